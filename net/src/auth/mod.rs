//! Tenants: who is calling ([`Caller`]), what each method needs ([`ACCESS`]), and the tower
//! layer every kvcache server runs that decides it before any handler sees a request.
//!
//! - [`Auth`]: a process's view of the tenants file ([`tenants`]), reloaded when the file
//!   changes (a mounted Kubernetes Secret is swapped in place) and on SIGHUP; without a file the
//!   process runs open — every caller is [`Caller::Open`] and may do everything, as a dev
//!   cluster does.
//! - With a file, every request names its caller: `authorization: Bearer <token>` (the token's
//!   SHA-256 looked up among the file's hashes; see `Tenants::identify` on timing) or, under
//!   mTLS, the SHA-256 of its client certificate. No credential, or one nobody has: UNAUTHENTICATED. kvcache's own
//!   processes show the service credential (`[service]`): nodes to the coordinator and to each
//!   other, workers to nodes on behalf of the tenant that called them.
//! - [`ACCESS`]: every method of every kvcache service with what it needs — nothing (health
//!   probes), any caller (the handler then keeps a tenant to its own namespaces, see
//!   [`Caller::check_namespace`]), or an operator (an admin tenant or the service). A method
//!   missing from the table is refused: a new RPC is closed until someone decides who may call it.
//! - Rate limits per tenant ([`limits`]): requests per second here, page bytes per second where
//!   the handlers learn them ([`Auth::charge_bytes`]); refusals are RESOURCE_EXHAUSTED with a
//!   `kvcache-retry-after-ms` trailer.
//! - Denials are counted per tenant and reason, and logged at most once per tenant per
//!   [`DENIAL_LOG_INTERVAL`] — never with the token.

pub mod limits;
pub mod tenants;

pub use tenants::{Tenant, Tenants, cert_sha256, token_sha256};

use crate::NetError;
use kvcache_telemetry::names;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::Status;
use tonic::codegen::http;

/// Trailer of a rate-limit refusal: milliseconds until a retry can pass.
pub const RETRY_AFTER_MS: &str = "kvcache-retry-after-ms";
/// How often a denied tenant's refusals are logged (all are counted).
pub const DENIAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often the tenants file is checked for changes.
pub const RELOAD_POLL: Duration = Duration::from_millis(250);

/// What a method needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing: health probes (Kubernetes' gRPC probes carry no credential).
    Public,
    /// Any authenticated caller; the handler keeps a tenant to its own namespaces.
    Caller,
    /// An admin tenant or kvcache's own processes.
    Operator,
}

/// Every method every kvcache server answers, with what it needs. [`Auth`] refuses a method
/// that is not here when tenants are configured.
pub const ACCESS: &[(&str, Access)] = &[
    ("/grpc.health.v1.Health/Check", Access::Public),
    ("/grpc.health.v1.Health/Watch", Access::Public),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Access::Caller),
    ("/kvcache.v1.Coordinator/RegisterNode", Access::Operator),
    ("/kvcache.v1.Coordinator/Heartbeat", Access::Operator),
    ("/kvcache.v1.Coordinator/Drain", Access::Operator),
    ("/kvcache.v1.Coordinator/RegisterWorker", Access::Operator),
    ("/kvcache.v1.Coordinator/ClusterStatus", Access::Operator),
    ("/kvcache.v1.Coordinator/GetShardMap", Access::Caller),
    ("/kvcache.v1.Coordinator/WatchShardMap", Access::Caller),
    ("/kvcache.v1.Coordinator/CreateNamespace", Access::Caller),
    ("/kvcache.v1.Coordinator/GetNamespace", Access::Caller),
    ("/kvcache.v1.Coordinator/ListNamespaces", Access::Caller),
    ("/kvcache.v1.CacheNode/PutPages", Access::Caller),
    ("/kvcache.v1.CacheNode/GetPages", Access::Caller),
    ("/kvcache.v1.CacheNode/GetRows", Access::Caller),
    ("/kvcache.v1.CacheNode/AppendTokens", Access::Caller),
    ("/kvcache.v1.CacheNode/AppendBatch", Access::Caller),
    ("/kvcache.v1.CacheNode/Lookup", Access::Caller),
    ("/kvcache.v1.CacheNode/MatchPrefix", Access::Caller),
    ("/kvcache.v1.CacheNode/DeleteSequence", Access::Caller),
    ("/kvcache.v1.CacheNode/CreateSequence", Access::Caller),
    ("/kvcache.v1.CacheNode/Lease", Access::Caller),
    ("/kvcache.v1.CacheNode/Release", Access::Caller),
    ("/kvcache.v1.CacheNode/Stats", Access::Caller),
    ("/kvcache.v1.CacheNode/EnsureNamespace", Access::Caller),
    ("/kvcache.v1.AttentionWorker/Decode", Access::Caller),
];

