//! Sequences over a cached prefix: a sequence's first pages may be content pages (its prefix,
//! held by their own owners), its own pages and appends following them.
//!
//! The prefix is kept beside the pool files, one small file per sequence under `chains/`:
//!
//! ```text
//! magic "KVCH" | version u16 = 1 | id length u16 | namespace id u64 | key count u32 |
//! sequence id | keys (32 bytes each) | CRC-32C of everything before it        (integers LE)
//! ```
//!
//! written to a temporary name and renamed (fsynced under `sync` durability), removed with the
//! sequence (delete or eviction). Recovery reads every file whose CRC and namespace verify; a file
//! that does not verify is removed. A sequence that lost its prefix that way keeps its own pages
//! at their page indices, after a gap where the prefix was: a reader finds missing pages (a miss)
//! and never reads them as if they started at token 0.

use super::*;
use kvcache_core::ContentKey;

const MAGIC: &[u8; 4] = b"KVCH";
const VERSION: u16 = 1;
/// Most pages a prefix may have (a 4M-token prompt of 64-token pages).
pub const MAX_PREFIX_PAGES: usize = 1 << 16;

fn chains_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("chains")
}

fn chain_file(data_dir: &Path, key: &SequenceKey) -> PathBuf {
    let h = xxhash_rust::xxh3::xxh3_128(format!("{}\0{}", key.namespace, key.sequence_id).as_bytes());
    chains_dir(data_dir).join(format!("{h:032x}.chain"))
}

fn encode(ns_id: u64, key: &SequenceKey, prefix: &[ContentKey]) -> Vec<u8> {
    let id = key.sequence_id.as_bytes();
    let mut b = Vec::with_capacity(20 + id.len() + 32 * prefix.len() + 4);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(id.len() as u16).to_le_bytes());
    b.extend_from_slice(&ns_id.to_le_bytes());
    b.extend_from_slice(&(prefix.len() as u32).to_le_bytes());
    b.extend_from_slice(id);
    for k in prefix {
        b.extend_from_slice(&k.0);
    }
    let crc = kvcache_core::checksum::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// (namespace id, sequence id, prefix) of a chain file, if it verifies.
