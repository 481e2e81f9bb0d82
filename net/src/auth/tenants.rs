//! The tenants file: who may call, with which credential, and what each tenant may hold.
//!
//! ```toml
//! # What nodes, workers and coordinators show each other (--service-token).
//! [service]
//! token_sha256 = "<hex sha256 of the service token>"
//!
//! [tenants.acme]
//! token_sha256 = "<hex sha256 of the token>"   # or a list, to rotate without downtime
//! cert_sha256 = ["<hex sha256 of a client certificate (DER)>"]   # mTLS identities, optional
//! quota = "64GiB"                 # bytes of cache across the cluster (default: no quota)
//! reserved = "8GiB"               # never evicted by other tenants' writes below this (default 0)
//! admin = false                   # cluster operations: drain, register, status of all
//! requests_per_second = 2000      # default: unlimited
//! bytes_per_second = "4GiB"       # page bytes written and read; default: unlimited
//! concurrent_requests = 256       # calls in flight at once, streams until they end; default: unlimited
//! ```
//!
//! Only hashes are stored: a token never appears in the file, in memory past the hash of a
//! request, or in a log line. Unknown keys are refused (a misspelt `qouta` would otherwise be a
//! tenant without a quota).

use kvcache_core::size::parse_bytes;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A SHA-256 digest of a token or a certificate.
pub type Digest32 = [u8; 32];

/// SHA-256 of a token, the form the file stores it in.
pub fn token_sha256(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

/// SHA-256 of a certificate's DER, the form `cert_sha256` takes.
pub fn cert_sha256(der: &[u8]) -> Digest32 {
    Sha256::digest(der).into()
}

/// One tenant, as the file defines it.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// Its name (the `tenant` of the namespaces it creates).
    pub name: String,
    /// May run cluster operations.
    pub admin: bool,
    /// Bytes of cache it may hold across the cluster.
    pub quota: Option<u64>,
    /// Bytes other tenants' writes never evict it below.
    pub reserved: u64,
    /// Requests per second (a burst of one second's worth).
    pub requests_per_second: Option<f64>,
    /// Page bytes per second written and read.
    pub bytes_per_second: Option<u64>,
    /// Calls in flight at once (a streamed response counts until it ends).
    pub concurrent_requests: Option<u32>,
    pub(crate) tokens: Vec<Digest32>,
    pub(crate) certs: Vec<Digest32>,
    /// Its requests counter, registered on first use (after the process installed its recorder).
    pub(crate) requests: std::sync::OnceLock<metrics::Counter>,
}

impl PartialEq for Tenant {
    fn eq(&self, o: &Self) -> bool {
        (&self.name, self.admin, self.quota, self.reserved, self.requests_per_second, self.bytes_per_second)
            == (&o.name, o.admin, o.quota, o.reserved, o.requests_per_second, o.bytes_per_second)
            && (self.concurrent_requests, &self.tokens, &self.certs) == (o.concurrent_requests, &o.tokens, &o.certs)
    }
}

/// A parsed tenants file.
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    /// By name.
    pub tenants: BTreeMap<String, Arc<Tenant>>,
    pub(crate) service_tokens: Vec<Digest32>,
    pub(crate) service_certs: Vec<Digest32>,
    /// Every credential digest: the tenant it names (`None`: the service).
    by_digest: HashMap<Digest32, Option<Arc<Tenant>>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Int(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    token_sha256: Option<OneOrMany>,
    #[serde(default)]
    cert_sha256: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTenant {
    token_sha256: Option<OneOrMany>,
    #[serde(default)]
    cert_sha256: Vec<String>,
    quota: Option<Size>,
    reserved: Option<Size>,
    #[serde(default)]
    admin: bool,
    requests_per_second: Option<f64>,
    bytes_per_second: Option<Size>,
    concurrent_requests: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    service: Option<FileService>,
    #[serde(default)]
    tenants: BTreeMap<String, FileTenant>,
}

fn digest(what: &str, s: &str) -> Result<Digest32, String> {
    // `openssl x509 -fingerprint -sha256` writes AB:CD:...; sha256sum writes lowercase hex.
    let clean: String = s.trim().chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&clean, &mut out).map_err(|_| {
        format!("{what}: {} characters is not a hex SHA-256 (64 hex digits, colons allowed)", clean.len())
    })?;
    Ok(out)
}