/// What a method needs, or `None` for a method kvcache does not know.
pub fn access(path: &str) -> Option<Access> {
    ACCESS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// Who made a request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The server runs without tenants: everything is allowed.
    Open,
    /// kvcache's own processes (the `[service]` credential).
    Service,
    /// A tenant.
    Tenant(Arc<Tenant>),
    /// No credential, on a method that needs none (health).
    Anonymous,
}

impl Caller {
    /// The caller of `request` (what the layer found; [`Caller::Open`] on a server without it).
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        Self::from_extensions(request.extensions())
    }

    /// The caller recorded in a request's extensions.
    pub fn from_extensions(e: &http::Extensions) -> Caller {
        e.get::<Caller>().cloned().unwrap_or(Caller::Open)
    }

    /// The tenant, when the caller is one.
    pub fn tenant(&self) -> Option<&Arc<Tenant>> {
        match self {
            Caller::Tenant(t) => Some(t),
            _ => None,
        }
    }

    /// May run cluster operations (and see every tenant's namespaces).
    pub fn is_operator(&self) -> bool {
        match self {
            Caller::Open | Caller::Service => true,
            Caller::Tenant(t) => t.admin,
            Caller::Anonymous => false,
        }
    }

    /// May read and write namespace data of every tenant (the open mode and kvcache's own
    /// processes; not an admin tenant, which runs the cluster but does not read tenants' data).
    pub fn is_trusted(&self) -> bool {
        matches!(self, Caller::Open | Caller::Service)
    }

    /// Whether a namespace of `tenant` is this caller's to use.
    pub fn owns(&self, tenant: &str) -> bool {
        match self {
            Caller::Open | Caller::Service => true,
            Caller::Tenant(t) => t.name == tenant,
            Caller::Anonymous => false,
        }
    }

    /// Whether this caller may see that a namespace of `tenant` exists (listing, shard maps).
    pub fn sees(&self, tenant: &str) -> bool {
        self.is_operator() || self.owns(tenant)
    }

    /// PERMISSION_DENIED unless namespace `name` (of `tenant`) is this caller's to use.
    pub fn check_namespace(&self, name: &str, tenant: &str) -> Result<(), Status> {
        if self.owns(tenant) {
            return Ok(());
        }
        let who = match self {
            Caller::Tenant(t) => format!("tenant {:?}", t.name),
            _ => "an anonymous caller".into(),
        };
        denied(self, "namespace");
        Err(Status::permission_denied(format!("namespace {name:?} does not belong to {who}")))
    }

    /// PERMISSION_DENIED unless the caller is an operator.
    pub fn check_operator(&self, what: &str) -> Result<(), Status> {
        if self.is_operator() {
            return Ok(());
        }
        denied(self, "operator");
        Err(Status::permission_denied(format!("{what} needs an admin tenant or a kvcache process")))
    }

    /// The metrics label: the tenant's name, "service", "open" or "anonymous".
    pub fn label(&self) -> String {
        match self {
            Caller::Open => "open".into(),
            Caller::Service => "service".into(),
            Caller::Tenant(t) => t.name.clone(),
            Caller::Anonymous => "anonymous".into(),
        }
    }
}

