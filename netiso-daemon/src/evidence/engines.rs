//! The policy engine over the inventory, built once per change rather than per flow.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::inventory::Inventory;
use crate::inventory::timeline::PodSnapshot;
use crate::policy::PolicyEngine;

/// Engines are rebuilt at most this often under a stream of changes; records in between use
/// the previous one.
const REBUILD_INTERVAL: Duration = Duration::from_millis(250);

pub struct Engines {
    inventory: Arc<Inventory>,
    built: Mutex<Option<Built>>,
}

struct Built {
    generation: u64,
    at: Instant,
    engine: Arc<PolicyEngine>,
}

impl Engines {
    pub fn new(inventory: Arc<Inventory>) -> Self {
        Engines { inventory, built: Mutex::default() }
    }

    /// The engine over the inventory's current state.
    pub fn current(&self) -> Arc<PolicyEngine> {
        let generation = self.inventory.generation();
        let mut built = self.built.lock().expect("engine cache");
        if let Some(b) = &*built
            && (b.generation == generation || b.at.elapsed() < REBUILD_INTERVAL)
        {
            return b.engine.clone();
        }
        let engine = Arc::new(PolicyEngine::new(self.inventory.cluster_state()));
        *built = Some(Built { generation, at: Instant::now(), engine: engine.clone() });
        engine
    }

    /// The engine for a flow between these pods: the current one, or, when a pod has been
    /// deleted since, one that includes it as it was.
    pub fn with(&self, pods: &[&PodSnapshot]) -> Arc<PolicyEngine> {
        match self.inventory.cluster_state_with_departed(pods) {
            Some(state) => Arc::new(PolicyEngine::new(state)),
            None => self.current(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Change, Object};

    fn namespace(name: &str) -> Object {
        Object::Namespace(serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap())
    }

    #[test]
    fn an_engine_is_reused_until_the_inventory_changes() {
        let inventory = Inventory::new(&[], Duration::from_secs(60));
        let engines = Engines::new(inventory.clone());
        let first = engines.current();
        assert!(Arc::ptr_eq(&first, &engines.current()), "no change: the same engine");
        inventory.apply(Change::Apply(namespace("shop")));
        std::thread::sleep(REBUILD_INTERVAL);
        let rebuilt = engines.current();
        assert!(!Arc::ptr_eq(&first, &rebuilt), "a change is seen once the interval has passed");
        assert!(Arc::ptr_eq(&rebuilt, &engines.current()));
    }
}
