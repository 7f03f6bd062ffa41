//! The client side: make a key here, send a request for it with the
//! token, pin the root by fingerprint, keep what comes back.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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
    /// Also make an Ed25519 key here and have it registered through the
    /// credential authority with what the token grants (off by default).
    pub ed25519: bool,
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
            ed25519: false,
        }
    }
}

/// An Ed25519 key registered at enrollment.
#[derive(Debug)]
#[non_exhaustive]
pub struct EnrolledKey {
    /// The id it was registered under.
    pub key_id: String,
    /// The key (its seed never left this process).
    pub key: netproc_pki::Ed25519Key,
}

/// What enrollment yields: a key made here and the certificate chain for
/// it, up to the root.
pub struct Enrolled {
    /// The private key (PKCS#8 PEM); it never left this process.
    pub key_pem: Zeroizing<String>,
    /// Leaf first, then the intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    /// The root the chain ends at (its fingerprint is a pinned one).
    pub root: CertificateDer<'static>,
    /// The other roots to trust now (a CA rotation in progress).
    pub bundle: Vec<CertificateDer<'static>>,
    /// The Ed25519 key registered with it, if one was asked for.
    pub ed25519: Option<EnrolledKey>,
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

    /// The roots as PEM: the chain's root first, then the bundle.
    pub fn root_pem(&self) -> String {
        std::iter::once(&self.root)
            .chain(&self.bundle)
            .map(|c| netproc_pki::certificate_pem(c))
            .collect()
    }

    /// Every root to trust (for servers too: `Client::set_identity`).
    pub fn trust_anchors(&self) -> Result<netproc_pki::TrustAnchors, EnrollError> {
        Ok(netproc_pki::TrustAnchors::from_der(
            std::iter::once(self.root.clone())
                .chain(self.bundle.iter().cloned())
                .collect(),
        )?)
    }

    /// The fingerprints of every root held: what a renewal pins.
    pub fn root_fingerprints(&self) -> Vec<Fingerprint> {
        std::iter::once(&self.root)
            .chain(&self.bundle)
            .map(|c| Fingerprint::of(c))
            .collect()
    }

    /// Reads what [`write_to`](Self::write_to) wrote.
    pub fn read_from(dir: &Path) -> Result<Enrolled, EnrollError> {
        let key = netproc_pki::read_secret_file(&dir.join("key.pem"))?;
        let key_pem = Zeroizing::new(String::from_utf8_lossy(&key).into_owned());
        let read = |file: &str| -> Result<Vec<CertificateDer<'static>>, EnrollError> {
            let path = dir.join(file);
            let text = std::fs::read(&path)
                .map_err(|e| EnrollError::Io(format!("{}: {e}", path.display())))?;
            CertificateDer::pem_slice_iter(&text)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| EnrollError::Invalid(format!("{}: {e}", path.display())))
        };
        let chain = read("cert.pem")?;
        let mut roots = read("ca.pem")?.into_iter();
        let root = roots
            .next()
            .ok_or_else(|| EnrollError::Invalid("ca.pem: no certificate".into()))?;
        if chain.is_empty() {
            return Err(EnrollError::Invalid("cert.pem: no certificate".into()));
        }
        let enrolled = Enrolled {
            key_pem,
            chain,
            root,
            bundle: roots.collect(),
            ed25519: None,
        };
        enrolled.identity()?;
        Ok(enrolled)
    }

    /// Replaces the files in `dir` with this (renewed) certificate, each
    /// written beside and renamed into place, so a reader (a server
    /// watching them) never sees half a file; the key first when it
    /// changed.
    pub fn replace_in(&self, dir: &Path) -> Result<(), EnrollError> {
        let swap = |file: &str, bytes: &[u8], secret: bool| -> Result<(), EnrollError> {
            let path = dir.join(file);
            let tmp = dir.join(format!(".{file}.new"));
            let _ = std::fs::remove_file(&tmp);
            if secret {
                netproc_pki::write_secret_file(&tmp, bytes, false)?;
            } else {
                std::fs::write(&tmp, bytes)
                    .map_err(|e| EnrollError::Io(format!("{}: {e}", tmp.display())))?;
            }
            std::fs::rename(&tmp, &path)
                .map_err(|e| EnrollError::Io(format!("{}: {e}", path.display())))
        };
        let old_key = netproc_pki::read_secret_file(&dir.join("key.pem")).ok();
        if old_key.as_deref().map(|k| k.as_slice()) != Some(self.key_pem.as_bytes()) {
            swap("key.pem", self.key_pem.as_bytes(), true)?;
        }
        swap("cert.pem", self.chain_pem().as_bytes(), false)?;
        swap("ca.pem", self.root_pem().as_bytes(), false)
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
    let ed25519 = match e.ed25519 {
        true => Some(netproc_pki::Ed25519Key::generate()?),
        false => None,
    };
    let message = Request::Token {
        version: wire::VERSION,
        token: e.token.to_string(),
        name: e.name.clone(),
        profile: e.profile.as_str().to_owned(),
        csr: request.der().to_vec(),
        ed25519: ed25519.as_ref().map(netproc_pki::Ed25519Key::public_key),
    };
    let link = Link {
        server: &e.server,
        server_name: &e.server_name,
        roots: vec![e.root],
        timeout: e.timeout,
    };
    let issued = exchange(&link, None, &message).await?;
    let key_id = issued.key_id.clone();
    let mut enrolled = finish(issued, &request, key_pem, &link.roots, e.profile)?;
    enrolled.ed25519 = match (ed25519, key_id) {
        (Some(key), Some(key_id)) => Some(EnrolledKey { key_id, key }),
        (Some(_), None) => {
            return Err(EnrollError::Protocol(
                "the Ed25519 key was not registered".into(),
            ));
        }
        (None, _) => None,
    };
    Ok(enrolled)
}

