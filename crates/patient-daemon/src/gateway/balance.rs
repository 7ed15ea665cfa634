//! Picking an upstream: smooth weighted round robin (nginx's: over any
//! stretch of picks each upstream gets its weight's share, spread out
//! rather than in runs), or the fewest requests in flight.

use std::sync::{atomic::Ordering, Mutex};

use super::{settings::Balance, Upstream};

/// A route's balancer.
pub(crate) struct Balancer {
    kind: Balance,
    weights: Vec<i64>,
    state: Mutex<State>,
}

struct State {
    /// Smooth weighted round robin's current weights.
    current: Vec<i64>,
    /// The turn, for ties between equally loaded upstreams.
    turn: usize,
}

impl Balancer {
    pub(crate) fn new(kind: Balance, weights: &[u32]) -> Self {
        Balancer {
            kind,
            weights: weights.iter().map(|&w| i64::from(w.max(1))).collect(),
            state: Mutex::new(State {
                current: vec![0; weights.len()],
                turn: 0,
            }),
        }
    }

    /// Every upstream's index, the one to try first first; the others in
    /// turn after it (the failover order).
    pub(crate) fn order(&self, upstreams: &[Upstream]) -> Vec<usize> {
        let n = upstreams.len();
        if n <= 1 {
            return (0..n).collect();
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let first = match self.kind {
            Balance::RoundRobin => {
                let total: i64 = self.weights.iter().sum();
                let mut best = 0;
                for i in 0..n {
                    state.current[i] += self.weights[i];
                    if state.current[i] > state.current[best] {
                        best = i;
                    }
                }
                state.current[best] -= total;
                best
            }
            Balance::LeastInFlight => {
                let turn = state.turn;
                state.turn = state.turn.wrapping_add(1);
                (0..n)
                    .map(|k| (turn + k) % n)
                    .min_by_key(|&i| upstreams[i].in_flight.load(Ordering::Relaxed))
                    .unwrap_or(0)
            }
        };
        (0..n).map(|k| (first + k) % n).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn upstreams(n: usize) -> Vec<Upstream> {
        (0..n)
            .map(|i| Upstream {
                base: format!("http://127.0.0.1:{}", 1000 + i),
                origin: format!("http://127.0.0.1:{}", 1000 + i),
                key: format!("r@{i}"),
                in_flight: AtomicUsize::new(0),
            })
            .collect()
    }

    #[test]
    fn weighted_round_robin_gives_each_its_share_spread_out() {
        let ups = upstreams(3);
        let b = Balancer::new(Balance::RoundRobin, &[5, 1, 1]);
        let picks: Vec<usize> = (0..7).map(|_| b.order(&ups)[0]).collect();
        // nginx's sequence for weights 5, 1, 1.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
        let order = b.order(&ups);
        assert_eq!(order.len(), 3);
    }

    #[test]
    fn least_in_flight_picks_the_least_loaded_and_ties_go_in_turn() {
        let ups = upstreams(3);
        let b = Balancer::new(Balance::LeastInFlight, &[1, 1, 1]);
        ups[0].in_flight.store(4, Ordering::Relaxed);
        ups[1].in_flight.store(1, Ordering::Relaxed);
        ups[2].in_flight.store(2, Ordering::Relaxed);
        assert_eq!(b.order(&ups), [1, 2, 0]);
        ups[1].in_flight.store(2, Ordering::Relaxed);
        let firsts: Vec<usize> = (0..4).map(|_| b.order(&ups)[0]).collect();
        assert!(firsts.contains(&1) && firsts.contains(&2), "{firsts:?}");
        assert!(!firsts.contains(&0));
    }
}
