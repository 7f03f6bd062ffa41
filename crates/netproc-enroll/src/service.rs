//! The enrollment service: its own TLS listener (ALPN
//! `netproc-enroll/1`), strict admission, one request per connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use netproc_limits::{Gate, Idle, KeyedTable, SlidingWindow};
use netproc_pki::{
    CertificateAuthority, CertificateRequest, Fingerprint, Identity, LeafParams, SubjectAltName,
    TrustAnchors, Validity,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::state::TokenStore;
use crate::store::IssuedRecord;
use crate::wire::{self, RefusalCode, Request, Response};
use crate::{EnrollError, Profile};

/// How the service runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EnrollConfig {
    /// Where to listen (never the RPC port).
    pub bind: SocketAddr,
    /// The names (DNS or IP) clients reach the service by: its own
    /// certificate is issued for them at start.
    pub names: Vec<String>,
    /// The trust domain in every issued URI SAN
    /// (`netproc://<trust_domain>/<profile>/<name>`).
    pub trust_domain: String,
    /// Lifetime of a client certificate (24 h by default).
    pub client_lifetime: Duration,
    /// Lifetime of a server certificate (24 h by default).
    pub server_lifetime: Duration,
    /// Connections at once, at most (64).
    pub max_connections: usize,
    /// Connections per source address per minute, at most (30).
    pub per_ip_per_minute: u32,
    /// Source addresses tracked, at most (16,384).
    pub max_tracked_ips: usize,
    /// The TLS handshake and the request must each arrive within this
    /// (5 s).
    pub timeout: Duration,
    /// How the operator is told about pairing requests; none: pairing is
    /// off (tokens only).
    pub notifier: Option<crate::Notifier>,
    /// How long a pairing waits for its code (10 minutes).
    pub pairing_ttl: Duration,
    /// Pairings pending at once, at most (1,000; 5 per source address).
    pub max_pending_pairings: u32,
    /// Other roots, during a CA rotation: announced with every issued
    /// certificate (clients add them to their trust) and trusted for
    /// renewal. Before switching to a new root: the new one here; after:
    /// the previous one, until every certificate under it has renewed.
    pub bundle: Vec<CertificateDer<'static>>,
    /// Registers the Ed25519 keys that tokens grant (through the
    /// credential authority, so they reach every server); none: such
    /// requests are refused.
    pub registrar: Option<Arc<dyn KeyRegistrar>>,
    /// Client certificates denied fleet-wide (the credential authority's
    /// deny list): such a certificate cannot renew either.
    pub deny: netproc_pki::DenyList,
}

/// An Ed25519 key to register for an enrolled identity.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KeyRegistration {
    /// The enrolled name.
    pub name: String,
    /// The public key, made on the new host.
    pub public_key: [u8; 32],
    /// What the token grants.
    pub privileges: Vec<String>,
    /// The function allow-list the token grants, if any.
    pub functions: Option<Vec<String>>,
    /// The certificate binding: `spki:<hex>` of the enrolled key.
    pub binding: String,
}

/// Registers enrolled Ed25519 keys (the CLI: with the credential
/// authority, `Authority::ensure`).
pub trait KeyRegistrar: std::fmt::Debug + Send + Sync + 'static {
    /// Registers `key`; returns the key id it is known by.
    fn register<'a>(
        &'a self,
        key: &'a KeyRegistration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + 'a>>;
}

impl EnrollConfig {
    /// Listening on `bind`, reached as `names`.
    pub fn new(bind: SocketAddr, names: Vec<String>) -> EnrollConfig {
        EnrollConfig {
            bind,
            names,
            trust_domain: "netproc.local".into(),
            client_lifetime: Duration::from_secs(24 * 3600),
            server_lifetime: Duration::from_secs(24 * 3600),
            max_connections: 64,
            per_ip_per_minute: 30,
            max_tracked_ips: 16_384,
            timeout: Duration::from_secs(5),
            notifier: None,
            pairing_ttl: Duration::from_secs(600),
            max_pending_pairings: 1000,
            bundle: Vec::new(),
            registrar: None,
            deny: netproc_pki::DenyList::new(),
        }
    }
}

struct PerIp(SlidingWindow);

impl Idle for PerIp {
    fn is_idle(&mut self, now: Instant) -> bool {
        self.0.is_empty_at(now)
    }
}

struct Shared {
    config: EnrollConfig,
    ca: CertificateAuthority,
    root: CertificateDer<'static>,
    store: TokenStore,
    gate: Gate,
    per_ip: KeyedTable<IpAddr, PerIp>,
}

