//! [`ClientError`]: what reaches the caller, and how statuses are told apart (by code and
//! trailer, never by message text).

use tonic::{Code, Status};

/// A failure that reached the caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The data is not in the cache (recompute).
    #[error("miss: {0}")]
    Miss(String),
    /// The request was malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No owner could serve the call.
    #[error("unavailable{}: {last}", if tried.is_empty() { String::new() } else { format!(" after trying {}", tried.join(", ")) })]
    Unavailable {
        /// Nodes tried, in order.
        tried: Vec<String>,
        /// The last error.
        last: String,
    },
    /// Not allowed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Unknown namespace or sequence.
    #[error("not found: {0}")]
    NotFound(String),
    /// A node sent a page that does not check out (wrong key, codec, size): a node bug or a
    /// corrupted stream. The read from that node is abandoned; other replicas may serve it.
    #[error("node {node} sent a bad page: {reason}")]
    BadPage {
        /// The node.
        node: String,
        /// What was wrong.
        reason: String,
    },
    /// The node is full and everything on it is pinned, a quota was hit, or a message was over
    /// the size limit: retry later, smaller, or elsewhere.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The sequence's partial last page was lost: it cannot be extended, only recomputed.
    #[error("data lost: {0}")]
    DataLoss(String),
    /// A write the node refused because of its state (an append at an unexpected position).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Any other status, with its code.
    #[error("{code:?}: {message}")]
    Other {
        /// The gRPC code.
        code: Code,
        /// The server's message.
        message: String,
    },
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        let m = s.message().to_owned();
        match s.code() {
            Code::InvalidArgument => Self::InvalidArgument(m),
            Code::PermissionDenied | Code::Unauthenticated => Self::PermissionDenied(m),
            Code::NotFound => Self::NotFound(m),
            Code::Unavailable | Code::DeadlineExceeded => Self::Unavailable { tried: vec![], last: m },
            Code::ResourceExhausted => Self::ResourceExhausted(m),
            Code::DataLoss => Self::DataLoss(m),
            Code::FailedPrecondition => Self::FailedPrecondition(m),
            code => Self::Other { code, message: m },
        }
    }
}

/// A node refusing a write routed with an older shard-map epoch than its own.
pub(crate) fn stale_epoch(s: &Status) -> bool {
    s.code() == Code::FailedPrecondition && s.metadata().get(kvcache_proto::metadata::EPOCH).is_some()
}

/// A node that has not learnt the namespace yet.
pub(crate) fn unknown_namespace(s: &Status) -> bool {
    kvcache_proto::metadata::is_unknown_namespace(s)
}

pub(crate) fn retryable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Internal)
}
