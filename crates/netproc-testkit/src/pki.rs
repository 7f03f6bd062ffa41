//! The in-process PKI and what is made from it: server builders,
//! endpoints, clients, keys.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use netproc_auth::{ApiKey, ApiKeyStore, KeySpec, PrivilegeSet};
use netproc_client::{Client, ServerEndpoint, ServerRef};
use netproc_pki::{CaParams, CertificateAuthority, IssuedCert, LeafParams};
use netproc_server::{BucketControls, Server, ServerBuilder, ServerOptions};

/// A private CA with a server certificate (for `localhost` and
/// `127.0.0.1`) and a client certificate (common name `client`).
pub struct TestPki {
    /// The CA; issue more certificates with [`TestPki::client_cert`] or
    /// `ca.issue`.
    pub ca: CertificateAuthority,
    /// The servers' certificate.
    pub server: IssuedCert,
    /// The default client certificate.
    pub client: IssuedCert,
}

impl TestPki {
    /// A fresh CA and its two certificates.
    ///
    /// # Panics
    /// If generation fails.
    #[must_use]
    pub fn new() -> TestPki {
        let ca = CertificateAuthority::generate(&CaParams::new("test CA")).expect("test CA");
        let server = ca
            .issue(&LeafParams::server("server", ["localhost", "127.0.0.1"]))
            .expect("server certificate");
        let client = ca
            .issue(&LeafParams::client("client"))
            .expect("client certificate");
        TestPki { ca, server, client }
    }

    /// Another client certificate from the same CA.
    ///
    /// # Panics
    /// If issuing fails.
    #[must_use]
    pub fn client_cert(&self, common_name: &str) -> IssuedCert {
        self.ca
            .issue(&LeafParams::client(common_name))
            .expect("client certificate")
    }

    /// A server builder with this PKI's server certificate and CA, over
    /// `keys`, listening on 127.0.0.1 port 0 unless told otherwise.
    ///
    /// # Panics
    /// If the server certificate cannot be used.
    #[must_use]
    pub fn server_builder(&self, name: &str, keys: Arc<ApiKeyStore>) -> ServerBuilder {
        Server::builder(
            name,
            self.server.identity().expect("server identity"),
            self.ca.trust_anchors(),
            keys,
        )
    }

    /// An endpoint to `addr` as `cert`, with `key`: server name
    /// `localhost`, 5 s to connect, 10 s per request.
    ///
    /// # Panics
    /// If the client certificate cannot be used.
    #[must_use]
    pub fn endpoint(&self, cert: &IssuedCert, addr: SocketAddr, key: &ApiKey) -> ServerEndpoint {
        ServerEndpoint::new(
            addr,
            "localhost",
            cert.identity().expect("client identity"),
            self.ca.trust_anchors(),
            key.to_secret(),
        )
        .connect_timeout(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(10))
    }
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("ca", &self.ca.cert_identity().fingerprint)
            .field("server", &self.server.cert_identity().fingerprint)
            .field("client", &self.client.cert_identity().fingerprint)
            .finish()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// A new API key in `keys` with `privileges` (comma-separated names).
///
/// # Panics
/// If the privileges do not parse or the store refuses the key.
#[must_use]
pub fn key(keys: &ApiKeyStore, privileges: &str) -> ApiKey {
    let privileges = privileges.parse::<PrivilegeSet>().expect("privileges");
    keys.create(KeySpec::new(privileges)).expect("key").1
}

/// A client of one server, named `s1`.
///
/// # Panics
/// If the client cannot be built.
#[must_use]
pub fn only(endpoint: ServerEndpoint) -> ServerRef {
    Client::builder()
        .server("s1", endpoint)
        .build()
        .expect("client")
        .server("s1")
        .expect("s1")
}

/// Default server options with the request buckets off, for load-style
/// tests and benches.
#[must_use]
pub fn unlimited() -> ServerOptions {
    let mut o = ServerOptions::default();
    o.request_controls.per_connection = BucketControls::disabled();
    o.request_controls.per_api_key = BucketControls::disabled();
    o.request_controls.per_ip = BucketControls::disabled();
    o
}
