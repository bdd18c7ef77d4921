//! Envoy's shared queues for the prefetch tests: one process's queues in memory, any worker
//! enqueueing to any queue, each read by whoever holds its id.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use ocicrypt_core::gateway::prefetch::SharedQueues;

/// The host's queues of one process: any VM enqueues to any queue.
#[derive(Default)]
pub struct Process {
    pub queues: BTreeMap<u32, VecDeque<Vec<u8>>>,
    pub next: u32,
    /// The host refuses registrations.
    pub refuse: bool,
    /// Applied to every message enqueued (a helper that answers wrong keystream).
    pub tamper: Option<fn(&mut Vec<u8>)>,
}

#[derive(Clone, Default)]
pub struct Queues(pub Rc<RefCell<Process>>);

impl SharedQueues for Queues {
    fn register(&mut self, _name: &str) -> Option<u32> {
        let mut p = self.0.borrow_mut();
        if p.refuse {
            return None;
        }
        p.next += 1;
        let id = p.next;
        p.queues.insert(id, VecDeque::new());
        Some(id)
    }
    fn enqueue(&mut self, queue: u32, message: &[u8]) -> bool {
        let mut p = self.0.borrow_mut();
        let mut message = message.to_vec();
        if let Some(tamper) = p.tamper {
            tamper(&mut message);
        }
        match p.queues.get_mut(&queue) {
            Some(q) => {
                q.push_back(message);
                true
            }
            None => false,
        }
    }
    fn dequeue(&mut self, queue: u32) -> Option<Vec<u8>> {
        self.0.borrow_mut().queues.get_mut(&queue)?.pop_front()
    }
}

impl Queues {
    pub fn waiting(&self, queue: u32) -> usize {
        self.0.borrow().queues.get(&queue).map_or(0, VecDeque::len)
    }
}