fn size(what: &str, s: Size) -> Result<u64, String> {
    match s {
        Size::Int(n) => Ok(n),
        Size::Text(t) => parse_bytes(&t).map_err(|e| format!("{what}: {e}")),
    }
}

fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
}

impl Tenants {
    /// Parse the file's text; the error says which key of which tenant is wrong.
    pub fn parse(text: &str) -> Result<Tenants, String> {
        let f: File = toml::from_str(text).map_err(|e| {
            // One line (toml's own rendering quotes the source over several).
            let line = e.span().map_or(0, |s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            format!("line {line}: {}", e.message().trim())
        })?;
        let mut out = Tenants::default();
        if let Some(s) = f.service {
            for t in s.token_sha256.map(OneOrMany::into_vec).unwrap_or_default() {
                out.service_tokens.push(digest("[service] token_sha256", &t)?);
            }
            for c in &s.cert_sha256 {
                out.service_certs.push(digest("[service] cert_sha256", c)?);
            }
        }
        let mut seen: BTreeMap<Digest32, String> = BTreeMap::new();
        for d in out.service_tokens.iter().chain(&out.service_certs) {
            seen.insert(*d, "[service]".into());
        }
        for (name, t) in f.tenants {
            let at = |k: &str| format!("[tenants.{name}] {k}");
            if !valid_name(&name) {
                return Err(format!(
                    "tenant name {name:?}: expected 1-63 of a-z 0-9 . _ - starting with a letter or digit"
                ));
            }
            let tokens = t
                .token_sha256
                .map(OneOrMany::into_vec)
                .unwrap_or_default()
                .iter()
                .map(|h| digest(&at("token_sha256"), h))
                .collect::<Result<Vec<_>, _>>()?;
            let certs = t.cert_sha256.iter().map(|h| digest(&at("cert_sha256"), h)).collect::<Result<Vec<_>, _>>()?;
            if tokens.is_empty() && certs.is_empty() {
                return Err(format!("[tenants.{name}]: no token_sha256 or cert_sha256: nobody could call as it"));
            }
            for d in tokens.iter().chain(&certs) {
                if let Some(other) = seen.insert(*d, format!("[tenants.{name}]")) {
                    return Err(format!("[tenants.{name}] and {other} share a credential: each must be its own"));
                }
            }
            let quota = t.quota.map(|q| size(&at("quota"), q)).transpose()?;
            let reserved = t.reserved.map(|r| size(&at("reserved"), r)).transpose()?.unwrap_or(0);
            if let Some(q) = quota
                && reserved > q
            {
                return Err(format!("{}: {reserved} bytes is more than its quota ({q})", at("reserved")));
            }
            if let Some(r) = t.requests_per_second
                && !(r.is_finite() && r > 0.0)
            {
                return Err(format!("{}: {r} is not a positive rate", at("requests_per_second")));
            }
            let bytes_per_second = t.bytes_per_second.map(|b| size(&at("bytes_per_second"), b)).transpose()?;
            if bytes_per_second == Some(0) {
                return Err(format!("{}: 0 would refuse every page", at("bytes_per_second")));
            }
            if t.concurrent_requests == Some(0) {
                return Err(format!("{}: 0 would refuse every call", at("concurrent_requests")));
            }
            let t = Arc::new(Tenant {
                name,
                admin: t.admin,
                quota,
                reserved,
                requests_per_second: t.requests_per_second,
                bytes_per_second,
                concurrent_requests: t.concurrent_requests,
                tokens,
                certs,
                requests: Default::default(),
            });
            for d in t.tokens.iter().chain(&t.certs) {
                out.by_digest.insert(*d, Some(t.clone()));
            }
            out.tenants.insert(t.name.clone(), t);
        }
        for d in out.service_tokens.iter().chain(&out.service_certs) {
            out.by_digest.insert(*d, None);
        }
        Ok(out)
    }

    /// Accept `hash` as a service token too.
    pub(crate) fn add_service_token(&mut self, hash: Digest32) {
        self.service_tokens.push(hash);
        self.by_digest.insert(hash, None);
    }

    /// Who a credential's SHA-256 names: `Some(None)` the service, `Some(Some(t))` a tenant.
    ///
    /// Timing: the token itself is never compared, only its SHA-256, and the table is keyed by
    /// that digest, so how long a lookup takes depends on the digest of what the caller sent —
    /// which it cannot steer toward a stored one without inverting SHA-256 — not on any stored
    /// token. The digest found is then compared in constant time (a table hit is an exact match;
    /// the check keeps the rule "secrets are compared in constant time" true by construction).
    pub(crate) fn identify(&self, hash: &Digest32) -> Option<Option<Arc<Tenant>>> {
        use subtle::ConstantTimeEq;
        let (k, v) = self.by_digest.get_key_value(hash)?;
        bool::from(k.ct_eq(hash)).then(|| v.clone())
    }

    /// Whether `hash` is a service token's.
    #[cfg(test)]
    pub(crate) fn is_service_token(&self, hash: &Digest32) -> bool {
        matches!(self.identify(hash), Some(None))
    }

    /// The tenant whose credential hashes to `hash`.
    #[cfg(test)]
    pub(crate) fn by_token(&self, hash: &Digest32) -> Option<Arc<Tenant>> {
        self.identify(hash).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(t: &str) -> String {
        hex::encode(token_sha256(t))
    }

    #[test]
    fn a_file_parses_with_sizes_lists_and_fingerprints() {
        let text = format!(
            r#"
[service]
token_sha256 = "{}"

[tenants.acme]
token_sha256 = ["{}", "{}"]
quota = "64GiB"
reserved = 1048576
requests_per_second = 100
bytes_per_second = "1GiB"

[tenants.ops]
cert_sha256 = ["{}"]
admin = true
"#,
            h("svc"),
            h("a1"),
            h("a2"),
            // openssl's form: upper case, colon-separated.
            h("cert")
                .to_uppercase()
                .as_bytes()
                .chunks(2)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(":")
        );
        let t = Tenants::parse(&text).unwrap();
        let acme = &t.tenants["acme"];
        assert_eq!((acme.quota, acme.reserved, acme.bytes_per_second), (Some(64 << 30), 1 << 20, Some(1 << 30)));
        assert_eq!(t.by_token(&token_sha256("a2")).unwrap().name, "acme");
        assert!(t.by_token(&token_sha256("svc")).is_none() && t.is_service_token(&token_sha256("svc")));
        assert!(t.by_token(&token_sha256("nobody")).is_none());
        assert_eq!(t.identify(&token_sha256("cert")).unwrap().unwrap().name, "ops");
        assert!(t.tenants["ops"].admin && !acme.admin);
    }

    #[test]
    fn mistakes_are_refused_naming_the_tenant_and_key() {
        let hx = h("x");
        for (text, says) in [
            (format!("[tenants.a]\ntoken_sha256 = \"{hx}\"\nqouta = \"1GiB\""), "unknown field `qouta`"),
            ("[tenants.a]\ntoken_sha256 = \"abc\"".into(), "[tenants.a] token_sha256: 3 characters"),
            ("[tenants.a]\nquota = \"1GiB\"".into(), "no token_sha256 or cert_sha256"),
            (
                format!("[tenants.a]\ntoken_sha256 = \"{hx}\"\n[tenants.b]\ntoken_sha256 = \"{hx}\""),
                "share a credential",
            ),
            (format!("[tenants.A]\ntoken_sha256 = \"{hx}\""), "tenant name \"A\""),
            (format!("[tenants.a]\ntoken_sha256 = \"{hx}\"\nquota = \"1G\""), "[tenants.a] quota: \"1G\" is ambiguous"),
            (
                format!("[tenants.a]\ntoken_sha256 = \"{hx}\"\nquota = \"1MiB\"\nreserved = \"2MiB\""),
                "more than its quota",
            ),
            (format!("[tenants.a]\ntoken_sha256 = \"{hx}\"\nrequests_per_second = 0"), "not a positive rate"),
        ] {
            let e = Tenants::parse(&text).unwrap_err();
            assert!(e.contains(says), "{text}\n=> {e}");
        }
    }
}