/// A certificate as the service sent it.
struct Issued {
    chain: Vec<Vec<u8>>,
    bundle: Vec<Vec<u8>>,
    key_id: Option<String>,
}

/// Checks what came back: a chain ending at the pinned root, whose leaf is
/// for the requested key.
fn finish(
    Issued { chain, bundle, .. }: Issued,
    request: &CertificateRequest,
    key_pem: Zeroizing<String>,
    pinned: &[Fingerprint],
    profile: Profile,
) -> Result<Enrolled, EnrollError> {
    if bundle.len() > 8 {
        return Err(EnrollError::Protocol(
            "more than 8 roots in the bundle".into(),
        ));
    }
    let bundle: Vec<CertificateDer<'static>> =
        bundle.into_iter().map(CertificateDer::from).collect();
    // Each bundled root must be a CA certificate.
    if !bundle.is_empty() {
        netproc_pki::TrustAnchors::from_der(bundle.clone())?;
    }
    let mut chain: Vec<CertificateDer<'static>> =
        chain.into_iter().map(CertificateDer::from).collect();
    let root = match chain.pop() {
        Some(root) if !chain.is_empty() => root,
        _ => return Err(EnrollError::Protocol("the chain is too short".into())),
    };
    if !pinned.contains(&Fingerprint::of(&root)) {
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
            match profile {
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
        bundle,
        ed25519: None,
    })
}

/// Where the service is.
struct Link<'a> {
    server: &'a str,
    server_name: &'a str,
    roots: Vec<Fingerprint>,
    timeout: Duration,
}

async fn exchange(
    e: &Link<'_>,
    identity: Option<&Identity>,
    message: &Request,
) -> Result<Issued, EnrollError> {
    match send(e, identity, message).await? {
        Response::Issued {
            chain,
            bundle,
            key_id,
        } => Ok(Issued {
            chain,
            bundle,
            key_id,
        }),
        Response::Refused { code, message } => Err(EnrollError::Refused { code, message }),
        Response::Pending { .. } => Err(EnrollError::Protocol(
            "a pairing answer to another request".into(),
        )),
    }
}

async fn send(
    e: &Link<'_>,
    identity: Option<&Identity>,
    message: &Request,
) -> Result<Response, EnrollError> {
    let config = netproc_pki::enroll_client_config(&e.roots, identity)?;
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(e.server_name.to_owned())
        .map_err(|_| EnrollError::Invalid(format!("server name {:?}", e.server_name)))?;
    let io = |what: &str, err: &dyn std::fmt::Display| {
        EnrollError::Io(format!("{what} {}: {err}", e.server))
    };
    let tcp = tokio::time::timeout(e.timeout, TcpStream::connect(e.server))
        .await
        .map_err(|_| io("connect to", &"timed out"))?
        .map_err(|err| io("connect to", &err))?;
    // Small frames, one each way: no Nagle delay behind the handshake.
    let _ = tcp.set_nodelay(true);
    let mut tls = tokio::time::timeout(e.timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| io("TLS with", &"timed out"))?
        .map_err(|err| EnrollError::Tls(tls_message(&err, &e.roots)))?;
    wire::write_frame(&mut tls, message)
        .await
        .map_err(|err| io("send to", &err))?;
    let response: Response = tokio::time::timeout(e.timeout, wire::read_frame(&mut tls))
        .await
        .map_err(|_| io("answer from", &"timed out"))?
        .map_err(|err| io("answer from", &err))?;
    Ok(response)
}

