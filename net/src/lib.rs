//! kvcache-net: how kvcache processes reach each other.
//!
//! - [`TlsArgs`] → [`Tls`]: TLS (rustls with ring) for every listener and every channel, from PEM
//!   files. A certificate and key make a server speak TLS and are the identity a process shows
//!   when it calls others; a CA makes servers require client certificates signed by it (mTLS)
//!   and clients verify servers against it.
//! - [`channel`] / [`endpoint`]: lazily connecting channels tuned for page streams (large HTTP/2
//!   windows, TCP_NODELAY), over TLS when configured.
//! - [`server`], [`incoming`], [`reflection`]: the tonic server every process runs, tuned the
//!   same way, with TLS when configured; [`serve`]: the message limit, bounded connections and
//!   streams, and [`ServeError`], the error of every server's `run`.
//! - [`coordinator`]: the [`CoordinatorLink`] — leader redirects, replica failover and the
//!   watched shard map, for every process that follows the cluster.
//! - [`auth`]: tenants — who is calling (a bearer token or a client certificate), what every
//!   method needs, per-tenant rate limits; the layer every server runs ([`server`]) and the
//!   bearer token every [`Channel`] carries ([`Tls::with_token`]).
//! - [`DataDirLock`]: the exclusive lock a process holds on each data directory it owns.
//! - [`check_address`]: `host:port` checked before anything is dialed.
//! - [`frames`]: gRPC messages decoded from the HTTP/2 frames as they arrived (no reassembly
//!   copy), for the calls that carry page payloads.
//! - [`serve_health`]: a plaintext listener with only `grpc.health.v1`, for Kubernetes' native
//!   gRPC probes (which cannot speak TLS) when the main port requires it.

pub mod auth;
pub mod coordinator;
pub mod datadir;
pub mod frames;
pub mod serve;

pub use auth::{Auth, Caller};
pub use coordinator::CoordinatorLink;
pub use datadir::{DataDirError, DataDirLock};
pub use serve::{MAX_MESSAGE_BYTES, ServeError, incoming};

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::codegen::http;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// What can go wrong setting up transport.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A TLS file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file ("--tls-cert" ...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Flags that do not fit together.
    #[error("{0}")]
    Config(String),
    /// An address tonic cannot use.
    #[error("bad address {addr:?}: {reason}")]
    Address {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// tonic refused the TLS settings (e.g. a key that is not PEM).
    #[error("TLS: {0}")]
    Tls(String),
}

/// TLS and credential flags shared by every `kvcache` command that serves or calls.
#[derive(clap::Args, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate (chain) of this process: its servers speak TLS, and it shows the
    /// certificate when it calls others. Needs --tls-key.
    #[arg(long, env = "KVCACHE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KVCACHE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: servers require client certificates signed by it (mTLS), clients verify
    /// servers against it. Calling a TLS server needs it.
    #[arg(long, env = "KVCACHE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Name to verify servers' certificates against (default: the host of each address).
    #[arg(long, env = "KVCACHE_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Bearer token every call carries, for clusters with tenants: a tenant's token for client
    /// commands (status, load, demo, drain), kvcache's service token for nodes and workers.
    #[arg(long, env = "KVCACHE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl std::fmt::Debug for TlsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsArgs")
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_ca", &self.tls_ca)
            .field("tls_server_name", &self.tls_server_name)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The tenants flag of every `kvcache` server.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TenantsArgs {
    /// Tenants file (TOML: token hashes, quotas, admins; see README "Tenants"): every call must
    /// then carry a tenant's token (or the service token), and each tenant sees only its own
    /// namespaces. Reloaded when the file changes and on SIGHUP. Without it the server is open
    /// to anyone who can reach its port.
    #[arg(long, env = "KVCACHE_TENANTS")]
    pub tenants: Option<PathBuf>,
}

impl TenantsArgs {
    /// The tenants to enforce: the file's (kept current by a reload task), or open.
    pub fn load(&self) -> Result<Auth, NetError> {
        match &self.tenants {
            None => Ok(Auth::open()),
            Some(p) => {
                let a = Auth::load(p)?;
                a.spawn_reloader();
                Ok(a)
            }
        }
    }
}

