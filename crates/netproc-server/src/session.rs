//! One connection, from TCP accept to close.
//!
//! | state | waits for | on success | on failure |
//! | --- | --- | --- | --- |
//! | `Handshaking` | TLS 1.3 handshake, `tls_handshake_timeout_ms` | ALPN checked → `AwaitingAuth` | closed, nothing sent |
//! | `AwaitingAuth` | one `Auth` frame ≤ `max_pre_auth_frame_bytes`, `auth_message_timeout_ms` | `AuthOk` → `Authenticated` | `Error` frame (`authentication_failed`, `not_authenticated`, `timeout`, …), closed |
//! | `Authenticated` | requests, cancels, pings; control messages | responses | fatal input: `Error` frame, closed |
//! | `Draining` | in-flight calls (after `GoAway(shutting_down)`) | closed when none are left | closed at the grace deadline |

use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use netproc_auth::{AuthRequest, BoxFuture, Credential, authorize, authorize_privilege};
use netproc_limits::TokenBucket;
use netproc_pki::CertIdentity;
use netproc_wire::{
    ALPN_PROTOCOL, AnnouncedLimits, AuthMethod, AuthOk, ClientMessage,
    DEFAULT_MAX_POST_AUTH_FRAME_BYTES, DecodeError, ErrorBody, ErrorCode, FrameDecoder, FrameError,
    GoAway, Operation, Outcome, PROTOCOL_VERSION, Request, Response, ServerMessage, Value,
    to_value,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::abuse::{Admitted, Counter, new_bucket};
use crate::audit::{self, sanitize};
use crate::function::{CallContext, CallError, SessionFacts};
use crate::outbox::Outbox;
use crate::server::Shared;
use crate::sessions::{Control, Entry, SessionInfo, SessionSelector, unix_ms};

/// Read chunk: enough for many small requests per read.
const READ_CHUNK: usize = 16 * 1024;

/// How long a best-effort error frame may take to send before closing.
const FAREWELL_TIMEOUT: Duration = Duration::from_millis(500);

enum ReadError {
    Frame(FrameError),
    Closed,
}

async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    dec: &mut FrameDecoder,
) -> Result<Bytes, ReadError> {
    loop {
        if let Some(frame) = dec.next_frame().map_err(ReadError::Frame)? {
            return Ok(frame);
        }
        let buf = dec.buffer_mut();
        buf.reserve(READ_CHUNK);
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(_) => {}
        }
    }
}

/// Sends one message and closes, best effort: used before the session's
/// writer exists, and for errors that end the connection.
async fn farewell<W: AsyncWrite + Unpin>(wr: &mut W, msg: ServerMessage, limit: u32) {
    let mut buf = BytesMut::new();
    if msg.encode(&mut buf, limit).is_ok() {
        let send = async {
            wr.write_all(&buf).await?;
            wr.flush().await?;
            wr.shutdown().await
        };
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, send).await;
    }
}

/// The audit line of a connection refused after accept, aggregated per reason.
fn connection_refused(shared: &Shared, peer: SocketAddr, reason: &'static str) {
    let now = shared.abuse.clock.now();
    if let Some(suppressed) = shared.abuse.connection_log.check(&reason, now) {
        audit::refused_connection(peer, reason, suppressed);
    }
}

fn error_msg(code: ErrorCode, message: impl Into<String>) -> ServerMessage {
    ServerMessage::Error(ErrorBody::new(code, message))
}

