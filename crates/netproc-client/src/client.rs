//! The client: named servers, lazy single-flight connections, typed calls,
//! fan-out to every server.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use netproc_pki::{Identity, TrustAnchors};
use netproc_wire::{DefineFunction, DependencySource, Operation, Value, from_value, to_value};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::connection::{Connection, connect};
use crate::endpoint::ServerEndpoint;
use crate::error::ClientError;

/// The reserved name that means "every configured server".
pub const ALL_SERVERS: &str = "all_servers";

/// Reconnection backoff: 100 ms doubling to 5 s, with jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<ClientError>,
}

struct Slot {
    name: String,
    endpoint: ServerEndpoint,
    /// Swapped whole by [`Client::set_identity`]; read at each connect.
    tls: arc_swap::ArcSwap<rustls::ClientConfig>,
    current: ArcSwapOption<Connection>,
    /// Held while connecting: concurrent first calls share one attempt.
    connecting: tokio::sync::Mutex<Backoff>,
    /// The server refused `AuthWithOptions` once: it predates it.
    plain_auth: std::sync::atomic::AtomicBool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(conn) = self.current.swap(None) {
            conn.close();
        }
    }
}

fn jitter(d: Duration) -> Duration {
    // Spread reconnections over [d/2, d] without a random-number crate: the
    // clock's low bits differ between processes and attempts.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    d / 2 + d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

impl Slot {
    async fn connection(&self, deadline: Instant) -> Result<Arc<Connection>, ClientError> {
        if let Some(conn) = self.current.load_full()
            && conn.usable()
        {
            return Ok(conn);
        }
        let mut backoff = self.connecting.lock().await;
        // Someone else may have connected while we waited.
        if let Some(conn) = self.current.load_full()
            && conn.usable()
        {
            return Ok(conn);
        }
        if let Some(at) = backoff.retry_at {
            if at > deadline {
                return Err(backoff.last_error.clone().unwrap_or(ClientError::Timeout {
                    server: self.name.clone(),
                    message: "waiting to reconnect".into(),
                }));
            }
            tokio::time::sleep_until(at).await;
        }
        let tls = TlsConnector::from(self.tls.load_full());
        let plain = self.plain_auth.load(Ordering::Relaxed);
        let mut attempt = connect(&self.name, &self.endpoint, &tls, deadline, plain).await;
        if !plain
            && let Err(e) = &attempt
            && e.code() == netproc_wire::ErrorCode::NotAuthenticated
        {
            // A server from before AuthWithOptions: plain Auth from now on.
            tracing::info!(server = %self.name, "the server predates AuthWithOptions; using plain Auth");
            self.plain_auth.store(true, Ordering::Relaxed);
            attempt = connect(&self.name, &self.endpoint, &tls, deadline, true).await;
        }
        match attempt {
            Ok(conn) => {
                *backoff = Backoff {
                    failures: 0,
                    retry_at: None,
                    last_error: None,
                };
                self.current.store(Some(Arc::clone(&conn)));
                Ok(conn)
            }
            Err(e) => {
                backoff.failures = backoff.failures.saturating_add(1);
                let exp = BACKOFF_BASE.saturating_mul(1 << backoff.failures.min(6));
                backoff.retry_at = Some(Instant::now() + jitter(exp.min(BACKOFF_MAX)));
                backoff.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    fn flush(&self) {
        if let Some(conn) = self.current.swap(None) {
            conn.close();
        }
    }
}

struct Inner {
    slots: BTreeMap<String, Arc<Slot>>,
    nonce: AtomicU64,
}

/// A netproc client for a set of named servers.
///
/// Connections are made lazily on first use (concurrent first calls share
/// one attempt), reconnected on the next use after a loss (with exponential
/// backoff and jitter), and replaced by [`flush_server`](Client::flush_server).
/// Cloning is cheap and shares the connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("servers", &self.inner.slots.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Builds a [`Client`].
#[derive(Debug, Default)]
pub struct ClientBuilder {
    servers: Vec<(String, ServerEndpoint)>,
}

impl ClientBuilder {
    /// Adds a named server.
    pub fn server(mut self, name: impl Into<String>, endpoint: ServerEndpoint) -> Self {
        self.servers.push((name.into(), endpoint));
        self
    }

    /// Checks the configuration and builds the TLS settings of every server.
    /// Fails on an empty, repeated or reserved (`all_servers`) name.
    pub fn build(self) -> Result<Client, ClientError> {
        let mut slots = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (name, endpoint) in self.servers {
            let config_err = |message: String| ClientError::Config { message };
            if name.is_empty() {
                return Err(config_err("a server name is empty".into()));
            }
            if name == ALL_SERVERS {
                return Err(config_err(format!(
                    "\"{ALL_SERVERS}\" is reserved and cannot name a server"
                )));
            }
            if !seen.insert(name.clone()) {
                return Err(config_err(format!("server \"{name}\" is configured twice")));
            }
            let tls = netproc_pki::client_config_with(
                &endpoint.identity,
                &endpoint.roots,
                &endpoint.pins,
                &endpoint.tls_options,
            )
            .map_err(|e| config_err(format!("server \"{name}\": {e}")))?;
            slots.insert(
                name.clone(),
                Arc::new(Slot {
                    name,
                    endpoint,
                    tls: arc_swap::ArcSwap::from_pointee(tls),
                    current: ArcSwapOption::empty(),
                    connecting: tokio::sync::Mutex::new(Backoff {
                        failures: 0,
                        retry_at: None,
                        last_error: None,
                    }),
                    plain_auth: std::sync::atomic::AtomicBool::new(false),
                }),
            );
        }
        Ok(Client {
            inner: Arc::new(Inner {
                slots,
                nonce: AtomicU64::new(1),
            }),
        })
    }
}

/// Converts call arguments: a tuple or list gives positional arguments,
/// `()` none, anything else one argument.
fn args_of(server: &str, args: &impl Serialize) -> Result<Vec<Value>, ClientError> {
    match to_value(args) {
        Ok(Value::List(items)) => Ok(items),
        Ok(Value::Null) => Ok(Vec::new()),
        Ok(other) => Ok(vec![other]),
        Err(e) => Err(ClientError::InvalidArgument {
            server: server.to_owned(),
            message: format!("arguments cannot be encoded: {e}"),
        }),
    }
}

fn decode_result<R: DeserializeOwned>(server: &str, v: Value) -> Result<R, ClientError> {
    from_value(v).map_err(|e| ClientError::InvalidResponse {
        server: server.to_owned(),
        message: format!("unexpected result: {e}"),
    })
}

impl Client {
    /// A builder.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Replaces this client's certificate and the CAs it trusts for servers
    /// (a renewed certificate, a CA rotation), for every server: new
    /// connections use them at once; established ones carry on until they
    /// end or [`flush_server`](Client::flush_server) /
    /// [`flush_all`](Client::flush_all) replaces them. Nothing changes if
    /// the material does not make a valid configuration for every server.
    pub fn set_identity(
        &self,
        identity: &Identity,
        server_roots: &TrustAnchors,
    ) -> Result<(), ClientError> {
        let mut configs = Vec::with_capacity(self.inner.slots.len());
        for slot in self.inner.slots.values() {
            let ep = &slot.endpoint;
            let config =
                netproc_pki::client_config_with(identity, server_roots, &ep.pins, &ep.tls_options)
                    .map_err(|e| ClientError::Config {
                        message: format!("server \"{}\": {e}", slot.name),
                    })?;
            configs.push(Arc::new(config));
        }
        for (slot, config) in self.inner.slots.values().zip(configs) {
            slot.tls.store(config);
        }
        Ok(())
    }

    /// The configured server names.
    pub fn server_names(&self) -> impl Iterator<Item = &str> {
        self.inner.slots.keys().map(String::as_str)
    }

    /// One server by name.
    pub fn server(&self, name: &str) -> Result<ServerRef, ClientError> {
        self.inner
            .slots
            .get(name)
            .map(|slot| ServerRef {
                slot: Arc::clone(slot),
                inner: Arc::clone(&self.inner),
            })
            .ok_or_else(|| ClientError::UnknownServer {
                server: name.chars().take(64).collect(),
            })
    }

    /// Every configured server at once: see [`AllServers`].
    pub fn all_servers(&self) -> AllServers {
        AllServers {
            client: self.clone(),
        }
    }

    /// Closes the connection to `name`; the next call dials afresh (use
    /// after rotating certificates or keys). Calls in flight on the old
    /// connection fail with `unavailable`.
    pub fn flush_server(&self, name: &str) -> Result<(), ClientError> {
        self.server(name)?.slot.flush();
        Ok(())
    }

    /// [`flush_server`](Client::flush_server) for every server.
    pub fn flush_all(&self) {
        for slot in self.inner.slots.values() {
            slot.flush();
        }
    }
}

/// One configured server.
#[derive(Clone)]
pub struct ServerRef {
    slot: Arc<Slot>,
    inner: Arc<Inner>,
}

impl fmt::Debug for ServerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerRef")
            .field("name", &self.slot.name)
            .finish()
    }
}

impl ServerRef {
    /// The server's configured name.
    pub fn name(&self) -> &str {
        &self.slot.name
    }

    /// Runs an operation with a deadline `timeout` from now.
    pub async fn execute_with_timeout(
        &self,
        op: Operation,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let deadline = Instant::now() + timeout;
        let conn = self.slot.connection(deadline).await?;
        conn.request(op, deadline).await
    }

    /// Runs an operation with the endpoint's default deadline.
    pub async fn execute(&self, op: Operation) -> Result<Value, ClientError> {
        self.execute_with_timeout(op, self.slot.endpoint.request_timeout)
            .await
    }

    /// Calls `function`. `args` is a tuple of positional arguments (`()` for
    /// none, `(x,)` for one); the result converts to `R`.
    pub async fn call<R: DeserializeOwned>(
        &self,
        function: &str,
        args: impl Serialize,
    ) -> Result<R, ClientError> {
        self.call_with_timeout(function, args, self.slot.endpoint.request_timeout)
            .await
    }

    /// [`call`](ServerRef::call) with its own deadline.
    pub async fn call_with_timeout<R: DeserializeOwned>(
        &self,
        function: &str,
        args: impl Serialize,
        timeout: Duration,
    ) -> Result<R, ClientError> {
        let args = args_of(&self.slot.name, &args)?;
        let op = Operation::Invoke {
            function: function.to_owned(),
            args,
        };
        let v = self.execute_with_timeout(op, timeout).await?;
        decode_result(&self.slot.name, v)
    }

    /// Defines (or replaces) a constant.
    pub async fn define_constant(
        &self,
        name: &str,
        value: impl Serialize,
    ) -> Result<(), ClientError> {
        let value = to_value(&value).map_err(|e| ClientError::InvalidArgument {
            server: self.slot.name.clone(),
            message: format!("the value cannot be encoded: {e}"),
        })?;
        self.execute(Operation::DefineConstant {
            name: name.to_owned(),
            value,
        })
        .await
        .map(drop)
    }

    /// Removes a constant (an unknown name succeeds).
    pub async fn undefine_constant(&self, name: &str) -> Result<(), ClientError> {
        self.execute(Operation::UndefineConstant {
            name: name.to_owned(),
        })
        .await
        .map(drop)
    }

    /// The constants.
    pub async fn list_constants(&self) -> Result<BTreeMap<String, Value>, ClientError> {
        let v = self.execute(Operation::ListConstants).await?;
        decode_result(&self.slot.name, v)
    }

    /// The functions this caller may call, as `{name, kind}` maps.
    pub async fn list_functions(&self) -> Result<Vec<Value>, ClientError> {
        let v = self.execute(Operation::ListFunctions).await?;
        decode_result(&self.slot.name, v)
    }

    /// Defines (or replaces) a script function `name` from `source` (one or
    /// more Rhai `fn` definitions, one of them `name`). Defining the same
    /// source again is a no-op, so retries are safe.
    pub async fn define_function(&self, name: &str, source: &str) -> Result<(), ClientError> {
        self.execute(define_function_op(name, source))
            .await
            .map(drop)
    }

    /// Removes a script function (an unknown name succeeds).
    pub async fn undefine_function(&self, name: &str) -> Result<(), ClientError> {
        self.execute(Operation::UndefineFunction {
            name: name.to_owned(),
        })
        .await
        .map(drop)
    }

    /// Defines a dependency scripts import with `import "alias" as m;`.
    pub async fn define_dependency(
        &self,
        alias: &str,
        source: DependencySource,
    ) -> Result<(), ClientError> {
        self.execute(Operation::DefineDependency {
            alias: alias.to_owned(),
            source,
        })
        .await
        .map(drop)
    }

    /// Removes a dependency; refused while functions import it unless `force`.
    pub async fn undefine_dependency(&self, alias: &str, force: bool) -> Result<(), ClientError> {
        self.execute(Operation::UndefineDependency {
            alias: alias.to_owned(),
            force,
        })
        .await
        .map(drop)
    }

    /// The dependencies, as `{alias, kind, defined_by, defined_at_unix_ms}` maps.
    pub async fn list_dependencies(&self) -> Result<Vec<Value>, ClientError> {
        let v = self.execute(Operation::ListDependencies).await?;
        decode_result(&self.slot.name, v)
    }

    /// Admin: the server's name, version, uptime and session count.
    pub async fn server_info(&self) -> Result<Value, ClientError> {
        self.execute(Operation::ServerInfo).await
    }

    /// Admin: the live sessions.
    pub async fn list_sessions(&self) -> Result<Value, ClientError> {
        self.execute(Operation::ListSessions).await
    }

    /// Admin: closes a session; returns how many were closed (0 or 1).
    pub async fn disconnect_session(&self, session_id: u64) -> Result<u64, ClientError> {
        let v = self
            .execute(Operation::DisconnectSession { session_id })
            .await?;
        decode_result(&self.slot.name, v)
    }

    /// Admin: closes every session of a principal; returns how many.
    pub async fn disconnect_principal(&self, principal: &str) -> Result<u64, ClientError> {
        let v = self
            .execute(Operation::DisconnectPrincipal {
                principal: principal.to_owned(),
            })
            .await?;
        decode_result(&self.slot.name, v)
    }

    /// Sends a `Ping` and returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let deadline = Instant::now() + self.slot.endpoint.request_timeout;
        let conn = self.slot.connection(deadline).await?;
        let started = Instant::now();
        let nonce = self.inner.nonce.fetch_add(1, Ordering::Relaxed);
        conn.ping(nonce, deadline).await?;
        Ok(started.elapsed())
    }

    /// The session id and privileges the server granted (connecting if needed).
    pub async fn session(&self) -> Result<(u64, Vec<String>), ClientError> {
        let deadline = Instant::now() + self.slot.endpoint.connect_timeout;
        let conn = self.slot.connection(deadline).await?;
        Ok((conn.auth().session_id, conn.auth().privileges.clone()))
    }
}

/// The operation defining script function `name`, with its source's SHA-256.
fn define_function_op(name: &str, source: &str) -> Operation {
    Operation::DefineFunction(DefineFunction::new(name, source))
}

/// Every configured server at once. Each method runs on all servers
/// concurrently, never fails fast, and returns one entry per server.
#[derive(Debug, Clone)]
pub struct AllServers {
    client: Client,
}

/// One result per server name.
pub type FanOut<T> = BTreeMap<String, Result<T, ClientError>>;

impl AllServers {
    async fn each<T, F, Fut>(&self, f: F) -> FanOut<T>
    where
        F: Fn(ServerRef) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let refs: Vec<ServerRef> = self
            .client
            .inner
            .slots
            .values()
            .map(|slot| ServerRef {
                slot: Arc::clone(slot),
                inner: Arc::clone(&self.client.inner),
            })
            .collect();
        let names: Vec<String> = refs.iter().map(|r| r.slot.name.clone()).collect();
        let results = futures_util::future::join_all(refs.into_iter().map(f)).await;
        names.into_iter().zip(results).collect()
    }

    /// Calls `function` on every server.
    pub async fn call<R: DeserializeOwned>(
        &self,
        function: &str,
        args: impl Serialize,
    ) -> FanOut<R> {
        let args = to_value(&args);
        self.each(|s| {
            let args = args.clone();
            async move {
                let args = match args {
                    Ok(Value::List(items)) => items,
                    Ok(Value::Null) => Vec::new(),
                    Ok(other) => vec![other],
                    Err(e) => {
                        return Err(ClientError::InvalidArgument {
                            server: s.name().to_owned(),
                            message: format!("arguments cannot be encoded: {e}"),
                        });
                    }
                };
                let v = s
                    .execute(Operation::Invoke {
                        function: function.to_owned(),
                        args,
                    })
                    .await?;
                decode_result(s.name(), v)
            }
        })
        .await
    }

    /// Defines a constant on every server.
    pub async fn define_constant(&self, name: &str, value: impl Serialize + Clone) -> FanOut<()> {
        self.each(|s| {
            let value = value.clone();
            async move { s.define_constant(name, value).await }
        })
        .await
    }

    /// Removes a constant on every server.
    pub async fn undefine_constant(&self, name: &str) -> FanOut<()> {
        self.each(|s| async move { s.undefine_constant(name).await })
            .await
    }

    /// Defines a script function on every server (idempotent, so safe to retry).
    pub async fn define_function(&self, name: &str, source: &str) -> FanOut<()> {
        self.each(|s| async move { s.define_function(name, source).await })
            .await
    }

    /// Removes a script function on every server.
    pub async fn undefine_function(&self, name: &str) -> FanOut<()> {
        self.each(|s| async move { s.undefine_function(name).await })
            .await
    }

    /// Defines a dependency on every server.
    pub async fn define_dependency(&self, alias: &str, source: DependencySource) -> FanOut<()> {
        self.each(|s| {
            let source = source.clone();
            async move { s.define_dependency(alias, source).await }
        })
        .await
    }

    /// Removes a dependency on every server.
    pub async fn undefine_dependency(&self, alias: &str, force: bool) -> FanOut<()> {
        self.each(|s| async move { s.undefine_dependency(alias, force).await })
            .await
    }

    /// Lists functions on every server.
    pub async fn list_functions(&self) -> FanOut<Vec<Value>> {
        self.each(|s| async move { s.list_functions().await }).await
    }

    /// Pings every server.
    pub async fn ping(&self) -> FanOut<Duration> {
        self.each(|s| async move { s.ping().await }).await
    }

    /// Runs a raw operation on every server.
    pub async fn execute(&self, op: Operation) -> FanOut<Value> {
        self.each(|s| {
            let op = op.clone();
            async move { s.execute(op).await }
        })
        .await
    }
}