/// How a process's connections are secured: loaded TLS settings (the default is plaintext both
/// ways) and the bearer token its calls carry when the cluster has tenants ([`Tls::with_token`]).
#[derive(Clone, Default)]
pub struct Tls {
    server: Option<ServerTlsConfig>,
    client: Option<ClientTlsConfig>,
    bearer: Option<http::HeaderValue>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server", &self.server.is_some())
            .field("client", &self.client.is_some())
            .field("token", &self.bearer.is_some())
            .finish()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, NetError> {
    std::fs::read(path).map_err(|source| NetError::Read { what, path: path.to_owned(), source })
}

impl Tls {
    /// Plaintext.
    pub fn none() -> Self {
        Self::default()
    }

    /// Plaintext both ways, no token.
    pub fn is_plaintext(&self) -> bool {
        self.server.is_none() && self.client.is_none() && self.bearer.is_none()
    }

    /// Load the files named by `args`.
    pub fn load(args: &TlsArgs) -> Result<Self, NetError> {
        let identity = match (&args.tls_cert, &args.tls_key) {
            (Some(c), Some(k)) => Some((read("--tls-cert", c)?, read("--tls-key", k)?)),
            (None, None) => None,
            _ => return Err(NetError::Config("--tls-cert and --tls-key go together".into())),
        };
        let ca = args.tls_ca.as_deref().map(|p| read("--tls-ca", p)).transpose()?;
        let tls = Self::from_pem(
            identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
            ca.as_deref(),
            args.tls_server_name.clone(),
        )?;
        match &args.token {
            Some(t) => tls.with_token(t).map_err(|e| NetError::Config(format!("--token: {e}"))),
            None => Ok(tls),
        }
    }

    /// From PEM bytes: `identity` = (certificate chain, key), `ca` = the CA bundle.
    pub fn from_pem(
        identity: Option<(&[u8], &[u8])>,
        ca: Option<&[u8]>,
        server_name: Option<String>,
    ) -> Result<Self, NetError> {
        for (what, pem) in [("certificate", identity.map(|i| i.0)), ("key", identity.map(|i| i.1)), ("CA", ca)] {
            if let Some(p) = pem
                && !p.windows(11).any(|w| w == b"-----BEGIN ")
            {
                return Err(NetError::Tls(format!("the {what} file is not PEM")));
            }
        }
        let identity = identity.map(|(c, k)| Identity::from_pem(c, k));
        let ca = ca.map(Certificate::from_pem);
        let server = identity.clone().map(|id| {
            let s = ServerTlsConfig::new().identity(id);
            match &ca {
                Some(ca) => s.client_ca_root(ca.clone()),
                None => s,
            }
        });
        let client = match (&ca, &identity) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(NetError::Config(
                    "--tls-cert without --tls-ca: calls to other kvcache processes could not verify them".into(),
                ));
            }
            (Some(ca), id) => {
                let mut c = ClientTlsConfig::new().ca_certificate(ca.clone());
                if let Some(id) = id {
                    c = c.identity(id.clone());
                }
                if let Some(n) = server_name {
                    c = c.domain_name(n);
                }
                Some(c)
            }
        };
        Ok(Self { server, client, bearer: None })
    }

    /// These settings with every call carrying `authorization: Bearer <token>` (a tenant's
    /// token, or the service token kvcache's processes show each other). The header value is
    /// marked sensitive: it never appears in debug output.
    pub fn with_token(mut self, token: &str) -> Result<Self, NetError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(NetError::Config("the token is empty".into()));
        }
        let mut v = http::HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| NetError::Config("the token has characters a header cannot carry".into()))?;
        v.set_sensitive(true);
        self.bearer = Some(v);
        Ok(self)
    }

    /// Whether calls carry a bearer token.
    pub fn has_token(&self) -> bool {
        self.bearer.is_some()
    }

    /// Whether this process's servers speak TLS.
    pub fn serves_tls(&self) -> bool {
        self.server.is_some()
    }

    /// The client side of these settings (CA, identity, server name), for channels built
    /// elsewhere (the coordinator's etcd client); `None` when calls are plaintext.
    pub fn client_config(&self) -> Option<ClientTlsConfig> {
        self.client.clone()
    }

    /// Whether calls go over TLS.
    pub fn calls_tls(&self) -> bool {
        self.client.is_some()
    }
}

