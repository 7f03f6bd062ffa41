//! Enrollment over real TLS on 127.0.0.1: a token's certificate then calls
//! a real netproc server; every bad input is refused with its code and the
//! service keeps serving.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use netproc_auth::{ApiKeyStore, KeySpec};
use netproc_client::{Client, ServerEndpoint};
use netproc_enroll::wire::{self, Request, Response};
use netproc_enroll::*;
use netproc_pki::{CaParams, CertificateAuthority, Fingerprint, LeafParams};
use netproc_server::{CallContext, CallError, Server};
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsConnector;

struct Setup {
    _dir: tempfile::TempDir,
    root: CertificateAuthority,
    store: TokenStore,
    service: EnrollHandle,
}

async fn setup(tune: impl FnOnce(&mut EnrollConfig)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = CertificateAuthority::generate(&CaParams::new("root")).unwrap();
    let online = root.issue_intermediate(&CaParams::new("online")).unwrap();
    let store = TokenStore::open(dir.path().join("enroll.db")).unwrap();
    let mut config = EnrollConfig::new("127.0.0.1:0".parse().unwrap(), vec!["localhost".into()]);
    tune(&mut config);
    let service = EnrollService::start(config, online, root.certificate().clone(), store.clone())
        .await
        .unwrap();
    Setup {
        _dir: dir,
        root,
        store,
        service,
    }
}

impl Setup {
    async fn token(&self, name: &str, profile: Profile) -> String {
        self.store
            .create(&TokenSpec::new(name, profile), SystemTime::now())
            .await
            .unwrap()
            .to_string()
    }

    fn enrollment(&self, token: &str, name: &str, profile: Profile) -> TokenEnrollment {
        let mut e = TokenEnrollment::new(
            format!("localhost:{}", self.service.local_addr().port()),
            token,
            name,
            profile,
            self.service.root_fingerprint(),
        );
        e.timeout = Duration::from_secs(5);
        e
    }

    /// Sends one raw request and reads the answer.
    async fn raw(&self, request: &Request) -> Response {
        let mut tls = self.tls().await;
        wire::write_frame(&mut tls, request).await.unwrap();
        wire::read_frame(&mut tls).await.unwrap()
    }

    async fn tls(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let config =
            netproc_pki::enroll_client_config(&[self.service.root_fingerprint()], None).unwrap();
        let tcp = tokio::net::TcpStream::connect(self.service.local_addr())
            .await
            .unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }
}

