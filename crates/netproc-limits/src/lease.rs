//! Leases from a shared bucket: the local side of a limit shared by a
//! fleet, sans I/O.
//!
//! A fleet-wide bucket lives in a shared store (Redis for netproc). Asking
//! it on every call would put a round trip on the hot path, so each server
//! leases a few tokens at a time and spends them locally. [`Lease`] is that
//! local account: it says when to ask for more ([`Take::Refill`]) and takes
//! in what the store granted ([`Lease::granted`]).
//!
//! **The overshoot bound.** A server that has no tokens yet (a new key, or a
//! grant still in flight) may spend on credit, up to its lease size `L`;
//! grants pay the debt first, and a server in debt spends nothing more
//! until the bucket has paid it. With `L ≤ ε × capacity / N` on each of `N`
//! servers, the fleet never spends more than the bucket allowed plus
//! `ε × capacity`, however calls are spread. Tokens leased and not spent
//! are returned ([`Lease::refund`]) or expire with the shared bucket's
//! refill: they only ever make the fleet spend less.

use std::time::{Duration, Instant};

/// What a call may do, and whether to ask the shared bucket for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Take {
    /// Spend the token.
    Granted,
    /// Spend the token, and ask the shared bucket for `n` tokens (then
    /// report the answer with [`Lease::granted`]).
    GrantedRefill(u32),
    /// Refuse the call; retry after the duration.
    Refused(Duration),
    /// Refuse the call, and ask the shared bucket for `n` tokens.
    RefusedRefill(u32, Duration),
}

/// The local account of one shared bucket (one API key, one address).
///
/// ```
/// use std::time::{Duration, Instant};
/// use netproc_limits::{Lease, Take};
///
/// let now = Instant::now();
/// let mut lease = Lease::new(4);
/// // The first call spends on credit and asks the shared bucket.
/// let Take::GrantedRefill(ask) = lease.take(now) else { panic!() };
/// // The bucket was empty: the debt stays, and calls are refused.
/// lease.granted(0, Duration::from_millis(100), now);
/// assert!(matches!(lease.take(now), Take::Refused(_)));
/// // Later it pays the debt and leases three more.
/// let later = now + Duration::from_millis(100);
/// assert!(matches!(lease.take(later), Take::RefusedRefill(..)));
/// lease.granted(4, Duration::ZERO, later);
/// assert_eq!(lease.available(), 3);
/// # let _ = ask;
/// ```
#[derive(Debug, Clone)]
pub struct Lease {
    /// Leased from the shared bucket and not spent.
    tokens: u32,
    /// Spent on credit and not yet paid by a grant.
    debt: u32,
    /// The lease size `L`: at most this much credit, and the most asked.
    max_lease: u32,
    /// A request to the shared bucket is in flight.
    pending: bool,
    /// What that request asked for.
    asked: u32,
    /// The last grant's size: asking again at half of it keeps a steady
    /// caller supplied without a request per few calls.
    last_grant: u32,
    /// Calls since the last grant, granted or refused: the demand that
    /// sizes the next request.
    demand: u32,
    /// The demand between the two grants before (a request asked at once
    /// after a grant would otherwise see almost none).
    prev_demand: u32,
    /// No request before this (the bucket said it was empty).
    not_before: Option<Instant>,
}

impl Lease {
    /// An account with lease size `max_lease` (at least 1): the most a
    /// request asks for beyond the debt, and the most credit.
    pub fn new(max_lease: u32) -> Lease {
        Lease {
            tokens: 0,
            debt: 0,
            max_lease: max_lease.max(1),
            pending: false,
            asked: 0,
            last_grant: 0,
            demand: 0,
            prev_demand: 0,
            not_before: None,
        }
    }

    /// Changes the lease size (the fleet grew or shrank). Credit already
    /// given stays owed.
    pub fn set_max_lease(&mut self, max_lease: u32) {
        self.max_lease = max_lease.max(1);
    }

    /// Tokens leased and unspent.
    pub fn available(&self) -> u32 {
        self.tokens
    }

    /// Tokens spent on credit and not yet paid.
    pub fn debt(&self) -> u32 {
        self.debt
    }

