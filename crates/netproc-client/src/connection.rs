//! One authenticated connection to one server: requests are multiplexed,
//! ids allocated and encoded under one lock so they reach the server in
//! increasing order, and a reader task routes responses back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use netproc_wire::{
    Auth, AuthMethod, AuthOk, AuthWithOptions, ClientMessage, CodecError, Ed25519Proof, ErrorBody,
    ErrorCode, FrameDecoder, GoAway, Operation, Outcome, PROTOCOL_VERSION, Request, ServerMessage,
    Value,
};
use std::task::{Poll, Waker};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};

use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::endpoint::{Credential, ServerEndpoint};
use crate::error::{ClientError, classify_tls};

/// How a call ends: the server's answer (or why the connection ended), or
/// its deadline passed first.
enum Answer {
    Remote(Result<Value, ErrorBody>),
    TimedOut,
}

/// A call waiting for its response. The answer is left here by the
/// reader (or the sweeper, or the end of the connection) and taken by the
/// caller, who is woken: no channel per call.
struct Pending {
    deadline: Instant,
    answer: Option<Answer>,
    waker: Option<Waker>,
}

impl Pending {
    /// Leaves `answer` unless there is one already; the waker to wake.
    fn answer(&mut self, answer: Answer) -> Option<Waker> {
        if self.answer.is_some() {
            return None;
        }
        self.answer = Some(answer);
        self.waker.take()
    }
}

struct State {
    buf: BytesMut,
    next_id: u64,
    pending: netproc_wire::RequestIdMap<Pending>,
    /// When the sweeper wakes next to time out calls: the earliest deadline
    /// it knows of (`None`: no call waiting). One timer per connection,
    /// not one per call.
    sweep_at: Option<Instant>,
    pings: netproc_wire::RequestIdMap<oneshot::Sender<()>>,
    /// Set when no new request may be sent: why.
    closed: Option<ErrorBody>,
}

pub(crate) struct Connection {
    server: String,
    state: Mutex<State>,
    wake_writer: Notify,
    wake_sweeper: Notify,
    /// `State::closed` is set: read without the lock by [`usable`](Self::usable).
    closed: std::sync::atomic::AtomicBool,
    permits: Semaphore,
    queued: AtomicUsize,
    max_queued: usize,
    frame_limit: u32,
    dead: CancellationToken,
    auth: AuthOk,
    /// Set by [`Connection::drain`]: no new call; closed once idle.
    draining: std::sync::atomic::AtomicBool,
    /// Calls using this connection now (see [`Connection::enter`]).
    active: AtomicUsize,
    /// Woken when the last active call of a draining connection ends.
    idle: Notify,
    /// The runtime the connection's tasks run on (a drain may be asked
    /// from outside any runtime).
    runtime: tokio::runtime::Handle,
}

/// Held by a call while it uses a connection.
pub(crate) struct Active<'a>(&'a Connection);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.draining.load(Ordering::SeqCst)
        {
            self.0.idle.notify_one();
        }
    }
}

fn io_error(server: &str, e: &std::io::Error, during: &str) -> ClientError {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        // TLS has one alert for both ends of the validity window: say so.
        let hint = match tls {
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired) => {
                " (the server refused this client's certificate as expired or not yet \
                 valid: check its validity window and both clocks)"
            }
            _ => "",
        };
        return ClientError::Tls {
            server: server.to_owned(),
            reason: classify_tls(tls),
            message: format!("{tls}{hint}"),
        };
    }
    // A connection closed or reset before the handshake completes is how a
    // server refuses an address (blocked after failed authentications, or
    // over a connection limit): it says nothing before TLS. Say so.
    let refused_quietly = during == "TLS handshake"
        && matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
        );
    let hint = if refused_quietly {
        " (the server closed the connection before TLS completed: it may refuse this \
         address after failed authentications or over a connection limit; an administrator \
         can check with `netproc admin … blocked` and the server's log)"
    } else {
        ""
    };
    ClientError::Connect {
        server: server.to_owned(),
        kind: e.kind(),
        message: format!("{during}: {e}{hint}"),
    }
}

fn timeout_error(server: &str, what: &str) -> ClientError {
    ClientError::Timeout {
        server: server.to_owned(),
        message: what.to_owned(),
    }
}