fn denied(caller: &Caller, reason: &'static str) {
    metrics::counter!(names::TENANT_DENIED, "tenant" => caller.label(), "reason" => reason).increment(1);
}

struct Inner {
    path: Option<PathBuf>,
    /// The file's text as last loaded (reloads compare it).
    text: Mutex<String>,
    tenants: RwLock<Arc<Tenants>>,
    /// Service token hashes added in memory (a dev cluster's own), kept across reloads.
    extra_service: Mutex<Vec<tenants::Digest32>>,
    limits: limits::Limits,
    /// Last time a denial of each tenant (or "unknown") was logged.
    logged: Mutex<HashMap<String, Instant>>,
}

/// A process's tenants: open (no file) or the file's, current. Cheap to clone.
#[derive(Clone, Default)]
pub struct Auth {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            None => f.write_str("Auth(open)"),
            Some(i) => write!(f, "Auth({} tenants)", i.tenants.read().tenants.len()),
        }
    }
}

impl Auth {
    /// No tenants: every caller may do everything.
    pub fn open() -> Self {
        Self::default()
    }

    /// The tenants file at `path` (`--tenants`); [`Auth::spawn_reloader`] keeps it current.
    pub fn load(path: &Path) -> Result<Self, NetError> {
        let text = read_file(path)?;
        Self::build(Some(path.to_owned()), text)
    }

    /// Tenants from a file's text (tests, embedded use); never reloaded.
    pub fn from_toml(text: &str) -> Result<Self, NetError> {
        Self::build(None, text.to_owned())
    }

    fn build(path: Option<PathBuf>, text: String) -> Result<Self, NetError> {
        let t = parse(path.as_deref(), &text)?;
        Ok(Self {
            inner: Some(Arc::new(Inner {
                path,
                text: Mutex::new(text),
                tenants: RwLock::new(Arc::new(t)),
                extra_service: Mutex::new(Vec::new()),
                limits: Default::default(),
                logged: Mutex::new(HashMap::new()),
            })),
        })
    }

    /// Accept `token` as the service credential too, across reloads (a dev cluster makes one up
    /// for its own processes, so its file needs no `[service]`). Every clone sees it.
    pub fn add_service_token(&self, token: &str) {
        let Some(i) = &self.inner else { return };
        let h = token_sha256(token);
        i.extra_service.lock().push(h);
        let mut cur = i.tenants.write();
        let mut t = (**cur).clone();
        t.add_service_token(h);
        *cur = Arc::new(t);
    }

    /// Whether tenants are enforced.
    pub fn enforced(&self) -> bool {
        self.inner.is_some()
    }

    /// The tenants now in force (empty when open).
    pub fn tenants(&self) -> Arc<Tenants> {
        self.inner.as_ref().map_or_else(|| Arc::new(Tenants::default()), |i| i.tenants.read().clone())
    }

    /// Whether the file has a service credential (processes that call others need it).
    pub fn has_service(&self) -> bool {
        self.inner.as_ref().is_none_or(|i| {
            let t = i.tenants.read();
            !t.service_tokens.is_empty() || !t.service_certs.is_empty()
        })
    }

    /// Read the file again; Ok(true) when it changed and the new tenants are in force. A file
    /// that does not parse leaves the old tenants in force (and says why).
    pub fn reload(&self) -> Result<bool, NetError> {
        let Some(i) = &self.inner else { return Ok(false) };
        let Some(path) = &i.path else { return Ok(false) };
        let text = read_file(path)?;
        if *i.text.lock() == text {
            return Ok(false);
        }
        let mut t = parse(Some(path), &text).inspect_err(|_| {
            metrics::counter!(names::TENANTS_RELOADS, "outcome" => "error").increment(1);
        })?;
        for h in i.extra_service.lock().iter() {
            t.add_service_token(*h);
        }
        i.limits.retain(|name| t.tenants.contains_key(name));
        *i.tenants.write() = Arc::new(t);
        *i.text.lock() = text;
        metrics::counter!(names::TENANTS_RELOADS, "outcome" => "ok").increment(1);
        Ok(true)
    }

