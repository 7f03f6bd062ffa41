//! Authentication and authorisation end to end.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use netproc_auth::{
    ApiKeyStore, AuthRequest, CertBinding, KeySpec, Principal, PrivilegeSet, authenticator_fn,
};
use netproc_client::{Client, ClientError, TlsFailure};
use netproc_pki::{CaParams, CertificateAuthority, LeafParams, Validity};
use netproc_server::Server;
use netproc_wire::Privilege;

use crate::support::*;

#[tokio::test]
async fn a_client_cert_from_a_rogue_ca_is_refused_with_the_tls_alert() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let rogue_ca = CertificateAuthority::generate(&CaParams::new("rogue")).unwrap();
    let rogue = rogue_ca.issue(&LeafParams::client("mallory")).unwrap();
    let client = Client::builder()
        .server("s1", endpoint_as(&pki, &rogue, &server, &key))
        .build()
        .unwrap();
    let err = client
        .server("s1")
        .unwrap()
        .call::<String>("ping_fn", ())
        .await
        .unwrap_err();
    let ClientError::Tls { reason, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*reason, TlsFailure::RejectedByServer("UnknownCA".into()));
    assert_eq!(err.code().as_str(), "tls_error");
}

#[tokio::test]
async fn an_expired_client_cert_is_refused() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let old = pki
        .ca
        .issue(&LeafParams::client("old").validity(Validity::new(now - 10 * day, now - day)))
        .unwrap();
    let client = Client::builder()
        .server("s1", endpoint_as(&pki, &old, &server, &key))
        .build()
        .unwrap();
    let err = client
        .server("s1")
        .unwrap()
        .call::<String>("ping_fn", ())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Tls { reason: TlsFailure::RejectedByServer(a), .. } if a == "CertificateExpired"),
        "{err:?}"
    );
    // One TLS alert covers both ends of the window: the message says so.
    assert!(err.to_string().contains("not yet valid"), "{err}");
}

