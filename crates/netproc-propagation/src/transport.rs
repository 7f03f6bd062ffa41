//! How deliveries reach targets. The authority and the target only see
//! bytes in and bytes out, so another carrier (a message broker) is one
//! more implementation of [`Transport`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use netproc_auth::BoxFuture;
use netproc_client::Client;
use netproc_wire::{Operation, Value};

use crate::target::PropagationTarget;
use crate::wire::{Delivery, EXTENSION};

/// A delivery did not get an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

/// Carries one encoded [`Delivery`] to a named target and brings back its
/// encoded [`DeliveryReply`](crate::DeliveryReply).
pub trait Transport: Send + Sync + 'static {
    /// Delivers `request` to `target`.
    fn deliver<'a>(
        &'a self,
        target: &'a str,
        request: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<u8>, TransportError>>;
}

/// The direct transport: netproc's own mTLS channel. The authority is a
/// netproc client of every target; each target is a server of `client`
/// named like the target, and the client's credential holds
/// `receive_credentials` (or `admin_privileges` / `all_privileges`) there.
#[derive(Debug, Clone)]
pub struct NetprocTransport {
    client: Client,
}

impl NetprocTransport {
    /// Delivers through `client`.
    pub fn new(client: Client) -> NetprocTransport {
        NetprocTransport { client }
    }
}

impl Transport for NetprocTransport {
    fn deliver<'a>(
        &'a self,
        target: &'a str,
        request: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
        Box::pin(async move {
            let server = self
                .client
                .server(target)
                .map_err(|e| TransportError(e.to_string()))?;
            let op = Operation::Extension {
                name: EXTENSION.into(),
                payload: request,
            };
            match server.execute(op).await {
                Ok(Value::Bytes(reply)) => Ok(reply),
                Ok(_) => Err(TransportError("the target's reply is not bytes".into())),
                Err(e) => Err(TransportError(e.to_string())),
            }
        })
    }
}

/// Delivers to targets in the same process, without a network: for tests
/// and single-process deployments.
#[derive(Debug, Clone, Default)]
pub struct LocalTransport {
    targets: HashMap<String, Arc<PropagationTarget>>,
}

impl LocalTransport {
    /// No targets yet.
    pub fn new() -> LocalTransport {
        LocalTransport::default()
    }

    /// Adds a target under its own name.
    pub fn add(&mut self, target: Arc<PropagationTarget>) {
        self.targets.insert(target.name().to_owned(), target);
    }
}

impl Transport for LocalTransport {
    fn deliver<'a>(
        &'a self,
        target: &'a str,
        request: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
        Box::pin(async move {
            let t = self
                .targets
                .get(target)
                .ok_or_else(|| TransportError(format!("no target named {target:?}")))?;
            let delivery = Delivery::decode(&request).map_err(|e| TransportError(e.to_string()))?;
            let t = Arc::clone(t);
            tokio::task::spawn_blocking(move || t.deliver(&delivery, SystemTime::now()))
                .await
                .map_err(|e| TransportError(e.to_string()))?
                .map(|r| r.encode())
                .map_err(|e| TransportError(e.to_string()))
        })
    }
}
