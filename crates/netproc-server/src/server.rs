//! The server: builder, accept loop, handle, shutdown.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use netproc_auth::Authenticator;
use netproc_limits::{Clock, SystemClock};
use netproc_pki::{Crl, Identity, TlsOptions, TrustAnchors};
use netproc_wire::{ErrorCode, FunctionLimits, Privilege, Value, to_value};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::abuse::{Abuse, AbuseMetrics};
use crate::connection::run_connection;
use crate::error::{RegistrationProblem, ServerError};
use crate::function::{
    CallContext, CallError, Extension, ExtensionHandler, FunctionGuard, NativeFunction, Registry,
    TypedFunction, valid_name,
};
use crate::liveness::{Liveness, LivenessEvent};
use crate::options::{InvalidOption, ServerOptions};
use crate::scripts::Definitions;
use crate::sessions::{Control, SessionInfo, SessionSelector, SessionTable};
use crate::shared::{ReloadSource, Shared};
use crate::state::StateDatabase;

/// Entry point: [`Server::builder`].
#[derive(Debug)]
pub struct Server;

impl Server {
    /// A server named `name` (announced in `AuthOk`), presenting `identity`,
    /// accepting client certificates issued by `client_roots`, and
    /// authenticating clients with `authenticator`.
    ///
    /// Everything a secure server needs is a parameter here, so an
    /// incomplete server cannot be built.
    pub fn builder(
        name: impl Into<String>,
        identity: Identity,
        client_roots: TrustAnchors,
        authenticator: impl Authenticator,
    ) -> ServerBuilder {
        ServerBuilder {
            name: name.into(),
            identity,
            client_roots,
            crls: Vec::new(),
            tls_options: TlsOptions::default(),
            authenticator: Arc::new(authenticator),
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            options: ServerOptions::default(),
            functions: HashMap::new(),
            limits: HashMap::new(),
            constants: BTreeMap::new(),
            extensions: HashMap::new(),
            clock: Arc::new(SystemClock),
            scripts: None,
            state: None,
            reload_source: None,
            trusted_proxies: Vec::new(),
            deny: netproc_pki::DenyList::new(),
            #[cfg(feature = "shared-limits")]
            shared_limits: None,
            errors: Vec::new(),
        }
    }
}

/// Configures a server; [`start`](ServerBuilder::start) runs it.
pub struct ServerBuilder {
    name: String,
    identity: Identity,
    client_roots: TrustAnchors,
    crls: Vec<Crl>,
    pub(crate) tls_options: TlsOptions,
    authenticator: Arc<dyn Authenticator>,
    bind: SocketAddr,
    options: ServerOptions,
    functions: HashMap<String, Arc<dyn NativeFunction>>,
    limits: HashMap<String, FunctionLimits>,
    constants: BTreeMap<String, Value>,
    extensions: HashMap<String, Extension>,
    clock: Arc<dyn Clock>,
    scripts: Option<netproc_script::ScriptRuntime>,
    state: Option<StateSource>,
    reload_source: Option<ReloadSource>,
    trusted_proxies: Vec<crate::proxy_protocol::TrustedProxy>,
    deny: netproc_pki::DenyList,
    #[cfg(feature = "shared-limits")]
    shared_limits: Option<crate::fleet::SharedLimits>,
    errors: Vec<ServerError>,
}

