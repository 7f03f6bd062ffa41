//! The client side: make a key here, send a request for it with the
//! token, pin the root by fingerprint, keep what comes back.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use netproc_pki::{CertificateRequest, Fingerprint, Identity};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use crate::wire::{self, Request, Response};
use crate::{EnrollError, Profile};

/// Enrolling with a token: where the service is, the token, what it was
/// made for, and the root's fingerprint given with it.
#[derive(Clone)]
#[non_exhaustive]
pub struct TokenEnrollment {
    /// `host:port` of the enrollment service.
    pub server: String,
    /// The name its certificate is checked for (the host part of
    /// `server` by default).
    pub server_name: String,
    /// The token (`npe1_…`).
    pub token: Zeroizing<String>,
    /// The name the token was made for.
    pub name: String,
    /// The profile the token was made for.
    pub profile: Profile,
    /// SHA-256 of the root certificate: any other root is refused.
    pub root: Fingerprint,
    /// Connect, handshake and answer, each (10 s).
    pub timeout: Duration,
}

impl std::fmt::Debug for TokenEnrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEnrollment")
            .field("server", &self.server)
            .field("name", &self.name)
            .field("profile", &self.profile)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl TokenEnrollment {
    /// Enrolling `name` as `profile` at `server` (`host:port`).
    pub fn new(
        server: impl Into<String>,
        token: impl Into<String>,
        name: impl Into<String>,
        profile: Profile,
        root: Fingerprint,
    ) -> TokenEnrollment {
        let server = server.into();
        let server_name = server
            .rsplit_once(':')
            .map_or(server.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        TokenEnrollment {
            server,
            server_name,
            token: Zeroizing::new(token.into()),
            name: name.into(),
            profile,
            root,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What enrollment yields: a key made here and the certificate chain for
/// it, up to the root.
pub struct Enrolled {
    /// The private key (PKCS#8 PEM); it never left this process.
    pub key_pem: Zeroizing<String>,
    /// Leaf first, then the intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    /// The root (its fingerprint is the pinned one).
    pub root: CertificateDer<'static>,
}

impl std::fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolled")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Enrolled {
    /// The identity to connect with (chain and key).
    pub fn identity(&self) -> Result<Identity, EnrollError> {
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| EnrollError::Invalid(e.to_string()))?;
        Ok(Identity::from_der(self.chain.clone(), key)?)
    }

    /// The chain as PEM (leaf first).
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| netproc_pki::certificate_pem(c))
            .collect()
    }

    /// The root as PEM.
    pub fn root_pem(&self) -> String {
        netproc_pki::certificate_pem(&self.root)
    }

    /// Writes `key.pem` (0600), `cert.pem` (the chain) and `ca.pem` (the
    /// root) into `dir`; an existing key file is not overwritten.
    pub fn write_to(&self, dir: &Path) -> Result<(), EnrollError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| EnrollError::Io(format!("{}: {e}", dir.display())))?;
        netproc_pki::write_secret_file(&dir.join("key.pem"), self.key_pem.as_bytes(), false)?;
        for (file, text) in [("cert.pem", self.chain_pem()), ("ca.pem", self.root_pem())] {
            let path = dir.join(file);
            std::fs::write(&path, text)
                .map_err(|e| EnrollError::Io(format!("{}: {e}", path.display())))?;
        }
        Ok(())
    }
}

/// Enrolls with a token: makes a key here, sends a request for it, checks
/// that the certificate that comes back is for that key and chains to the
/// pinned root.
pub async fn enroll_with_token(e: &TokenEnrollment) -> Result<Enrolled, EnrollError> {
    crate::check_name(&e.name)?;
    let (request, key_pem) = CertificateRequest::generate(&e.name)?;
    let message = Request::Token {
        version: wire::VERSION,
        token: e.token.to_string(),
        name: e.name.clone(),
        profile: e.profile.as_str().to_owned(),
        csr: request.der().to_vec(),
    };
    let chain = exchange(e, &message).await?;
    let mut chain: Vec<CertificateDer<'static>> =
        chain.into_iter().map(CertificateDer::from).collect();
    let root = match chain.pop() {
        Some(root) if !chain.is_empty() => root,
        _ => return Err(EnrollError::Protocol("the chain is too short".into())),
    };
    if Fingerprint::of(&root) != e.root {
        return Err(EnrollError::Protocol(
            "the chain does not end at the pinned root".into(),
        ));
    }
    let leaf = netproc_pki::CertIdentity::from_der(&chain[0])?;
    if leaf.spki_fingerprint != request.spki_fingerprint() {
        return Err(EnrollError::Protocol(
            "the certificate is not for the key this request was made with".into(),
        ));
    }
    let anchors = netproc_pki::TrustAnchors::from_der(vec![root.clone()])?;
    anchors
        .verify_client(&chain, std::time::SystemTime::now())
        .or_else(|_| {
            // A server certificate is not a client one: check the chain only.
            match e.profile {
                Profile::Server => Ok(()),
                Profile::Client => Err(EnrollError::Protocol(
                    "the certificate does not chain to the pinned root".into(),
                )),
            }
        })?;
    Ok(Enrolled {
        key_pem,
        chain,
        root,
    })
}

async fn exchange(e: &TokenEnrollment, message: &Request) -> Result<Vec<Vec<u8>>, EnrollError> {
    let config = netproc_pki::enroll_client_config(e.root, None)?;
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(e.server_name.clone())
        .map_err(|_| EnrollError::Invalid(format!("server name {:?}", e.server_name)))?;
    let io = |what: &str, err: &dyn std::fmt::Display| {
        EnrollError::Io(format!("{what} {}: {err}", e.server))
    };
    let tcp = tokio::time::timeout(e.timeout, TcpStream::connect(&e.server))
        .await
        .map_err(|_| io("connect to", &"timed out"))?
        .map_err(|err| io("connect to", &err))?;
    let mut tls = tokio::time::timeout(e.timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| io("TLS with", &"timed out"))?
        .map_err(|err| EnrollError::Tls(tls_message(&err, e.root)))?;
    wire::write_frame(&mut tls, message)
        .await
        .map_err(|err| io("send to", &err))?;
    let response: Response = tokio::time::timeout(e.timeout, wire::read_frame(&mut tls))
        .await
        .map_err(|_| io("answer from", &"timed out"))?
        .map_err(|err| io("answer from", &err))?;
    match response {
        Response::Issued { chain } => Ok(chain),
        Response::Refused { code, message } => Err(EnrollError::Refused { code, message }),
    }
}

/// Parses a root fingerprint: 64 hex digits, colons allowed
/// (`netproc enroll --ca-fingerprint`).
pub fn parse_fingerprint(text: &str) -> Option<Fingerprint> {
    let hex: String = text.trim().chars().filter(|c| *c != ':').collect();
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(&hex, &mut bytes).ok()?;
    Some(Fingerprint::from_bytes(bytes))
}

/// A TLS failure in words: a root other than the pinned one said plainly.
fn tls_message(err: &std::io::Error, root: Fingerprint) -> String {
    let pinned = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<tokio_rustls::rustls::Error>())
        .is_some_and(|e| match e {
            tokio_rustls::rustls::Error::InvalidCertificate(
                tokio_rustls::rustls::CertificateError::Other(other),
            ) => other
                .0
                .downcast_ref::<netproc_pki::RootMismatch>()
                .is_some(),
            _ => false,
        });
    if pinned {
        format!(
            "the service's chain is not the pinned root's (--ca-fingerprint {root}): not the pinned root; check the fingerprint given with the token"
        )
    } else {
        err.to_string()
    }
}