/// The enrollment service.
#[derive(Debug)]
pub struct EnrollService;

/// A running service.
#[derive(Debug)]
pub struct EnrollHandle {
    local_addr: SocketAddr,
    root: Fingerprint,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl EnrollHandle {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The root's fingerprint, which clients pin (`--ca-fingerprint`).
    pub fn root_fingerprint(&self) -> Fingerprint {
        self.root
    }

    /// Stops accepting; requests in progress finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl EnrollService {
    /// Starts the service: `ca` is the online intermediate (it issues),
    /// `root` the offline root it chains to (sent with every chain, so
    /// clients pin it and servers trust it). The service's own TLS
    /// certificate is issued by `ca` for `config.names`.
    pub async fn start(
        config: EnrollConfig,
        ca: CertificateAuthority,
        root: CertificateDer<'static>,
        store: TokenStore,
    ) -> Result<EnrollHandle, EnrollError> {
        if config.names.is_empty() {
            return Err(EnrollError::Invalid(
                "names: the service needs at least one name".into(),
            ));
        }
        crate::check_dns_name(&config.trust_domain)?;
        let own = ca.issue(
            &LeafParams::server("netproc enrollment", &config.names).validity(Validity::new(
                SystemTime::now() - Duration::from_secs(60),
                SystemTime::now() + Duration::from_secs(30 * 24 * 3600),
            )),
        )?;
        let chain = vec![
            own.certificate().clone(),
            ca.certificate().clone(),
            root.clone(),
        ];
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(own.key_pem().as_bytes())
            .map_err(|e| EnrollError::Invalid(e.to_string()))?;
        let identity = Identity::from_der(chain, key)?;
        let roots = TrustAnchors::from_der(
            std::iter::once(root.clone())
                .chain(config.bundle.iter().cloned())
                .collect(),
        )?;
        let tls = netproc_pki::enroll_server_config(&identity, &roots)?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(|e| EnrollError::Io(format!("bind {}: {e}", config.bind)))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| EnrollError::Io(e.to_string()))?;
        let fingerprint = Fingerprint::of(&root);
        let shared = Arc::new(Shared {
            gate: Gate::new(config.max_connections.max(1)),
            per_ip: KeyedTable::new(config.max_tracked_ips.max(1)),
            config,
            ca,
            root,
            store,
        });
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    accepted = listener.accept() => {
                        let Ok((tcp, peer)) = accepted else { continue };
                        if let Some(permit) = admit(&shared, peer.ip()) {
                            let shared = Arc::clone(&shared);
                            let acceptor = acceptor.clone();
                            conns.spawn(async move {
                                let _permit = permit;
                                serve(&shared, acceptor, tcp, peer.ip()).await;
                            });
                        }
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
            while conns.join_next().await.is_some() {}
        });
        tracing::info!(%local_addr, root = %fingerprint, "enrollment service listening");
        Ok(EnrollHandle {
            local_addr,
            root: fingerprint,
            stop,
            task,
        })
    }
}

/// Admission: the connection cap, then the per-address window; a refused
/// connection is closed at once with nothing sent.
fn admit(shared: &Shared, ip: IpAddr) -> Option<netproc_limits::GatePermit> {
    let refuse = |reason: &'static str| {
        metrics::counter!("netproc_enroll_refused_total", "code" => reason).increment(1);
        None
    };
    let Some(permit) = shared.gate.try_enter() else {
        return refuse("connection_limited");
    };
    let now = Instant::now();
    let limit = shared.config.per_ip_per_minute.max(1);
    let allowed = shared.per_ip.with(
        &netproc_limits::ip_key(ip, 64),
        now,
        || PerIp(SlidingWindow::new(Duration::from_secs(60), limit)),
        |w| w.0.try_record(now).is_ok(),
    );
    match allowed {
        Ok(true) => Some(permit),
        _ => refuse("rate_limited"),
    }
}