/// Runs one accepted TCP connection to its end. `admitted` holds the socket
/// and handshake permits taken at accept.
pub(crate) async fn run_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
) {
    let _ = tcp.set_nodelay(true);
    // The socket permit is held for the connection's life.
    let Admitted {
        socket: _socket,
        handshake,
    } = admitted;
    let options = shared.options_arc();
    let cc = &options.connection_controls;
    let acceptor = TlsAcceptor::from(shared.tls.load_full());
    let handshake_timeout = Duration::from_millis(cc.tls_handshake_timeout_ms);
    let tls = tokio::select! {
        r = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)) => r,
        () = shared.shutdown.cancelled() => return,
    };
    drop(handshake);
    let tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            shared.abuse.count(Counter::handshake_failure_count);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.abuse.count(Counter::handshake_timeout_count);
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    if conn.alpn_protocol() != Some(ALPN_PROTOCOL) {
        shared.abuse.count(Counter::handshake_failure_count);
        connection_refused(&shared, peer, "the client did not negotiate ALPN netproc/1");
        return;
    }
    // The verifier requires a client certificate, so one is present.
    let Some(cert) = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|der| CertIdentity::from_der(der).ok())
    else {
        connection_refused(&shared, peer, "no parsable client certificate");
        return;
    };
    let cert = Arc::new(cert);
    // What an Ed25519 proof must sign: unique to this connection.
    let channel_binding = conn
        .export_keying_material([0u8; 32], netproc_pki::AUTH_EXPORTER_LABEL, None)
        .ok();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let pre_limit = cc.max_pre_auth_frame_bytes;
    let Some(unauthenticated) = shared.abuse.unauthenticated.try_enter() else {
        shared.abuse.count(Counter::handshake_limited_count);
        connection_refused(&shared, peer, "max_unauthenticated_sessions reached");
        let msg = error_msg(
            ErrorCode::HandshakeLimited,
            "too many unauthenticated sessions",
        );
        farewell(&mut wr, msg, pre_limit).await;
        return;
    };

    // AwaitingAuth.
    let started = Instant::now();
    let auth_timeout = Duration::from_millis(cc.auth_message_timeout_ms);
    let auth_deadline = tokio::time::Instant::now() + auth_timeout;
    // Every failed credential is logged (each cost the peer a handshake, and
    // the blocklist bounds them per address and key); the cheaper refusals
    // are aggregated per (address, code).
    let refuse = |code: ErrorCode, key: Option<&str>, reason: &str| {
        let suppressed = if code == ErrorCode::AuthenticationFailed {
            Some(0)
        } else {
            let now = shared.abuse.clock.now();
            shared.abuse.auth_log.check(&(peer.ip(), code.clone()), now)
        };
        if let Some(suppressed) = suppressed {
            audit::auth_refused(peer, &cert, key, code, reason, started, suppressed);
        }
    };
    let mut decoder = FrameDecoder::new(pre_limit);
    let first = tokio::select! {
        r = tokio::time::timeout_at(auth_deadline, read_frame(&mut rd, &mut decoder)) => r,
        () = shared.shutdown.cancelled() => return,
    };
    let body = match first {
        Err(_) => {
            shared.abuse.count(Counter::auth_timeout_count);
            refuse(ErrorCode::Timeout, None, "no Auth message in time");
            let msg = format!("no Auth message within {} ms", cc.auth_message_timeout_ms);
            farewell(&mut wr, error_msg(ErrorCode::Timeout, msg), pre_limit).await;
            return;
        }
        Ok(Err(ReadError::Closed)) => return,
        Ok(Err(ReadError::Frame(e))) => {
            if e.code() == ErrorCode::FrameTooLarge {
                shared.abuse.count(Counter::frame_too_large_count);
            }
            refuse(e.code(), None, &e.to_string());
            farewell(&mut wr, error_msg(e.code(), e.to_string()), pre_limit).await;
            return;
        }
        Ok(Ok(body)) => body,
    };
    // What the client can take: announced with AuthWithOptions, else the
    // default every client accepts. The server never sends a larger frame.
    let (auth, client_limit) = match ClientMessage::decode(&body) {
        Ok(ClientMessage::Auth(auth)) => (auth, DEFAULT_MAX_POST_AUTH_FRAME_BYTES),
        Ok(ClientMessage::AuthWithOptions(a)) => {
            let limit = a
                .max_inbound_frame_bytes()
                .unwrap_or(DEFAULT_MAX_POST_AUTH_FRAME_BYTES);
            (a.auth, limit)
        }
        Ok(_)
        | Err(
            DecodeError::UnsupportedMessageType { .. }
            | DecodeError::InvalidOperation { .. }
            | DecodeError::InvalidRequest { .. },
        ) => {
            refuse(
                ErrorCode::NotAuthenticated,
                None,
                "first message was not Auth",
            );
            let msg = error_msg(
                ErrorCode::NotAuthenticated,
                "the first message must be Auth",
            );
            farewell(&mut wr, msg, pre_limit).await;
            return;
        }
        Err(e) => {
            refuse(e.code(), None, &e.to_string());
            farewell(&mut wr, error_msg(e.code(), e.to_string()), pre_limit).await;
            return;
        }
    };
    let client_name = auth.client_name.as_deref().map(sanitize);
    let failed = || error_msg(ErrorCode::AuthenticationFailed, "authentication failed");
    let credential = match (auth.method, channel_binding) {
        (AuthMethod::ApiKey(key), _) => Credential::ApiKey(key),
        (AuthMethod::Ed25519(proof), Some(channel_binding)) => Credential::Ed25519 {
            proof,
            channel_binding,
        },
        _ => {
            refuse(
                ErrorCode::AuthenticationFailed,
                None,
                "authentication method not enabled",
            );
            farewell(&mut wr, failed(), pre_limit).await;
            return;
        }
    };
    let claimed_key = match &credential {
        Credential::ApiKey(k) => audit::claimed_key_id(k.expose()),
        Credential::Ed25519 { proof, .. } => Some(sanitize(&proof.key_id)),
        _ => None,
    };
    // A blocked address or key, or too many attempts from this address:
    // refused without calling the authenticator.
    if let Err(body) = shared
        .abuse
        .check_auth_attempt(peer.ip(), claimed_key.as_deref())
    {
        refuse(
            ErrorCode::AuthThrottled,
            claimed_key.as_deref(),
            &body.message,
        );
        farewell(&mut wr, ServerMessage::Error(body), pre_limit).await;
        return;
    }
    let request = AuthRequest::new(credential, peer, Arc::clone(&cert));
    let authenticated = AssertUnwindSafe(shared.authenticator.authenticate(request)).catch_unwind();
    let mut principal = match tokio::time::timeout_at(auth_deadline, authenticated).await {
        Ok(Ok(Ok(p))) if p.expires_at.is_none_or(|t| t > SystemTime::now()) => p,
        outcome => {
            let (reason, against_key) = match outcome {
                Ok(Ok(Err(rejected))) => (rejected.reason, rejected.counts_against_key),
                Ok(Ok(Ok(_))) => ("credential expired".to_owned(), true),
                Ok(Err(_)) => ("the authenticator panicked".to_owned(), true),
                Err(_) => ("the authenticator did not answer in time".to_owned(), true),
            };
            let key = crate::abuse::Abuse::failure_key(
                claimed_key.as_deref(),
                against_key,
                &*shared.authenticator,
            );
            let answer = match shared.abuse.auth_failed(peer.ip(), key) {
                Some(throttled) => ServerMessage::Error(throttled),
                None => failed(),
            };
            refuse(
                ErrorCode::AuthenticationFailed,
                claimed_key.as_deref(),
                &reason,
            );
            farewell(&mut wr, answer, pre_limit).await;
            return;
        }
    };

    // Authenticated.
    if options.session_controls.principal == crate::options::PrincipalSource::Certificate {
        principal.id = cert.fingerprint.to_string();
    }
    let session_id = shared.next_session_id();
    let facts = Arc::new(SessionFacts {
        session_id,
        principal,
        peer,
        cert,
    });
    shared.abuse.count(Counter::auth_success_count);
    audit::auth_ok(&facts, client_name.as_deref(), started);
    let post_limit = cc.max_post_auth_frame_bytes;
    decoder.set_limit(post_limit);
    let (control_tx, control_rx) = mpsc::channel(4);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let activity = Arc::new(std::sync::atomic::AtomicU64::new(shared.liveness.stamp()));
    let entry = Entry {
        in_flight: Arc::clone(&in_flight),
        activity: Arc::clone(&activity),
        facts: Arc::clone(&facts),
        info: SessionInfo {
            session_id,
            principal: facts.principal.id.clone(),
            key_id: facts.principal.key_id.clone(),
            peer: peer.to_string(),
            cert_fingerprint: facts.cert.fingerprint.to_string(),
            since_unix_ms: unix_ms(SystemTime::now()),
            client_name,
            idle_ms: 0,
            in_flight: 0,
            liveness: crate::liveness::Liveness::Online,
        },
        control: control_tx,
    };
    let sc = &options.session_controls;
    // The key's own policy, if it has one, over the server's.
    let max_sessions = facts
        .principal
        .max_sessions
        .unwrap_or(sc.max_sessions_per_principal);
    let single_active = facts
        .principal
        .single_active_session
        .unwrap_or(sc.single_active_session);
    match shared.sessions.register(entry, max_sessions, single_active) {
        None => {
            audit::session_closed(&facts, ErrorCode::TooManySessions);
            let msg = format!("the principal already has {max_sessions} sessions");
            farewell(
                &mut wr,
                error_msg(ErrorCode::TooManySessions, msg),
                post_limit,
            )
            .await;
            return;
        }
        Some(replaced) => {
            for id in replaced {
                shared.close_sessions_inner(
                    &SessionSelector::Session(id),
                    ErrorCode::SessionReplaced,
                );
            }
        }
    }
    drop(unauthenticated);
    // Online from authentication on, before the client hears AuthOk.
    shared.liveness.session_started(&facts.principal.id);
    // A shutdown that began while this session authenticated must reach it.
    if shared.shutdown.is_cancelled() {
        shared.sessions.signal(
            Some(&SessionSelector::Session(session_id)),
            &Control::Shutdown {
                deadline: Instant::now(),
            },
        );
    }

    let outbox = Arc::new(Outbox::new(client_limit));
    outbox.push(&ServerMessage::AuthOk(AuthOk {
        version: PROTOCOL_VERSION,
        server_name: shared.name.clone(),
        session_id,
        privileges: facts.principal.privileges.names(),
        limits: AnnouncedLimits {
            max_in_flight_requests: options
                .request_controls
                .max_in_flight_requests_per_connection,
            max_pre_auth_frame_bytes: pre_limit,
            max_post_auth_frame_bytes: post_limit,
        },
        idle_timeout_ms: options.session_controls.idle_timeout_ms,
    }));
    outbox.flush();
    let stall = Duration::from_millis(options.session_controls.write_stall_timeout_ms);
    let writer = {
        let outbox = Arc::clone(&outbox);
        tokio::spawn(async move { outbox.run_writer(wr, stall).await })
    };

    let mut session = Session::new(
        Arc::clone(&shared),
        facts,
        Arc::clone(&outbox),
        in_flight,
        activity,
    );
    session.run(&mut rd, &mut decoder, control_rx).await;
    shared.sessions.remove(session_id);
    outbox.close();
    // The writer ends after sending what is queued, or at its stall timeout.
    let _ = writer.await;
    tracing::debug!(session_id, "session closed");
}

