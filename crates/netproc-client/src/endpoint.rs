//! A server as the client dials it: address, name, identity, trust
//! anchors, credential, timeouts.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use netproc_pki::{Ed25519Key, Identity, Pin, TlsOptions, TrustAnchors};
use netproc_wire::{DEFAULT_MAX_POST_AUTH_FRAME_BYTES, SecretString};

/// Where a server listens: a socket address, or a host name and port that
/// is resolved at every connect and reconnect (so a changed DNS record is
/// followed; the TLS `server_name` stays separate).
///
/// ```
/// use netproc_client::ServerAddr;
///
/// let ip: ServerAddr = "127.0.0.1:6767".parse().unwrap();
/// assert!(matches!(ip, ServerAddr::Socket(_)));
/// let host: ServerAddr = "localhost:6767".parse().unwrap();
/// assert_eq!(host.to_string(), "localhost:6767");
/// assert!("localhost".parse::<ServerAddr>().is_err(), "a port is required");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ServerAddr {
    /// An IP address and port.
    Socket(SocketAddr),
    /// A host name and port, resolved at each connect.
    Host {
        /// The host name.
        host: String,
        /// The port.
        port: u16,
    },
}

/// A server address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid server address {input:?}: expected host:port, ip:port or [ipv6]:port")]
pub struct InvalidServerAddr {
    /// The text, cut to 100 characters.
    pub input: String,
}

impl FromStr for ServerAddr {
    type Err = InvalidServerAddr;

    fn from_str(s: &str) -> Result<ServerAddr, InvalidServerAddr> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ServerAddr::Socket(addr));
        }
        let bad = || InvalidServerAddr {
            input: s.chars().take(100).collect(),
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        // A DNS name: letters, digits, '-', '.', '_' (no brackets, no
        // colons: an IPv6 literal without brackets is refused).
        let valid = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !valid {
            return Err(bad());
        }
        Ok(ServerAddr::Host {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Socket(a) => write!(f, "{a}"),
            ServerAddr::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<SocketAddr> for ServerAddr {
    fn from(addr: SocketAddr) -> ServerAddr {
        ServerAddr::Socket(addr)
    }
}

impl ServerAddr {
    /// The socket addresses to try, in order: itself, or what the host
    /// name resolves to now.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        match self {
            ServerAddr::Socket(a) => Ok(vec![*a]),
            ServerAddr::Host { host, port } => {
                let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
                    .await?
                    .collect();
                if found.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{host} has no address"),
                    ));
                }
                Ok(found)
            }
        }
    }
}

/// How to reach and authenticate to one server.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerEndpoint {
    /// The server's address.
    pub addr: ServerAddr,
    /// The name its certificate must be valid for (SNI).
    pub server_name: String,
    pub(crate) identity: Identity,
    pub(crate) roots: TrustAnchors,
    pub(crate) pins: Vec<Pin>,
    pub(crate) tls_options: TlsOptions,
    pub(crate) credential: Credential,

    /// A local address to connect from (e.g. `127.0.0.2` in tests, or an
    /// interface in deployments).
    pub bind: Option<IpAddr>,
    /// Connect + TLS + authentication limit. Default 10 s.
    pub connect_timeout: Duration,
    /// A call's default deadline. Default 30 s.
    pub request_timeout: Duration,
    /// Largest frame accepted from the server. Default 1 MiB.
    pub max_frame_bytes: u32,
    /// Calls that may wait locally for an in-flight slot; past it calls fail
    /// `overloaded` at once. Default 10 000.
    pub max_queued_calls: usize,
    /// A name sent in `Auth`, for the server's logs.
    pub client_name: Option<String>,
    /// A `Ping` after this long without sending anything, so the server
    /// sees the client alive and never idles the session out; `None` = no
    /// heartbeats. Default 30 s. Kept below the idle timeout the server
    /// announces (clamped to half of it, with a warning).
    pub heartbeat_interval: Option<Duration>,
}

/// How an endpoint authenticates inside the channel.
#[derive(Clone)]
pub(crate) enum Credential {
    ApiKey(SecretString),
    Ed25519 {
        key_id: String,
        key: Arc<Ed25519Key>,
    },
}

impl fmt::Debug for ServerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerEndpoint")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .field("identity", &self.identity)
            .field("credential", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl ServerEndpoint {
    /// An endpoint: the server's address and certificate name, this
    /// client's certificate identity, the CA(s) that must have signed the
    /// server's certificate, and the API key.
    ///
    /// Trust anchors are required: a client never dials without one.
    pub fn new(
        addr: impl Into<ServerAddr>,
        server_name: impl Into<String>,
        identity: Identity,
        server_roots: TrustAnchors,
        api_key: SecretString,
    ) -> ServerEndpoint {
        ServerEndpoint::with_credential(
            addr.into(),
            server_name.into(),
            identity,
            server_roots,
            Credential::ApiKey(api_key),
        )
    }

    /// An endpoint that authenticates with an Ed25519 key registered on
    /// the server under `key_id`, instead of an API key: each connection
    /// signs its own TLS exporter value, so no secret crosses the wire and
    /// a captured proof is useless on any other connection.
    pub fn with_ed25519(
        addr: impl Into<ServerAddr>,
        server_name: impl Into<String>,
        identity: Identity,
        server_roots: TrustAnchors,
        key_id: impl Into<String>,
        key: Arc<Ed25519Key>,
    ) -> ServerEndpoint {
        ServerEndpoint::with_credential(
            addr.into(),
            server_name.into(),
            identity,
            server_roots,
            Credential::Ed25519 {
                key_id: key_id.into(),
                key,
            },
        )
    }

    fn with_credential(
        addr: ServerAddr,
        server_name: String,
        identity: Identity,
        server_roots: TrustAnchors,
        credential: Credential,
    ) -> ServerEndpoint {
        ServerEndpoint {
            addr,
            server_name,
            identity,
            roots: server_roots,
            pins: Vec::new(),
            tls_options: TlsOptions::default(),
            credential,
            bind: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            heartbeat_interval: Some(Duration::from_secs(30)),
            max_frame_bytes: DEFAULT_MAX_POST_AUTH_FRAME_BYTES,
            max_queued_calls: 10_000,
            client_name: None,
        }
    }

    /// Also requires the server's certificate to match one of `pins`.
    pub fn pins(mut self, pins: Vec<Pin>) -> Self {
        self.pins = pins;
        self
    }

    /// TLS options (e.g. allowing TLS 1.2).
    pub fn tls_options(mut self, options: TlsOptions) -> Self {
        self.tls_options = options;
        self
    }

    /// Connects from this local address.
    pub fn bind(mut self, ip: IpAddr) -> Self {
        self.bind = Some(ip);
        self
    }

    /// Sets the connect + TLS + authentication limit.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Sets the default call deadline.
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// Sets the local queue bound.
    pub fn max_queued_calls(mut self, n: usize) -> Self {
        self.max_queued_calls = n;
        self
    }

    /// Sets the name sent in `Auth`.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = Some(name.into());
        self
    }

    /// Sets the heartbeat interval (`None`: no heartbeats).
    pub fn heartbeat_interval(mut self, interval: Option<Duration>) -> Self {
        self.heartbeat_interval = interval.filter(|d| !d.is_zero());
        self
    }
}