    /// Whether a request to the shared bucket is in flight.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// How many to ask for: the debt, plus four times the demand in the
    /// last request's time (so a busy key's leases grow until `max_lease`
    /// and round trips become rare), within `1..=max_lease`.
    fn ask(&mut self) -> u32 {
        self.pending = true;
        let recent = self.demand.max(self.prev_demand);
        self.asked = self.debt + recent.saturating_mul(4).clamp(1, self.max_lease);
        self.asked
    }

    fn may_ask(&self, now: Instant) -> bool {
        !self.pending && self.not_before.is_none_or(|t| now >= t)
    }

    /// One call at `now`.
    pub fn take(&mut self, now: Instant) -> Take {
        self.demand = self.demand.saturating_add(1);
        if self.tokens > 0 {
            self.tokens -= 1;
            // Ask ahead, at half the last grant, so a steady caller never
            // waits.
            if self.tokens <= (self.last_grant / 2).min(self.max_lease / 2) && self.may_ask(now) {
                return Take::GrantedRefill(self.ask());
            }
            return Take::Granted;
        }
        // Credit: only while nothing says the bucket is empty.
        if self.debt < self.max_lease && self.not_before.is_none() {
            self.debt += 1;
            if self.may_ask(now) {
                return Take::GrantedRefill(self.ask());
            }
            return Take::Granted;
        }
        let retry = self.not_before.map_or(Duration::from_millis(1), |t| {
            t.saturating_duration_since(now)
                .max(Duration::from_millis(1))
        });
        if self.may_ask(now) {
            return Take::RefusedRefill(self.ask(), retry);
        }
        Take::Refused(retry)
    }

    /// The shared bucket granted `got` tokens; when it had fewer than asked
    /// it said `wait` until the next would be there, and until then this
    /// account spends no credit and asks nothing. Grants pay the debt
    /// first.
    pub fn granted(&mut self, got: u32, wait: Duration, now: Instant) {
        self.pending = false;
        self.prev_demand = std::mem::take(&mut self.demand);
        let paid = got.min(self.debt);
        self.debt -= paid;
        self.tokens = self.tokens.saturating_add(got - paid);
        self.last_grant = got;
        // Only a short grant says the bucket is empty: a debt run up while
        // the request was in flight is simply asked for next.
        self.not_before = (got < self.asked).then(|| now + wait.max(Duration::from_millis(1)));
    }

    /// The request failed (the store is unreachable): nothing was granted;
    /// the next request may go at once.
    pub fn failed(&mut self) {
        self.pending = false;
        self.prev_demand = std::mem::take(&mut self.demand);
    }

    /// Takes the unspent tokens out, to give back to the shared bucket (an
    /// idle entry, a shutdown).
    pub fn refund(&mut self) -> u32 {
        std::mem::take(&mut self.tokens)
    }
}

/// The shared bucket's arithmetic — what netproc's Redis script does — for
/// models and tests: `tokens` at `last_us` refill at `rate_per_sec` up to
/// `capacity`; take up to `want`. Returns the tokens granted and, when
/// fewer than asked, the wait until the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedBucket {
    /// Tokens now (fractional: refill is continuous).
    pub tokens: f64,
    /// When `tokens` was computed, in microseconds of the store's clock.
    pub last_us: u64,
}

impl SharedBucket {
    /// A full bucket at `now_us`.
    pub fn full(capacity: u32, now_us: u64) -> SharedBucket {
        SharedBucket {
            tokens: f64::from(capacity),
            last_us: now_us,
        }
    }

    /// Takes up to `want` at `now_us` (a clock that never goes back).
    pub fn take(
        &mut self,
        now_us: u64,
        rate_per_sec: f64,
        capacity: u32,
        want: u32,
    ) -> (u32, Duration) {
        let elapsed = now_us.saturating_sub(self.last_us) as f64 / 1e6;
        self.tokens = (self.tokens + elapsed * rate_per_sec).min(f64::from(capacity));
        self.last_us = self.last_us.max(now_us);
        let got = (self.tokens.floor() as u32).min(want);
        self.tokens -= f64::from(got);
        let wait = if got < want && rate_per_sec > 0.0 {
            Duration::from_secs_f64(((1.0 - self.tokens).max(0.0) / rate_per_sec).min(3600.0))
        } else {
            Duration::ZERO
        };
        (got, wait)
    }