/// Pairing: where the service is, the name asked for, the pinned root.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Pairing {
    /// `host:port` of the enrollment service.
    pub server: String,
    /// The name its certificate is checked for.
    pub server_name: String,
    /// The name asked for.
    pub name: String,
    /// SHA-256 of the root certificate.
    pub root: Fingerprint,
    /// Connect, handshake and answer, each (10 s).
    pub timeout: Duration,
}

impl Pairing {
    /// Asking for `name` at `server` (`host:port`), the root pinned.
    pub fn new(server: impl Into<String>, name: impl Into<String>, root: Fingerprint) -> Pairing {
        let server = server.into();
        let server_name =
            TokenEnrollment::new(server.clone(), "", "", Profile::Client, root).server_name;
        Pairing {
            server,
            server_name,
            name: name.into(),
            root,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A pairing waiting for its code: show [`sas`](Self::sas) to the
/// requester, who checks it with the operator, then
/// [`complete`](Self::complete) with the code the operator gives.
pub struct PendingPairing {
    pairing: Pairing,
    /// The request's id.
    pub request_id: u64,
    /// The short authentication string, computed here from the request id
    /// and this host's key: it must match what the operator was told.
    pub sas: String,
    /// How long the pairing waits.
    pub expires_in: Duration,
    request: CertificateRequest,
    key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for PendingPairing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingPairing")
            .field("request_id", &self.request_id)
            .field("sas", &self.sas)
            .finish_non_exhaustive()
    }
}

/// Pairing, first step: makes the key here and sends a request for it;
/// the operator is notified.
pub async fn start_pairing(p: &Pairing) -> Result<PendingPairing, EnrollError> {
    crate::check_name(&p.name)?;
    let (request, key_pem) = CertificateRequest::generate(&p.name)?;
    let message = Request::Pair {
        version: wire::VERSION,
        name: p.name.clone(),
        csr: request.der().to_vec(),
    };
    let link = Link {
        server: &p.server,
        server_name: &p.server_name,
        roots: vec![p.root],
        timeout: p.timeout,
    };
    match send(&link, None, &message).await? {
        Response::Pending {
            request_id,
            expires_in_s,
        } => Ok(PendingPairing {
            pairing: p.clone(),
            request_id,
            sas: crate::pairing_sas(request_id, request.spki_fingerprint()),
            expires_in: Duration::from_secs(u64::from(expires_in_s)),
            request,
            key_pem,
        }),
        Response::Refused { code, message } => Err(EnrollError::Refused { code, message }),
        Response::Issued { .. } => Err(EnrollError::Protocol("issued without a code".into())),
    }
}

impl PendingPairing {
    /// Sends the code to another instance of the service (they share
    /// their state): `host:port`.
    pub fn retarget(&mut self, server: impl Into<String>) {
        self.pairing.server = server.into();
    }

    /// Pairing, second step: the code the operator gave. A wrong code may
    /// be tried again (`wrong_code`), a few times.
    pub async fn complete(&self, code: &str) -> Result<Enrolled, EnrollError> {
        let message = Request::PairCode {
            version: wire::VERSION,
            request_id: self.request_id,
            code: code.trim().to_owned(),
        };
        let p = &self.pairing;
        let link = Link {
            server: &p.server,
            server_name: &p.server_name,
            roots: vec![p.root],
            timeout: p.timeout,
        };
        let issued = exchange(&link, None, &message).await?;
        finish(
            issued,
            &self.request,
            self.key_pem.clone(),
            &link.roots,
            Profile::Client,
        )
    }
}

/// Renewing: where the service is and the pinned root.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Renewal {
    /// `host:port` of the enrollment service.
    pub server: String,
    /// The name its certificate is checked for.
    pub server_name: String,
    /// SHA-256 of the root certificate.
    pub root: Fingerprint,
    /// A new key instead of the current one.
    pub rekey: bool,
    /// Connect, handshake and answer, each (10 s).
    pub timeout: Duration,
}

impl Renewal {
    /// Renewing at `server` (`host:port`), the root pinned.
    pub fn new(server: impl Into<String>, root: Fingerprint) -> Renewal {
        let server = server.into();
        let server_name =
            TokenEnrollment::new(server.clone(), "", "", Profile::Client, root).server_name;
        Renewal {
            server,
            server_name,
            root,
            rekey: false,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Renews `current` over mTLS with it: a new certificate for the same
/// name, profile and SANs, for the same key (or a new one with
/// [`Renewal::rekey`]). A revoked or expired certificate cannot renew
/// (`not_renewable`, or refused at the handshake): enroll again.
pub async fn renew(r: &Renewal, current: &Enrolled) -> Result<Enrolled, EnrollError> {
    let identity = current.identity()?;
    let leaf = identity.cert_identity();
    let name = leaf.common_name.clone().unwrap_or_default();
    let profile = if leaf
        .key_purposes
        .iter()
        .any(|p| matches!(p, netproc_pki::KeyPurpose::ServerAuth))
    {
        Profile::Server
    } else {
        Profile::Client
    };
    let (request, key_pem) = if r.rekey {
        CertificateRequest::generate(&name)?
    } else {
        (
            CertificateRequest::for_key_pem(&name, &current.key_pem)?,
            current.key_pem.clone(),
        )
    };
    let message = Request::Renew {
        version: wire::VERSION,
        csr: request.der().to_vec(),
    };
    // The roots this host holds (its ca.pem: a rotation's next root
    // arrives there before the switch) and the one given.
    let mut roots = current.root_fingerprints();
    if !roots.contains(&r.root) {
        roots.push(r.root);
    }
    let link = Link {
        server: &r.server,
        server_name: &r.server_name,
        roots,
        timeout: r.timeout,
    };
    let issued = exchange(&link, Some(&identity), &message).await?;
    finish(issued, &request, key_pem, &link.roots, profile)
}

/// When to renew a certificate valid from `not_before` to `not_after`: at
/// two thirds of its lifetime, moved by up to ±10 % of it (`jitter` in
/// [-1, 1]), so a fleet enrolled at once does not renew at once.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let base = lifetime.mul_f64(2.0 / 3.0);
    let shift = lifetime.mul_f64(0.1 * jitter.clamp(-1.0, 1.0).abs());
    if jitter < 0.0 {
        not_before + base.saturating_sub(shift)
    } else {
        not_before + base + shift
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
fn tls_message(err: &std::io::Error, roots: &[Fingerprint]) -> String {
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
        let pinned: Vec<String> = roots.iter().map(ToString::to_string).collect();
        format!(
            "the service's chain is not the pinned root's (--ca-fingerprint {}): not the pinned root; check the fingerprint given with the token",
            pinned.join(", ")
        )
    } else {
        err.to_string()
    }
}

/// Keeps `current` renewed until `shutdown`: at two thirds of the time it
/// has left when received (±10 % jitter), renews it (see [`renew`]) and
/// hands the new one to `on_renewed` — e.g. `Client::set_identity` then
/// `Client::migrate_all`, or writing the files a server watches. A failed
/// renewal is retried with backoff (1 s doubling, at most a tenth of the
/// lifetime) and counted in `netproc_renewal_failures_total`;
/// `netproc_cert_expires_in_seconds` says how long the current one has.
/// Returns the last certificate held.
pub async fn keep_renewed(
    renewal: Renewal,
    mut current: Enrolled,
    mut on_renewed: impl FnMut(&Enrolled) + Send,
    shutdown: impl std::future::Future<Output = ()>,
) -> Enrolled {
    tokio::pin!(shutdown);
    let mut received = SystemTime::now();
    let mut failures = 0u32;
    loop {
        let Ok(identity) = current.identity() else {
            return current;
        };
        let not_after = identity.cert_identity().not_after;
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        metrics::gauge!("netproc_cert_expires_in_seconds").set(left.as_secs_f64());
        let lifetime = not_after.duration_since(received).unwrap_or_default();
        let due = match failures {
            0 => renew_at(received, not_after, jitter()),
            n => {
                let step = Duration::from_secs(1)
                    .saturating_mul(1 << n.min(16))
                    .min(lifetime / 10)
                    .max(Duration::from_millis(100));
                SystemTime::now() + step
            }
        };
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            () = &mut shutdown => return current,
            () = tokio::time::sleep(wait) => {}
        }
        match renew(&renewal, &current).await {
            Ok(next) => {
                failures = 0;
                received = SystemTime::now();
                on_renewed(&next);
                current = next;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                metrics::counter!("netproc_renewal_failures_total").increment(1);
                tracing::warn!(error = %e, failures, "certificate renewal failed; retrying");
            }
        }
    }
}

/// A number in [-1, 1] from the RNG (0 if it fails).
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if netproc_pki::random_bytes(&mut b).is_err() {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX) * 2.0 - 1.0
}
