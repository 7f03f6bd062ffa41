//! Calls and operations on every server at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use netproc_wire::{DependencySource, Operation, Value, to_value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ClientError;
use crate::server_ref::{ServerRef, decode_result};
use crate::slot::Inner;

/// Every configured server at once. Each method runs on all servers
/// concurrently, never fails fast, and returns one entry per server.
#[derive(Clone)]
pub struct AllServers {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for AllServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllServers")
            .field("servers", &self.inner.slots.keys().collect::<Vec<_>>())
            .finish()
    }
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
            .inner
            .slots
            .values()
            .map(|slot| ServerRef {
                slot: Arc::clone(slot),
                inner: Arc::clone(&self.inner),
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