async fn serve(shared: &Shared, acceptor: TlsAcceptor, tcp: TcpStream, peer: IpAddr) {
    let timeout = shared.config.timeout;
    let _ = tcp.set_nodelay(true);
    let Ok(Ok(mut tls)) = tokio::time::timeout(timeout, acceptor.accept(tcp)).await else {
        return;
    };
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let request = tokio::time::timeout(timeout, wire::read_frame::<_, Request>(&mut tls)).await;
    let response = match request {
        Ok(Ok(r)) if r.version() != wire::VERSION => refusal(
            RefusalCode::InvalidRequest,
            "unknown protocol version",
            peer,
            "-",
        ),
        Ok(Ok(Request::Token {
            token,
            name,
            profile,
            csr,
            ed25519,
            ..
        })) => {
            let ask = TokenAsk {
                token: zeroize::Zeroizing::new(token),
                name,
                profile,
                csr,
                ed25519,
            };
            handle_token(shared, ask, peer).await
        }
        Ok(Ok(Request::Renew { csr, .. })) => handle_renew(shared, presented, csr, peer).await,
        Ok(Ok(Request::Pair { name, csr, .. })) => handle_pair(shared, name, csr, peer).await,
        Ok(Ok(Request::PairCode {
            request_id, code, ..
        })) => handle_pair_code(shared, request_id, code, peer).await,
        Ok(Err(wire::FrameError::Io(_))) | Err(_) => return,
        Ok(Err(_)) => refusal(
            RefusalCode::InvalidRequest,
            "the request does not decode",
            peer,
            "-",
        ),
    };
    let _ = tokio::time::timeout(timeout, async {
        let _ = wire::write_frame(&mut tls, &response).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    })
    .await;
}

fn refusal(code: RefusalCode, message: &str, peer: IpAddr, name: &str) -> Response {
    metrics::counter!("netproc_enroll_refused_total", "code" => code.to_string()).increment(1);
    tracing::warn!(
        target: netproc_server::AUDIT_TARGET,
        event = "enroll_refused",
        code = %code,
        name,
        peer = %peer,
        "enrollment refused"
    );
    Response::Refused {
        code,
        message: message.to_owned(),
    }
}

fn parse_csr(csr: &[u8], peer: IpAddr, name: &str) -> Result<CertificateRequest, Response> {
    CertificateRequest::from_der(csr).map_err(|_| {
        refusal(
            RefusalCode::BadCsr,
            "the certificate request is malformed, wrongly signed or of an unsupported key type",
            peer,
            name,
        )
    })
}

/// A token request, as received.
struct TokenAsk {
    token: zeroize::Zeroizing<String>,
    name: String,
    profile: String,
    csr: Vec<u8>,
    ed25519: Option<[u8; 32]>,
}

async fn handle_token(shared: &Shared, ask: TokenAsk, peer: IpAddr) -> Response {
    let TokenAsk {
        token,
        name,
        profile,
        csr,
        ed25519,
    } = ask;
    if crate::check_name(&name).is_err() || Profile::parse(&profile).is_none() {
        return refusal(
            RefusalCode::InvalidRequest,
            "bad name or profile",
            peer,
            "-",
        );
    }
    // The request is checked before the token is spent.
    let request = match parse_csr(&csr, peer, &name) {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    let now = SystemTime::now();
    let redeemed = shared
        .store
        .redeem(&token, &name, &profile, peer, now)
        .await;
    let redeemed = match redeemed {
        Ok(r) => r,
        Err(code) => {
            let message = match code {
                RefusalCode::InvalidToken => "unknown, expired or used token",
                RefusalCode::NotAllowed => "the token is for another name, profile or source",
                _ => "try again later",
            };
            return refusal(code, message, peer, &name);
        }
    };
    // An Ed25519 key to register: only what the token grants, bound to
    // the requested key (spki:), so it works with this certificate and
    // every renewal on the same key. Registered before the certificate is
    // issued: if it fails, the token is given back.
    let key_id = match (ed25519, &redeemed.grant, &shared.config.registrar) {
        (None, _, _) => None,
        (Some(_), None, _) => {
            unspend(shared, &token).await;
            return refusal(
                RefusalCode::NotAllowed,
                "this token grants no key",
                peer,
                &name,
            );
        }
        (Some(_), Some(_), None) => {
            unspend(shared, &token).await;
            return refusal(
                RefusalCode::NotAllowed,
                "keys are not registered here",
                peer,
                &name,
            );
        }
        (Some(public_key), Some(grant), Some(registrar)) => {
            let registration = KeyRegistration {
                name: redeemed.name.clone(),
                public_key,
                privileges: grant.privileges.clone(),
                functions: grant.functions.clone(),
                binding: format!("spki:{}", request.spki_fingerprint()),
            };
            match registrar.register(&registration).await {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::error!(error = %e, name = %name, "cannot register the enrolled key");
                    unspend(shared, &token).await;
                    return refusal(RefusalCode::Internal, "try again later", peer, &name);
                }
            }
        }
    };
    let mut response = issue(
        shared,
        &request,
        &redeemed.name,
        redeemed.profile,
        &redeemed.sans,
        peer,
        "enroll_issued",
    )
    .await;
    if let Response::Issued { key_id: id, .. } = &mut response {
        id.clone_from(&key_id);
    }
    response
}