    /// Reload the file when it changes (checked every [`RELOAD_POLL`]) and on SIGHUP, until
    /// every clone of this `Auth` is dropped. Needs a tokio runtime; does nothing when open.
    pub fn spawn_reloader(&self) -> Option<tokio::task::JoinHandle<()>> {
        let i = self.inner.as_ref()?;
        i.path.as_ref()?;
        let weak: Weak<Inner> = Arc::downgrade(i);
        Some(tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut iv = tokio::time::interval(RELOAD_POLL);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let hup_fut = async {
                    match hup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hup_fut = std::future::pending::<()>();
                tokio::select! {
                    _ = iv.tick() => {}
                    _ = hup_fut => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                let auth = Auth { inner: Some(inner) };
                match auth.reload() {
                    Ok(true) => tracing::info!(tenants = auth.tenants().tenants.len(), "tenants file reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "tenants file not reloaded; the previous one stays in force"),
                }
            }
        }))
    }

    /// Who sent a request with these headers and extensions: Ok(caller), or the status that
    /// refuses it (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED).
    pub fn authorize(&self, path: &str, headers: &http::HeaderMap, ext: &http::Extensions) -> Result<Caller, Status> {
        self.admit(path, headers, ext).map(|(c, _)| c)
    }

    /// [`Auth::authorize`], and the call's place among the tenant's calls in flight (held until
    /// the call ends).
    fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        ext: &http::Extensions,
    ) -> Result<(Caller, Option<limits::InFlight>), Status> {
        let Some(i) = &self.inner else { return Ok((Caller::Open, None)) };
        let Some(need) = access(path) else {
            self.log_denial("unknown", path, "method without an access rule");
            metrics::counter!(names::TENANT_DENIED, "tenant" => "unknown", "reason" => "method").increment(1);
            return Err(Status::permission_denied(format!("{path} has no access rule on this server")));
        };
        if need == Access::Public {
            return Ok((Caller::Anonymous, None));
        }
        let tenants = i.tenants.read().clone();
        let caller = match identify(&tenants, headers, ext) {
            Ok(c) => c,
            Err(why) => {
                self.log_denial("unknown", path, why);
                metrics::counter!(names::TENANT_DENIED, "tenant" => "unknown", "reason" => "unauthenticated")
                    .increment(1);
                return Err(Status::unauthenticated(why));
            }
        };
        if need == Access::Operator && !caller.is_operator() {
            self.log_denial(&caller.label(), path, "not an operator");
            return Err(caller.check_operator(path).unwrap_err());
        }
        if let Caller::Tenant(t) = &caller
            && let Some(rate) = t.requests_per_second
            && let Err(wait) = i.limits.request(&t.name, rate)
        {
            metrics::counter!(names::TENANT_THROTTLED, "tenant" => t.name.clone(), "limit" => "requests").increment(1);
            return Err(throttled(format!("tenant {:?} is over its {rate} requests per second", t.name), wait));
        }
        let mut inflight = None;
        if let Caller::Tenant(t) = &caller
            && let Some(max) = t.concurrent_requests
        {
            match i.limits.enter(&t.name, max) {
                Some(g) => inflight = Some(g),
                None => {
                    metrics::counter!(names::TENANT_THROTTLED, "tenant" => t.name.clone(), "limit" => "concurrency")
                        .increment(1);
                    return Err(throttled(
                        format!("tenant {:?} has its {max} concurrent calls in flight", t.name),
                        Duration::from_millis(10),
                    ));
                }
            }
        }
        match &caller {
            Caller::Tenant(t) => t
                .requests
                .get_or_init(|| metrics::counter!(names::TENANT_REQUESTS, "tenant" => t.name.clone()))
                .increment(1),
            _ => metrics::counter!(names::TENANT_REQUESTS, "tenant" => caller.label()).increment(1),
        }
        Ok((caller, inflight))
    }

    /// Charge `n` page bytes to the caller's bytes-per-second limit: RESOURCE_EXHAUSTED (with
    /// the retry hint) while its bucket is in debt.
    pub fn charge_bytes(&self, caller: &Caller, n: u64) -> Result<(), Status> {
        let (Some(i), Caller::Tenant(t)) = (&self.inner, caller) else { return Ok(()) };
        let Some(rate) = t.bytes_per_second else { return Ok(()) };
        i.limits.bytes(&t.name, rate as f64, n).map_err(|wait| {
            metrics::counter!(names::TENANT_THROTTLED, "tenant" => t.name.clone(), "limit" => "bytes").increment(1);
            throttled(format!("tenant {:?} is over its {rate} page bytes per second", t.name), wait)
        })
    }

    /// Charge `n` page bytes already sent to the caller's bytes-per-second limit (never
    /// refused: the debt makes the caller's next requests wait).
    pub fn debit(&self, caller: &Caller, n: u64) {
        let (Some(i), Caller::Tenant(t)) = (&self.inner, caller) else { return };
        let Some(rate) = t.bytes_per_second else { return };
        let _ = i.limits.bytes(&t.name, rate as f64, 0);
        i.limits.force(&t.name, n);
    }

    /// Log a denial, at most once per `who` per [`DENIAL_LOG_INTERVAL`].
    fn log_denial(&self, who: &str, path: &str, why: &str) {
        let Some(i) = &self.inner else { return };
        let now = Instant::now();
        let mut logged = i.logged.lock();
        if logged.get(who).is_some_and(|t| now.duration_since(*t) < DENIAL_LOG_INTERVAL) {
            return;
        }
        logged.insert(who.to_owned(), now);
        if logged.len() > 4096 {
            logged.retain(|_, t| now.duration_since(*t) < DENIAL_LOG_INTERVAL);
        }
        tracing::warn!(
            tenant = who,
            method = path,
            reason = why,
            "request denied (further denials of this tenant counted, logged every 10 s)"
        );
    }
}