fn decode(b: &[u8]) -> Option<(u64, String, Vec<ContentKey>)> {
    if b.len() < 24 || &b[..4] != MAGIC || u16::from_le_bytes([b[4], b[5]]) != VERSION {
        return None;
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if kvcache_core::checksum::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let id_len = u16::from_le_bytes([b[6], b[7]]) as usize;
    let ns_id = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let n = u32::from_le_bytes(b[16..20].try_into().ok()?) as usize;
    if n > MAX_PREFIX_PAGES || body.len() != 20 + id_len + 32 * n {
        return None;
    }
    let id = std::str::from_utf8(&b[20..20 + id_len]).ok()?.to_owned();
    let keys = b[20 + id_len..body.len()].chunks_exact(32).map(|c| ContentKey(c.try_into().expect("32"))).collect();
    Some((ns_id, id, keys))
}

impl PageStore {
    /// Create `key` over the content pages of `prefix`. Returns false when it already exists
    /// with this prefix. With `seal`, a prefix that extends the sequence's own (or starts one)
    /// over full pages the sequence holds seals those pages: they become references to the content pages
    /// of the new keys and the sequence's copies are dropped. Anything else is refused: another
    /// prefix, or an extension over pages that are not full on every layer.
    pub fn create_sequence(&self, key: &SequenceKey, prefix: &[ContentKey], seal: bool) -> Result<bool, StoreError> {
        let ns = self.ns_of(&key.namespace)?;
        if key.is_content() {
            return Err(ValidationError::ContentPage("a content page key is not a sequence to create".into()).into());
        }
        if prefix.len() > MAX_PREFIX_PAGES {
            return Err(ValidationError::Count {
                what: "prefix pages",
                got: prefix.len() as u64,
                expected: format!("at most {MAX_PREFIX_PAGES}"),
            }
            .into());
        }
        loop {
            let seq = self.sequence(&ns, key);
            let mut inner = seq.inner.lock();
            if inner.removed {
                continue;
            }
            let cur: Vec<ContentKey> = inner.prefix.as_deref().map(<[ContentKey]>::to_vec).unwrap_or_default();
            if inner.prefix.is_some() && cur[..] == *prefix {
                return Ok(false);
            }
            if !prefix.starts_with(&cur) {
                return Err(StoreError::SequenceExists(key.sequence_id.clone()));
            }
            // Extending the prefix over pages the sequence holds itself seals them: each must be
            // a full page on every layer; the sequence's copies go (the caller has put them by
            // key, where every request finds them).
            if inner.layers.iter().any(|l| l.iter().any(Option::is_some)) {
                if !seal {
                    return Err(StoreError::SequenceExists(key.sequence_id.clone()));
                }
                let pt = ns.ns.page_tokens;
                // Layers that keep tokens: a full layer must hold the page; a sliding or
                // chunked one may have released it (a prefix needs it only near its end); a
                // state layer's pages are its state, not tokens, and stay.
                let token_layers: Vec<(usize, bool)> = (0..ns.ns.stored_layers())
                    .map(|l| (l as usize, ns.ns.layer_kind(l)))
                    .filter(|(_, k)| k.keeps_tokens())
                    .map(|(l, k)| (l, k == LayerKind::Full))
                    .collect();
                for idx in cur.len()..prefix.len() {
                    for &(l, required) in &token_layers {
                        let e = inner.layers.get(l).and_then(|v| v.get(idx)).copied().flatten();
                        if e.is_none() && !required {
                            continue;
                        }
                        if e.is_none_or(|e| e.tokens != pt) {
                            return Err(ValidationError::ContentPage(format!(
                                "page {idx} of layer {l} of {:?} is not a full page it holds: only full pages are sealed",
                                key.sequence_id
                            ))
                            .into());
                        }
                    }
                }
                for idx in cur.len()..prefix.len() {
                    for &(l, _) in &token_layers {
                        let pk = PageKey { sequence: key.clone(), layer: l as u32, page_index: idx as u32 };
                        self.drop_entry(&seq, &mut inner, &pk);
                    }
                }
            }
            self.write_chain(ns.ns.id(), key, prefix)?;
            inner.prefix = Some(prefix.into());
            drop(inner);
            self.touch(&seq);
            return Ok(true);
        }
    }

    fn write_chain(&self, ns_id: u64, key: &SequenceKey, prefix: &[ContentKey]) -> io::Result<()> {
        let dir = chains_dir(&self.cfg.data_dir);
        std::fs::create_dir_all(&dir)?;
        let path = chain_file(&self.cfg.data_dir, key);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, encode(ns_id, key, prefix))?;
        if self.cfg.durability == Durability::Sync {
            std::fs::File::open(&tmp)?.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        if self.cfg.durability == Durability::Sync {
            fsync_dir(&dir)?;
        }
        Ok(())
    }

    /// Forget the prefix file of a removed sequence.
    pub(super) fn remove_chain(&self, key: &SequenceKey) {
        let path = chain_file(&self.cfg.data_dir, key);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "could not remove a chain file"),
        }
    }

    /// Read back every chain file (after the pool scan): each verified one gives its sequence
    /// its prefix. Unverifiable files, and files of unknown namespaces, are removed.
    pub(super) fn recover_chains(&self) -> Result<usize, StoreError> {
        let dir = chains_dir(&self.cfg.data_dir);
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(0) };
        let ns_by_id = self.ns_by_id.read().clone();
        let mut n = 0;
        for e in entries {
            let path = e?.path();
            if path.extension().is_some_and(|x| x == "tmp") {
                std::fs::remove_file(&path)?;
                continue;
            }
            let bytes = std::fs::read(&path)?;
            let Some((ns_id, id, prefix)) = decode(&bytes) else {
                tracing::warn!(file = %path.display(), "chain file failed verification: removed");
                std::fs::remove_file(&path)?;
                continue;
            };
            let Some(ns) = ns_by_id.get(&ns_id) else {
                std::fs::remove_file(&path)?;
                continue;
            };
            let key = SequenceKey::new(ns.ns.name.clone(), id);
            if chain_file(&self.cfg.data_dir, &key) != path {
                tracing::warn!(file = %path.display(), "chain file under the wrong name: removed");
                std::fs::remove_file(&path)?;
                continue;
            }
            let seq = self.sequence(ns, &key);
            seq.inner.lock().prefix = Some(prefix.into());
            n += 1;
        }
        Ok(n)
    }

    /// The prefix of a sequence, if it has one.
    pub fn prefix_of(&self, key: &SequenceKey) -> Option<Arc<[ContentKey]>> {
        let seq = self.sequences.get(key).map(|s| s.clone())?;
        seq.inner.lock().prefix.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_files_round_trip_and_refuse_any_damage() {
        let key = SequenceKey::new("ns", "req-1");
        let prefix = vec![ContentKey([1; 32]), ContentKey([2; 32])];
        let b = encode(7, &key, &prefix);
        assert_eq!(decode(&b), Some((7, "req-1".to_owned(), prefix.clone())));
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert_eq!(decode(&bad), None, "flip at byte {i}");
        }
        assert_eq!(decode(&b[..b.len() - 1]), None);
        assert_eq!(decode(&encode(7, &key, &[])), Some((7, "req-1".to_owned(), vec![])));
    }
}