async fn unspend(shared: &Shared, token: &zeroize::Zeroizing<String>) {
    if let Err(e) = shared.store.unspend(token).await {
        tracing::error!(error = %e, "cannot give a token back");
    }
}

/// A renewal: the presented certificate (its chain and validity already
/// checked by TLS against the root) must carry this service's URI SAN and
/// be one it issued and did not revoke.
async fn handle_renew(
    shared: &Shared,
    presented: Option<CertificateDer<'static>>,
    csr: Vec<u8>,
    peer: IpAddr,
) -> Response {
    let not_renewable = |name: &str| {
        refusal(
            RefusalCode::NotRenewable,
            "renewal needs a current certificate this service issued and did not revoke: enroll again",
            peer,
            name,
        )
    };
    let Some(leaf) = presented.and_then(|c| netproc_pki::CertIdentity::from_der(&c).ok()) else {
        return not_renewable("-");
    };
    if shared.config.deny.refuses(&leaf) {
        return not_renewable("-");
    }
    let prefix = format!("netproc://{}/", shared.config.trust_domain);
    let Some((profile, name)) = leaf.sans.iter().find_map(|san| match san {
        SubjectAltName::Uri(u) => u
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(p, n)| Some((Profile::parse(p)?, n.to_owned()))),
        _ => None,
    }) else {
        return not_renewable("-");
    };
    let request = match parse_csr(&csr, peer, &name) {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    let renewable = shared
        .store
        .renewable(&leaf.serial, &name, profile)
        .await
        .ok();
    match renewable {
        Some(true) => {}
        Some(false) => return not_renewable(&name),
        None => return refusal(RefusalCode::Internal, "try again later", peer, &name),
    }
    let sans: Vec<String> = leaf
        .sans
        .iter()
        .filter_map(|san| match san {
            SubjectAltName::Dns(d) => Some(d.clone()),
            SubjectAltName::Ip(ip) => Some(ip.to_string()),
            _ => None,
        })
        .collect();
    issue(
        shared,
        &request,
        &name,
        profile,
        &sans,
        peer,
        "enroll_renewed",
    )
    .await
}

