//! The request gate, sans I/O: every frame a session reads is judged here,
//! fed the frame's facts and `now` (through the abuse layer's clock), and
//! answered with a decision the session carries out. Unit-tested without
//! sockets.
//!
//! Order for a request: id (≥ 1, above the last), privilege, in-flight cap,
//! per-connection / per-key / per-address buckets, deadline. A frame
//! refused before it runs (privilege denial, bad operation or payload, id,
//! unknown kind, cancel of an id not running) first takes a token from the
//! per-connection refusal budget; without one it is answered `rate_limited`
//! (scope `refusals`) instead.

use std::net::IpAddr;
use std::time::Duration;

use netproc_auth::{Principal, authorize};
use netproc_limits::TokenBucket;
use netproc_wire::{ErrorBody, ErrorCode, Operation};

use crate::abuse::{Abuse, Counter, new_bucket};
use crate::options::ServerOptions;
use crate::refusal::Refused;

/// An answer the session sends for a refused frame.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply {
    /// A `Response` to this id, or a top-level `Error` when `None`.
    pub(crate) id: Option<u64>,
    pub(crate) body: ErrorBody,
}

/// What the session does with a frame.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Run the request within `limit`.
    Run {
        /// The request's execution limit: the server's, or the caller's
        /// deadline if shorter.
        limit: Duration,
    },
    /// Nothing to send (a cancel of an id not running, within budget).
    Ignore,
    /// Send `Reply` and keep reading.
    Answer(Reply),
    /// Send `Reply`, then end the session with `rate_limited`
    /// (`disconnect_on_limit`).
    AnswerAndClose(Reply),
}

/// One session's gate state: the last accepted id, the per-connection
/// request bucket and the refusal budget (each with the settings version it
/// follows).
pub(crate) struct Gate {
    last_id: Option<u64>,
    conn_bucket: (u64, TokenBucket),
    refusals: (u64, TokenBucket),
}

impl Gate {
    pub(crate) fn new(abuse: &Abuse) -> Gate {
        let options = abuse.options();
        let now = abuse.clock.now();
        let rc = &options.request_controls;
        Gate {
            last_id: None,
            conn_bucket: (abuse.version(), new_bucket(&rc.per_connection, now)),
            refusals: (abuse.version(), new_bucket(&rc.refusals, now)),
        }
    }

    /// The highest id accepted (for `GoAway.last_id`).
    pub(crate) fn last_id(&self) -> Option<u64> {
        self.last_id
    }

