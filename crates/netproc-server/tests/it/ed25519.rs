//! Ed25519 keys: a proof bound to the TLS channel, no secret on the wire;
//! wrong keys, other channels' bindings and stale times refused.

use std::sync::Arc;
use std::time::SystemTime;

use netproc_auth::{ApiKeyStore, KeySpec};
use netproc_pki::Ed25519Key;
use netproc_wire::{ClientMessage, Ed25519Proof, ErrorCode, ServerMessage};

use crate::support::*;

fn unix_ms_now() -> u64 {
    netproc_wire::unix_ms(SystemTime::now())
}

/// Sends an Ed25519 proof over `raw` and returns the server's answer.
async fn prove(
    raw: &mut Raw,
    key_id: &str,
    key: &Ed25519Key,
    binding: &[u8; 32],
    timestamp_ms: u64,
) -> ServerMessage {
    let message = Ed25519Proof::signed_message(key_id, binding, timestamp_ms);
    raw.send(&ClientMessage::Auth(netproc_wire::Auth {
        version: netproc_wire::PROTOCOL_VERSION,
        method: netproc_wire::AuthMethod::Ed25519(Ed25519Proof {
            key_id: key_id.to_owned(),
            timestamp_ms,
            signature: key.sign(&message).to_vec(),
        }),
        client_name: None,
    }))
    .await;
    raw.recv()
        .await
        .expect("the server closed without answering")
}

fn refused(answer: &ServerMessage) -> bool {
    matches!(answer, ServerMessage::Error(e)
        if e.code == ErrorCode::AuthenticationFailed && e.message == "authentication failed")
}

#[tokio::test]
async fn an_ed25519_key_authenticates_a_client_without_a_secret_on_the_wire() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = Arc::new(Ed25519Key::generate().unwrap());
    let info = keys
        .register_ed25519(
            KeySpec::new("invoke_functions".parse().unwrap()),
            key.public_key(),
        )
        .unwrap();
    let server = start(&pki, "s1", Arc::clone(&keys)).await;
    let endpoint = netproc_client::ServerEndpoint::with_ed25519(
        server.local_addr(),
        "localhost",
        pki.client.identity().unwrap(),
        pki.ca.trust_anchors(),
        info.id.clone(),
        Arc::clone(&key),
    );
    let s = only(endpoint);
    assert_eq!(s.call::<String>("whoami", ()).await.unwrap(), info.id);
    assert_eq!(s.call::<i64>("add", (20, 22)).await.unwrap(), 42);
    // An Ed25519 key has no secret to rotate.
    assert!(matches!(
        keys.rotate(&info.id),
        Err(netproc_auth::KeyStoreError::NotAnApiKey(_))
    ));
}

#[tokio::test]
async fn ed25519_proofs_with_the_wrong_key_another_connection_s_binding_or_a_stale_time_are_refused()
 {
    let capture = crate::auth::audit_capture();
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = Ed25519Key::generate().unwrap();
    let id = keys
        .register_ed25519(
            KeySpec::new("invoke_functions".parse().unwrap()),
            key.public_key(),
        )
        .unwrap()
        .id;
    // Three refusals stay under the default blocking threshold (20).
    let server = start(&pki, "s1", keys).await;

    // Signed by another key.
    let mut raw = Raw::connect(&pki, &server).await;
    let other = Ed25519Key::generate().unwrap();
    let binding = raw.channel_binding();
    let answer = prove(&mut raw, &id, &other, &binding, unix_ms_now()).await;
    assert!(refused(&answer), "{answer:?}");

    // A valid proof made for another connection.
    let first = Raw::connect(&pki, &server).await;
    let mut second = Raw::connect(&pki, &server).await;
    assert_ne!(first.channel_binding(), second.channel_binding());
    let answer = prove(
        &mut second,
        &id,
        &key,
        &first.channel_binding(),
        unix_ms_now(),
    )
    .await;
    assert!(refused(&answer), "{answer:?}");

    // The right connection, but a timestamp a minute old.
    let mut raw = Raw::connect(&pki, &server).await;
    let binding = raw.channel_binding();
    let answer = prove(&mut raw, &id, &key, &binding, unix_ms_now() - 60_000).await;
    assert!(refused(&answer), "{answer:?}");

    // The same proof, fresh and for its own connection, is accepted.
    let mut raw = Raw::connect(&pki, &server).await;
    let binding = raw.channel_binding();
    let answer = prove(&mut raw, &id, &key, &binding, unix_ms_now()).await;
    assert!(matches!(answer, ServerMessage::AuthOk(_)), "{answer:?}");

    // The audit log names each reason; the peer learned none of them.
    let all = String::from_utf8(capture.lock().unwrap().clone()).unwrap();
    let mine: Vec<&str> = all.lines().filter(|l| l.contains(&id)).collect();
    let bad_signature = mine.iter().filter(|l| l.contains("bad signature")).count();
    assert_eq!(bad_signature, 2, "{mine:#?}");
    assert!(
        mine.iter().any(|l| l.contains("freshness window")),
        "{mine:#?}"
    );
}