impl fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("name", &self.name)
            .field("bind", &self.bind)
            .field("functions", &self.functions.len())
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// The address to listen on. Default `127.0.0.1:0` (any free port; see
    /// [`ServerHandle::local_addr`]).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// CRLs for client certificates.
    pub fn crls(mut self, crls: Vec<Crl>) -> Self {
        self.crls = crls;
        self
    }

    /// TLS options (e.g. allowing TLS 1.2).
    pub fn tls_options(mut self, options: TlsOptions) -> Self {
        self.tls_options = options;
        self
    }

    /// All tunable limits (defaults otherwise).
    pub fn options(mut self, options: ServerOptions) -> Self {
        self.options = options;
        self
    }

    fn refuse(&mut self, what: &'static str, name: &str, problem: RegistrationProblem) {
        self.errors.push(ServerError::Registration {
            what,
            name: name.to_owned(),
            problem,
        });
    }

    fn register(&mut self, name: &str) -> bool {
        if !valid_name(name) {
            self.refuse("function", name, RegistrationProblem::InvalidName);
            return false;
        }
        if self.functions.contains_key(name) {
            self.refuse("function", name, RegistrationProblem::Duplicate);
            return false;
        }
        true
    }

    /// Registers a typed async function. Arguments arrive as a list and are
    /// converted to `A` (a tuple for positional arguments); a wrong shape is
    /// answered `invalid_argument` naming the expected type. The result is
    /// converted from `R`.
    ///
    /// ```no_run
    /// # use netproc_server::{CallContext, CallError, ServerBuilder};
    /// # fn f(b: ServerBuilder) -> ServerBuilder {
    /// b.function("add", |_ctx: CallContext, (a, b): (i64, i64)| async move {
    ///     a.checked_add(b).ok_or(CallError::invalid_argument("overflow"))
    /// })
    /// # }
    /// ```
    pub fn function<F, A, R, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: Fn(CallContext, A) -> Fut + Send + Sync + 'static,
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        Fut: Future<Output = Result<R, CallError>> + Send + 'static,
    {
        if self.register(name) {
            self.functions
                .insert(name.to_owned(), Arc::new(TypedFunction::new(name, f)));
        }
        self
    }

    /// Gives a registered function limits of its own: a token bucket shared
    /// by all its callers (scope `per_function`) and a cap on concurrent
    /// calls (scope `function_concurrency`), both answered `rate_limited`.
    pub fn function_limits(mut self, name: &str, limits: FunctionLimits) -> Self {
        if let Some(rate) = &limits.rate
            && (rate.tokens_per_interval == 0 || rate.interval_ms == 0 || rate.burst_tokens == 0)
        {
            self.refuse("function", name, RegistrationProblem::ZeroRate);
        }
        self.limits.insert(name.to_owned(), limits);
        self
    }

    /// Enables run-time defined functions (Rhai scripts) on this runtime:
    /// clients with `define_functions` may then define functions that
    /// everyone with `invoke_functions` can call. Off by default: the script
    /// operations answer `invalid_operation`.
    pub fn scripts(mut self, runtime: netproc_script::ScriptRuntime) -> Self {
        self.scripts = Some(runtime);
        self
    }
    /// Keeps run-time definitions (script functions, dependencies,
    /// constants) in a SQLite database in `dir` (created if missing), so
    /// they survive restarts. Without it they live in memory.
    pub fn state_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.state = Some(StateSource::Dir(dir.into()));
        self
    }

    /// Like [`state_dir`](Self::state_dir), with a state database already
    /// open — shared with the crates built on the server (credential
    /// propagation keeps its tables there).
    pub fn state(mut self, db: StateDatabase) -> Self {
        self.state = Some(StateSource::Open(db));
        self
    }

    /// Shares the per-key and per-address request budgets, failed-login
    /// counts and blocks with every server of the same fleet, through
    /// Redis (feature `shared-limits`; `docs/fleet.md`). The server starts
    /// whether or not Redis is up, limiting on its fallback share until it
    /// is.
    #[cfg(feature = "shared-limits")]
    pub fn shared_limits(mut self, shared: crate::fleet::SharedLimits) -> Self {
        self.shared_limits = Some(shared);
        self
    }

    /// Connections from these addresses or networks (load balancers) start
    /// with a PROXY protocol v2 header, whose source address then counts
    /// as the peer's for admission, per-address limits, blocks and the
    /// audit log. Connections from anywhere else are never read for one.
    /// A trusted peer without a valid v2 header is closed.
    pub fn proxy_protocol_from(
        mut self,
        trusted: Vec<crate::proxy_protocol::TrustedProxy>,
    ) -> Self {
        self.trusted_proxies = trusted;
        self
    }

    /// Client certificates to refuse whatever their chain says (e.g. the
    /// list credential propagation keeps): checked at every handshake
    /// after the chain and the CRLs, and each entry added later also ends
    /// the live sessions over a matching certificate, with
    /// `credential_revoked`. Default: an empty list of the server's own
    /// ([`ServerHandle::deny_list`]).
    pub fn deny_list(mut self, list: netproc_pki::DenyList) -> Self {
        self.deny = list;
        self
    }

    /// Where [`ServerHandle::reload`] and the admin `reload` operation read
    /// new TLS material from (typically: the files, re-read).
    pub fn reload_source(mut self, source: ReloadSource) -> Self {
        self.reload_source = Some(source);
        self
    }

    /// The clock the limiters read (a manual clock in tests).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Registers a function implementing [`NativeFunction`] directly.
    pub fn native_function(mut self, name: &str, f: Arc<dyn NativeFunction>) -> Self {
        if self.register(name) {
            self.functions.insert(name.to_owned(), f);
        }
        self
    }

    /// Defines a constant, readable by callers and (later) scripts.
    pub fn constant(mut self, name: &str, value: impl Serialize) -> Self {
        if !valid_name(name) {
            self.refuse("constant", name, RegistrationProblem::InvalidName);
            return self;
        }
        match to_value(&value) {
            Ok(v) => {
                self.constants.insert(name.to_owned(), v);
            }
            Err(e) => self.refuse("constant", name, RegistrationProblem::Value(e.to_string())),
        }
        self
    }

    /// Adds an extension operation (for higher layers such as credential
    /// propagation): requests `Extension { name, payload }` from principals
    /// holding `privilege` go to `handler`.
    pub fn extension(
        mut self,
        name: &str,
        privilege: Privilege,
        handler: Arc<dyn ExtensionHandler>,
    ) -> Self {
        if self.extensions.contains_key(name) {
            self.refuse("extension", name, RegistrationProblem::Duplicate);
        } else {
            self.extensions
                .insert(name.to_owned(), Extension { privilege, handler });
        }
        self
    }

    /// Binds the listener and starts accepting connections.
    pub async fn start(self) -> Result<ServerHandle, ServerError> {
        if let Some(e) = self.errors.into_iter().next() {
            return Err(e);
        }
        if let Some(name) = self
            .limits
            .keys()
            .find(|n| !self.functions.contains_key(*n))
        {
            return Err(ServerError::Registration {
                what: "function",
                name: name.clone(),
                problem: RegistrationProblem::LimitsWithoutFunction,
            });
        }
        self.options.validate()?;
        let tls = netproc_pki::server_config_denying(
            &self.identity,
            &self.client_roots,
            &self.crls,
            &self.deny,
            &self.tls_options,
        )?;
        let state = match self.state {
            None => None,
            Some(source) => Some(open_state(source).await?),
        };
        let listener = TcpListener::bind(self.bind)
            .await
            .map_err(|source| ServerError::Bind {
                addr: self.bind,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: self.bind,
            source,
        })?;
        let now = self.clock.now();
        let guards = self
            .limits
            .into_iter()
            .map(|(name, limits)| (name, FunctionGuard::new(&limits, now)))
            .collect();
        let settings = Arc::new(crate::options::Settings::new(self.options));
        let shared = Arc::new(Shared {
            abuse: Abuse::new(Arc::clone(&settings), Arc::clone(&self.clock)),
            settings,
            name: self.name,
            liveness: crate::liveness::LivenessTracker::new(Arc::clone(&self.clock)),
            time: crate::time::Time::new(Arc::clone(&self.clock)),
            tls: arc_swap::ArcSwap::from_pointee(tls),
            tls_options: self.tls_options,
            deny: self.deny,
            reload_source: self.reload_source,
            trusted_proxies: self.trusted_proxies,
            defs: Arc::new(Definitions {
                registry: Registry::new(self.functions, guards, self.extensions, self.constants),
                scripts: self.scripts.map(crate::scripts::Scripts::new),
                state: state.as_ref().map(|(db, _)| Arc::clone(&db.db)),
            }),
            authenticator: self.authenticator,
            sessions: SessionTable::default(),
            started: Instant::now(),
            next_session_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        if let Some((_, stored)) = state {
            restore(&shared.defs, stored).await;
        }
        #[cfg(feature = "shared-limits")]
        if let Some(config) = self.shared_limits {
            let fleet = crate::fleet::RedisFleet::new(config, &shared)?;
            fleet.start(shared.shutdown.clone());
            let _ = shared.abuse.fleet.set(Arc::new(fleet));
        }
        follow_deny_list(&shared);
        tokio::spawn(scan_liveness(Arc::downgrade(&shared)));
        // Every series from the start, when a `metrics` recorder is
        // installed (gauges stay current with `refresh_gauges_every`).
        shared.abuse.describe_metrics();
        let accept = tokio::spawn(accept_loop(Arc::clone(&shared), listener));
        tracing::info!(server = %shared.name, addr = %local_addr, "listening");
        Ok(ServerHandle {
            inner: Arc::new(HandleInner {
                shared,
                local_addr,
                accept: Mutex::new(Some(accept)),
            }),
        })
    }
}
/// Entries added to the deny list end the live sessions over a matching
/// certificate (handshakes consult the list themselves).
fn follow_deny_list(shared: &Arc<Shared>) {
    metrics::describe_gauge!(
        "netproc_denied_certificates",
        "Client certificates on the deny list now (refused at the handshake; see `docs/propagation.md`)."
    );
    metrics::gauge!("netproc_denied_certificates").set(shared.deny.len() as f64);
    let weak = Arc::downgrade(shared);
    shared.deny.on_added(move |added| {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        metrics::gauge!("netproc_denied_certificates").set(shared.deny.len() as f64);
        let mut closed = 0;
        for session in shared.sessions.list_facts() {
            if added.iter().any(|d| d.matches(&session.cert)) {
                closed += shared.close_sessions_inner(
                    &SessionSelector::Session(session.session_id),
                    ErrorCode::CredentialRevoked,
                );
            }
        }
        if closed > 0 {
            tracing::info!(server = %shared.name, sessions = closed, "closed sessions over denied certificates");
        }
    });
}

type Stored = (
    Vec<(String, Value)>,
    Vec<crate::state::StoredDependency>,
    Vec<crate::state::StoredFunction>,
);

/// Where the state database comes from.
enum StateSource {
    /// Opened at start, in this directory.
    Dir(std::path::PathBuf),
    /// Opened by the caller.
    Open(StateDatabase),
}

/// Opens the state database and reads what it holds, off the runtime threads.
async fn open_state(source: StateSource) -> Result<(StateDatabase, Stored), ServerError> {
    tokio::task::spawn_blocking(move || {
        let db = match source {
            StateSource::Dir(dir) => StateDatabase::open(&dir)?,
            StateSource::Open(db) => db,
        };
        let stored = (|| {
            Ok::<_, rusqlite::Error>((
                db.db.load_constants()?,
                db.db.load_dependencies()?,
                db.db.load_functions()?,
            ))
        })()
        .map_err(|e| ServerError::State {
            path: db.path().to_owned(),
            source: Box::new(e),
        })?;
        Ok((db, stored))
    })
    .await
    .map_err(|e| ServerError::State {
        path: std::path::PathBuf::new(),
        source: Box::new(e),
    })?
}

/// Applies stored definitions at start (recompiling on a blocking thread).
async fn restore(defs: &Arc<Definitions>, (constants, deps, functions): Stored) {
    for (name, value) in constants {
        defs.registry.define_constant(name, value);
    }
    if deps.is_empty() && functions.is_empty() {
        return;
    }
    if defs.scripts.is_none() {
        tracing::warn!(
            "the state directory holds script definitions, but scripts are not enabled; they are ignored"
        );
        return;
    }
    let defs = Arc::clone(defs);
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(scripts) = &defs.scripts {
            scripts.restore(deps, functions);
        }
    })
    .await;
}