#[tokio::test]
async fn a_not_yet_valid_client_cert_is_refused_with_both_ends_named() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", keys).await;
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let early = pki
        .ca
        .issue(&LeafParams::client("early").validity(Validity::new(now + day, now + 10 * day)))
        .unwrap();
    let err = Client::builder()
        .server("s1", endpoint_as(&pki, &early, &server, &key))
        .build()
        .unwrap()
        .server("s1")
        .unwrap()
        .call::<String>("ping_fn", ())
        .await
        .unwrap_err();
    assert!(matches!(&err, ClientError::Tls { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("expired or not yet valid") && message.contains("clock"),
        "{message}"
    );
}

#[tokio::test]
async fn wrong_key_bound_key_and_revoked_key_fail_authentication() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let good = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", Arc::clone(&keys)).await;

    // A well-formed key that is not in the store.
    let other_store = ApiKeyStore::in_memory();
    let stranger = key(&other_store, "invoke_functions");
    let err = client(&pki, &server, &stranger)
        .server("s1")
        .unwrap()
        .call::<String>("ping_fn", ())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::AuthenticationFailed { .. }),
        "{err:?}"
    );

    // A key bound to another certificate.
    let other_cert = pki.ca.issue(&LeafParams::client("other")).unwrap();
    let (_, bound) = keys
        .create(
            KeySpec::new(PrivilegeSet::from([Privilege::InvokeFunctions])).binding(
                CertBinding::Fingerprint(other_cert.cert_identity().fingerprint),
            ),
        )
        .unwrap();
    let err = client(&pki, &server, &bound)
        .server("s1")
        .unwrap()
        .call::<String>("ping_fn", ())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::AuthenticationFailed { .. }),
        "{err:?}"
    );
    // ...and it works over the certificate it is bound to.
    let ok = Client::builder()
        .server("s1", endpoint_as(&pki, &other_cert, &server, &bound))
        .build()
        .unwrap();
    assert_eq!(
        ok.server("s1")
            .unwrap()
            .call::<String>("ping_fn", ())
            .await
            .unwrap(),
        "ok"
    );

    // A revoked key: refused on its next connection.
    let c = client(&pki, &server, &good);
    assert_eq!(
        c.server("s1")
            .unwrap()
            .call::<String>("ping_fn", ())
            .await
            .unwrap(),
        "ok"
    );
    let id = keys
        .list()
        .into_iter()
        .find(|k| good.expose().contains(&k.id))
        .unwrap()
        .id;
    keys.revoke(&id).unwrap();
    c.flush_server("s1").unwrap();
    let err = c
        .server("s1")
        .unwrap()
        .call::<String>("ping_fn", ())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::AuthenticationFailed { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn each_privilege_gates_its_operation() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let server = start(&pki, "s1", Arc::clone(&keys)).await;
    use netproc_wire::{DefineFunction, DependencySource, Operation};
    let cases: Vec<(Privilege, Operation)> = vec![
        (
            Privilege::InvokeFunctions,
            Operation::Invoke {
                function: "ping_fn".into(),
                args: vec![],
            },
        ),
        (
            Privilege::DefineFunctions,
            Operation::DefineFunction(DefineFunction {
                name: "f".into(),
                source: "fn f() { 1 }".into(),
                source_sha256: [0; 32],
                description: None,
                limits: None,
            }),
        ),
        (
            Privilege::UndefineFunctions,
            Operation::UndefineFunction { name: "f".into() },
        ),
        (
            Privilege::DefineConstants,
            Operation::DefineConstant {
                name: "c".into(),
                value: 1.into(),
            },
        ),
        (
            Privilege::UndefineConstants,
            Operation::UndefineConstant { name: "c".into() },
        ),
        (
            Privilege::DefineDependencies,
            Operation::DefineDependency {
                alias: "m".into(),
                source: DependencySource::Host("m".into()),
            },
        ),
        (
            Privilege::UndefineDependencies,
            Operation::UndefineDependency {
                alias: "m".into(),
                force: false,
            },
        ),
        (Privilege::AdminPrivileges, Operation::ServerInfo),
        (Privilege::AdminPrivileges, Operation::ListSessions),
    ];
    for (privilege, op) in cases {
        // Every privilege except the needed one (and the two that satisfy all).
        let without: PrivilegeSet = Privilege::ALL
            .iter()
            .copied()
            .filter(|p| {
                *p != privilege
                    && *p != Privilege::AdminPrivileges
                    && *p != Privilege::AllPrivileges
            })
            .collect();
        let denied = keys.create(KeySpec::new(without)).unwrap().1;
        let err = client(&pki, &server, &denied)
            .server("s1")
            .unwrap()
            .execute(op.clone())
            .await
            .unwrap_err();
        let ClientError::InsufficientPrivileges { message, .. } = &err else {
            panic!("{} without {privilege}: {err:?}", op.name())
        };
        assert!(
            message.contains(privilege.as_str()) && message.contains(op.name()),
            "{message}"
        );

        for grant in [
            privilege,
            Privilege::AllPrivileges,
            Privilege::AdminPrivileges,
        ] {
            let allowed = keys
                .create(KeySpec::new(PrivilegeSet::from([grant])))
                .unwrap()
                .1;
            let r = client(&pki, &server, &allowed)
                .server("s1")
                .unwrap()
                .execute(op.clone())
                .await;
            assert!(
                !matches!(r, Err(ClientError::InsufficientPrivileges { .. })),
                "{} with {grant}: {r:?}",
                op.name()
            );
        }
    }
}