/// An endpoint for `addr` (`host:port`, or a URL): `https` with TLS when `tls` calls over TLS,
/// tuned for page streams.
pub fn endpoint(addr: &str, tls: &Tls) -> Result<Endpoint, NetError> {
    check_address(addr)?;
    let bad = |reason: String| NetError::Address { addr: addr.to_owned(), reason };
    let hostport = addr.strip_prefix("http://").or_else(|| addr.strip_prefix("https://")).unwrap_or(addr);
    let scheme = if tls.client.is_some() { "https" } else { "http" };
    let e = Endpoint::from_shared(format!("{scheme}://{hostport}"))
        .map_err(|e| bad(e.to_string()))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        .max_frame_size((1 << 20) - 1)
        .http2_adaptive_window(false);
    match &tls.client {
        Some(c) => e.tls_config(c.clone()).map_err(|e| NetError::Tls(e.to_string())),
        None => Ok(e),
    }
}

/// Check that `addr` is `host:port` (an `http://` or `https://` prefix allowed) with a port in
/// 1..=65535: without this check `localhost` would dial port 80 and `127.0.0.1:70000` fail later
/// with a message that does not name the address.
pub fn check_address(addr: &str) -> Result<(), NetError> {
    let bad = |reason: String| NetError::Address { addr: addr.to_owned(), reason };
    let hostport = addr.strip_prefix("http://").or_else(|| addr.strip_prefix("https://")).unwrap_or(addr);
    let Some((host, port)) = hostport.rsplit_once(':') else {
        return Err(bad("no port: write host:port, e.g. 127.0.0.1:7000".into()));
    };
    if host.is_empty() {
        return Err(bad("no host: write host:port, e.g. 127.0.0.1:7000".into()));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad("an IPv6 address needs brackets: [::1]:7000".into()));
    }
    match port.parse::<u16>() {
        Ok(0) => Err(bad("port 0 cannot be dialed".into())),
        Ok(_) => Ok(()),
        Err(_) => Err(bad(format!("port {port:?} is not a number in 1..=65535"))),
    }
}

/// What a failed call comes down to, for people: the innermost cause of `s` ("Connection
/// refused (os error 111)"), or its message when it has none.
pub fn root_cause(s: &tonic::Status) -> String {
    let mut e: &dyn std::error::Error = s;
    while let Some(next) = e.source() {
        e = next;
    }
    if std::ptr::addr_eq(e, s as &dyn std::error::Error) { s.message().to_owned() } else { e.to_string() }
}

/// A lazily connecting [`endpoint`] channel, its calls carrying the token of `tls`.
pub fn channel(addr: &str, tls: &Tls) -> Result<Channel, NetError> {
    Ok(Channel::new(endpoint(addr, tls)?.connect_lazy(), tls))
}

/// A tonic channel whose calls carry this process's bearer token (when it has one): what every
/// kvcache client stub is built on.
#[derive(Clone, Debug)]
pub struct Channel {
    inner: tonic::transport::Channel,
    bearer: Option<http::HeaderValue>,
}

impl Channel {
    /// `inner` with the token of `tls`.
    pub fn new(inner: tonic::transport::Channel, tls: &Tls) -> Self {
        Self { inner, bearer: tls.bearer.clone() }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(b) = &self.bearer {
            // A token the caller put on the request itself wins (a worker forwarding one).
            req.headers_mut().entry(http::header::AUTHORIZATION).or_insert_with(|| b.clone());
        }
        self.inner.call(req)
    }
}

/// The layers every kvcache server runs under (see [`server`]).
pub type ServerLayers = tower::layer::util::Stack<
    auth::AuthLayer,
    tower::layer::util::Stack<
        tower::util::MapResponseLayer<fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body>>,
        tower::layer::util::Identity,
    >,
>;

/// A message over the size limit is RESOURCE_EXHAUSTED, gRPC's convention (and what every
/// kvcache `.proto` says); tonic's decoder answers OUT_OF_RANGE. No kvcache handler answers
/// OUT_OF_RANGE, so the rewrite touches only tonic's limit. The status of a refused request
/// travels in the response head (trailers-only), which is where this looks.
pub fn size_limit_status(mut r: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    const OUT_OF_RANGE: &str = "11";
    const RESOURCE_EXHAUSTED: &str = "8";
    if r.headers().get("grpc-status").is_some_and(|v| v == OUT_OF_RANGE) {
        r.headers_mut().insert("grpc-status", http::HeaderValue::from_static(RESOURCE_EXHAUSTED));
    }
    r
}