    /// A request: id, privilege, in-flight cap, buckets, deadline.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn request(
        &mut self,
        abuse: &Abuse,
        options: &ServerOptions,
        principal: &Principal,
        peer: IpAddr,
        id: u64,
        op: &Operation,
        deadline_ms: Option<u32>,
        in_flight: usize,
    ) -> Decision {
        if let Err(refused) = self.accept_id(abuse, options, id) {
            return refused;
        }
        if let Err(denied) = authorize(principal, op) {
            let body = Refused::InsufficientPrivileges(denied.to_string()).into_body();
            return self.refuse_with(abuse, options, Some(id), body);
        }
        let rc = &options.request_controls;
        if in_flight >= rc.max_in_flight_requests_per_connection as usize {
            return Decision::Answer(Reply {
                id: Some(id),
                body: abuse.in_flight_refusal(),
            });
        }
        let key_id = principal.key_id.as_deref().unwrap_or(&principal.id);
        if let Err(refusal) = abuse.check_request(options, &mut self.conn_bucket, key_id, peer) {
            let reply = Reply {
                id: Some(id),
                body: refusal.body,
            };
            return if refusal.disconnect {
                Decision::AnswerAndClose(reply)
            } else {
                Decision::Answer(reply)
            };
        }
        if deadline_ms == Some(0) {
            // The client gave the call no time at all.
            return Decision::Answer(Reply {
                id: Some(id),
                body: Refused::ZeroDeadline.into_body(),
            });
        }
        let server_limit = Duration::from_millis(rc.request_timeout_ms);
        let limit = deadline_ms.map_or(server_limit, |ms| {
            server_limit.min(Duration::from_millis(ms.into()))
        });
        Decision::Run { limit }
    }

    /// Checks that `id` is at least 1 and above the previous ids. Refused
    /// with a top-level `Error{invalid_request}` whose details carry
    /// `{id, last_id}` — never a `Response`, so a response always belongs to
    /// the call the client made with that id.
    pub(crate) fn accept_id(
        &mut self,
        abuse: &Abuse,
        options: &ServerOptions,
        id: u64,
    ) -> Result<(), Decision> {
        let last = self.last_id.unwrap_or(0);
        if id > last {
            self.last_id = Some(id);
            return Ok(());
        }
        let body = Refused::InvalidRequestId { id, last_id: last }.into_body();
        Err(self.refuse_with(abuse, options, None, body))
    }

    /// A frame refused with `code` before it ran: a `Response` to `id`, or a
    /// top-level `Error` (the session stays open).
    pub(crate) fn refuse(
        &mut self,
        abuse: &Abuse,
        options: &ServerOptions,
        id: Option<u64>,
        code: ErrorCode,
        message: String,
    ) -> Decision {
        self.refuse_with(abuse, options, id, ErrorBody::new(code, message))
    }

    /// A `Cancel` of an id that is not running: ignored, but not free.
    pub(crate) fn stray_cancel(&mut self, abuse: &Abuse, options: &ServerOptions) -> Decision {
        match self.budget(abuse, options, None) {
            Ok(()) => Decision::Ignore,
            Err(spent) => spent,
        }
    }

    fn refuse_with(
        &mut self,
        abuse: &Abuse,
        options: &ServerOptions,
        id: Option<u64>,
        body: ErrorBody,
    ) -> Decision {
        if let Err(spent) = self.budget(abuse, options, id) {
            return spent;
        }
        abuse.count(Counter::request_refused_count);
        Decision::Answer(Reply { id, body })
    }

    /// A token from the refusal budget; without one, the `rate_limited`
    /// answer that replaces the frame's own.
    fn budget(
        &mut self,
        abuse: &Abuse,
        options: &ServerOptions,
        id: Option<u64>,
    ) -> Result<(), Decision> {
        let refusal = match abuse.check_refusal(options, &mut self.refusals) {
            Ok(()) => return Ok(()),
            Err(refusal) => refusal,
        };
        let reply = Reply {
            id,
            body: refusal.body,
        };
        Err(if refusal.disconnect {
            Decision::AnswerAndClose(reply)
        } else {
            Decision::Answer(reply)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use netproc_limits::ManualClock;
    use netproc_wire::Value;

    use super::*;

    struct Bench {
        abuse: Abuse,
        clock: Arc<ManualClock>,
        gate: Gate,
        principal: Principal,
        next: u64,
    }

    fn bench(f: impl FnOnce(&mut ServerOptions)) -> Bench {
        let mut options = ServerOptions::default();
        f(&mut options);
        let clock = Arc::new(ManualClock::new());
        let abuse = Abuse::new(
            Arc::new(crate::options::Settings::new(options)),
            clock.clone(),
        );
        let gate = Gate::new(&abuse);
        let principal = Principal::new("k1", "invoke_functions".parse().unwrap()).with_key("k1", 1);
        Bench {
            abuse,
            clock,
            gate,
            principal,
            next: 1,
        }
    }

    fn invoke() -> Operation {
        Operation::Invoke {
            function: "f".into(),
            args: vec![],
        }
    }

    fn define() -> Operation {
        Operation::DefineConstant {
            name: "c".into(),
            value: Value::Null,
        }
    }

    impl Bench {
        fn send(&mut self, op: &Operation, deadline_ms: Option<u32>, in_flight: usize) -> Decision {
            let id = self.next;
            self.next += 1;
            self.send_id(id, op, deadline_ms, in_flight)
        }

        fn send_id(
            &mut self,
            id: u64,
            op: &Operation,
            deadline_ms: Option<u32>,
            in_flight: usize,
        ) -> Decision {
            let options = self.abuse.options();
            self.gate.request(
                &self.abuse,
                &options,
                &self.principal,
                IpAddr::from([10, 0, 0, 1]),
                id,
                op,
                deadline_ms,
                in_flight,
            )
        }
    }

    fn code(d: &Decision) -> Option<(ErrorCode, Option<Value>)> {
        match d {
            Decision::Answer(r) | Decision::AnswerAndClose(r) => {
                let scope = match &r.body.details {
                    Value::Map(m) => m.get("scope").cloned(),
                    _ => None,
                };
                Some((r.body.code.clone(), scope))
            }
            _ => None,
        }
    }

    #[test]
    fn a_permitted_request_runs_within_the_shorter_of_the_two_limits() {
        let mut b = bench(|_| {});
        assert_eq!(
            b.send(&invoke(), None, 0),
            Decision::Run {
                limit: Duration::from_secs(30)
            }
        );
        assert_eq!(
            b.send(&invoke(), Some(250), 0),
            Decision::Run {
                limit: Duration::from_millis(250)
            }
        );
        assert_eq!(
            code(&b.send(&invoke(), Some(0), 0)).unwrap().0,
            ErrorCode::Timeout
        );
        assert_eq!(b.gate.last_id(), Some(3));
    }

    #[test]
    fn ids_start_at_1_and_must_increase_and_are_refused_outside_any_response() {
        let mut b = bench(|_| {});
        let top_level_invalid = |d: Decision| match d {
            Decision::Answer(Reply { id: None, body }) => body.code == ErrorCode::InvalidRequest,
            _ => false,
        };
        assert!(top_level_invalid(b.send_id(0, &invoke(), None, 0)));
        assert!(matches!(
            b.send_id(1, &invoke(), None, 0),
            Decision::Run { .. }
        ));
        assert!(top_level_invalid(b.send_id(1, &invoke(), None, 0)));
        assert!(matches!(
            b.send_id(7, &invoke(), None, 0),
            Decision::Run { .. }
        ));
        assert!(top_level_invalid(b.send_id(6, &invoke(), None, 0)));
        assert_eq!(b.gate.last_id(), Some(7));
    }

    #[test]
    fn privilege_denials_spend_the_refusal_budget_then_answer_rate_limited() {
        let mut b = bench(|o| {
            o.request_controls.refusals.burst_tokens = 3;
            o.request_controls.refusals.tokens_per_interval = 1;
            o.request_controls.refusals.interval_ms = 1_000;
        });
        for _ in 0..3 {
            assert_eq!(
                code(&b.send(&define(), None, 0)).unwrap().0,
                ErrorCode::InsufficientPrivileges
            );
        }
        let spent = code(&b.send(&define(), None, 0)).unwrap();
        assert_eq!(
            spent,
            (ErrorCode::RateLimited, Some(Value::from("refusals")))
        );
        // Stray cancels draw from it too.
        let options = b.abuse.options();
        assert!(matches!(
            b.gate.stray_cancel(&b.abuse, &options),
            Decision::Answer(_)
        ));
        // It refills with time; permitted calls never touch it.
        b.clock.advance(Duration::from_secs(1));
        assert_eq!(b.gate.stray_cancel(&b.abuse, &options), Decision::Ignore);
        assert!(matches!(b.send(&invoke(), None, 0), Decision::Run { .. }));
    }

    #[test]
    fn a_spent_budget_with_disconnect_on_limit_closes() {
        let mut b = bench(|o| {
            o.request_controls.refusals.burst_tokens = 1;
            o.request_controls.refusals.disconnect_on_limit = true;
        });
        assert!(matches!(b.send(&define(), None, 0), Decision::Answer(_)));
        assert!(matches!(
            b.send(&define(), None, 0),
            Decision::AnswerAndClose(_)
        ));
    }

    #[test]
    fn the_in_flight_cap_comes_before_the_buckets() {
        let mut b = bench(|o| o.request_controls.max_in_flight_requests_per_connection = 2);
        let d = b.send(&invoke(), None, 2);
        assert_eq!(
            code(&d).unwrap(),
            (
                ErrorCode::RateLimited,
                Some(Value::from("in_flight_per_connection"))
            )
        );
        assert!(matches!(b.send(&invoke(), None, 1), Decision::Run { .. }));
    }

    #[test]
    fn the_per_connection_bucket_refuses_then_refills_on_the_clock() {
        let mut b = bench(|o| {
            o.request_controls.per_connection.burst_tokens = 2;
            o.request_controls.per_connection.tokens_per_interval = 2;
        });
        assert!(matches!(b.send(&invoke(), None, 0), Decision::Run { .. }));
        assert!(matches!(b.send(&invoke(), None, 0), Decision::Run { .. }));
        assert_eq!(
            code(&b.send(&invoke(), None, 0)).unwrap(),
            (ErrorCode::RateLimited, Some(Value::from("per_connection")))
        );
        b.clock.advance(Duration::from_millis(500));
        assert!(matches!(b.send(&invoke(), None, 0), Decision::Run { .. }));
    }
}