fn throttled(msg: String, wait: Duration) -> Status {
    let ms = wait.as_millis().max(1) as u64;
    let mut s = Status::resource_exhausted(format!("{msg}; retry in {ms} ms"));
    if let Ok(v) = ms.to_string().parse() {
        s.metadata_mut().insert(RETRY_AFTER_MS, v);
    }
    s
}

fn read_file(path: &Path) -> Result<String, NetError> {
    std::fs::read_to_string(path).map_err(|source| NetError::Read { what: "--tenants", path: path.to_owned(), source })
}

fn parse(path: Option<&Path>, text: &str) -> Result<Tenants, NetError> {
    Tenants::parse(text).map_err(|e| match path {
        Some(p) => NetError::Config(format!("tenants file {}: {e}", p.display())),
        None => NetError::Config(format!("tenants: {e}")),
    })
}

/// The caller a request's credential names.
fn identify(t: &Tenants, headers: &http::HeaderMap, ext: &http::Extensions) -> Result<Caller, &'static str> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let token = v
            .to_str()
            .ok()
            .and_then(|s| s.strip_prefix("Bearer ").or_else(|| s.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or("the authorization header is not \"Bearer <token>\"")?;
        return match t.identify(&token_sha256(token)) {
            Some(None) => Ok(Caller::Service),
            Some(Some(t)) => Ok(Caller::Tenant(t)),
            None => Err("unknown token"),
        };
    }
    if let Some(certs) = ext
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
        && let Some(leaf) = certs.first()
    {
        use sha2::Digest;
        let hash: tenants::Digest32 = sha2::Sha256::digest(leaf.as_ref()).into();
        return match t.identify(&hash) {
            Some(None) => Ok(Caller::Service),
            Some(Some(t)) => Ok(Caller::Tenant(t)),
            None => Err("the client certificate is not a tenant's: send authorization: Bearer <token>"),
        };
    }
    Err("no credential: send authorization: Bearer <token>")
}