fn refused(r: Result<Enrolled, EnrollError>) -> RefusalCode {
    match r {
        Err(EnrollError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_enrolls_a_client_that_then_calls_a_real_server() {
    let s = setup(|_| {}).await;
    let token = s.token("alice", Profile::Client).await;
    let enrolled = enroll_with_token(&s.enrollment(&token, "alice", Profile::Client))
        .await
        .unwrap();
    let identity = enrolled.identity().unwrap();
    let leaf = identity.cert_identity();
    assert_eq!(leaf.common_name.as_deref(), Some("alice"));
    let lifetime = leaf
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(lifetime <= Duration::from_secs(24 * 3600), "{lifetime:?}");
    assert!(lifetime > Duration::from_secs(23 * 3600), "{lifetime:?}");
    assert_eq!(s.store.issued_count("alice").await.unwrap(), 1);
    // A server trusting the root accepts the enrolled chain.
    let server_cert = s
        .root
        .issue(&LeafParams::server("s", ["localhost"]))
        .unwrap();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (_, key) = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()))
        .unwrap();
    let server = Server::builder(
        "s",
        server_cert.identity().unwrap(),
        s.root.trust_anchors(),
        Arc::clone(&keys),
    )
    .function("cn", |ctx: CallContext, (): ()| async move {
        Ok::<_, CallError>(ctx.cert().common_name.clone().unwrap_or_default())
    })
    .start()
    .await
    .unwrap();
    let client = Client::builder()
        .server(
            "s",
            ServerEndpoint::new(
                server.local_addr(),
                "localhost",
                identity,
                s.root.trust_anchors(),
                key.to_secret(),
            ),
        )
        .build()
        .unwrap();
    let cn: String = client.server("s").unwrap().call("cn", ()).await.unwrap();
    assert_eq!(cn, "alice");
    // Files: the key 0600, the chain and the root.
    let out = s._dir.path().join("out");
    enrolled.write_to(&out).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0);
    assert!(netproc_pki::Identity::load(out.join("cert.pem"), out.join("key.pem")).is_ok());
    server.shutdown(Duration::from_secs(1)).await;
    s.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_token_gets_a_server_certificate_for_its_names() {
    let s = setup(|_| {}).await;
    let mut spec = TokenSpec::new("web", Profile::Server);
    spec.sans = vec!["web.example".into(), "10.0.0.7".into()];
    let token = s.store.create(&spec, SystemTime::now()).await.unwrap();
    let enrolled = enroll_with_token(&s.enrollment(&token, "web", Profile::Server))
        .await
        .unwrap();
    let leaf = enrolled.identity().unwrap().cert_identity().clone();
    let sans: Vec<String> = leaf.sans.iter().map(|s| format!("{s:?}")).collect();
    assert!(sans.iter().any(|s| s.contains("web.example")), "{sans:?}");
    assert!(sans.iter().any(|s| s.contains("10.0.0.7")), "{sans:?}");
    assert!(
        sans.iter()
            .any(|s| s.contains("netproc://netproc.local/server/web")),
        "{sans:?}"
    );
    s.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_uses_of_one_token_exactly_one_wins() {
    let s = setup(|_| {}).await;
    for round in 0..5 {
        let name = format!("n{round}");
        let token = s.token(&name, Profile::Client).await;
        let (e1, e2) = (
            s.enrollment(&token, &name, Profile::Client),
            s.enrollment(&token, &name, Profile::Client),
        );
        let (a, b) = tokio::join!(enroll_with_token(&e1), enroll_with_token(&e2));
        let wins = [a.is_ok(), b.is_ok()].iter().filter(|w| **w).count();
        assert_eq!(wins, 1, "round {round}");
        let loser = if a.is_ok() { b } else { a };
        assert_eq!(refused(loser), RefusalCode::InvalidToken);
    }
    s.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_requests_are_refused_with_their_code_and_the_service_stays_up() {
    let s = setup(|_| {}).await;
    // Unknown token.
    let e = s.enrollment("npe1_00", "alice", Profile::Client);
    assert_eq!(
        refused(enroll_with_token(&e).await),
        RefusalCode::InvalidToken
    );
    // Another name, another profile: refused, and the token still works.
    let token = s.token("alice", Profile::Client).await;
    let e = s.enrollment(&token, "bob", Profile::Client);
    assert_eq!(
        refused(enroll_with_token(&e).await),
        RefusalCode::NotAllowed
    );
    let e = s.enrollment(&token, "alice", Profile::Server);
    assert_eq!(
        refused(enroll_with_token(&e).await),
        RefusalCode::NotAllowed
    );
    // An expired token.
    let mut spec = TokenSpec::new("carol", Profile::Client);
    spec.ttl = Duration::from_secs(1);
    let old = s
        .store
        .create(&spec, SystemTime::now() - Duration::from_secs(5))
        .await
        .unwrap();
    let e = s.enrollment(&old, "carol", Profile::Client);
    assert_eq!(
        refused(enroll_with_token(&e).await),
        RefusalCode::InvalidToken
    );
    // A malformed, a wrongly signed and an oversized certificate request:
    // refused before the token is spent.
    let (request, _) = netproc_pki::CertificateRequest::generate("alice").unwrap();
    let mut tampered = request.der().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    for csr in [b"garbage".to_vec(), tampered, vec![0x30; 9000]] {
        let r = s
            .raw(&Request::Token {
                version: wire::VERSION,
                token: token.clone(),
                name: "alice".into(),
                profile: "client".into(),
                csr,
                ed25519: None,
            })
            .await;
        assert!(
            matches!(
                r,
                Response::Refused {
                    code: RefusalCode::BadCsr,
                    ..
                }
            ),
            "{r:?}"
        );
    }
    // An unknown version.
    let r = s
        .raw(&Request::Token {
            version: 99,
            token: token.clone(),
            name: "alice".into(),
            profile: "client".into(),
            csr: request.der().to_vec(),
            ed25519: None,
        })
        .await;
    assert!(matches!(
        r,
        Response::Refused {
            code: RefusalCode::InvalidRequest,
            ..
        }
    ));
    // Garbage frames and a frame over the limit: closed or refused.
    let mut tls = s.tls().await;
    tls.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let r: Response = wire::read_frame(&mut tls).await.unwrap();
    assert!(matches!(
        r,
        Response::Refused {
            code: RefusalCode::InvalidRequest,
            ..
        }
    ));
    let mut tls = s.tls().await;
    tls.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let r: Response = wire::read_frame(&mut tls).await.unwrap();
    assert!(matches!(
        r,
        Response::Refused {
            code: RefusalCode::InvalidRequest,
            ..
        }
    ));
    // Through it all, the token still works for what it was made for.
    let enrolled = enroll_with_token(&s.enrollment(&token, "alice", Profile::Client)).await;
    assert!(enrolled.is_ok(), "{enrolled:?}");
    s.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_root_is_refused_at_the_handshake() {
    let s = setup(|_| {}).await;
    let token = s.token("alice", Profile::Client).await;
    let mut e = s.enrollment(&token, "alice", Profile::Client);
    e.root = Fingerprint::of(b"some other root");
    match enroll_with_token(&e).await {
        Err(EnrollError::Tls(m)) => assert!(m.contains("not the pinned root"), "{m}"),
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
    // The token was never sent: it still works.
    assert!(
        enroll_with_token(&s.enrollment(&token, "alice", Profile::Client))
            .await
            .is_ok()
    );
    s.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_is_dropped_and_floods_are_limited() {
    let s = setup(|c| {
        c.timeout = Duration::from_millis(300);
        c.per_ip_per_minute = 5;
    })
    .await;
    // Connects and sends nothing: closed after the timeout.
    let mut idle = tokio::net::TcpStream::connect(s.service.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
    )
    .await
    .expect("an idle client must be dropped");
    assert!(matches!(read, Ok(0) | Err(_)));
    // More than 5 connections a minute from one address: the rest are
    // closed at once with nothing sent.
    let mut closed = 0;
    for _ in 0..8 {
        let token = s.token("x", Profile::Client).await;
        if enroll_with_token(&s.enrollment(&token, "x", Profile::Client))
            .await
            .is_err()
        {
            closed += 1;
        }
    }
    assert!(closed >= 4, "{closed}");
    s.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_renews_over_mtls_keeping_or_changing_its_key() {
    let s = setup(|_| {}).await;
    let token = s.token("alice", Profile::Client).await;
    let first = enroll_with_token(&s.enrollment(&token, "alice", Profile::Client))
        .await
        .unwrap();
    let renewal = Renewal::new(
        format!("localhost:{}", s.service.local_addr().port()),
        s.service.root_fingerprint(),
    );
    let second = renew(&renewal, &first).await.unwrap();
    let (a, b) = (
        first.identity().unwrap().cert_identity().clone(),
        second.identity().unwrap().cert_identity().clone(),
    );
    assert_ne!(a.serial, b.serial);
    assert_eq!(a.spki_fingerprint, b.spki_fingerprint, "the key is kept");
    // So an API key bound to the key (spki:) works with both certificates,
    // where one bound to the certificate's fingerprint would not.
    let keys = ApiKeyStore::in_memory();
    let (_, by_key) = keys
        .create(KeySpec::default().binding(netproc_auth::CertBinding::Spki(a.spki_fingerprint)))
        .unwrap();
    let (_, by_cert) = keys
        .create(KeySpec::default().binding(netproc_auth::CertBinding::Fingerprint(a.fingerprint)))
        .unwrap();
    for cert in [&a, &b] {
        assert!(
            keys.verify(by_key.expose(), cert, SystemTime::now())
                .is_ok()
        );
    }
    assert!(
        keys.verify(by_cert.expose(), &b, SystemTime::now())
            .is_err()
    );
    assert_eq!(b.common_name.as_deref(), Some("alice"));
    assert_eq!(a.sans, b.sans, "the same stable URI SAN");
    // Re-keying.
    let mut rekey = renewal.clone();
    rekey.rekey = true;
    let third = renew(&rekey, &second).await.unwrap();
    assert_ne!(
        third.identity().unwrap().cert_identity().spki_fingerprint,
        b.spki_fingerprint
    );
    assert_eq!(s.store.issued_count("alice").await.unwrap(), 3);
    // A revoked certificate cannot renew.
    assert!(
        s.store
            .revoke(
                &third.identity().unwrap().cert_identity().serial,
                SystemTime::now()
            )
            .await
            .unwrap()
    );
    match renew(&renewal, &third).await {
        Err(EnrollError::Refused { code, .. }) => assert_eq!(code, RefusalCode::NotRenewable),
        other => panic!("{other:?}"),
    }
    s.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_the_service_did_not_issue_cannot_renew() {
    let s = setup(|_| {}).await;
    let renewal = Renewal::new(
        format!("localhost:{}", s.service.local_addr().port()),
        s.service.root_fingerprint(),
    );
    let as_enrolled = |cert: &netproc_pki::IssuedCert, root: &CertificateAuthority| Enrolled {
        key_pem: cert.key_pem().clone(),
        chain: vec![cert.certificate().clone()],
        root: root.certificate().clone(),
        bundle: Vec::new(),
        ed25519: None,
    };
    // Chains to the root, claims the service's URI SAN, but was never
    // issued by it.
    let forged = s
        .root
        .issue(
            &LeafParams::client("mallory").san(netproc_pki::SubjectAltName::Uri(
                "netproc://netproc.local/client/mallory".into(),
            )),
        )
        .unwrap();
    match renew(&renewal, &as_enrolled(&forged, &s.root)).await {
        Err(EnrollError::Refused { code, .. }) => assert_eq!(code, RefusalCode::NotRenewable),
        other => panic!("{other:?}"),
    }
    // From a rogue CA: refused at the handshake.
    let rogue = CertificateAuthority::generate(&CaParams::new("rogue")).unwrap();
    let cert = rogue.issue(&LeafParams::client("eve")).unwrap();
    assert!(matches!(
        renew(&renewal, &as_enrolled(&cert, &s.root)).await,
        Err(EnrollError::Tls(_) | EnrollError::Io(_))
    ));
    // Expired: refused at the handshake too.
    let expired = s
        .root
        .issue(
            &LeafParams::client("old").validity(netproc_pki::Validity::new(
                SystemTime::now() - Duration::from_secs(7200),
                SystemTime::now() - Duration::from_secs(3600),
            )),
        )
        .unwrap();
    assert!(matches!(
        renew(&renewal, &as_enrolled(&expired, &s.root)).await,
        Err(EnrollError::Tls(_) | EnrollError::Io(_))
    ));
    // The service still serves.
    let token = s.token("ok", Profile::Client).await;
    assert!(
        enroll_with_token(&s.enrollment(&token, "ok", Profile::Client))
            .await
            .is_ok()
    );
    s.service.shutdown().await;
}

#[test]
fn renewal_is_due_at_two_thirds_give_or_take_a_tenth() {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let end = start + Duration::from_secs(3000);
    assert_eq!(renew_at(start, end, 0.0), start + Duration::from_secs(2000));
    assert_eq!(renew_at(start, end, 1.0), start + Duration::from_secs(2300));
    assert_eq!(
        renew_at(start, end, -1.0),
        start + Duration::from_secs(1700)
    );
    assert_eq!(renew_at(start, end, 7.0), start + Duration::from_secs(2300));
}

/// 3-second certificates renewed live under a steady stream of calls:
/// no call fails, and each renewal moves the client to the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_renew_under_load_without_a_failed_call() {
    let s = setup(|c| c.client_lifetime = Duration::from_secs(3)).await;
    let token = s.token("alice", Profile::Client).await;
    let enrolled = enroll_with_token(&s.enrollment(&token, "alice", Profile::Client))
        .await
        .unwrap();
    let server_cert = s
        .root
        .issue(&LeafParams::server("s", ["localhost"]))
        .unwrap();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (_, key) = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()))
        .unwrap();
    let server = Server::builder(
        "s",
        server_cert.identity().unwrap(),
        s.root.trust_anchors(),
        Arc::clone(&keys),
    )
    .function("sleep_ms", |_: CallContext, (ms,): (u64,)| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, CallError>(ms)
    })
    .start()
    .await
    .unwrap();
    let client = Client::builder()
        .server(
            "s",
            ServerEndpoint::new(
                server.local_addr(),
                "localhost",
                enrolled.identity().unwrap(),
                s.root.trust_anchors(),
                key.to_secret(),
            ),
        )
        .build()
        .unwrap();
    let renewed = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let renewer = tokio::spawn({
        let (client, renewed, anchors) =
            (client.clone(), Arc::clone(&renewed), s.root.trust_anchors());
        let renewal = Renewal::new(
            format!("localhost:{}", s.service.local_addr().port()),
            s.service.root_fingerprint(),
        );
        async move {
            keep_renewed(
                renewal,
                enrolled,
                move |next| {
                    client
                        .set_identity(&next.identity().unwrap(), &anchors)
                        .unwrap();
                    client.migrate_all();
                    renewed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                },
                async {
                    let _ = stopped.await;
                },
            )
            .await
        }
    });
    let s1 = client.server("s").unwrap();
    let started = std::time::Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let s1 = s1.clone();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while started.elapsed() < Duration::from_secs(9) {
                match s1.call::<u64>("sleep_ms", (20u64,)).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        assert!(ok > 50, "{ok}");
    }
    let _ = stop.send(());
    let last = renewer.await.unwrap();
    let n = renewed.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n >= 4, "{n} renewals in 9 s of 3-second certificates");
    // The client holds the last one.
    let now = s1.who_am_i().await.unwrap();
    assert_eq!(
        now.cert_fingerprint,
        last.identity()
            .unwrap()
            .cert_identity()
            .fingerprint
            .to_string()
    );
    server.shutdown(Duration::from_secs(1)).await;
    s.service.shutdown().await;
}

type Notices = Arc<std::sync::Mutex<Vec<PairingNotice>>>;

async fn pairing_setup() -> (Setup, Notices) {
    let notices: Notices = Arc::default();
    let seen = Arc::clone(&notices);
    let s = setup(move |c| {
        c.notifier = Some(Notifier::Callback(Arc::new(move |n: &PairingNotice| {
            seen.lock().unwrap().push(n.clone());
        })));
    })
    .await;
    (s, notices)
}

impl Setup {
    fn pairing(&self, name: &str) -> Pairing {
        Pairing::new(
            format!("localhost:{}", self.service.local_addr().port()),
            name,
            self.service.root_fingerprint(),
        )
    }
}

fn code_of(notices: &Notices, request_id: u64) -> (String, String) {
    let n = notices.lock().unwrap();
    let n = n.iter().find(|n| n.request_id == request_id).unwrap();
    (n.code.to_string(), n.sas.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_with_the_operators_code_issues_for_that_key_only_once() {
    let (s, notices) = pairing_setup().await;
    let pending = start_pairing(&s.pairing("alice")).await.unwrap();
    let (code, sas) = code_of(&notices, pending.request_id);
    // The string the requester sees is the one the operator was told.
    assert_eq!(pending.sas, sas);
    let enrolled = pending.complete(&code).await.unwrap();
    let leaf = enrolled.identity().unwrap().cert_identity().clone();
    assert_eq!(leaf.common_name.as_deref(), Some("alice"));
    // Used.
    match pending.complete(&code).await {
        Err(EnrollError::Refused { code, .. }) => assert_eq!(code, RefusalCode::PairingClosed),
        other => panic!("{other:?}"),
    }
    s.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_for_the_name_cannot_use_the_first_ones_approval() {
    let (s, notices) = pairing_setup().await;
    let legit = start_pairing(&s.pairing("alice")).await.unwrap();
    let rival = start_pairing(&s.pairing("alice")).await.unwrap();
    assert_ne!(legit.sas, rival.sas, "each request shows its own string");
    let (legit_code, _) = code_of(&notices, legit.request_id);
    let (rival_code, _) = code_of(&notices, rival.request_id);
    // The code approves its own request only.
    let refused = |r: Result<Enrolled, EnrollError>| match r {
        Err(EnrollError::Refused { code, .. }) => code,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        refused(rival.complete(&legit_code).await),
        RefusalCode::WrongCode
    );
    let enrolled = legit.complete(&legit_code).await.unwrap();
    assert!(enrolled.identity().is_ok());
    // Approving one cancelled the other.
    assert_eq!(
        refused(rival.complete(&rival_code).await),
        RefusalCode::PairingClosed
    );
    s.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_codes_closes_the_pairing() {
    let (s, notices) = pairing_setup().await;
    let pending = start_pairing(&s.pairing("alice")).await.unwrap();
    let (code, _) = code_of(&notices, pending.request_id);
    let wrong = if code == "00000000" {
        "00000001"
    } else {
        "00000000"
    };
    let refused = |r: Result<Enrolled, EnrollError>| match r {
        Err(EnrollError::Refused { code, .. }) => code,
        other => panic!("{other:?}"),
    };
    for _ in 0..4 {
        assert_eq!(
            refused(pending.complete(wrong).await),
            RefusalCode::WrongCode
        );
    }
    assert_eq!(
        refused(pending.complete(wrong).await),
        RefusalCode::PairingClosed
    );
    // Closed for good: even the right code.
    assert_eq!(
        refused(pending.complete(&code).await),
        RefusalCode::PairingClosed
    );
    s.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_notifier_gets_the_message_on_stdin_and_pairing_is_off_without_one() {
    let s = setup(|_| {}).await;
    match start_pairing(&s.pairing("alice")).await {
        Err(EnrollError::Refused { code, .. }) => assert_eq!(code, RefusalCode::NotAllowed),
        other => panic!("{other:?}"),
    }
    s.service.shutdown().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("notify.txt");
    let s = setup(|c| {
        c.notifier = Some(Notifier::Command(vec![
            "sh".into(),
            "-c".into(),
            format!("cat > '{}'", log.display()),
        ]));
    })
    .await;
    let pending = start_pairing(&s.pairing("alice")).await.unwrap();
    let message = std::fs::read_to_string(&log).unwrap();
    assert!(message.contains("name: alice"), "{message}");
    assert!(message.contains(&pending.sas), "{message}");
    let code = message
        .lines()
        .find_map(|l| l.strip_prefix("then give them this code: "))
        .unwrap()
        .to_owned();
    assert!(pending.complete(&code).await.is_ok());
    s.service.shutdown().await;
}

/// A CA rotation with overlap while clients renew: the next root is
/// announced, then signs, then the previous one goes; a client that
/// renewed in between follows on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_follow_a_ca_rotation_by_renewing() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::open(dir.path().join("enroll.db")).unwrap();
    let root1 = CertificateAuthority::generate(&CaParams::new("root 1")).unwrap();
    let root2 = CertificateAuthority::generate(&CaParams::new("root 2")).unwrap();
    let online1_pem = {
        let o = root1
            .issue_intermediate(&CaParams::new("online 1"))
            .unwrap();
        (o.cert_pem(), o.key_pem())
    };
    let online2 = root2
        .issue_intermediate(&CaParams::new("online 2"))
        .unwrap();
    let online2_pem = (online2.cert_pem(), online2.key_pem());
    let start = |online: &(String, zeroize::Zeroizing<String>),
                 root: &CertificateAuthority,
                 bundle: Vec<&CertificateAuthority>| {
        let ca = CertificateAuthority::from_pem(&online.0, &online.1).unwrap();
        let mut config =
            EnrollConfig::new("127.0.0.1:0".parse().unwrap(), vec!["localhost".into()]);
        config.bundle = bundle.iter().map(|r| r.certificate().clone()).collect();
        EnrollService::start(config, ca, root.certificate().clone(), store.clone())
    };
    let renewal = |svc: &EnrollHandle, root: &CertificateAuthority| {
        Renewal::new(
            format!("localhost:{}", svc.local_addr().port()),
            Fingerprint::of(root.certificate()),
        )
    };
    // Before: root 1 only.
    let a = start(&online1_pem, &root1, vec![]).await.unwrap();
    let mut enrolled = Vec::new();
    for name in ["alice", "bob"] {
        let token = store
            .create(&TokenSpec::new(name, Profile::Client), SystemTime::now())
            .await
            .unwrap();
        let mut e = TokenEnrollment::new(
            format!("localhost:{}", a.local_addr().port()),
            token.as_str(),
            name,
            Profile::Client,
            a.root_fingerprint(),
        );
        e.timeout = Duration::from_secs(5);
        enrolled.push(enroll_with_token(&e).await.unwrap());
    }
    let bob = enrolled.pop().unwrap();
    let alice = enrolled.pop().unwrap();
    a.shutdown().await;
    // 1. Root 2 announced: alice renews and learns it.
    let b = start(&online1_pem, &root1, vec![&root2]).await.unwrap();
    let alice = renew(&renewal(&b, &root1), &alice).await.unwrap();
    assert_eq!(alice.bundle, vec![root2.certificate().clone()]);
    b.shutdown().await;
    // 2. Root 2 signs, root 1 still trusted: alice renews with her root-1
    // certificate and pins root 2 from what she holds.
    let c = start(&online2_pem, &root2, vec![&root1]).await.unwrap();
    let unknown = Fingerprint::of(b"not a root");
    let alice = renew(&renewal(&c, &root1), &alice).await.unwrap();
    assert_eq!(alice.root, *root2.certificate());
    assert!(
        root2
            .trust_anchors()
            .verify_client(alice.identity().unwrap().chain(), SystemTime::now())
            .is_ok()
    );
    // Bob missed the announcement: he holds root 1 only, so the service's
    // root-2 chain is refused — until he is given root 2's fingerprint.
    let mut blind = renewal(&c, &root1);
    blind.root = unknown;
    assert!(matches!(
        renew(&blind, &bob).await,
        Err(EnrollError::Tls(_))
    ));
    let bob = renew(&renewal(&c, &root2), &bob).await.unwrap();
    assert_eq!(bob.root, *root2.certificate());
    c.shutdown().await;
    // 3. Root 1 gone: both renew under root 2 alone.
    let d = start(&online2_pem, &root2, vec![]).await.unwrap();
    for who in [&alice, &bob] {
        let next = renew(&renewal(&d, &root2), who).await.unwrap();
        assert!(next.bundle.is_empty());
    }
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_renews_with_its_own_server_certificate() {
    let s = setup(|_| {}).await;
    let mut spec = TokenSpec::new("web", Profile::Server);
    spec.sans = vec!["web.example".into(), "10.0.0.7".into()];
    let token = s.store.create(&spec, SystemTime::now()).await.unwrap();
    let first = enroll_with_token(&s.enrollment(&token, "web", Profile::Server))
        .await
        .unwrap();
    let renewal = Renewal::new(
        format!("localhost:{}", s.service.local_addr().port()),
        s.service.root_fingerprint(),
    );
    let second = renew(&renewal, &first).await.unwrap();
    let (a, b) = (
        first.identity().unwrap().cert_identity().clone(),
        second.identity().unwrap().cert_identity().clone(),
    );
    assert_ne!(a.serial, b.serial);
    assert_eq!(a.sans, b.sans, "the same DNS, IP and URI SANs");
    assert_eq!(a.key_purposes, b.key_purposes, "serverAuth, as before");
    // It is still not a client certificate for the RPC listener.
    assert!(
        s.root
            .trust_anchors()
            .verify_client(second.identity().unwrap().chain(), SystemTime::now())
            .is_err()
    );
    s.service.shutdown().await;
}

/// The credential authority as the registrar: an enrolled host's Ed25519
/// key, bound to its certificate's key, reaches every target.
#[derive(Debug)]
struct AuthorityRegistrar {
    authority: netproc_propagation::Authority,
    targets: Vec<String>,
}

impl KeyRegistrar for AuthorityRegistrar {
    fn register<'a>(
        &'a self,
        key: &'a KeyRegistration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + 'a>>
    {
        Box::pin(async move {
            let id: String = key
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let privileges: netproc_auth::PrivilegeSet = key
                .privileges
                .join(",")
                .parse()
                .map_err(|e| format!("{e}"))?;
            let binding = key.binding.parse().map_err(|e| format!("{e}"))?;
            let spec = netproc_propagation::CredentialSpec::ed25519(
                id.clone(),
                key.public_key,
                KeySpec::new(privileges).binding(binding),
            );
            let targets: Vec<&str> = self.targets.iter().map(String::as_str).collect();
            self.authority
                .ensure(spec, &targets)
                .await
                .map_err(|e| e.to_string())?;
            Ok(id)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_hosts_ed25519_key_reaches_a_server_through_the_authority() {
    let dir = tempfile::tempdir().unwrap();
    let root = CertificateAuthority::generate(&CaParams::new("root")).unwrap();
    let online = root.issue_intermediate(&CaParams::new("online")).unwrap();
    // A server that receives credentials from the authority (in process).
    let signing = netproc_pki::Ed25519Key::generate().unwrap();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let state = netproc_server::StateDatabase::open(dir.path()).unwrap();
    let target = netproc_propagation::PropagationTarget::open(
        netproc_propagation::TargetConfig::new("s", vec![signing.public_key()]),
        Arc::clone(&keys),
        &state,
    )
    .unwrap();
    let server_cert = root.issue(&LeafParams::server("s", ["localhost"])).unwrap();
    let server = target
        .install(
            Server::builder(
                "s",
                server_cert.identity().unwrap(),
                root.trust_anchors(),
                Arc::clone(&keys),
            )
            .state(state)
            .function("ping", |_: CallContext, (): ()| async move {
                Ok::<_, CallError>("pong".to_owned())
            }),
        )
        .start()
        .await
        .unwrap();
    server.follow_key_store(&keys);
    let mut transport = netproc_propagation::LocalTransport::new();
    transport.add(target);
    let authority = netproc_propagation::Authority::open(
        netproc_propagation::AuthorityConfig::new(
            dir.path().join("authority.db"),
            vec!["s".into()],
        ),
        signing,
        Arc::new(transport),
    )
    .unwrap();
    // The enrollment service registers granted keys with the authority.
    let store = TokenStore::open(dir.path().join("enroll.db")).unwrap();
    let mut config = EnrollConfig::new("127.0.0.1:0".parse().unwrap(), vec!["localhost".into()]);
    config.registrar = Some(Arc::new(AuthorityRegistrar {
        authority: authority.clone(),
        targets: vec!["s".into()],
    }));
    let service = EnrollService::start(config, online, root.certificate().clone(), store.clone())
        .await
        .unwrap();
    let mut spec = TokenSpec::new("carol", Profile::Client);
    spec.grant = Some(KeyGrant::new(vec!["invoke_functions".into()]));
    let token = store.create(&spec, SystemTime::now()).await.unwrap();
    let mut e = TokenEnrollment::new(
        format!("localhost:{}", service.local_addr().port()),
        token.as_str(),
        "carol",
        Profile::Client,
        service.root_fingerprint(),
    );
    e.ed25519 = true;
    let enrolled = enroll_with_token(&e).await.unwrap();
    let key = enrolled.ed25519.as_ref().unwrap();
    assert_eq!(key.key_id, "carol");
    assert!(authority.sync().await.all_ok());
    // No shared secret typed or copied: the certificate and the key made
    // on the host are all it needs.
    let client = Client::builder()
        .server(
            "s",
            ServerEndpoint::with_ed25519(
                server.local_addr(),
                "localhost",
                enrolled.identity().unwrap(),
                root.trust_anchors(),
                key.key_id.clone(),
                Arc::new(netproc_pki::Ed25519Key::from_seed(key.key.seed()).unwrap()),
            ),
        )
        .build()
        .unwrap();
    let pong: String = client.server("s").unwrap().call("ping", ()).await.unwrap();
    assert_eq!(pong, "pong");
    // A token without a grant cannot register a key, and stays usable.
    let plain = store
        .create(&TokenSpec::new("dave", Profile::Client), SystemTime::now())
        .await
        .unwrap();
    let mut e2 = TokenEnrollment::new(
        format!("localhost:{}", service.local_addr().port()),
        plain.as_str(),
        "dave",
        Profile::Client,
        service.root_fingerprint(),
    );
    e2.ed25519 = true;
    assert_eq!(
        refused(enroll_with_token(&e2).await),
        RefusalCode::NotAllowed
    );
    e2.ed25519 = false;
    assert!(enroll_with_token(&e2).await.is_ok());
    server.shutdown(Duration::from_secs(1)).await;
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_cannot_take_over_a_live_name_and_a_denied_certificate_cannot_renew() {
    let deny = netproc_pki::DenyList::new();
    let notices: Notices = Arc::default();
    let (seen, denied) = (Arc::clone(&notices), deny.clone());
    let s = setup(move |c| {
        c.notifier = Some(Notifier::Callback(Arc::new(move |n: &PairingNotice| {
            seen.lock().unwrap().push(n.clone());
        })));
        c.deny = denied;
    })
    .await;
    let token = s.token("alice", Profile::Client).await;
    let alice = enroll_with_token(&s.enrollment(&token, "alice", Profile::Client))
        .await
        .unwrap();
    // Someone pairs as alice while alice holds a live certificate.
    match start_pairing(&s.pairing("alice")).await {
        Err(EnrollError::Refused { code, .. }) => assert_eq!(code, RefusalCode::NotAllowed),
        other => panic!("{other:?}"),
    }
    assert!(notices.lock().unwrap().is_empty(), "nobody was asked");
    // Denied fleet-wide (the authority's deny list): no renewal.
    let leaf = alice.identity().unwrap().cert_identity().clone();
    for entry in netproc_pki::DeniedCert::of(&leaf) {
        deny.insert(entry, leaf.not_after);
    }
    let renewal = Renewal::new(
        format!("localhost:{}", s.service.local_addr().port()),
        s.service.root_fingerprint(),
    );
    match renew(&renewal, &alice).await {
        Err(EnrollError::Refused { code, .. }) => assert_eq!(code, RefusalCode::NotRenewable),
        other => panic!("{other:?}"),
    }
    s.service.shutdown().await;
}

/// Two service instances on one PostgreSQL database: a token is honoured
/// once across them, a pairing asked on one is approved on the other, and
/// a certificate issued by one renews on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_postgresql() {
    let Some(pg) = netproc_testkit::PgSchema::new("enroll two_instances_share_postgresql").await
    else {
        return;
    };
    let mut options = PostgresStore::new(pg.url.clone());
    options.schema = Some(pg.schema.clone());
    let root = CertificateAuthority::generate(&CaParams::new("root")).unwrap();
    let online = root.issue_intermediate(&CaParams::new("online")).unwrap();
    let online_pem = (online.cert_pem(), online.key_pem());
    let notices: Notices = Arc::default();
    let mut services = Vec::new();
    for _ in 0..2 {
        let store = TokenStore::connect_postgres(&options).await.unwrap();
        let seen = Arc::clone(&notices);
        let mut config =
            EnrollConfig::new("127.0.0.1:0".parse().unwrap(), vec!["localhost".into()]);
        config.notifier = Some(Notifier::Callback(Arc::new(move |n: &PairingNotice| {
            seen.lock().unwrap().push(n.clone());
        })));
        let ca = CertificateAuthority::from_pem(&online_pem.0, &online_pem.1).unwrap();
        services.push(
            EnrollService::start(config, ca, root.certificate().clone(), store)
                .await
                .unwrap(),
        );
    }
    let (a, b) = (&services[0], &services[1]);
    let at = |svc: &EnrollHandle, token: &str, name: &str| {
        let mut e = TokenEnrollment::new(
            format!("localhost:{}", svc.local_addr().port()),
            token,
            name,
            Profile::Client,
            svc.root_fingerprint(),
        );
        e.timeout = Duration::from_secs(5);
        e
    };
    let store = TokenStore::connect_postgres(&options).await.unwrap();
    // One token, both instances at once: exactly one wins.
    for round in 0..3 {
        let name = format!("n{round}");
        let token = store
            .create(&TokenSpec::new(&name, Profile::Client), SystemTime::now())
            .await
            .unwrap();
        let (ea, eb) = (at(a, &token, &name), at(b, &token, &name));
        let (x, y) = tokio::join!(enroll_with_token(&ea), enroll_with_token(&eb));
        assert_eq!(
            [x.is_ok(), y.is_ok()].iter().filter(|w| **w).count(),
            1,
            "round {round}"
        );
    }
    // Issued by A, renewed by B.
    let token = store
        .create(&TokenSpec::new("alice", Profile::Client), SystemTime::now())
        .await
        .unwrap();
    let alice = enroll_with_token(&at(a, &token, "alice")).await.unwrap();
    let renewed = renew(
        &Renewal::new(
            format!("localhost:{}", b.local_addr().port()),
            b.root_fingerprint(),
        ),
        &alice,
    )
    .await
    .unwrap();
    assert_eq!(store.issued_count("alice").await.unwrap(), 2);
    // Paired on A, approved on B (the code checked there).
    let pending = start_pairing(&Pairing::new(
        format!("localhost:{}", a.local_addr().port()),
        "bob",
        a.root_fingerprint(),
    ))
    .await
    .unwrap();
    let (code, _) = code_of(&notices, pending.request_id);
    let mut on_b = pending;
    on_b.retarget(format!("localhost:{}", b.local_addr().port()));
    assert!(on_b.complete(&code).await.is_ok());
    // Revoked in the shared store: neither instance renews it.
    let serial = renewed.identity().unwrap().cert_identity().serial.clone();
    assert!(store.revoke(&serial, SystemTime::now()).await.unwrap());
    for svc in [a, b] {
        let r = Renewal::new(
            format!("localhost:{}", svc.local_addr().port()),
            svc.root_fingerprint(),
        );
        match renew(&r, &renewed).await {
            Err(EnrollError::Refused { code, .. }) => assert_eq!(code, RefusalCode::NotRenewable),
            other => panic!("{other:?}"),
        }
    }
    for svc in services {
        svc.shutdown().await;
    }
    drop(pg);
}
