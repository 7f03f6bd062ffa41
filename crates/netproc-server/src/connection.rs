//! One connection, from TCP accept to close: the TLS handshake, the
//! authentication exchange, registration, then the session loop.
//!
//! | state | waits for | on success | on failure |
//! | --- | --- | --- | --- |
//! | `Handshaking` | TLS 1.3 handshake, `tls_handshake_timeout_ms` | ALPN checked → `AwaitingAuth` | closed, nothing sent |
//! | `AwaitingAuth` | one `Auth` frame ≤ `max_pre_auth_frame_bytes`, `auth_message_timeout_ms` | `AuthOk` → `Authenticated` | `Error` frame (`authentication_failed`, `not_authenticated`, `timeout`, …), closed |
//! | `Authenticated` | requests, cancels, pings; control messages | responses | fatal input: `Error` frame, closed |
//! | `Draining` | in-flight calls (after `GoAway(shutting_down)`) | closed when none are left | closed at the grace deadline |

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use netproc_auth::AuthRequest;
use netproc_pki::CertIdentity;
use netproc_wire::{
    ALPN_PROTOCOL, AnnouncedLimits, AuthOk, ErrorCode, FrameDecoder, PROTOCOL_VERSION,
    ServerMessage,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::abuse::{Admitted, Counter};
use crate::audit::{self};
use crate::function::SessionFacts;
use crate::outbox::Outbox;
use crate::session::Session;
use crate::shared::Shared;

mod auth_exchange;

use crate::frames::{ReadError, error_msg, farewell, read_frame};
use crate::refusal::Refused;
use crate::sessions::{Control, Entry, SessionInfo, SessionSelector};
#[cfg(feature = "fuzzing")]
pub(crate) use auth_exchange::exercise as exercise_auth_exchange;
use auth_exchange::{Answer, Attempt, Failure, FirstRead};
use netproc_wire::unix_ms;

/// The audit line of a connection refused after accept, aggregated per reason.
fn connection_refused(shared: &Shared, peer: SocketAddr, reason: &'static str) {
    let now = shared.abuse.clock.now();
    if let Some(suppressed) = shared.abuse.connection_log.check(&reason, now) {
        audit::refused_connection(peer, reason, suppressed);
    }
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
        let msg = ServerMessage::Error(Refused::HandshakeLimited.into_body());
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
    let read = match &first {
        Err(_) => FirstRead::TimedOut(cc.auth_message_timeout_ms),
        Ok(Err(ReadError::Closed)) => return,
        Ok(Err(ReadError::Frame(e))) => FirstRead::Refused(e.clone()),
        Ok(Ok(body)) => FirstRead::Frame(body),
    };
    let attempt = match auth_exchange::first_frame(read, channel_binding) {
        Ok(attempt) => attempt,
        Err(refusal) => {
            match refusal.code {
                ErrorCode::Timeout => shared.abuse.count(Counter::auth_timeout_count),
                ErrorCode::FrameTooLarge => shared.abuse.count(Counter::frame_too_large_count),
                _ => {}
            }
            refuse(refusal.code.clone(), None, &refusal.reason);
            farewell(&mut wr, error_msg(refusal.code, refusal.message), pre_limit).await;
            return;
        }
    };
    let Attempt {
        credential,
        claimed_key,
        client_name,
        client_limit,
    } = attempt;
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
    let answer = match tokio::time::timeout_at(auth_deadline, authenticated).await {
        Ok(Ok(returned)) => Answer::Returned(returned),
        Ok(Err(_)) => Answer::Panicked,
        Err(_) => Answer::TimedOut,
    };
    let mut principal = match auth_exchange::judge(answer, SystemTime::now()) {
        Ok(principal) => principal,
        Err(Failure {
            reason,
            against_key,
        }) => {
            let key = crate::abuse::Abuse::failure_key(
                claimed_key.as_deref(),
                against_key,
                &*shared.authenticator,
            );
            let answer = match shared.abuse.auth_failed(peer.ip(), key) {
                Some(throttled) => ServerMessage::Error(throttled),
                None => ServerMessage::Error(Refused::AuthenticationFailed.into_body()),
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
    let control = Arc::new(crate::sessions::ControlBox::default());
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
        control: Arc::clone(&control),
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
            let refused = Refused::TooManySessions { max: max_sessions };
            farewell(
                &mut wr,
                ServerMessage::Error(refused.into_body()),
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
    session.run(&mut rd, &mut decoder, &control).await;
    shared.sessions.remove(session_id);
    outbox.close();
    // The writer ends after sending what is queued, or at its stall timeout.
    let _ = writer.await;
    tracing::debug!(session_id, "session closed");
}
