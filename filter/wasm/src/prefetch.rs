//! Keystream prefetch across Envoy workers, host side: the worker's planning is
//! [`ocicrypt_core::gateway::prefetch`]'s; this file lends it proxy-wasm's shared queues and the
//! worker VM's state, shared by its root context (ticks, queue events) and its streams.
use std::cell::RefCell;
use std::rc::Rc;

use ocicrypt_core::gateway::prefetch::{SharedQueues, Worker};

use crate::host;

/// The worker's state, shared by its root context and its stream contexts.
pub type SharedWorker = Rc<RefCell<Worker>>;

/// Envoy's shared queues. Host contract: a queue registered by a VM is read by that VM only
/// (its `on_queue_ready` runs on its own thread); any VM of the process may enqueue to it.
pub struct HostQueues;

impl SharedQueues for HostQueues {
    fn register(&mut self, name: &str) -> Option<u32> {
        host::register_queue(name)
    }

    fn enqueue(&mut self, queue: u32, message: &[u8]) -> bool {
        host::enqueue(queue, message)
    }

    fn dequeue(&mut self, queue: u32) -> Option<Vec<u8>> {
        host::dequeue(queue)
    }
}