type CallFuture = BoxFuture<'static, (u64, Outcome)>;

struct Session {
    shared: Arc<Shared>,
    facts: Arc<SessionFacts>,
    outbox: Arc<Outbox>,
    calls: FuturesUnordered<CallFuture>,
    cancels: HashMap<u64, CancellationToken>,
    last_id: Option<u64>,
    pings: TokenBucket,
    /// The per-connection request bucket, with the settings version it follows.
    conn_bucket: (u64, TokenBucket),
    /// The per-connection refusal budget, likewise.
    refusals: (u64, TokenBucket),
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
    fn new(
        shared: Arc<Shared>,
        facts: Arc<SessionFacts>,
        outbox: Arc<Outbox>,
        in_flight: Arc<AtomicUsize>,
        activity: Arc<std::sync::atomic::AtomicU64>,
    ) -> Session {
        let options = shared.options();
        let sc = &options.session_controls;
        let now = shared.abuse.clock.now();
        let conn_bucket = (
            shared.abuse.version(),
            new_bucket(&options.request_controls.per_connection, now),
        );
        let refusals = (
            shared.abuse.version(),
            new_bucket(&options.request_controls.refusals, now),
        );
        let pings = TokenBucket::new(
            sc.max_pings_per_second,
            Duration::from_secs(1),
            sc.ping_burst,
            Instant::now(),
        );
        Session {
            shared,
            facts,
            outbox,
            calls: FuturesUnordered::new(),
            cancels: HashMap::new(),
            last_id: None,
            pings,
            conn_bucket,
            refusals,
            in_flight,
            activity,
            last_activity: Instant::now(),
        }
    }

