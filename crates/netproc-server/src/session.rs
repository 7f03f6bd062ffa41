//! The session loop of an authenticated connection: reads frames, answers
//! calls as they complete, follows control messages (close, shutdown),
//! timers (idle, expiry) and the outbound budget.
//!
//! The request gate and calls are in [`dispatch`], admin operations in
//! [`admin`].

mod admin;
mod dispatch;
mod gate;

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use futures_util::stream::{FuturesUnordered, StreamExt};
use netproc_auth::BoxFuture;
use netproc_limits::TokenBucket;
use netproc_wire::{
    ClientMessage, DecodeError, ErrorBody, ErrorCode, FrameDecoder, GoAway, Outcome, Response,
    ServerMessage,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use crate::audit::{self};
use crate::frames::error_msg;
use crate::function::SessionFacts;
use crate::outbox::Outbox;
use crate::sessions::Control;
use crate::shared::Shared;
use gate::Gate;

type CallFuture = BoxFuture<'static, (u64, Outcome)>;

/// The calls that did not finish on their first poll, polled by the
/// session's task. The set is made on the first such call: most sessions
/// never need one (its queue is two allocations per connection).
#[derive(Default)]
struct Calls(Option<FuturesUnordered<CallFuture>>);

impl Calls {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(FuturesUnordered::is_empty)
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesUnordered::len)
    }

    fn push(&mut self, call: CallFuture) {
        self.0.get_or_insert_with(FuturesUnordered::new).push(call);
    }

    /// The next call to finish; `None` when there is none.
    async fn next(&mut self) -> Option<(u64, Outcome)> {
        match &mut self.0 {
            Some(calls) => calls.next().await,
            None => None,
        }
    }

    fn poll_next_unpin(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<(u64, Outcome)>> {
        match &mut self.0 {
            Some(calls) => calls.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    facts: Arc<SessionFacts>,
    outbox: Arc<Outbox>,
    calls: Calls,
    cancels: netproc_wire::RequestIdMap<CancellationToken>,
    /// The request gate's state: last id, request bucket, refusal budget.
    gate: Gate,
    pings: TokenBucket,
    /// This session's running calls, published for the metrics gauge (only
    /// this session writes it: no cache line shared between connections).
    in_flight: Arc<AtomicUsize>,
    /// The liveness stamp of the last read (only this session writes it).
    activity: Arc<std::sync::atomic::AtomicU64>,
    last_activity: Instant,
}

/// How the session loop ends.
enum End {
    /// Close now (after the farewell, if any).
    Now,
    /// Stop reading; finish in-flight calls until the deadline.
    Drain(Instant),
}

impl Session {
    pub(crate) fn new(
        shared: Arc<Shared>,
        facts: Arc<SessionFacts>,
        outbox: Arc<Outbox>,
        in_flight: Arc<AtomicUsize>,
        activity: Arc<std::sync::atomic::AtomicU64>,
    ) -> Session {
        let options = shared.options();
        let sc = &options.session_controls;
        let gate = Gate::new(&shared.abuse);
        let now = shared.time.now();
        let pings = TokenBucket::new(
            sc.max_pings_per_second,
            Duration::from_secs(1),
            sc.ping_burst,
            now,
        );
        Session {
            shared,
            facts,
            outbox,
            calls: Calls::default(),
            cancels: netproc_wire::RequestIdMap::default(),
            gate,
            pings,
            in_flight,
            activity,
            last_activity: now,
        }
    }

    fn respond(&self, id: u64, outcome: Outcome) {
        self.outbox
            .push(&ServerMessage::Response(Response { id, outcome }));
    }

    fn respond_err(&self, id: u64, code: ErrorCode, message: impl Into<String>) {
        self.respond(id, Outcome::Err(ErrorBody::new(code, message)));
    }

    pub(crate) async fn run<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        decoder: &mut FrameDecoder,
        control: &crate::sessions::ControlBox,
    ) {
        let options = self.shared.options_arc();
        let budget = options.session_controls.max_outbound_bytes_per_connection as usize;
        let idle = Duration::from_millis(options.session_controls.idle_timeout_ms);
        // Deadlines in the server's clock (a manual clock in tests).
        let time = self.shared.time.clone();
        let never = Duration::from_secs(100 * 365 * 86_400);
        let mut idle_timer =
            Box::pin(time.sleep_until(time.now() + if idle.is_zero() { never } else { idle }));
        // The session ends when its certificate (if configured) or its
        // credential expires.
        let (expiry, expiry_reason) = self.expiry(options.session_controls.close_on_cert_expiry);
        let mut expiry_timer = pin!(time.sleep_until(expiry));
        let dead = self.outbox.dead().clone();
        let end = loop {
            let out_full = self.outbox.pending() > budget;
            let buf = decoder.read_buffer();
            tokio::select! {
                biased;
                () = dead.cancelled() => break End::Now,
                ctrl = control.recv() => match ctrl {
                    Control::Close { reason, message } => {
                        self.close_with(reason, message);
                        break End::Now;
                    }
                    Control::Shutdown { deadline } => {
                        self.go_away(ErrorCode::ShuttingDown, "the server is shutting down");
                        break End::Drain(deadline);
                    }
                },
                Some((id, outcome)) = self.calls.next(), if !self.calls.is_empty() => {
                    self.cancels.remove(&id);
                    self.respond(id, outcome);
                    self.drain_ready_calls().await;
                }
                read = rd.read_buf(buf), if !out_full => {
                    match read {
                        Ok(0) | Err(_) => break End::Now,
                        Ok(n) => {
                            decoder.read_done(n);
                            self.last_activity = time.now();
                            self.shared.liveness.touch(&self.activity);
                            if let Some(end) = self.drain_frames(decoder) {
                                break end;
                            }
                        }
                    }
                }
                () = self.outbox.space(), if out_full => {}
                () = &mut expiry_timer => {
                    audit::session_closed(&self.facts, expiry_reason.clone());
                    let message = if expiry_reason == ErrorCode::CertificateExpired {
                        "the client certificate expired"
                    } else {
                        "the credential expired"
                    };
                    self.close_with(expiry_reason, message);
                    break End::Now;
                }
                () = &mut idle_timer => {
                    let quiet = time.now().saturating_duration_since(self.last_activity);
                    if !idle.is_zero() && quiet >= idle && self.calls.is_empty() {
                        audit::session_closed(&self.facts, ErrorCode::IdleTimeout);
                        self.close_with(ErrorCode::IdleTimeout, format!("no activity for {} ms", idle.as_millis()));
                        break End::Now;
                    }
                    let next = if quiet >= idle { idle } else { idle - quiet };
                    idle_timer = Box::pin(time.sleep_until(time.now() + next));
                }
            }
            // One wake of the writer per batch of work.
            self.outbox.flush();
            self.in_flight.store(self.calls.len(), Ordering::Relaxed);
        };
        self.outbox.flush();
        if let End::Drain(deadline) = end {
            let deadline = tokio::time::Instant::from_std(deadline);
            while !self.calls.is_empty() {
                tokio::select! {
                    Some((id, outcome)) = self.calls.next() => {
                        self.cancels.remove(&id);
                        self.respond(id, outcome);
                        self.outbox.flush();
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        self.answer_in_flight(ErrorCode::ShuttingDown, "the server shut down before the call finished");
                        break;
                    }
                    () = dead.cancelled() => break,
                }
            }
        }
    }
    /// When the session must end on its own: the earlier of the client
    /// certificate's end of validity (if `close_on_cert_expiry`) and the
    /// credential's expiry, with the reason to give.
    fn expiry(&self, close_on_cert_expiry: bool) -> (Instant, ErrorCode) {
        let time = &self.shared.time;
        let until = |t: SystemTime| time.when(t);
        let far = time.now() + Duration::from_secs(100 * 365 * 86_400);
        let cert = close_on_cert_expiry.then(|| until(self.facts.cert.not_after));
        let key = self.facts.principal.expires_at.map(until);
        match (cert, key) {
            (Some(c), Some(k)) if k < c => (k, ErrorCode::CredentialRevoked),
            (Some(c), _) => (c, ErrorCode::CertificateExpired),
            (None, Some(k)) => (k, ErrorCode::CredentialRevoked),
            (None, None) => (far, ErrorCode::CertificateExpired),
        }
    }

    /// Answers every call that is already complete, without waiting, so
    /// their responses share one write.
    async fn drain_ready_calls(&mut self) {
        loop {
            let ready =
                std::future::poll_fn(|cx| Poll::Ready(self.calls.poll_next_unpin(cx))).await;
            match ready {
                Poll::Ready(Some((id, outcome))) => {
                    self.cancels.remove(&id);
                    self.respond(id, outcome);
                }
                Poll::Ready(None) | Poll::Pending => return,
            }
        }
    }

    /// Handles every complete frame in the decoder. `Some` ends the session.
    fn drain_frames(&mut self, decoder: &mut FrameDecoder) -> Option<End> {
        loop {
            let body = match decoder.next_frame() {
                Ok(Some(body)) => body,
                Ok(None) => return None,
                Err(e) => {
                    audit::session_closed(&self.facts, e.code());
                    self.fatal(e.code(), e.to_string());
                    return Some(End::Now);
                }
            };
            match ClientMessage::decode_shared(&body) {
                Ok(ClientMessage::Request(req)) => {
                    if let Some(end) = self.handle_request(req) {
                        return Some(end);
                    }
                }
                Ok(ClientMessage::Cancel { id }) => {
                    // Free for a live call (it reduces work); a cancel of an
                    // id that is not running is ignored, but not for free.
                    if let Some(token) = self.cancels.get(&id) {
                        token.cancel();
                    } else {
                        let options = self.shared.options();
                        let decision = self.gate.stray_cancel(&self.shared.abuse, &options);
                        if let end @ Some(_) = self.apply(decision, "cancel", None) {
                            return end;
                        }
                    }
                }
                Ok(ClientMessage::Ping { nonce }) => {
                    if let Err(retry) = self.pings.try_acquire(self.shared.time.now()) {
                        audit::session_closed(&self.facts, ErrorCode::RateLimited);
                        let body = crate::abuse::rate_limited("pings", retry, "too many pings");
                        self.answer_in_flight(ErrorCode::RateLimited, &body.message);
                        self.outbox.push(&ServerMessage::Error(body));
                        return Some(End::Now);
                    }
                    self.outbox.push(&ServerMessage::Pong { nonce });
                }
                // A second Auth, whatever version it names.
                Ok(ClientMessage::Auth(_) | ClientMessage::AuthWithOptions(_))
                | Err(DecodeError::UnsupportedVersion { .. }) => {
                    audit::session_closed(&self.facts, ErrorCode::AuthenticationFailed);
                    self.fatal(
                        ErrorCode::AuthenticationFailed,
                        "the session is already authenticated",
                    );
                    return Some(End::Now);
                }
                Ok(_) => {
                    let end = self.refuse(
                        None,
                        "unknown",
                        None,
                        ErrorCode::UnsupportedMessageType,
                        "unsupported message type".into(),
                    );
                    if end.is_some() {
                        return end;
                    }
                }
                Err(DecodeError::UnsupportedMessageType { kind }) => {
                    let end = self.refuse(
                        None,
                        "unknown",
                        None,
                        ErrorCode::UnsupportedMessageType,
                        format!("unsupported message type {kind}"),
                    );
                    if end.is_some() {
                        return end;
                    }
                }
                Err(
                    e @ (DecodeError::InvalidOperation { id, .. }
                    | DecodeError::InvalidRequest { id, .. }),
                ) => {
                    let options = self.shared.options();
                    let end = match self.gate.accept_id(&self.shared.abuse, &options, id) {
                        Ok(()) => self.refuse(Some(id), "unknown", None, e.code(), e.to_string()),
                        Err(decision) => self.apply(decision, "unknown", None),
                    };
                    if end.is_some() {
                        return end;
                    }
                }
                Err(e) => {
                    audit::session_closed(&self.facts, e.code());
                    self.fatal(e.code(), e.to_string());
                    return Some(End::Now);
                }
            }
        }
    }

    /// An error that ends the connection.
    fn fatal(&mut self, code: ErrorCode, message: impl Into<String>) {
        let message = message.into();
        self.answer_in_flight(code.clone(), &message);
        self.outbox.push(&error_msg(code, message));
    }

    /// Answers every in-flight call with `code` and drops its future.
    fn answer_in_flight(&mut self, code: ErrorCode, message: &str) {
        for (id, token) in self.cancels.drain() {
            token.cancel();
            self.outbox.push(&ServerMessage::Response(Response {
                id,
                outcome: Outcome::Err(ErrorBody::new(code.clone(), message)),
            }));
        }
        self.calls = Calls::default();
    }

    fn go_away(&self, reason: ErrorCode, message: &str) {
        self.outbox.push(&ServerMessage::GoAway(GoAway {
            reason,
            last_id: self.gate.last_id().unwrap_or(0),
            message: message.to_owned(),
        }));
    }

    /// Ends the session for `reason`: `GoAway` first (one rule for every
    /// reason, as for `shutting_down`), then in-flight calls answered with it.
    fn close_with(&mut self, reason: ErrorCode, message: impl Into<String>) {
        let message = message.into();
        self.go_away(reason.clone(), &message);
        self.answer_in_flight(reason, &message);
    }
}