/// A tonic server tuned for large page streams (big HTTP/2 windows and frames, TCP_NODELAY), with
/// TLS when `exposure` serves it, every request authorized by its tenants ([`auth`]), and
/// over-size messages answered RESOURCE_EXHAUSTED.
pub fn server(exposure: &Exposure) -> Result<Server<ServerLayers>, NetError> {
    let tls = &exposure.tls;
    let size_status: fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> = size_limit_status;
    let s = Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some((1 << 20) - 1))
        .http2_adaptive_window(Some(false))
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(serve::MAX_STREAMS_PER_CONNECTION))
        .layer(tower::util::MapResponseLayer::new(size_status))
        .layer(auth::AuthLayer::new(exposure.auth.clone()));
    match &tls.server {
        Some(c) => s.tls_config(c.clone()).map_err(|e| NetError::Tls(e.to_string())),
        None => Ok(s),
    }
}

/// The gRPC reflection service over the kvcache contract.
pub fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    NetError,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kvcache_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| NetError::Config(e.to_string()))
}

/// How a server is exposed: its listener's TLS, who may call it, its probe listener.
#[derive(Default)]
pub struct Exposure {
    /// TLS of the main listener.
    pub tls: Tls,
    /// The tenants it enforces (open by default).
    pub auth: Auth,
    /// A plaintext listener serving only `grpc.health.v1` (for probes).
    pub health_listener: Option<TcpListener>,
}

impl Exposure {
    /// Plaintext, no probe listener.
    pub fn plaintext() -> Self {
        Self::default()
    }
}

/// Serve only `health` on `listener`, in plaintext, until the task is dropped or aborted.
pub fn serve_health<S>(
    listener: TcpListener,
    health: tonic_health::pb::health_server::HealthServer<S>,
) -> tokio::task::JoinHandle<()>
where
    S: tonic_health::pb::health_server::Health,
{
    tokio::spawn(async move {
        if let Err(e) = Server::builder().add_service(health).serve_with_incoming(incoming(listener)).await {
            tracing::error!(error = %e, "health listener failed");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_by_default_and_flags_that_do_not_fit_are_refused() {
        let t = Tls::load(&TlsArgs::default()).unwrap();
        assert!(!t.serves_tls() && !t.calls_tls());
        assert!(endpoint("127.0.0.1:1", &t).unwrap().uri().to_string().starts_with("http://"));
        let dir = std::env::temp_dir().join(format!("kvcache-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("c.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        let only_cert = TlsArgs { tls_cert: Some(cert.clone()), ..Default::default() };
        assert!(matches!(Tls::load(&only_cert), Err(NetError::Config(m)) if m.contains("--tls-key")));
        let missing = TlsArgs { tls_ca: Some(dir.join("absent.pem")), ..Default::default() };
        assert!(matches!(Tls::load(&missing), Err(NetError::Read { what: "--tls-ca", .. })));
        let not_pem = TlsArgs { tls_ca: Some(cert), ..Default::default() };
        assert!(matches!(Tls::load(&not_pem), Err(NetError::Tls(m)) if m.contains("CA")));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(endpoint("bad host:x", &Tls::none()), Err(NetError::Address { .. })));
    }

    #[test]
    fn an_address_without_a_usable_port_is_refused_with_what_is_wrong() {
        for ok in ["127.0.0.1:7000", "localhost:1", "http://node-0:7070", "https://[::1]:65535"] {
            check_address(ok).unwrap();
        }
        for (bad, reason) in [
            ("localhost", "no port"),
            ("127.0.0.1:70000", "port \"70000\" is not a number in 1..=65535"),
            ("127.0.0.1:0", "port 0 cannot be dialed"),
            (":7000", "no host"),
            ("::1:7000", "IPv6 address needs brackets"),
            ("node:70x", "port \"70x\""),
        ] {
            let e = check_address(bad).unwrap_err().to_string();
            assert!(e.contains(reason) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn a_coordinator_link_refuses_an_empty_or_unusable_replica_list() {
        assert!(matches!(CoordinatorLink::new(" , ", &Tls::none(), Duration::from_secs(1)), Err(NetError::Config(_))));
        let e = CoordinatorLink::new("a:7000,localhost", &Tls::none(), Duration::from_secs(1)).err().unwrap();
        assert!(e.to_string().contains("\"localhost\": no port"), "{e}");
    }

    #[tokio::test]
    async fn a_call_no_replica_answers_names_the_replicas() {
        // Two ports nothing listens on (bound, then closed).
        let ports: Vec<u16> =
            (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
        let addrs = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
        let link = CoordinatorLink::new(&addrs, &Tls::none(), Duration::from_secs(2)).unwrap();
        let e = link.refresh().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().starts_with(&format!("cannot reach the coordinator at {addrs} (")), "{}", e.message());
    }
}
