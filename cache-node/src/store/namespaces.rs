//! Namespaces: the registry in memory (by name and by the id stored in page headers) and its
//! file ([`crate::registry`]).

use super::*;

impl PageStore {
    pub(super) fn load_namespaces(&self) -> Result<(), StoreError> {
        for ns in crate::registry::load(&self.cfg.data_dir)? {
            self.insert_namespace(ns);
        }
        Ok(())
    }

    pub(super) fn insert_namespace(&self, ns: Namespace) -> Arc<NsEntry> {
        let layout = ns.layout();
        let entry = Arc::new(NsEntry {
            slot_bytes: slot_bytes_for(&layout),
            layout,
            tenant: self.ledger(&ns.tenant),
            ns,
            counters: NsCounters::default(),
        });
        self.ns_by_id.write().insert(entry.ns.id(), entry.clone());
        self.namespaces.write().insert(entry.ns.name.clone(), entry.clone());
        entry
    }

    pub(super) fn save_namespaces(&self) -> Result<(), StoreError> {
        let mut all = self.namespaces();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(crate::registry::save(&self.cfg.data_dir, &all)?)
    }

    /// Register a namespace (idempotent for an identical definition). Returns whether it was new.
    pub fn ensure_namespace(&self, ns: Namespace) -> Result<bool, StoreError> {
        let _g = self.ns_file.lock();
        if let Some(e) = self.namespace(&ns.name) {
            return if e.ns.same_definition(&ns) { Ok(false) } else { Err(StoreError::NamespaceConflict(ns.name)) };
        }
        let slot = slot_bytes_for(&ns.layout());
        if slot as u64 > self.cfg.capacity {
            return Err(StoreError::Full(format!(
                "a page of namespace {} needs a {slot}-byte slot, capacity is {} bytes",
                ns.name, self.cfg.capacity
            )));
        }
        self.insert_namespace(ns);
        self.save_namespaces()?;
        Ok(true)
    }

    /// A registered namespace.
    pub fn namespace(&self, name: &str) -> Option<Arc<NsEntry>> {
        self.namespaces.read().get(name).cloned()
    }

    /// Every registered namespace.
    pub fn namespaces(&self) -> Vec<Namespace> {
        self.namespaces.read().values().map(|e| e.ns.clone()).collect()
    }

    pub(super) fn ns_of(&self, name: &str) -> Result<Arc<NsEntry>, StoreError> {
        self.namespace(name).ok_or_else(|| StoreError::UnknownNamespace(name.to_owned()))
    }
}