/// Pairing, first step: the request is kept with a fresh code, and the
/// operator is told the code and the short authentication string.
async fn handle_pair(shared: &Shared, name: String, csr: Vec<u8>, peer: IpAddr) -> Response {
    if crate::check_name(&name).is_err() {
        return refusal(RefusalCode::InvalidRequest, "bad name", peer, "-");
    }
    let Some(notifier) = shared.config.notifier.clone() else {
        return refusal(
            RefusalCode::NotAllowed,
            "pairing is off here: ask for a token",
            peer,
            &name,
        );
    };
    let request = match parse_csr(&csr, peer, &name) {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    if let Some(refused) = taken_elsewhere(shared, &name, &request, peer).await {
        return refused;
    }
    let mut id = [0u8; 8];
    let mut c = [0u8; 8];
    if netproc_pki::random_bytes(&mut id).is_err() || netproc_pki::random_bytes(&mut c).is_err() {
        return refusal(RefusalCode::Internal, "try again later", peer, &name);
    }
    // Positive in SQLite's signed integers.
    let request_id = u64::from_be_bytes(id) >> 1;
    let code = zeroize::Zeroizing::new(format!("{:08}", u64::from_be_bytes(c) % 100_000_000));
    let now = SystemTime::now();
    let ttl = shared.config.pairing_ttl;
    let created = shared
        .store
        .create_pairing(crate::store::NewPairing {
            id: request_id,
            name: name.clone(),
            csr,
            code: code.clone(),
            source: peer,
            now,
            ttl,
            max_pending: shared.config.max_pending_pairings,
        })
        .await;
    if let Err(code) = created {
        return refusal(
            code,
            "too many pending pairings; try again later",
            peer,
            &name,
        );
    }
    let sas = crate::pairing_sas(request_id, request.spki_fingerprint());
    let notice = crate::PairingNotice {
        request_id,
        name: name.clone(),
        source: peer,
        at: now,
        sas: sas.clone(),
        code,
        expires_in: ttl,
    };
    if let Err(e) = notifier.notify(&notice).await {
        tracing::error!(error = %e, "cannot notify the operator of a pairing request");
        return refusal(
            RefusalCode::Internal,
            "the operator could not be notified",
            peer,
            &name,
        );
    }
    tracing::info!(
        target: netproc_server::AUDIT_TARGET,
        event = "pairing_requested",
        name = %name,
        request_id,
        sas = %sas,
        spki = %request.spki_fingerprint(),
        peer = %peer,
        "pairing requested; the operator was notified"
    );
    Response::Pending {
        request_id,
        expires_in_s: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
    }
}

/// Pairing, second step: the code unlocks the certificate for the key of
/// that request only.
async fn handle_pair_code(
    shared: &Shared,
    request_id: u64,
    code: String,
    peer: IpAddr,
) -> Response {
    let code = zeroize::Zeroizing::new(code);
    let approved = shared
        .store
        .approve_pairing(request_id, &code, SystemTime::now())
        .await;
    let (name, csr) = match approved {
        Ok(a) => a,
        Err(code) => {
            let message = match code {
                RefusalCode::WrongCode => "not the code of this request",
                RefusalCode::PairingClosed => {
                    "no such pending pairing: expired, cancelled, or closed after too many wrong codes"
                }
                _ => "try again later",
            };
            return refusal(code, message, peer, "-");
        }
    };
    let request = match parse_csr(&csr, peer, &name) {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    if let Some(refused) = taken_elsewhere(shared, &name, &request, peer).await {
        return refused;
    }
    issue(
        shared,
        &request,
        &name,
        Profile::Client,
        &[],
        peer,
        "pairing_approved",
    )
    .await
}

/// Pairing never takes over a name that holds a live certificate for
/// another key (a token, which an operator made for the name, may).
async fn taken_elsewhere(
    shared: &Shared,
    name: &str,
    request: &CertificateRequest,
    peer: IpAddr,
) -> Option<Response> {
    let bound = shared
        .store
        .bound_elsewhere(
            name,
            &request.spki_fingerprint().to_string(),
            SystemTime::now(),
        )
        .await
        .ok();
    match bound {
        Some(false) => None,
        Some(true) => Some(refusal(
            RefusalCode::NotAllowed,
            "the name holds a live certificate for another key: revoke it, or enroll with a token",
            peer,
            name,
        )),
        None => Some(refusal(
            RefusalCode::Internal,
            "try again later",
            peer,
            name,
        )),
    }
}

/// Issues, records and audits a certificate for `request`'s key.
async fn issue(
    shared: &Shared,
    request: &CertificateRequest,
    name: &str,
    profile: Profile,
    sans: &[String],
    peer: IpAddr,
    event: &'static str,
) -> Response {
    let now = SystemTime::now();
    let redeemed = crate::store::Redeemed {
        name: name.to_owned(),
        profile,
        sans: sans.to_vec(),
        grant: None,
    };
    let uri = format!(
        "netproc://{}/{}/{}",
        shared.config.trust_domain,
        redeemed.profile.as_str(),
        redeemed.name
    );
    let lifetime = match redeemed.profile {
        Profile::Client => shared.config.client_lifetime,
        Profile::Server => shared.config.server_lifetime,
    };
    let validity = Validity::new(now - Duration::from_secs(60), now + lifetime);
    let params = match redeemed.profile {
        Profile::Client => LeafParams::client(&redeemed.name),
        Profile::Server => LeafParams::server(&redeemed.name, &redeemed.sans),
    }
    .san(SubjectAltName::Uri(uri))
    .validity(validity);
    let cert = match shared.ca.issue_for_request(request, &params) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot issue a certificate");
            return refusal(RefusalCode::Internal, "try again later", peer, name);
        }
    };
    let serial = netproc_pki::CertIdentity::from_der(&cert)
        .map(|c| c.serial)
        .unwrap_or_default();
    let record = IssuedRecord {
        serial: serial.clone(),
        name: redeemed.name.clone(),
        profile: redeemed.profile,
        spki: request.spki_fingerprint().to_string(),
        source: peer,
        not_after: validity.not_after,
    };
    if shared.store.record_issued(record, now).await.is_err() {
        return refusal(RefusalCode::Internal, "try again later", peer, name);
    }
    metrics::counter!("netproc_enroll_issued_total", "profile" => redeemed.profile.as_str())
        .increment(1);
    tracing::info!(
        target: netproc_server::AUDIT_TARGET,
        event,
        name = %redeemed.name,
        profile = redeemed.profile.as_str(),
        serial = %serial,
        spki = %request.spki_fingerprint(),
        peer = %peer,
        "certificate issued"
    );
    Response::Issued {
        chain: vec![
            cert.to_vec(),
            shared.ca.certificate().to_vec(),
            shared.root.to_vec(),
        ],
        bundle: shared.config.bundle.iter().map(|c| c.to_vec()).collect(),
        key_id: None,
    }
}