/// The tower layer that runs [`Auth::authorize`] on every request and records the [`Caller`]
/// in its extensions (see [`crate::server`]).
#[derive(Clone, Debug, Default)]
pub struct AuthLayer {
    auth: Auth,
}

impl AuthLayer {
    /// A layer enforcing `auth`.
    pub fn new(auth: Auth) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, auth: self.auth.clone() }
    }
}

/// See [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    auth: Auth,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if !self.auth.enforced() {
            req.extensions_mut().insert(Caller::Open);
            return Box::pin(self.inner.call(req));
        }
        match self.auth.admit(req.uri().path(), req.headers(), req.extensions()) {
            Ok((caller, None)) => {
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Ok((caller, Some(inflight))) => {
                req.extensions_mut().insert(caller);
                let call = self.inner.call(req);
                // The call counts until its response body ends (a stream, until its last message).
                Box::pin(async move {
                    let r = call.await?;
                    Ok(r.map(|b| tonic::body::Body::new(Counted { inner: b, _inflight: inflight })))
                })
            }
            Err(s) => Box::pin(std::future::ready(Ok(s.into_http()))),
        }
    }
}

/// A response body that holds its call's place among the tenant's calls in flight.
struct Counted {
    inner: tonic::body::Body,
    _inflight: limits::InFlight,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_every_kvcache_service_has_an_access_rule() {
        use prost::Message;
        let set = prost_types_lite::FileDescriptorSet::decode(kvcache_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut n = 0;
        for f in &set.file {
            for s in &f.service {
                for m in &s.method {
                    let path = format!(
                        "/{}.{}/{}",
                        f.package.clone().unwrap_or_default(),
                        s.name.clone().unwrap_or_default(),
                        m.name.clone().unwrap_or_default()
                    );
                    assert!(access(&path).is_some(), "{path} has no access rule in ACCESS");
                    n += 1;
                }
            }
        }
        assert!(n >= 23, "only {n} methods found in the descriptor set");
    }

    /// Just enough of descriptor.proto to list services and methods.
    mod prost_types_lite {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct FileDescriptorSet {
            #[prost(message, repeated, tag = "1")]
            pub file: Vec<FileDescriptorProto>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct FileDescriptorProto {
            #[prost(string, optional, tag = "2")]
            pub package: Option<String>,
            #[prost(message, repeated, tag = "6")]
            pub service: Vec<ServiceDescriptorProto>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct ServiceDescriptorProto {
            #[prost(string, optional, tag = "1")]
            pub name: Option<String>,
            #[prost(message, repeated, tag = "2")]
            pub method: Vec<MethodDescriptorProto>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct MethodDescriptorProto {
            #[prost(string, optional, tag = "1")]
            pub name: Option<String>,
        }
    }

    fn file() -> String {
        format!(
            "[service]\ntoken_sha256 = \"{}\"\n[tenants.a]\ntoken_sha256 = \"{}\"\nrequests_per_second = 2\n[tenants.ops]\ntoken_sha256 = \"{}\"\nadmin = true\n",
            hex::encode(token_sha256("svc")),
            hex::encode(token_sha256("ta")),
            hex::encode(token_sha256("tops")),
        )
    }

    fn headers(token: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(t) = token {
            h.insert(http::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        }
        h
    }

    #[test]
    fn callers_are_named_by_their_token_and_refused_by_rule() {
        let auth = Auth::from_toml(&file()).unwrap();
        let ext = http::Extensions::new();
        let shard = "/kvcache.v1.Coordinator/GetShardMap";
        let drain = "/kvcache.v1.Coordinator/Drain";
        assert!(matches!(auth.authorize(shard, &headers(Some("svc")), &ext), Ok(Caller::Service)));
        assert!(matches!(auth.authorize(shard, &headers(Some("ta")), &ext), Ok(Caller::Tenant(t)) if t.name == "a"));
        for (h, says) in [(None, "no credential"), (Some("nope"), "unknown token")] {
            let e = auth.authorize(shard, &headers(h), &ext).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert!(e.message().contains(says), "{}", e.message());
        }
        let mut bad = http::HeaderMap::new();
        bad.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(auth.authorize(shard, &bad, &ext).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(
            auth.authorize(drain, &headers(Some("ta")), &ext).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(auth.authorize(drain, &headers(Some("tops")), &ext).is_ok());
        assert!(matches!(auth.authorize("/grpc.health.v1.Health/Check", &headers(None), &ext), Ok(Caller::Anonymous)));
        let e = auth.authorize("/kvcache.v1.CacheNode/NewThing", &headers(Some("svc")), &ext).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // Open: everything, no credential.
        assert!(matches!(Auth::open().authorize(drain, &headers(None), &ext), Ok(Caller::Open)));
    }

    #[test]
    fn a_tenant_over_its_request_rate_is_told_when_to_retry() {
        let auth = Auth::from_toml(&file()).unwrap();
        let ext = http::Extensions::new();
        let p = "/kvcache.v1.Coordinator/GetShardMap";
        auth.authorize(p, &headers(Some("ta")), &ext).unwrap();
        auth.authorize(p, &headers(Some("ta")), &ext).unwrap();
        let e = auth.authorize(p, &headers(Some("ta")), &ext).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let ms: u64 = e.metadata().get(RETRY_AFTER_MS).unwrap().to_str().unwrap().parse().unwrap();
        assert!((1..=500).contains(&ms), "{ms}");
        // Other tenants and the service are not limited by it.
        auth.authorize(p, &headers(Some("tops")), &ext).unwrap();
        auth.authorize(p, &headers(Some("svc")), &ext).unwrap();
    }

    #[test]
    fn namespaces_belong_to_their_tenant() {
        let auth = Auth::from_toml(&file()).unwrap();
        let t = auth.tenants();
        let a = Caller::Tenant(t.tenants["a"].clone());
        let ops = Caller::Tenant(t.tenants["ops"].clone());
        a.check_namespace("n", "a").unwrap();
        let e = a.check_namespace("n", "b").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("tenant \"a\""), "{}", e.message());
        // An admin runs the cluster and sees every namespace, but does not use another's data.
        assert!(ops.sees("a") && !ops.owns("a"));
        assert!(Caller::Service.owns("a") && Caller::Open.owns("a"));
        assert!(!Caller::Anonymous.owns("a"));
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_leaves_the_old_in_force() {
        let dir = std::env::temp_dir().join(format!("kvcache-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tenants.toml");
        std::fs::write(&path, file()).unwrap();
        let auth = Auth::load(&path).unwrap();
        auth.add_service_token("dev");
        let ext = http::Extensions::new();
        let p = "/kvcache.v1.Coordinator/ListNamespaces";
        assert!(auth.authorize(p, &headers(Some("tops")), &ext).is_ok());
        assert!(!auth.reload().unwrap());
        // Revoke ops.
        std::fs::write(&path, file().replace("[tenants.ops]", "[tenants.gone]")).unwrap();
        assert!(auth.reload().unwrap());
        assert!(matches!(auth.authorize(p, &headers(Some("tops")), &ext), Ok(Caller::Tenant(t)) if t.name == "gone"));
        std::fs::write(&path, "[tenants.a]\nqouta = 1").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.authorize(p, &headers(Some("ta")), &ext).is_ok());
        // The in-memory service token survives reloads.
        assert!(matches!(auth.authorize(p, &headers(Some("dev")), &ext), Ok(Caller::Service)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