/// Recomputes liveness until shutdown, at the period the current
/// thresholds call for.
async fn scan_liveness(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.shutdown.is_cancelled() {
            return;
        }
        let options = shared.options_arc();
        let s = &options.session_controls;
        shared.liveness.scan_with(
            || shared.sessions.latest_activity(),
            s.unstable_after_ms,
            s.offline_after_ms,
        );
        let period = crate::liveness::scan_period(s.unstable_after_ms, s.offline_after_ms);
        drop(options);
        drop(shared);
        tokio::time::sleep(period).await;
    }
}

/// Sets the exported gauges from a fresh snapshot every `every` until the
/// server stops.
async fn refresh_gauges(shared: std::sync::Weak<Shared>, every: std::time::Duration) {
    loop {
        {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if shared.shutdown.is_cancelled() {
                return;
            }
            let _ = shared.metrics();
        }
        tokio::time::sleep(every).await;
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) if shared.trusted_proxies.iter().any(|p| p.contains(peer.ip())) => {
                // The header is read on the connection's own task: a slow
                // balancer never holds the accept loop.
                let shared2 = Arc::clone(&shared);
                shared.tracker.spawn(async move {
                    let mut tcp = tcp;
                    let timeout = Duration::from_millis(
                        shared2.options().connection_controls.tls_handshake_timeout_ms,
                    );
                    let peer = match crate::proxy_protocol::read_header(&mut tcp, timeout).await {
                        Ok(Some(source)) => source,
                        Ok(None) => peer,
                        Err(e) => {
                            tracing::debug!(%peer, error = ?e, "a trusted proxy's connection had no valid PROXY v2 header");
                            shared2.abuse.count(crate::abuse::Counter::connection_rejected_count);
                            return;
                        }
                    };
                    match shared2.abuse.admit(peer.ip()) {
                        Err(code) => tracing::debug!(%peer, %code, "connection refused at admission"),
                        Ok(admitted) => run_connection(Arc::clone(&shared2), tcp, peer, admitted).await,
                    }
                });
            }
            Ok((tcp, peer)) => match shared.abuse.admit(peer.ip()) {
                // Refused before any TLS work; nothing is sent.
                Err(code) => {
                    tracing::debug!(%peer, %code, "connection refused at admission");
                    drop(tcp);
                }
                Ok(admitted) => {
                    shared
                        .tracker
                        .spawn(run_connection(Arc::clone(&shared), tcp, peer, admitted));
                }
            },
            Err(e) => {
                // Out of descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

pub(crate) struct HandleInner {
    pub(crate) shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for HandleInner {
    /// Dropping the last handle stops the server at once (no grace).
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.shared.sessions.signal(
            None,
            &Control::Close {
                reason: ErrorCode::ShuttingDown,
                message: "the server stopped".into(),
            },
        );
    }
}

/// A running server. Cloning gives another handle to the same server;
/// dropping the last handle stops it at once — call
/// [`shutdown`](Self::shutdown) for a graceful stop.
#[derive(Clone)]
pub struct ServerHandle {
    pub(crate) inner: Arc<HandleInner>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("name", &self.inner.shared.name)
            .field("local_addr", &self.inner.local_addr)
            .finish()
    }
}

impl ServerHandle {
    /// Keeps the gauges exported through the `metrics` facade current (for
    /// a Prometheus exporter): sets them from a fresh snapshot every `every`
    /// until the server stops. Counters need nothing: they are exported as
    /// they count. Without a call the gauges change only when the abuse
    /// metrics are read (`abuse_metrics`, the admin operation).
    pub fn refresh_gauges_every(&self, every: std::time::Duration) {
        tokio::spawn(refresh_gauges(
            Arc::downgrade(&self.inner.shared),
            every.max(std::time::Duration::from_millis(100)),
        ));
    }

    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// The client certificates this server refuses (shared: entries added
    /// here take effect at the next handshake and end the live sessions
    /// over them).
    pub fn deny_list(&self) -> &netproc_pki::DenyList {
        &self.inner.shared.deny
    }

    /// The live sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.inner.shared.sessions.list(&self.inner.shared.liveness)
    }

    /// Closes the selected sessions: each gets `GoAway` with `reason`, and
    /// its in-flight calls are answered with `reason`. Returns how many
    /// sessions were selected.
    pub fn close_sessions(&self, selector: &SessionSelector, reason: ErrorCode) -> usize {
        self.inner.shared.close_sessions_inner(selector, reason)
    }
}

