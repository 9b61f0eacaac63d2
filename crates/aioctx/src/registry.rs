//! Keeps every live BH and timer reachable from its context, so that dropping the context can
//! release their callbacks even when a callback owns its own handle (a BH that reschedules
//! itself usually does, which would otherwise be a reference cycle that never frees).
//!
//! Only creation, deletion and context teardown touch it; `poll` never does.

use std::sync::Arc;

use parking_lot::Mutex;
use slab::Slab;

use crate::callback::Handler;

/// Something that owns a user callback and can give it up.
pub(crate) trait Release: Send + Sync {
    /// Takes the callback out, unless it is running right now.
    fn release(&self) -> Option<Handler>;
}

pub(crate) struct Registry {
    live: Mutex<Option<Slab<Arc<dyn Release>>>>,
}

impl Registry {
    pub(crate) fn new() -> Registry {
        Registry {
            live: Mutex::new(Some(Slab::new())),
        }
    }

    /// Records `owner`; `None` once the context is gone.
    pub(crate) fn insert(&self, owner: Arc<dyn Release>) -> Option<usize> {
        self.live.lock().as_mut().map(|slab| slab.insert(owner))
    }

    pub(crate) fn remove(&self, key: Option<usize>) {
        if let (Some(key), Some(slab)) = (key, self.live.lock().as_mut()) {
            slab.try_remove(key);
        }
    }

    /// Closes the registry and returns every callback still held, for the caller to drop outside
    /// any lock (dropping a callback may drop handles that come back here).
    pub(crate) fn close(&self) -> Vec<Handler> {
        let slab = self.live.lock().take();
        slab.into_iter()
            .flatten()
            .filter_map(|(_, owner)| owner.release())
            .collect()
    }
}
