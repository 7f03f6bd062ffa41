//! Calls and operations on one named server.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use netproc_wire::{DefineFunction, DependencySource, Operation, Value, from_value, to_value};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::error::ClientError;
use crate::slot::{Inner, Slot};

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

pub(crate) fn decode_result<R: DeserializeOwned>(server: &str, v: Value) -> Result<R, ClientError> {
    from_value(v).map_err(|e| ClientError::InvalidResponse {
        server: server.to_owned(),
        message: format!("unexpected result: {e}"),
    })
}

/// One configured server.
#[derive(Clone)]
pub struct ServerRef {
    pub(crate) slot: Arc<Slot>,
    pub(crate) inner: Arc<Inner>,
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
        // A connection being drained (migrate_all) takes no new call: the
        // next one is fresh.
        for _ in 0..3 {
            let conn = self.slot.connection(deadline).await?;
            if let Some(_active) = conn.enter() {
                return conn.request(op, deadline).await;
            }
        }
        Err(ClientError::Connect {
            server: self.slot.name.clone(),
            kind: std::io::ErrorKind::ConnectionAborted,
            message: "the connection kept being replaced".into(),
        })
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
        self.execute(Operation::DefineFunction(DefineFunction::new(name, source)))
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

    /// Who the server takes this client to be (principal, key, privileges,
    /// allow-list, expiry, certificate binding) and the server's clock. Any
    /// authenticated caller may ask; a server that predates the operation
    /// answers [`ErrorCode::InvalidOperation`](netproc_wire::ErrorCode::InvalidOperation).
    pub async fn who_am_i(&self) -> Result<netproc_wire::WhoAmI, ClientError> {
        let v = self.execute(Operation::WhoAmI).await?;
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
        for _ in 0..3 {
            let conn = self.slot.connection(deadline).await?;
            if let Some(_active) = conn.enter() {
                let started = Instant::now();
                let nonce = self.inner.nonce.fetch_add(1, Ordering::Relaxed);
                conn.ping(nonce, deadline).await?;
                return Ok(started.elapsed());
            }
        }
        Err(ClientError::Connect {
            server: self.slot.name.clone(),
            kind: std::io::ErrorKind::ConnectionAborted,
            message: "the connection kept being replaced".into(),
        })
    }

    /// The session id and privileges the server granted (connecting if needed).
    pub async fn session(&self) -> Result<(u64, Vec<String>), ClientError> {
        let deadline = Instant::now() + self.slot.endpoint.connect_timeout;
        let conn = self.slot.connection(deadline).await?;
        Ok((conn.auth().session_id, conn.auth().privileges.clone()))
    }
}