impl ServerHandle {
    /// Every principal's liveness (`online`, `unstable`, `offline`), for
    /// principals with a live session.
    pub fn liveness(&self) -> Vec<(String, Liveness)> {
        self.inner.shared.liveness.states()
    }

    /// Liveness transitions as they happen: a bounded broadcast stream (a
    /// subscriber that falls more than 1024 events behind is told how many
    /// it missed, and continues).
    pub fn liveness_events(&self) -> tokio::sync::broadcast::Receiver<LivenessEvent> {
        self.inner.shared.liveness.subscribe()
    }

    /// The abuse-control counters and gauges.
    pub fn abuse_metrics(&self) -> AbuseMetrics {
        self.inner.shared.metrics()
    }

    /// Lifts a block on an address or API key id (`"*"`: the overflow
    /// windows). Returns whether anything was lifted.
    pub fn unblock(&self, entry: &str) -> bool {
        self.inner.shared.abuse.blocklist.unblock(entry)
    }

    /// The settings in force.
    pub fn options(&self) -> ServerOptions {
        (**self.inner.shared.options()).clone()
    }

    /// Changes the settings at run time. Caps, windows and buckets apply at
    /// once; frame limits and timeouts apply to new connections.
    pub fn set_options(&self, options: ServerOptions) -> Result<(), InvalidOption> {
        self.inner.shared.set_options(options)
    }

    /// Graceful shutdown: stop accepting, send `GoAway(shutting_down)` to
    /// every session, let in-flight calls finish for up to `grace`, then
    /// close everything. Returns when every connection task has ended.
    pub async fn shutdown(&self, grace: Duration) {
        let shared = &self.inner.shared;
        shared.shutdown.cancel();
        let accept = self
            .inner
            .accept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(accept) = accept {
            let _ = accept.await;
        }
        let deadline = Instant::now() + grace;
        shared
            .sessions
            .signal(None, &Control::Shutdown { deadline });
        shared.tracker.close();
        // Sessions end by the deadline; the margin covers their farewell writes.
        let margin = Duration::from_millis(
            shared
                .options()
                .session_controls
                .write_stall_timeout_ms
                .min(2_000),
        );
        if tokio::time::timeout(grace + margin, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(server = %shared.name, "connections still open after the grace period");
        }
        tracing::info!(server = %shared.name, "stopped");
    }
}
