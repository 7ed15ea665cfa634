//! Priority-ordered admission: when the processor's in-flight limit is
//! reached, waiting tasks are admitted high before normal before low, first
//! come first served within a priority.
//!
//! Written here because tokio's semaphore is fair but not priority-aware.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use patient_wire::Priority;
use tokio::sync::oneshot;

/// Slots for tasks in flight, handed out by priority.
#[derive(Debug)]
pub(crate) struct PriorityGate {
    state: Mutex<GateState>,
}

#[derive(Debug)]
struct GateState {
    available: usize,
    waiting: [VecDeque<oneshot::Sender<()>>; 3],
}

fn rank(priority: Priority) -> usize {
    match priority {
        Priority::High => 0,
        Priority::Normal => 1,
        Priority::Low => 2,
    }
}

/// A slot; it goes to the next waiter when dropped.
#[derive(Debug)]
pub(crate) struct GatePermit {
    gate: Arc<PriorityGate>,
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        self.gate.release();
    }
}

/// Waits for a slot; if dropped after a slot was handed to it, gives it back.
struct Waiter {
    gate: Arc<PriorityGate>,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.gate.release();
            }
        }
    }
}

impl PriorityGate {
    pub(crate) fn new(slots: usize) -> Arc<PriorityGate> {
        Arc::new(PriorityGate {
            state: Mutex::new(GateState {
                available: slots,
                waiting: Default::default(),
            }),
        })
    }

    /// Tasks waiting for a slot.
    pub(crate) fn waiting(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.waiting.iter().map(VecDeque::len).sum()
    }

    pub(crate) async fn acquire(self: &Arc<Self>, priority: Priority) -> GatePermit {
        let rx = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.available > 0 && state.waiting.iter().all(VecDeque::is_empty) {
                state.available -= 1;
                return GatePermit {
                    gate: Arc::clone(self),
                };
            }
            let (tx, rx) = oneshot::channel();
            state.waiting[rank(priority)].push_back(tx);
            rx
        };
        let mut waiter = Waiter {
            gate: Arc::clone(self),
            rx: Some(rx),
        };
        if let Some(rx) = waiter.rx.as_mut() {
            // The sender is only dropped after a failed send, which cannot
            // happen while this receiver is alive: Ok is the only outcome.
            let _ = rx.await;
        }
        waiter.rx = None;
        GatePermit {
            gate: Arc::clone(self),
        }
    }

    fn release(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for queue in state.waiting.iter_mut() {
            while let Some(tx) = queue.pop_front() {
                if tx.send(()).is_ok() {
                    return;
                }
            }
        }
        state.available += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;

    #[tokio::test]
    async fn admits_by_priority_then_arrival() {
        let gate = PriorityGate::new(1);
        let first = gate.acquire(Priority::Normal).await;
        let order = Arc::new(StdMutex::new(Vec::new()));
        let mut handles = Vec::new();
        for (i, p) in [
            Priority::Low,
            Priority::Normal,
            Priority::High,
            Priority::Normal,
            Priority::High,
        ]
        .into_iter()
        .enumerate()
        {
            let gate = Arc::clone(&gate);
            let order = Arc::clone(&order);
            handles.push(tokio::spawn(async move {
                let _permit = gate.acquire(p).await;
                order.lock().unwrap().push(i);
            }));
            tokio::task::yield_now().await;
        }
        while gate.waiting() < 5 {
            tokio::task::yield_now().await;
        }
        drop(first);
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![2, 4, 1, 3, 0]);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_lose_a_slot() {
        let gate = PriorityGate::new(1);
        let first = gate.acquire(Priority::Normal).await;
        let g = Arc::clone(&gate);
        let waiting = tokio::spawn(async move { g.acquire(Priority::High).await });
        while gate.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        waiting.abort();
        let _ = waiting.await;
        drop(first);
        // The slot is free again.
        let _again = gate.acquire(Priority::Low).await;
        assert_eq!(gate.waiting(), 0);
    }
}