#[tokio::test]
async fn an_empty_privilege_set_authenticates_but_may_only_ping_and_list() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "");
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.ping().await.unwrap();
    assert!(s.list_functions().await.unwrap().is_empty());
    let err = s.call::<String>("ping_fn", ()).await.unwrap_err();
    assert!(
        matches!(err, ClientError::InsufficientPrivileges { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_function_allow_list_limits_calls_and_listings() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (_, key) = keys
        .create(KeySpec::new(PrivilegeSet::from([Privilege::InvokeFunctions])).functions(["add"]))
        .unwrap();
    let server = start(&pki, "s1", keys).await;
    let s = client(&pki, &server, &key).server("s1").unwrap();
    assert_eq!(s.call::<i64>("add", (1, 2)).await.unwrap(), 3);
    let err = s.call::<String>("ping_fn", ()).await.unwrap_err();
    assert!(
        matches!(err, ClientError::InsufficientPrivileges { .. }),
        "{err:?}"
    );
    let listed = s.list_functions().await.unwrap();
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn a_panicking_or_failing_authenticator_refuses_and_the_server_keeps_serving() {
    let pki = Pki::new();
    let auth = authenticator_fn(|req: AuthRequest| async move {
        let netproc_auth::Credential::ApiKey(k) = &req.credential else {
            unreachable!()
        };
        match k.expose() {
            "panic" => panic!("authenticator bug"),
            "ok" => Ok(Principal::new(
                req.cert.common_name.clone().unwrap_or_default(),
                PrivilegeSet::all(),
            )),
            _ => Err(netproc_auth::AuthRejected::new("no")),
        }
    });
    let server = Server::builder(
        "s1",
        pki.server.identity().unwrap(),
        pki.ca.trust_anchors(),
        auth,
    )
    .function(
        "whoami",
        |ctx: netproc_server::CallContext, (): ()| async move {
            Ok::<_, netproc_server::CallError>(ctx.principal().id.clone())
        },
    )
    .start()
    .await
    .unwrap();
    let with = |k: &str| {
        Client::builder()
            .server(
                "s1",
                netproc_client::ServerEndpoint::new(
                    server.local_addr(),
                    "localhost",
                    pki.client.identity().unwrap(),
                    pki.ca.trust_anchors(),
                    netproc_wire::SecretString::new(k),
                ),
            )
            .build()
            .unwrap()
    };
    for bad in ["panic", "nope"] {
        let err = with(bad)
            .server("s1")
            .unwrap()
            .call::<String>("whoami", ())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::AuthenticationFailed { .. }),
            "{bad}: {err:?}"
        );
    }
    // The closure saw the certificate: the principal is the client's CN.
    let who: String = with("ok")
        .server("s1")
        .unwrap()
        .call("whoami", ())
        .await
        .unwrap();
    assert_eq!(who, "client");
}

/// The test binary's captured log (INFO and above).
pub(crate) fn audit_capture() -> &'static Mutex<Vec<u8>> {
    netproc_testkit::log_capture(tracing::Level::INFO)
}

#[tokio::test]
async fn audit_events_are_emitted_without_secrets() {
    let capture = audit_capture();
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let good = key(&keys, "invoke_functions");
    let server = start(&pki, "s1", Arc::clone(&keys)).await;
    let s = client(&pki, &server, &good).server("s1").unwrap();
    s.call::<i64>("add", (1, 2)).await.unwrap();
    let _ = s.define_constant("c", 1).await.unwrap_err();
    let wrong = format!("{}{}", &good.expose()[..good.expose().len() - 4], "AAAA");
    let err = Client::builder()
        .server(
            "s1",
            netproc_client::ServerEndpoint::new(
                server.local_addr(),
                "localhost",
                pki.client.identity().unwrap(),
                pki.ca.trust_anchors(),
                netproc_wire::SecretString::new(wrong.clone()),
            ),
        )
        .build()
        .unwrap()
        .server("s1")
        .unwrap()
        .call::<i64>("add", (1, 2))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::AuthenticationFailed { .. }));
    server.shutdown(Duration::from_secs(1)).await;

    // This test's lines: other tests write to the same global capture.
    let key_id = good.expose()[4..16].to_owned();
    let all = String::from_utf8(capture.lock().unwrap().clone()).unwrap();
    let log: String = all
        .lines()
        .filter(|l| l.contains(&key_id))
        .map(|l| format!("{l}\n"))
        .collect();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("netproc::audit"))
        .collect();
    assert!(
        audit
            .iter()
            .any(|l| l.contains("event=\"auth\"") && l.contains("outcome=\"ok\"")),
        "{log}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("authentication_failed") && l.contains("wrong secret")),
        "{log}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("insufficient_privileges") && l.contains("define_constant")),
        "{log}"
    );
    let good_secret = good.expose().rsplit('_').next().unwrap();
    let wrong_secret = wrong.rsplit('_').next().unwrap();
    assert!(!all.contains(good_secret), "secret in the log");
    assert!(!all.contains(wrong_secret), "presented secret in the log");
}
