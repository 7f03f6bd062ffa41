//! How deliveries reach targets. The authority and the target only see
//! bytes in and bytes out, so another carrier (a message broker) is one
//! more implementation of [`Transport`].
//!
//! What a broker needs is in the seam: each [`Outgoing`] delivery is
//! addressed to a target and carries a correlation id, so an answer that
//! comes later and out of band (on a reply queue) finds its request; and a
//! timeout, after which the authority drops the delivery's future — the
//! transport then forgets the correlation id (clean up on `Drop`) — and
//! records [`TransportError::TimedOut`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use netproc_auth::BoxFuture;
use netproc_client::Client;
use netproc_wire::{Operation, Value};

use crate::target::PropagationTarget;
use crate::wire::{Delivery, EXTENSION, EXTENSION_V2, EXTENSION_V3};

/// One delivery on its way to a target.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Outgoing {
    /// The target's name, as the transport knows it.
    pub target: String,
    /// Unique among one authority process's deliveries: an answer carries
    /// it back, so it finds its request even late or out of order.
    pub correlation_id: u64,
    /// The encoded [`Delivery`].
    pub request: Vec<u8>,
    /// How long the authority waits for the answer before it drops the
    /// delivery's future and records [`TransportError::TimedOut`].
    pub timeout: Duration,
    /// The events' format, and so the extension they go through: 1
    /// ([`EXTENSION`]), 2 (epochs, [`EXTENSION_V2`]) or 3 (epochs and the
    /// certificate deny list, [`EXTENSION_V3`]). A target that does not
    /// accept the format answers [`TransportError::Unsupported`].
    pub format: u8,
}

impl Outgoing {
    /// A delivery of `request` to `target`.
    pub fn new(
        target: impl Into<String>,
        correlation_id: u64,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Outgoing {
        Outgoing {
            target: target.into(),
            correlation_id,
            request,
            timeout,
            format: 1,
        }
    }
}

/// A delivery did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The transport knows no target of this name.
    #[error("no target named {0:?}")]
    UnknownTarget(String),
    /// The delivery could not be made or was refused on the way.
    #[error("delivery to {target} failed: {source}")]
    Failed {
        /// The target.
        target: String,
        /// Why (a client error, a broker error…).
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// No answer within the delivery's timeout.
    #[error("delivery to {target} timed out: no answer within {} ms", after.as_millis())]
    TimedOut {
        /// The target.
        target: String,
        /// The timeout.
        after: Duration,
    },
    /// An answer came, but it is not a delivery reply.
    #[error("delivery to {target}: the answer is not a delivery reply: {reason}")]
    BadReply {
        /// The target.
        target: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The target does not accept the second event format (it predates
    /// it): send it the first.
    #[error("{target} does not accept epoch-fenced deliveries")]
    Unsupported {
        /// The target.
        target: String,
    },
}

impl TransportError {
    /// A failed delivery to `target`, for `source`.
    pub fn failed(
        target: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> TransportError {
        TransportError::Failed {
            target: target.into(),
            source: Arc::from(source.into()),
        }
    }
}

/// Carries one encoded [`Delivery`] to its target and brings back the
/// encoded [`DeliveryReply`](crate::DeliveryReply).
pub trait Transport: Send + Sync + 'static {
    /// Delivers `delivery`. The future may be dropped (past the timeout):
    /// an implementation then forgets the delivery's correlation id.
    fn deliver<'a>(&'a self, delivery: Outgoing) -> BoxFuture<'a, Result<Vec<u8>, TransportError>>;
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
    fn deliver<'a>(&'a self, delivery: Outgoing) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
        Box::pin(async move {
            let target = delivery.target;
            let server = self
                .client
                .server(&target)
                .map_err(|_| TransportError::UnknownTarget(target.clone()))?;
            let name = match delivery.format {
                3 => EXTENSION_V3,
                2 => EXTENSION_V2,
                _ => EXTENSION,
            };
            let op = Operation::Extension {
                name: name.into(),
                payload: delivery.request,
            };
            // The answer is the call's own response: no correlation needed.
            match server.execute(op).await {
                Ok(Value::Bytes(reply)) => Ok(reply.into()),
                Ok(_) => Err(TransportError::BadReply {
                    target,
                    reason: "not bytes".into(),
                }),
                // A server that predates the extension: "no extension named".
                Err(e)
                    if delivery.format > 1
                        && e.code() == netproc_wire::ErrorCode::InvalidOperation =>
                {
                    Err(TransportError::Unsupported { target })
                }
                Err(e) => Err(TransportError::failed(target, e)),
            }
        })
    }
}

/// Delivers to targets in the same process, without a network: for tests
/// and single-process deployments.
#[derive(Debug, Clone, Default)]
pub struct LocalTransport {
    targets: HashMap<String, Arc<PropagationTarget>>,
    /// Targets that behave as if they predate newer event formats: the
    /// newest each accepts.
    max_format: HashMap<String, u8>,
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

    /// Adds a target that accepts only the first event format, as one that
    /// predates the second would (for compatibility tests).
    pub fn add_first_format_only(&mut self, target: Arc<PropagationTarget>) {
        self.add_with_format(target, 1);
    }

    /// Adds a target that accepts event formats up to `format` only (2: as
    /// one that predates the certificate deny list would).
    pub fn add_with_format(&mut self, target: Arc<PropagationTarget>, format: u8) {
        self.max_format.insert(target.name().to_owned(), format);
        self.add(target);
    }
}

impl Transport for LocalTransport {
    fn deliver<'a>(&'a self, delivery: Outgoing) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
        Box::pin(async move {
            let target = delivery.target;
            let t = self
                .targets
                .get(&target)
                .ok_or_else(|| TransportError::UnknownTarget(target.clone()))?;
            if self
                .max_format
                .get(&target)
                .is_some_and(|max| delivery.format > *max)
            {
                return Err(TransportError::Unsupported { target });
            }
            let request = Delivery::decode(&delivery.request)
                .map_err(|e| TransportError::failed(target.clone(), e))?;
            let t = Arc::clone(t);
            let with_epoch = delivery.format > 1;
            tokio::task::spawn_blocking(move || {
                if with_epoch {
                    t.deliver_epoch(&request, SystemTime::now())
                } else {
                    t.deliver(&request, SystemTime::now())
                }
            })
            .await
            .map_err(|e| TransportError::failed(target.clone(), e))?
            .map(|r| r.encode())
            .map_err(|e| TransportError::failed(target, e))
        })
    }
}

/// Each target through its own transport: direct over mTLS for some,
/// through a broker for others.
#[derive(Clone, Default)]
pub struct MixedTransport {
    routes: HashMap<String, Arc<dyn Transport>>,
}

impl std::fmt::Debug for MixedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MixedTransport")
            .field("targets", &self.routes.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl MixedTransport {
    /// No targets yet.
    pub fn new() -> MixedTransport {
        MixedTransport::default()
    }

    /// Delivers to `target` through `transport`.
    pub fn route(&mut self, target: impl Into<String>, transport: Arc<dyn Transport>) {
        self.routes.insert(target.into(), transport);
    }
}

impl Transport for MixedTransport {
    fn deliver<'a>(&'a self, delivery: Outgoing) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
        match self.routes.get(&delivery.target) {
            Some(t) => t.deliver(delivery),
            None => Box::pin(async move { Err(TransportError::UnknownTarget(delivery.target)) }),
        }
    }
}