    fn respond(&self, id: u64, outcome: Outcome) {
        self.outbox
            .push(&ServerMessage::Response(Response { id, outcome }));
    }

    fn respond_err(&self, id: u64, code: ErrorCode, message: impl Into<String>) {
        self.respond(id, Outcome::Err(ErrorBody::new(code, message)));
    }

    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        decoder: &mut FrameDecoder,
        mut control: mpsc::Receiver<Control>,
    ) {
        let options = self.shared.options_arc();
        let budget = options.session_controls.max_outbound_bytes_per_connection as usize;
        let idle = Duration::from_millis(options.session_controls.idle_timeout_ms);
        let mut idle_timer = pin!(tokio::time::sleep(if idle.is_zero() {
            Duration::MAX / 4
        } else {
            idle
        }));
        // The session ends when its certificate (if configured) or its
        // credential expires.
        let (expiry, expiry_reason) = self.expiry(options.session_controls.close_on_cert_expiry);
        let mut expiry_timer = pin!(tokio::time::sleep_until(expiry));
        let dead = self.outbox.dead().clone();
        let end = loop {
            let out_full = self.outbox.pending() > budget;
            let buf = decoder.buffer_mut();
            buf.reserve(READ_CHUNK);
            tokio::select! {
                biased;
                () = dead.cancelled() => break End::Now,
                Some(ctrl) = control.recv() => match ctrl {
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
                        Ok(_) => {
                            self.last_activity = Instant::now();
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
                    let quiet = self.last_activity.elapsed();
                    if !idle.is_zero() && quiet >= idle && self.calls.is_empty() {
                        audit::session_closed(&self.facts, ErrorCode::IdleTimeout);
                        self.close_with(ErrorCode::IdleTimeout, format!("no activity for {} ms", idle.as_millis()));
                        break End::Now;
                    }
                    let next = if quiet >= idle { idle } else { idle - quiet };
                    idle_timer.as_mut().reset(tokio::time::Instant::now() + next);
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
    fn expiry(&self, close_on_cert_expiry: bool) -> (tokio::time::Instant, ErrorCode) {
        let now_wall = SystemTime::now();
        let now = tokio::time::Instant::now();
        let until = |t: SystemTime| now + t.duration_since(now_wall).unwrap_or(Duration::ZERO);
        let far = now + Duration::from_secs(100 * 365 * 86_400);
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
            match ClientMessage::decode(&body) {
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
                    } else if let Err(end @ Some(_)) = self.take_refusal_token(None) {
                        return end;
                    }
                }
                Ok(ClientMessage::Ping { nonce }) => {
                    if let Err(retry) = self.pings.try_acquire(Instant::now()) {
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
                    let end = match self.accept_id(id) {
                        Ok(()) => self.refuse(Some(id), "unknown", None, e.code(), e.to_string()),
                        Err(end) => end,
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

    /// Checks that `id` is at least 1 and above the session's previous ids.
    /// `Err` when it is not: refused with a top-level `Error{invalid_request}`
    /// whose details carry `{id, last_id}` — never a `Response`, so a
    /// response always belongs to the call the client made with that id;
    /// `Err(Some(_))` ends the session.
    fn accept_id(&mut self, id: u64) -> Result<(), Option<End>> {
        let last = self.last_id.unwrap_or(0);
        if id <= last {
            let message = if id == 0 {
                "request ids start at 1".to_owned()
            } else {
                format!("request id {id} is not above the previous id {last}")
            };
            self.take_refusal_token(None)?;
            self.shared.abuse.count(Counter::request_refused_count);
            self.audit_refusal("unknown", None, ErrorCode::InvalidRequest);
            let int = |n: u64| Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
            let details = Value::Map(std::collections::BTreeMap::from([
                ("id".to_owned(), int(id)),
                ("last_id".to_owned(), int(last)),
            ]));
            self.outbox.push(&ServerMessage::Error(
                ErrorBody::new(ErrorCode::InvalidRequest, message).with_details(details),
            ));
            return Err(None);
        }
        self.last_id = Some(id);
        Ok(())
    }

    /// A token from the refusal budget for a frame that is refused rather
    /// than served. `Err` when the budget is spent: the frame was answered
    /// `rate_limited` (scope `refusals`) instead, and `Err(Some(_))` ends the
    /// session (`disconnect_on_limit`).
    fn take_refusal_token(&mut self, id: Option<u64>) -> Result<(), Option<End>> {
        let options = self.shared.options();
        let Err(refusal) = self
            .shared
            .abuse
            .check_refusal(&options, &mut self.refusals)
        else {
            return Ok(());
        };
        self.audit_refusal("unknown", None, ErrorCode::RateLimited);
        match id {
            Some(id) => self.respond(id, Outcome::Err(refusal.body)),
            None => self.outbox.push(&ServerMessage::Error(refusal.body)),
        }
        if refusal.disconnect {
            audit::session_closed(&self.facts, ErrorCode::RateLimited);
            self.close_with(ErrorCode::RateLimited, "too many refused requests");
            return Err(Some(End::Now));
        }
        Err(None)
    }

    /// Refuses a frame with `code`: a response to `id`, or a top-level
    /// `Error` frame that leaves the session open. Takes a token from the
    /// refusal budget first; `Some` ends the session.
    fn refuse(
        &mut self,
        id: Option<u64>,
        operation: &str,
        function: Option<&str>,
        code: ErrorCode,
        message: String,
    ) -> Option<End> {
        if let Err(end) = self.take_refusal_token(id) {
            return end;
        }
        self.shared.abuse.count(Counter::request_refused_count);
        self.audit_refusal(operation, function, code.clone());
        match id {
            Some(id) => self.respond_err(id, code, message),
            None => self.outbox.push(&error_msg(code, message)),
        }
        None
    }

    /// The audit line of a refused request, aggregated per (principal, code).
    fn audit_refusal(&self, operation: &str, function: Option<&str>, code: ErrorCode) {
        let now = self.shared.abuse.clock.now();
        let kind = (self.facts.principal.id.clone(), code.clone());
        if let Some(suppressed) = self.shared.abuse.request_log.check(&kind, now) {
            audit::request_refused(&self.facts, operation, function, code, suppressed);
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
        self.calls = FuturesUnordered::new();
    }

    fn go_away(&self, reason: ErrorCode, message: &str) {
        self.outbox.push(&ServerMessage::GoAway(GoAway {
            reason,
            last_id: self.last_id.unwrap_or(0),
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

    /// Checks and dispatches one request, in this order: id, privilege,
    /// in-flight cap, request buckets, function limits. `Some` ends the
    /// session (`disconnect_on_limit`).
    fn handle_request(&mut self, req: Request) -> Option<End> {
        let Request {
            id,
            op,
            deadline_ms,
        } = req;
        if let Err(end) = self.accept_id(id) {
            return end;
        }
        if let Err(denied) = authorize(&self.facts.principal, &op) {
            return self.refuse(
                Some(id),
                op.name(),
                function_of(&op),
                ErrorCode::InsufficientPrivileges,
                denied.to_string(),
            );
        }
        let refused = |session: &Session, op: &Operation, code: ErrorCode| {
            session.audit_refusal(op.name(), function_of(op), code);
        };
        let options = self.shared.options();
        let rc = &options.request_controls;
        if self.calls.len() >= rc.max_in_flight_requests_per_connection as usize {
            refused(self, &op, ErrorCode::RateLimited);
            let body = self.shared.abuse.in_flight_refusal();
            self.respond(id, Outcome::Err(body));
            return None;
        }
        let principal = &self.facts.principal;
        let key_id = principal.key_id.as_deref().unwrap_or(&principal.id);
        let checked = self.shared.abuse.check_request(
            &options,
            &mut self.conn_bucket,
            key_id,
            self.facts.peer.ip(),
        );
        if let Err(refusal) = checked {
            refused(self, &op, ErrorCode::RateLimited);
            self.respond(id, Outcome::Err(refusal.body));
            if refusal.disconnect {
                audit::session_closed(&self.facts, ErrorCode::RateLimited);
                self.close_with(ErrorCode::RateLimited, "request rate limit exceeded");
                return Some(End::Now);
            }
            return None;
        }
        if deadline_ms == Some(0) {
            // The client gave the call no time at all.
            refused(self, &op, ErrorCode::Timeout);
            self.respond_err(id, ErrorCode::Timeout, "the request's deadline is 0 ms");
            return None;
        }
        let server_limit = Duration::from_millis(rc.request_timeout_ms);
        let limit = deadline_ms.map_or(server_limit, |ms| {
            server_limit.min(Duration::from_millis(ms.into()))
        });
        match op {
            Operation::Invoke { function, args } => self.invoke(id, function, args, limit),
            Operation::DefineFunction(def) => {
                let (ctx, token, deadline) = self.context(limit);
                drop(ctx);
                let fut = crate::scripts::Scripts::define_function(
                    Arc::clone(&self.shared),
                    def,
                    self.facts.principal.clone(),
                );
                self.spawn_call(id, Box::pin(fut), token, deadline, limit, None);
            }
            Operation::DefineConstant { name, value } => {
                let fut = crate::scripts::define_constant(
                    Arc::clone(&self.shared),
                    name,
                    value,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::UndefineConstant { name } => {
                let fut = crate::scripts::undefine_constant(
                    Arc::clone(&self.shared),
                    name,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::UndefineFunction { name } => {
                let fut = crate::scripts::Scripts::undefine_function(
                    Arc::clone(&self.shared),
                    name,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::UndefineDependency { alias, force } => {
                let fut = crate::scripts::Scripts::undefine_dependency(
                    Arc::clone(&self.shared),
                    alias,
                    force,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::Reload => {
                audit::admin_action(&self.facts, "reload", "");
                let shared = Arc::clone(&self.shared);
                let fut = async move {
                    shared
                        .reload()
                        .await
                        .map(|closed| Value::Int(closed as i64))
                        .map_err(|e| {
                            CallError::with_code(ErrorCode::InvalidArgument, e.to_string())
                        })
                };
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::DefineDependency { alias, source } => {
                let (ctx, token, deadline) = self.context(limit);
                drop(ctx);
                let fut = crate::scripts::Scripts::define_dependency(
                    Arc::clone(&self.shared),
                    alias,
                    source,
                    self.facts.principal.clone(),
                );
                self.spawn_call(id, Box::pin(fut), token, deadline, limit, None);
            }
            Operation::Extension { name, payload } => {
                let Some(ext) = self.shared.registry.extensions.get(&name) else {
                    let msg = format!("no extension named \"{}\"", sanitize(&name));
                    return self.refuse(
                        Some(id),
                        "extension",
                        Some(&name),
                        ErrorCode::InvalidOperation,
                        msg,
                    );
                };
                if let Err(denied) =
                    authorize_privilege(&self.facts.principal, ext.privilege, "extension")
                {
                    return self.refuse(
                        Some(id),
                        "extension",
                        Some(&name),
                        ErrorCode::InsufficientPrivileges,
                        denied.to_string(),
                    );
                }
                let (ctx, token, deadline) = self.context(limit);
                let handler = Arc::clone(&ext.handler);
                let fut: BoxFuture<'static, Result<Value, CallError>> =
                    Box::pin(async move { handler.handle(ctx, payload).await.map(Value::Bytes) });
                self.spawn_call(id, fut, token, deadline, limit, None);
            }
            op => {
                let outcome = self.run_inline(op);
                self.respond(id, outcome);
            }
        }
        None
    }
    /// A change to the definitions, run as a call (it may wait for a
    /// compile or a database commit).
    fn spawn_definition(
        &mut self,
        id: u64,
        fut: BoxFuture<'static, Result<Value, CallError>>,
        limit: Duration,
    ) {
        let (ctx, token, deadline) = self.context(limit);
        drop(ctx);
        self.spawn_call(id, fut, token, deadline, limit, None);
    }

    /// An invoke: a native function, else a script function.
    fn invoke(&mut self, id: u64, function: String, args: Vec<Value>, limit: Duration) {
        let now = self.shared.abuse.clock.now();
        if let Some(f) = self.shared.registry.functions.get(&function) {
            let guards = &self.shared.registry.guards;
            let guard = if guards.is_empty() {
                None
            } else {
                guards.get(&function)
            };
            let Some(permit) = self.admit_function(id, &function, guard, now) else {
                return;
            };
            let (ctx, token, deadline) = self.context(limit);
            let fut = f.call(ctx, args);
            self.spawn_call(id, fut, token, deadline, limit, permit);
            return;
        }
        let entry = self.shared.scripts.as_ref().and_then(|s| s.get(&function));
        let Some(entry) = entry else {
            self.audit_refusal("invoke", Some(&function), ErrorCode::FunctionNotFound);
            let msg = format!("no function named \"{}\"", sanitize(&function));
            self.respond_err(id, ErrorCode::FunctionNotFound, msg);
            return;
        };
        let Some(permit) = self.admit_function(id, &function, entry.guard.as_ref(), now) else {
            return;
        };
        let (ctx, token, deadline) = self.context(limit);
        drop(ctx);
        let Some(scripts) = self.shared.scripts.as_ref() else {
            return;
        };
        let constants = self.shared.registry.constants();
        match scripts
            .runtime
            .call(&entry.function, args, constants, deadline)
        {
            Ok(call) => {
                let fut = async move { call.await.map_err(crate::scripts::script_error) };
                self.spawn_call(id, Box::pin(fut), token, deadline, limit, permit);
            }
            Err(e) => {
                self.audit_refusal("invoke", Some(&function), e.code());
                self.respond(
                    id,
                    Outcome::Err(crate::scripts::script_error(e).into_body()),
                );
            }
        }
    }

    /// A function's own limits: `Some(permit)` to go on, `None` when refused
    /// (and answered).
    fn admit_function(
        &self,
        id: u64,
        function: &str,
        guard: Option<&crate::function::FunctionGuard>,
        now: Instant,
    ) -> Option<Option<netproc_limits::GatePermit>> {
        match guard.map(|g| g.admit(now)) {
            None => Some(None),
            Some(Ok(permit)) => Some(permit),
            Some(Err((scope, retry))) => {
                self.audit_refusal("invoke", Some(function), ErrorCode::RateLimited);
                let body = self.shared.abuse.function_refusal(scope, retry);
                self.respond(id, Outcome::Err(body));
                None
            }
        }
    }

    fn context(&self, limit: Duration) -> (CallContext, CancellationToken, Instant) {
        let token = CancellationToken::new();
        let deadline = Instant::now() + limit;
        let ctx = CallContext::new(Arc::clone(&self.facts), token.clone(), deadline);
        (ctx, token, deadline)
    }

    /// Adds a call to the session's in-flight set. It is polled by this
    /// session's task (no task per call), bounded by its deadline, stopped
    /// by `Cancel`, and a panic in it answers `internal` for this request only.
    fn spawn_call(
        &mut self,
        id: u64,
        fut: BoxFuture<'static, Result<Value, CallError>>,
        token: CancellationToken,
        deadline: Instant,
        limit: Duration,
        permit: Option<netproc_limits::GatePermit>,
    ) {
        self.cancels.insert(id, token.clone());
        let facts = Arc::clone(&self.facts);
        self.calls.push(Box::pin(async move {
            // Released when the call ends, however it ends.
            let _permit = permit;
            let finished = |r: std::thread::Result<Result<Value, CallError>>| match r {
                Ok(Ok(v)) => Outcome::Ok(v),
                Ok(Err(e)) => Outcome::Err(e.into_body()),
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(session_id = facts.session_id, request_id = id, panic = %what, "a function panicked");
                    Outcome::Err(ErrorBody::new(ErrorCode::Internal, "internal error"))
                }
            };
            let mut guarded = AssertUnwindSafe(fut).catch_unwind();
            // Most functions finish on their first poll: they need no timer.
            if let Poll::Ready(r) = futures_util::poll!(&mut guarded) {
                return (id, finished(r));
            }
            let outcome = tokio::select! {
                biased;
                () = token.cancelled() => Outcome::Err(ErrorBody::new(ErrorCode::Cancelled, "the call was cancelled")),
                r = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), guarded) => match r {
                    Ok(r) => finished(r),
                    Err(_) => {
                        token.cancel();
                        Outcome::Err(ErrorBody::new(
                            ErrorCode::Timeout,
                            format!("the call did not finish within {} ms", limit.as_millis()),
                        ))
                    }
                },
            };
            (id, outcome)
        }));
    }

    /// Operations answered at once, without running user code.
    fn run_inline(&self, op: Operation) -> Outcome {
        let shared = &self.shared;
        let principal = &self.facts.principal;
        let err = |code, msg: String| Outcome::Err(ErrorBody::new(code, msg));
        match op {
            Operation::ListFunctions => {
                let may_invoke = principal
                    .privileges
                    .satisfies(netproc_wire::Privilege::InvokeFunctions);
                let mut entries: Vec<(String, Value)> = shared
                    .registry
                    .functions
                    .keys()
                    .filter(|n| may_invoke && principal.may_call(n))
                    .map(|n| {
                        let v = Value::Map(
                            [
                                ("kind".to_owned(), Value::from("native")),
                                ("name".to_owned(), Value::from(n.as_str())),
                            ]
                            .into(),
                        );
                        (n.clone(), v)
                    })
                    .collect();
                if let Some(scripts) = &shared.scripts {
                    entries.extend(scripts.list(principal));
                }
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Outcome::Ok(Value::List(entries.into_iter().map(|(_, v)| v).collect()))
            }
            Operation::ListConstants => {
                Outcome::Ok(Value::Map((*shared.registry.constants()).clone()))
            }
            Operation::ListDependencies => Outcome::Ok(
                shared
                    .scripts
                    .as_ref()
                    .map_or(Value::List(Vec::new()), |s| s.list_dependencies()),
            ),
            Operation::ServerInfo => {
                audit::admin_action(&self.facts, "server_info", "");
                let info = ServerInfoReply {
                    name: &shared.name,
                    version: env!("CARGO_PKG_VERSION"),
                    protocol_version: PROTOCOL_VERSION,
                    uptime_ms: u64::try_from(shared.started.elapsed().as_millis())
                        .unwrap_or(u64::MAX),
                    sessions: shared.sessions.len(),
                };
                Outcome::Ok(to_value(&info).unwrap_or_default())
            }
            Operation::ListSessions => {
                audit::admin_action(&self.facts, "list_sessions", "");
                Outcome::Ok(to_value(&shared.sessions.list(&shared.liveness)).unwrap_or_default())
            }
            Operation::DisconnectSession { session_id } => {
                audit::admin_action(&self.facts, "disconnect_session", &session_id.to_string());
                let n = shared.close_sessions_inner(
                    &SessionSelector::Session(session_id),
                    ErrorCode::DisconnectedByAdmin,
                );
                Outcome::Ok(Value::Int(n as i64))
            }
            Operation::DisconnectPrincipal { principal: target } => {
                audit::admin_action(&self.facts, "disconnect_principal", &target);
                let n = shared.close_sessions_inner(
                    &SessionSelector::Principal(target),
                    ErrorCode::DisconnectedByAdmin,
                );
                Outcome::Ok(Value::Int(n as i64))
            }
            Operation::AbuseMetrics => {
                audit::admin_action(&self.facts, "abuse_metrics", "");
                let snapshot = shared.metrics();
                Outcome::Ok(to_value(&snapshot).unwrap_or_default())
            }
            Operation::ListBlocked => {
                audit::admin_action(&self.facts, "list_blocked", "");
                Outcome::Ok(shared.abuse.blocked_value())
            }
            Operation::Unblock { entry } => {
                audit::admin_action(&self.facts, "unblock", &entry);
                Outcome::Ok(Value::Bool(shared.abuse.blocklist.unblock(&entry)))
            }
            Operation::GetLimits => {
                audit::admin_action(&self.facts, "get_limits", "");
                Outcome::Ok(shared.abuse.options_value())
            }
            Operation::SetLimits { limits } => {
                let applied = netproc_wire::from_value::<crate::ServerOptions>(limits)
                    .map_err(|e| format!("invalid limits: {e}"))
                    .and_then(|o| shared.set_options(o).map_err(|e| e.to_string()));
                match applied {
                    Ok(()) => {
                        audit::admin_action(&self.facts, "set_limits", "");
                        Outcome::Ok(Value::Null)
                    }
                    Err(message) => err(ErrorCode::InvalidArgument, message),
                }
            }
            other => err(
                ErrorCode::InvalidOperation,
                format!("operation {} is not supported by this server", other.name()),
            ),
        }
    }
}

fn function_of(op: &Operation) -> Option<&str> {
    match op {
        Operation::Invoke { function, .. } => Some(function),
        Operation::Extension { name, .. } => Some(name),
        _ => None,
    }
}

#[derive(serde::Serialize)]
struct ServerInfoReply<'a> {
    name: &'a str,
    version: &'static str,
    protocol_version: u32,
    uptime_ms: u64,
    sessions: usize,
}