    /// Gives back `n` unspent tokens (never above `capacity`).
    pub fn refund(&mut self, n: u32, capacity: u32) {
        self.tokens = (self.tokens + f64::from(n)).min(f64::from(capacity));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_steady_caller_asks_ahead_and_is_never_refused_while_the_bucket_has_tokens() {
        let t0 = Instant::now();
        let mut lease = Lease::new(8);
        let mut bucket = SharedBucket::full(1000, 0);
        let mut refused = 0;
        for i in 0..500u64 {
            let now = t0 + Duration::from_millis(i);
            let ask = match lease.take(now) {
                Take::Granted => None,
                Take::GrantedRefill(n) => Some(n),
                Take::Refused(_) => {
                    refused += 1;
                    None
                }
                Take::RefusedRefill(n, _) => {
                    refused += 1;
                    Some(n)
                }
            };
            if let Some(n) = ask {
                let (got, wait) = bucket.take(i * 1000, 100.0, 1000, n);
                lease.granted(got, wait, now);
            }
        }
        assert_eq!(refused, 0);
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Server `s` gets a call.
        Call(usize),
        /// Server `s`'s oldest request is answered (in any order).
        Answer(usize),
        /// Server `s`'s request is lost (the store was unreachable).
        Lose(usize),
        /// Server `s` refunds its unspent tokens.
        Refund(usize),
        /// Time passes (ms).
        Wait(u64),
    }

    fn step(servers: usize) -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0..servers).prop_map(Step::Call),
            3 => (0..servers).prop_map(Step::Answer),
            1 => (0..servers).prop_map(Step::Lose),
            1 => (0..servers).prop_map(Step::Refund),
            1 => (0u64..50).prop_map(Step::Wait),
        ]
    }

    proptest! {
        /// Over any interleaving of calls, grants, lost requests, refunds
        /// and time across servers, the fleet never spends more than the
        /// bucket allowed (capacity + rate × elapsed) plus ε × capacity.
        #[test]
        fn the_fleet_never_overspends_by_more_than_epsilon_capacity(
            servers in 1usize..6,
            capacity in 1u32..400,
            rate in 0.0f64..2000.0,
            steps in proptest::collection::vec(step(5), 1..400),
        ) {
            let epsilon = 0.05;
            let lease_size = ((epsilon * f64::from(capacity) / servers as f64).floor() as u32).max(1);
            let bound = f64::from(lease_size) * servers as f64;
            let t0 = Instant::now();
            let mut now_ms = 0u64;
            let mut bucket = SharedBucket::full(capacity, 0);
            let mut leases = vec![Lease::new(lease_size); servers];
            let mut asked: Vec<Option<u32>> = vec![None; servers];
            let mut spent = 0u64;
            for s in steps {
                let now = t0 + Duration::from_millis(now_ms);
                match s {
                    Step::Call(i) if i < servers => {
                        let (ok, ask) = match leases[i].take(now) {
                            Take::Granted => (true, None),
                            Take::GrantedRefill(n) => (true, Some(n)),
                            Take::Refused(_) => (false, None),
                            Take::RefusedRefill(n, _) => (false, Some(n)),
                        };
                        spent += u64::from(ok);
                        if let Some(n) = ask {
                            asked[i] = Some(n);
                        }
                    }
                    Step::Answer(i) if i < servers => {
                        if let Some(n) = asked[i].take() {
                            let (got, wait) = bucket.take(now_ms * 1000, rate, capacity, n);
                            leases[i].granted(got, wait, now);
                        }
                    }
                    Step::Lose(i) if i < servers => {
                        let lost = asked[i].take();
                        if lost.is_some() {
                            leases[i].failed();
                        }
                    }
                    Step::Refund(i) if i < servers => {
                        let n = leases[i].refund();
                        bucket.refund(n, capacity);
                    }
                    Step::Wait(ms) => now_ms += ms,
                    _ => {}
                }
                let allowed = f64::from(capacity) + rate * now_ms as f64 / 1000.0;
                prop_assert!(
                    spent as f64 <= allowed + bound + 1e-9,
                    "spent {} > allowed {} + bound {}", spent, allowed, bound
                );
            }
        }
    }
}
