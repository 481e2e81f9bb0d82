//! kvcache-proto: the wire contract and nothing else.
//!
//! - [`v1`]: the generated prost messages and tonic clients/servers of `proto/kvcache/v1/*.proto`
//!   (`CacheNode`, `Coordinator`, `AttentionWorker`). Payload fields are [`bytes::Bytes`], so a
//!   decoded page payload is a slice of the receive buffer, not a copy.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptor set, served by gRPC reflection.
//! - [`metadata`]: names of the request metadata and trailers the contract defines.
//!
//! Validation of these messages into domain types lives in `kvcache-core`, not here.

/// Generated code for package `kvcache.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("kvcache.v1");
}

/// Encoded `FileDescriptorSet` of every kvcache proto file, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kvcache_descriptor");

/// Metadata keys defined by the contract (see the header of `common.proto`).
pub mod metadata {
    /// Bearer token: `authorization: Bearer <token>`.
    pub const AUTHORIZATION: &str = "authorization";
    /// Tenant name on unauthenticated clusters.
    pub const TENANT: &str = "kvcache-tenant";
    /// Trailer of FAILED_PRECONDITION on a stale-epoch write: the node's current epoch.
    pub const EPOCH: &str = "kvcache-epoch";
    /// Trailer of a follower coordinator's UNAVAILABLE: the leader's address.
    pub const LEADER: &str = "kvcache-leader";
}

#[cfg(test)]
mod tests {
    use super::v1;
    use bytes::Bytes;
    use prost::Message;

    #[test]
    fn page_payload_decodes_as_a_slice_of_the_buffer() {
        let page = v1::Page { payload: Bytes::from(vec![7u8; 4096]), token_count: 3, ..Default::default() };
        let buf = Bytes::from(page.encode_to_vec());
        let decoded = v1::Page::decode(buf.clone()).unwrap();
        assert_eq!(decoded.payload.len(), 4096);
        let start = buf.as_ptr() as usize;
        let p = decoded.payload.as_ptr() as usize;
        assert!(p >= start && p + 4096 <= start + buf.len(), "payload was copied");
    }

    #[test]
    fn descriptor_set_names_every_service() {
        // Service names appear in the encoded descriptors as plain strings.
        let text = String::from_utf8_lossy(super::FILE_DESCRIPTOR_SET);
        for name in ["CacheNode", "Coordinator", "AttentionWorker", "kvcache.v1"] {
            assert!(text.contains(name), "{name} missing from descriptor set");
        }
    }
}
