//! The client: named servers, their connections made lazily, `ServerRef`
//! for one server and `AllServers` for all of them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwapOption;
use netproc_pki::{Identity, TrustAnchors};

use crate::endpoint::ServerEndpoint;
use crate::error::ClientError;
use crate::fan_out::AllServers;
use crate::server_ref::ServerRef;
use crate::slot::{Backoff, Inner, Slot};

/// The reserved name that means "every configured server".
pub const ALL_SERVERS: &str = "all_servers";

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
impl Client {
    /// A builder.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Replaces this client's certificate and the CAs it trusts for servers
    /// (a renewed certificate, a CA rotation), for every server: new
    /// connections use them at once; established ones carry on until they
    /// end or [`migrate_all`](Client::migrate_all) (no call fails) or
    /// [`flush_all`](Client::flush_all) (calls in flight fail) replaces them. Nothing changes if
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
            inner: Arc::clone(&self.inner),
        }
    }

    /// Closes the connection to `name`; the next call dials afresh (use
    /// after rotating certificates or keys). Calls in flight on the old
    /// connection fail with `unavailable`.
    pub fn flush_server(&self, name: &str) -> Result<(), ClientError> {
        self.server(name)?.slot.flush();
        Ok(())
    }

    /// Moves every server's traffic to a new connection without failing a
    /// call: new calls dial afresh (with the identity of
    /// [`set_identity`](Client::set_identity)), while the calls in flight
    /// on the old connection finish there; it then closes (at the latest
    /// one request timeout later).
    pub fn migrate_all(&self) {
        for slot in self.inner.slots.values() {
            slot.migrate();
        }
    }

    /// [`flush_server`](Client::flush_server) for every server.
    pub fn flush_all(&self) {
        for slot in self.inner.slots.values() {
            slot.flush();
        }
    }
}