async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    dec: &mut FrameDecoder,
) -> std::io::Result<Option<Bytes>> {
    dec.read_frame(rd).await.map_err(|e| match e {
        CodecError::Io(e) => e,
        e => std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// Opens a TCP connection to `addr`, from the endpoint's bind address if set.
async fn dial(
    name: &str,
    ep: &ServerEndpoint,
    addr: std::net::SocketAddr,
    limit: Instant,
) -> Result<TcpStream, ClientError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| io_error(name, &e, "socket"))?;
    if let Some(ip) = ep.bind {
        socket
            .bind((ip, 0).into())
            .map_err(|e| io_error(name, &e, "binding the local address"))?;
    }
    tokio::time::timeout_at(limit, socket.connect(addr))
        .await
        .map_err(|_| timeout_error(name, "connecting"))?
        .map_err(|e| io_error(name, &e, "connecting"))
}

/// Dials, handshakes, authenticates. Success is declared only after the
/// server's first answer: in TLS 1.3 a refused client certificate shows only
/// on the client's first read.
///
/// With `plain_auth` false the client announces its inbound frame limit
/// (`AuthWithOptions`); a server that predates that message answers
/// `not_authenticated`, and the caller connects again with `plain_auth`.
pub(crate) async fn connect(
    name: &str,
    ep: &ServerEndpoint,
    tls: &TlsConnector,
    deadline: Instant,
    plain_auth: bool,
) -> Result<Arc<Connection>, ClientError> {
    let limit = deadline.min(Instant::now() + ep.connect_timeout);
    // A host name is resolved at every connect (and so at every
    // reconnect); each address is tried in turn until one answers.
    let addrs = tokio::time::timeout_at(limit, ep.addr.resolve())
        .await
        .map_err(|_| timeout_error(name, "resolving the server's address"))?
        .map_err(|e| io_error(name, &e, &format!("resolving {}", ep.addr)))?;
    let mut last_error = None;
    let mut connected = None;
    for addr in addrs {
        match dial(name, ep, addr, limit).await {
            Ok(tcp) => {
                connected = Some(tcp);
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let tcp = match (connected, last_error) {
        (Some(tcp), _) => tcp,
        (None, Some(e)) => return Err(e),
        (None, None) => return Err(timeout_error(name, "connecting")),
    };
    let _ = tcp.set_nodelay(true);
    let server_name =
        rustls_pki_types::ServerName::try_from(ep.server_name.clone()).map_err(|_| {
            ClientError::Config {
                message: format!("{name}: invalid server name {:?}", ep.server_name),
            }
        })?;
    let mut stream = tokio::time::timeout_at(limit, tls.connect(server_name, tcp))
        .await
        .map_err(|_| timeout_error(name, "TLS handshake"))?
        .map_err(|e| io_error(name, &e, "TLS handshake"))?;

    let method = match &ep.credential {
        Credential::ApiKey(key) => AuthMethod::ApiKey(key.clone()),
        Credential::Ed25519 { key_id, key } => {
            let binding = stream
                .get_ref()
                .1
                .export_keying_material([0u8; 32], netproc_pki::AUTH_EXPORTER_LABEL, None)
                .map_err(|e| ClientError::Config {
                    message: format!("{name}: TLS exporter unavailable: {e}"),
                })?;
            let timestamp_ms = netproc_wire::unix_ms(std::time::SystemTime::now());
            let message = Ed25519Proof::signed_message(key_id, &binding, timestamp_ms);
            AuthMethod::Ed25519(Ed25519Proof {
                key_id: key_id.clone(),
                timestamp_ms,
                signature: key.sign(&message).to_vec(),
            })
        }
    };
    let mut out = BytesMut::new();
    let auth = Auth {
        version: PROTOCOL_VERSION,
        method,
        client_name: ep.client_name.clone(),
    };
    let auth = if plain_auth {
        ClientMessage::Auth(auth)
    } else {
        ClientMessage::AuthWithOptions(
            AuthWithOptions::new(auth).with_max_inbound_frame_bytes(ep.max_frame_bytes),
        )
    };
    auth.encode(&mut out, ep.max_frame_bytes)
        .map_err(|e| ClientError::Config {
            message: format!("{name}: cannot encode Auth: {e}"),
        })?;
    let exchange = async {
        stream.write_all(&out).await?;
        stream.flush().await?;
        let mut decoder = FrameDecoder::new(ep.max_frame_bytes);
        let first = read_frame(&mut stream, &mut decoder).await?;
        Ok::<_, std::io::Error>((first, decoder))
    };
    let (first, decoder) = tokio::time::timeout_at(limit, exchange)
        .await
        .map_err(|_| timeout_error(name, "authentication"))?
        .map_err(|e| io_error(name, &e, "authentication"))?;
    let Some(first) = first else {
        return Err(ClientError::Connect {
            server: name.to_owned(),
            kind: std::io::ErrorKind::UnexpectedEof,
            message: "the server closed the connection during authentication".into(),
        });
    };
    let invalid = |message: String| ClientError::InvalidResponse {
        server: name.to_owned(),
        message,
    };
    let auth_ok = match ServerMessage::decode(&first).map_err(|e| invalid(e.to_string()))? {
        ServerMessage::AuthOk(ok) => ok,
        ServerMessage::Error(body) => return Err(ClientError::from_remote(name, body)),
        other => return Err(invalid(format!("expected AuthOk, got {other:?}"))),
    };
    if auth_ok.version != PROTOCOL_VERSION {
        return Err(invalid(format!(
            "server speaks protocol version {}",
            auth_ok.version
        )));
    }
    let in_flight = auth_ok.limits.max_in_flight_requests.max(1) as usize;
    let frame_limit = auth_ok.limits.max_post_auth_frame_bytes;
    let conn = Arc::new(Connection {
        server: name.to_owned(),
        state: Mutex::new(State {
            buf: BytesMut::new(),
            next_id: 1,
            pending: netproc_wire::RequestIdMap::default(),
            sweep_at: None,
            pings: netproc_wire::RequestIdMap::default(),
            closed: None,
        }),
        wake_writer: Notify::new(),
        wake_sweeper: Notify::new(),
        closed: std::sync::atomic::AtomicBool::new(false),
        permits: Semaphore::new(in_flight),
        queued: AtomicUsize::new(0),
        draining: std::sync::atomic::AtomicBool::new(false),
        active: AtomicUsize::new(0),
        idle: Notify::new(),
        runtime: tokio::runtime::Handle::current(),
        max_queued: ep.max_queued_calls,
        frame_limit,
        dead: CancellationToken::new(),
        auth: auth_ok,
    });
    let heartbeat = heartbeat_interval(name, ep.heartbeat_interval, conn.auth.idle_timeout_ms);
    let (rd, wr) = tokio::io::split(stream);
    tokio::spawn(reader(Arc::clone(&conn), rd, decoder));
    tokio::spawn(writer(Arc::clone(&conn), wr, heartbeat));
    tokio::spawn(sweeper(Arc::clone(&conn)));
    Ok(conn)
}

/// Times out calls whose deadline passed: sleeps until the earliest one,
/// woken early only when a call with an earlier deadline arrives (rare:
/// calls with one timeout arrive in deadline order).
async fn sweeper(conn: Arc<Connection>) {
    loop {
        let at = conn.lock().sweep_at;
        let sleep = async {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = conn.wake_sweeper.notified() => {}
            () = sleep => conn.sweep(),
            () = conn.dead.cancelled() => return,
        }
    }
}

/// The heartbeat interval to use: below the server's idle timeout.
fn heartbeat_interval(
    server: &str,
    configured: Option<Duration>,
    idle_timeout_ms: u64,
) -> Option<Duration> {
    let interval = configured?;
    let idle = Duration::from_millis(idle_timeout_ms);
    if idle.is_zero() || interval < idle {
        return Some(interval);
    }
    let clamped = idle / 2;
    tracing::warn!(
        server,
        configured_ms = interval.as_millis() as u64,
        idle_timeout_ms,
        using_ms = clamped.as_millis() as u64,
        "heartbeat interval is not below the server's idle timeout; using half of it"
    );
    Some(clamped)
}

/// Heartbeat nonces: the top bit set, apart from the callers' pings.
const HEARTBEAT_NONCE: u64 = 1 << 63;

async fn writer(
    conn: Arc<Connection>,
    mut wr: WriteHalf<TlsStream<TcpStream>>,
    heartbeat: Option<Duration>,
) {
    let mut spare = BytesMut::new();
    let mut busy = false;
    let mut beats: u64 = 0;
    // Far enough never to fire when heartbeats are off.
    let every = heartbeat.unwrap_or(Duration::from_secs(100 * 365 * 86_400));
    let mut last_write = Instant::now();
    loop {
        // Under load (several calls outstanding), let callers that are about
        // to queue requests do so first, so requests issued together share
        // one write. A connection with one call writes at once.
        if busy {
            tokio::task::yield_now().await;
        }
        {
            let mut st = conn.lock();
            std::mem::swap(&mut st.buf, &mut spare);
            busy = st.pending.len() > 1;
        }
        if spare.is_empty() {
            tokio::select! {
                () = conn.wake_writer.notified() => continue,
                () = tokio::time::sleep_until(last_write + every) => {
                    // Idle: tell the server this client is alive. The reader
                    // ignores the Pong (no waiter has this nonce).
                    beats += 1;
                    let mut st = conn.lock();
                    let _ = ClientMessage::Ping { nonce: HEARTBEAT_NONCE | beats }
                        .encode(&mut st.buf, conn.frame_limit);
                    continue;
                }
                () = conn.dead.cancelled() => {
                    let _ = tokio::time::timeout(Duration::from_millis(200), wr.shutdown()).await;
                    return;
                }
            }
        }
        let write = async {
            wr.write_all(&spare).await?;
            wr.flush().await
        };
        let result = tokio::select! {
            r = write => r,
            () = conn.dead.cancelled() => return,
        };
        if let Err(e) = result {
            conn.fail(ErrorBody::new(
                ErrorCode::Unavailable,
                format!("write failed: {e}"),
            ));
            return;
        }
        last_write = Instant::now();
        spare.clear();
        if spare.capacity() > 1024 * 1024 {
            spare = BytesMut::new();
        }
    }
}

async fn reader(
    conn: Arc<Connection>,
    mut rd: ReadHalf<TlsStream<TcpStream>>,
    mut decoder: FrameDecoder,
) {
    // A top-level `Error` that the server may follow with a close: if the
    // connection ends next, this is why.
    let mut last_error: Option<ErrorBody> = None;
    let why = loop {
        let frame = tokio::select! {
            r = read_frame(&mut rd, &mut decoder) => r,
            () = conn.dead.cancelled() => return,
        };
        let body = match frame {
            Ok(Some(body)) => body,
            Ok(None) => {
                break last_error.take().unwrap_or_else(|| {
                    ErrorBody::new(ErrorCode::Unavailable, "the server closed the connection")
                });
            }
            Err(e) => {
                break ErrorBody::new(ErrorCode::Unavailable, format!("connection lost: {e}"));
            }
        };
        match ServerMessage::decode_shared(&body) {
            Ok(ServerMessage::Response(r)) => {
                let answer = Answer::Remote(match r.outcome {
                    Outcome::Ok(v) => Ok(v),
                    Outcome::Err(e) => Err(e),
                });
                let waker = conn
                    .lock()
                    .pending
                    .get_mut(&r.id)
                    .and_then(|p| p.answer(answer));
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            Ok(ServerMessage::Pong { nonce }) => {
                if let Some(w) = conn.lock().pings.remove(&nonce) {
                    let _ = w.send(());
                }
            }
            Ok(ServerMessage::GoAway(g)) => conn.go_away(g),
            Ok(ServerMessage::Error(e)) if e.code == ErrorCode::UnsupportedMessageType => {
                tracing::debug!(server = %conn.server, "server did not understand a message");
            }
            // Not tied to a request and not fatal by itself (wire contract
            // §7): a refused cancel or a spent refusal budget. The session
            // goes on unless the server closes it.
            Ok(ServerMessage::Error(e))
                if matches!(e.code, ErrorCode::RateLimited | ErrorCode::InvalidRequest) =>
            {
                tracing::debug!(server = %conn.server, code = %e.code, "server refused a message");
                last_error = Some(e);
            }
            Ok(ServerMessage::Error(e)) => break e,
            Ok(other) => {
                break ErrorBody::new(
                    ErrorCode::ProtocolError,
                    format!("unexpected message {other:?}"),
                );
            }
            Err(netproc_wire::DecodeError::UnsupportedMessageType { .. }) => {}
            Err(e) => break ErrorBody::new(ErrorCode::ProtocolError, e.to_string()),
        }
    };
    conn.fail(why);
}

impl Connection {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether new calls may use this connection.
    pub(crate) fn usable(&self) -> bool {
        !self.dead.is_cancelled()
            && !self.draining.load(Ordering::SeqCst)
            && !self.closed.load(Ordering::Acquire)
    }

    /// A call starts using this connection; `None` if it is draining (the
    /// caller takes a fresh one). With [`drain`](Self::drain), either the
    /// call sees the drain or the drain sees the call: never neither.
    pub(crate) fn enter(&self) -> Option<Active<'_>> {
        self.active.fetch_add(1, Ordering::SeqCst);
        let guard = Active(self);
        if self.draining.load(Ordering::SeqCst) {
            drop(guard);
            return None;
        }
        Some(guard)
    }

    /// Takes no new call; closes once the calls using it have ended (at
    /// most `max` from now, after which the rest end as `unavailable`).
    pub(crate) fn drain(self: Arc<Self>, max: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        let runtime = self.runtime.clone();
        runtime.spawn(async move {
            let deadline = Instant::now() + max;
            loop {
                if self.active.load(Ordering::SeqCst) == 0 || self.dead.is_cancelled() {
                    break;
                }
                tokio::select! {
                    () = self.idle.notified() => {}
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            self.fail(ErrorBody::new(
                ErrorCode::Unavailable,
                "the connection was replaced (drained)",
            ));
        });
    }

    pub(crate) fn auth(&self) -> &AuthOk {
        &self.auth
    }

    /// The connection is over: every waiting call gets `why`.
    fn fail(&self, why: ErrorBody) {
        let (wakers, pings) = {
            let mut st = self.lock();
            // A GoAway already said why; keep its reason.
            let why = st.closed.clone().unwrap_or(why);
            st.closed = Some(why.clone());
            self.closed.store(true, Ordering::Release);
            let wakers: Vec<Waker> = st
                .pending
                .values_mut()
                .filter_map(|p| p.answer(Answer::Remote(Err(why.clone()))))
                .collect();
            let pings = std::mem::take(&mut st.pings);
            (wakers, pings)
        };
        wakers.into_iter().for_each(Waker::wake);
        drop(pings);
        self.dead.cancel();
    }

    fn go_away(&self, g: GoAway) {
        let body = ErrorBody::new(g.reason.clone(), g.message);
        let mut st = self.lock();
        st.closed = Some(body.clone());
        self.closed.store(true, Ordering::Release);
        // Requests above last_id will not be answered.
        let wakers: Vec<Waker> = st
            .pending
            .iter_mut()
            .filter(|(id, _)| **id > g.last_id)
            .filter_map(|(_, p)| p.answer(Answer::Remote(Err(body.clone()))))
            .collect();
        drop(st);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Closes now (used by `flush_server`).
    pub(crate) fn close(&self) {
        self.fail(ErrorBody::new(
            ErrorCode::Unavailable,
            "the connection was flushed",
        ));
    }

    fn closed_error(&self, body: ErrorBody) -> ClientError {
        match body.code {
            ErrorCode::Unavailable => ClientError::Connect {
                server: self.server.clone(),
                kind: std::io::ErrorKind::ConnectionAborted,
                message: body.message,
            },
            _ => ClientError::from_remote(&self.server, body),
        }
    }

    /// Runs one request, respecting the server's in-flight limit by queuing
    /// locally. Dropping the future sends `Cancel`.
    pub(crate) async fn request(
        self: &Arc<Self>,
        op: Operation,
        deadline: Instant,
    ) -> Result<Value, ClientError> {
        // A free in-flight slot is taken at once; otherwise the call waits in
        // a bounded local queue, so bursts never exceed the server's limit.
        let _permit = match self.permits.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    return Err(ClientError::Overloaded {
                        server: self.server.clone(),
                        message: format!(
                            "{} calls already waiting for an in-flight slot",
                            self.max_queued
                        ),
                    });
                }
                let permit = tokio::time::timeout_at(deadline, self.permits.acquire()).await;
                self.queued.fetch_sub(1, Ordering::AcqRel);
                match permit {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => unreachable!("the semaphore is never closed"),
                    Err(_) => {
                        return Err(timeout_error(&self.server, "waiting for an in-flight slot"));
                    }
                }
            }
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let deadline_ms = u32::try_from(remaining.as_millis()).unwrap_or(u32::MAX);
        // The caller's waker goes in with the request: the reader can wake
        // it as soon as the answer is in, with no poll in between.
        let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
        let id = {
            let mut st = self.lock();
            if let Some(why) = st.closed.clone() {
                drop(st);
                return Err(self.closed_error(why));
            }
            let id = st.next_id;
            let msg = ClientMessage::Request(Request {
                id,
                op,
                deadline_ms: Some(deadline_ms),
            });
            let was_empty = st.buf.is_empty();
            if let Err(e) = msg.encode(&mut st.buf, self.frame_limit) {
                return Err(ClientError::InvalidArgument {
                    server: self.server.clone(),
                    message: format!("the request cannot be sent: {e}"),
                });
            }
            st.next_id += 1;
            st.pending.insert(
                id,
                Pending {
                    deadline,
                    answer: None,
                    waker: Some(waker),
                },
            );
            let sweep_earlier = st.sweep_at.is_none_or(|at| deadline < at);
            if sweep_earlier {
                st.sweep_at = Some(deadline);
            }
            drop(st);
            if was_empty {
                self.wake_writer.notify_one();
            }
            if sweep_earlier {
                self.wake_sweeper.notify_one();
            }
            id
        };
        let mut guard = CancelOnDrop {
            conn: self,
            id,
            armed: true,
        };
        // The deadline is kept by the connection's sweeper, which answers
        // `TimedOut` and sends the `Cancel`.
        let mut first = true;
        let answer = std::future::poll_fn(|cx| {
            if std::mem::take(&mut first) {
                // Just queued with this task's waker: nothing to look at yet.
                return Poll::Pending;
            }
            let mut st = self.lock();
            let Some(p) = st.pending.get_mut(&id) else {
                return Poll::Ready(None);
            };
            if let Some(answer) = p.answer.take() {
                st.pending.remove(&id);
                return Poll::Ready(Some(answer));
            }
            if !p.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                p.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
        guard.armed = false;
        match answer {
            Some(Answer::TimedOut) => {
                Err(timeout_error(&self.server, "the call's deadline passed"))
            }
            None => Err(self.closed_error(ErrorBody::new(
                ErrorCode::Unavailable,
                "the connection closed",
            ))),
            Some(Answer::Remote(answer)) => {
                answer.map_err(|body| ClientError::from_remote(&self.server, body))
            }
        }
    }

    /// Answers `TimedOut` to every call whose deadline passed, tells the
    /// server to stop them, and sets the next wake.
    fn sweep(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        let expired: Vec<u64> = st
            .pending
            .iter()
            .filter(|(_, p)| p.answer.is_none() && p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        let was_empty = st.buf.is_empty();
        let mut wakers = Vec::with_capacity(expired.len());
        for id in expired {
            if let Some(p) = st.pending.get_mut(&id) {
                wakers.extend(p.answer(Answer::TimedOut));
                if st.closed.is_none() {
                    let _ = ClientMessage::Cancel { id }.encode(&mut st.buf, self.frame_limit);
                }
            }
        }
        st.sweep_at = st
            .pending
            .values()
            .filter(|p| p.answer.is_none())
            .map(|p| p.deadline)
            .min();
        let wake = was_empty && !st.buf.is_empty();
        drop(st);
        if wake {
            self.wake_writer.notify_one();
        }
        wakers.into_iter().for_each(Waker::wake);
    }

    /// A `Ping`; resolves at the `Pong`.
    pub(crate) async fn ping(&self, nonce: u64, deadline: Instant) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.lock();
            if let Some(why) = st.closed.clone() {
                drop(st);
                return Err(self.closed_error(why));
            }
            let was_empty = st.buf.is_empty();
            let _ = ClientMessage::Ping { nonce }.encode(&mut st.buf, self.frame_limit);
            st.pings.insert(nonce, tx);
            drop(st);
            if was_empty {
                self.wake_writer.notify_one();
            }
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(self.closed_error(ErrorBody::new(
                ErrorCode::Unavailable,
                "the connection closed",
            ))),
            Err(_) => {
                self.lock().pings.remove(&nonce);
                Err(timeout_error(&self.server, "ping"))
            }
        }
    }
}

/// Sends `Cancel{id}` if the call is abandoned before its answer.
struct CancelOnDrop<'a> {
    conn: &'a Connection,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.conn.lock();
        // Abandoned before its answer: the server may stop (not if the
        // answer, or a time-out that already sent the cancel, is in).
        let unanswered = st
            .pending
            .remove(&self.id)
            .is_some_and(|p| p.answer.is_none());
        if unanswered && st.closed.is_none() {
            let was_empty = st.buf.is_empty();
            let _ =
                ClientMessage::Cancel { id: self.id }.encode(&mut st.buf, self.conn.frame_limit);
            drop(st);
            if was_empty {
                self.conn.wake_writer.notify_one();
            }
        }
    }
}
