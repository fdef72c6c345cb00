//! The key-value store every inferlet of a runtime shares (in memory).

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::bindings::store::Host;
use super::state::InstanceState;

#[derive(Default)]
pub struct KvStore {
    map: Mutex<BTreeMap<String, String>>,
}

impl KvStore {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Host for InstanceState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.store.map().get(&key).cloned())
    }

    async fn set(&mut self, key: String, value: String) -> wasmtime::Result<()> {
        self.store.map().insert(key, value);
        Ok(())
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.store.map().remove(&key);
        Ok(())
    }

    async fn list_keys(&mut self, prefix: String) -> wasmtime::Result<Vec<String>> {
        let map = self.store.map();
        Ok(map
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect())
    }
}
