//! Negative wire vectors (`fixtures/wire/negative.json`): for every class
//! of malformed input in the contract's §7, the exact frame bytes, the phase
//! it is sent in, the expected code, whether it comes as a top-level `Error`
//! or a `Response`, and whether the connection stays open. Each is fed to a
//! real server over TLS, so implementers in other languages can check
//! themselves against the same file.
//!
//! Regenerate after a deliberate change:
//! `NETPROC_BLESS=1 cargo test -p netproc-server --test it negative`.

use std::sync::Arc;

use netproc_auth::ApiKeyStore;
use netproc_server::ServerOptions;
use netproc_wire::{ClientMessage, ErrorCode, Outcome, Response, ServerMessage};
use serde_json::json;

use crate::support::*;

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/wire/negative.json"
);

struct Case {
    name: &'static str,
    description: &'static str,
    /// `pre_auth`: the first frame of the connection; `post_auth`: after a
    /// successful `Auth`.
    phase: &'static str,
    /// The whole frame, header included (a header alone for oversized ones).
    frame: Vec<u8>,
    code: ErrorCode,
    /// `error` (a top-level `Error`) or `response` (to request id 1).
    answer: &'static str,
    /// Whether the connection stays open afterwards.
    open: bool,
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// `Request{id 1, Invoke{"echo", [arg]}, deadline None}` with `arg`'s bytes.
fn echo(arg: &[u8]) -> Vec<u8> {
    let mut body = vec![1, 1, 0, 4, b'e', b'c', b'h', b'o', 1];
    body.extend_from_slice(arg);
    body.push(0);
    framed(&body)
}

fn cases() -> Vec<Case> {
    use ErrorCode as C;
    let c = |name, description, phase, frame, code, answer, open| Case {
        name,
        description,
        phase,
        frame,
        code,
        answer,
        open,
    };
    let mut deep = Vec::new();
    for _ in 0..65 {
        deep.extend([6, 1]); // List of one element
    }
    deep.push(0); // Null
    vec![
        c(
            "pre_auth_oversized_header",
            "a header declaring 100 000 bytes (limit 65 536 before auth), no body",
            "pre_auth",
            100_000u32.to_be_bytes().to_vec(),
            C::FrameTooLarge,
            "error",
            false,
        ),
        c(
            "pre_auth_zero_length",
            "a frame of length 0",
            "pre_auth",
            vec![0, 0, 0, 0],
            C::ProtocolError,
            "error",
            false,
        ),
        c(
            "pre_auth_bad_envelope",
            "a kind varint that never ends",
            "pre_auth",
            framed(&[0xff]),
            C::ProtocolError,
            "error",
            false,
        ),
        c(
            "pre_auth_unknown_kind",
            "kind 42 as the first message",
            "pre_auth",
            framed(&[42]),
            C::NotAuthenticated,
            "error",
            false,
        ),
        c(
            "pre_auth_not_auth",
            "a Ping as the first message",
            "pre_auth",
            framed(&[3, 1]),
            C::NotAuthenticated,
            "error",
            false,
        ),
        c(
            "pre_auth_other_version",
            "Auth naming version 7",
            "pre_auth",
            framed(&[0, 7]),
            C::UnsupportedVersion,
            "error",
            false,
        ),
        c(
            "pre_auth_invalid_utf8",
            "Auth v1 with an API key string holding 0xff",
            "pre_auth",
            framed(&[0, 1, 0, 1, 0xff, 0]),
            C::ProtocolError,
            "error",
            false,
        ),
        c(
            "pre_auth_trailing_bytes",
            "a valid Auth v1 with an API key \"k\", no client name, then one extra byte",
            "pre_auth",
            framed(&[0, 1, 0, 1, b'k', 0, 0]),
            C::ProtocolError,
            "error",
            false,
        ),
        c(
            "post_auth_oversized_header",
            "a header declaring 1 048 577 bytes (limit 1 048 576 after auth), no body",
            "post_auth",
            1_048_577u32.to_be_bytes().to_vec(),
            C::FrameTooLarge,
            "error",
            false,
        ),
        c(
            "post_auth_zero_length",
            "a frame of length 0",
            "post_auth",
            vec![0, 0, 0, 0],
            C::ProtocolError,
            "error",
            false,
        ),
        c(
            "post_auth_bad_envelope",
            "a kind varint that never ends",
            "post_auth",
            framed(&[0x80]),
            C::ProtocolError,
            "error",
            false,
        ),
        c(
            "unknown_kind",
            "kind 42 after auth",
            "post_auth",
            framed(&[42]),
            C::UnsupportedMessageType,
            "error",
            true,
        ),
        c(
            "second_auth",
            "a second Auth, naming version 2",
            "post_auth",
            framed(&[0, 2]),
            C::AuthenticationFailed,
            "error",
            false,
        ),
        c(
            "unknown_operation_tag",
            "request 1 with operation tag 99",
            "post_auth",
            framed(&[1, 1, 99]),
            C::InvalidOperation,
            "response",
            true,
        ),
        c(
            "bad_payload",
            "request 1, Invoke, whose name length varint never ends",
            "post_auth",
            framed(&[1, 1, 0, 200]),
            C::InvalidRequest,
            "response",
            true,
        ),
        c(
            "request_trailing_bytes",
            "request 1, ListFunctions, deadline None, then one extra byte",
            "post_auth",
            framed(&[1, 1, 7, 0, 0]),
            C::InvalidRequest,
            "response",
            true,
        ),
        c(
            "ping_trailing_bytes",
            "Ping 1 then one extra byte",
            "post_auth",
            framed(&[3, 1, 0]),
            C::ProtocolError,
            "error",
            false,
        ),
        c(
            "non_canonical_envelope",
            "Ping with nonce 1 written 81 00",
            "post_auth",
            framed(&[3, 0x81, 0x00]),
            C::ProtocolError,
            "error",
            false,
        ),
        c(
            "non_canonical_id",
            "request id 1 written 81 00 (ListFunctions)",
            "post_auth",
            framed(&[1, 0x81, 0x00, 7, 0]),
            C::ProtocolError,
            "error",
            false,
        ),
        c(
            "non_canonical_payload",
            "request 1, Invoke \"add\" with its length 3 written 83 00",
            "post_auth",
            framed(&[1, 1, 0, 0x83, 0x00, b'a', b'd', b'd', 0, 0]),
            C::InvalidRequest,
            "response",
            true,
        ),
        c(
            "bad_bool",
            "request 1, UndefineDependency \"a\" with force = 2",
            "post_auth",
            framed(&[1, 1, 6, 1, b'a', 2, 0]),
            C::InvalidRequest,
            "response",
            true,
        ),
        c(
            "bad_option_tag",
            "request 1, ListFunctions, deadline option tag 2",
            "post_auth",
            framed(&[1, 1, 7, 2]),
            C::InvalidRequest,
            "response",
            true,
        ),
        c(
            "invalid_utf8",
            "request 1, Invoke with a function name of one byte 0xff",
            "post_auth",
            framed(&[1, 1, 0, 1, 0xff, 0, 0]),
            C::InvalidRequest,
            "response",
            true,
        ),
        c(
            "value_depth_65",
            "echo of a Value nested 65 lists deep (limit 64)",
            "post_auth",
            echo(&deep),
            C::InvalidRequest,
            "response",
            true,
        ),
        c(
            "value_node_bomb",
            "echo of a List declaring 2^32 - 1 elements, with 3 present",
            "post_auth",
            echo(&[6, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0]),
            C::InvalidRequest,
            "response",
            true,
        ),
        c(
            "map_duplicate_keys",
            "echo of {\"a\": Null, \"a\": Null}",
            "post_auth",
            echo(&[7, 2, 1, b'a', 0, 1, b'a', 0]),
            C::InvalidRequest,
            "response",
            true,
        ),
        c(
            "map_unsorted_keys",
            "echo of {\"b\": Null, \"a\": Null}",
            "post_auth",
            echo(&[7, 2, 1, b'b', 0, 1, b'a', 0]),
            C::InvalidRequest,
            "response",
            true,
        ),
        c(
            "request_id_zero",
            "request id 0 (ListFunctions): ids start at 1",
            "post_auth",
            framed(&[1, 0, 7, 0]),
            C::InvalidRequest,
            "error",
            true,
        ),
    ]
}

fn to_json(cases: &[Case]) -> serde_json::Value {
    serde_json::Value::Array(
        cases
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "description": c.description,
                    "phase": c.phase,
                    "hex": hex::encode(&c.frame),
                    "code": c.code.as_str(),
                    "answer": c.answer,
                    "connection": if c.open { "open" } else { "closed" },
                })
            })
            .collect(),
    )
}

#[test]
fn the_negative_vector_file_is_current() {
    let built = to_json(&cases());
    if std::env::var_os("NETPROC_BLESS").is_some() {
        let text = serde_json::to_string_pretty(&built).unwrap();
        std::fs::write(PATH, text + "\n").unwrap();
    }
    let text = std::fs::read_to_string(PATH).expect("fixtures/wire/negative.json");
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(file, built);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_negative_vector_gets_its_documented_answer_from_a_real_server() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = start_with(&pki, keys, ServerOptions::default()).await;
    for case in cases() {
        let name = case.name;
        let mut raw = Raw::connect(&pki, &server).await;
        if case.phase == "post_auth" {
            raw.auth(&key).await;
        }
        raw.send_bytes(&case.frame).await;
        let body = match raw.recv().await {
            Some(ServerMessage::Error(e)) if case.answer == "error" => e,
            Some(ServerMessage::Response(Response {
                id: 1,
                outcome: Outcome::Err(e),
            })) if case.answer == "response" => e,
            other => panic!(
                "{name}: expected {} {}, got {other:?}",
                case.answer, case.code
            ),
        };
        assert_eq!(body.code, case.code, "{name}: {body:?}");
        if case.open {
            raw.send(&ClientMessage::Ping { nonce: 77 }).await;
            assert_eq!(
                raw.recv().await,
                Some(ServerMessage::Pong { nonce: 77 }),
                "{name}: the session should stay open"
            );
        } else {
            assert_eq!(
                raw.recv().await,
                None,
                "{name}: the connection should close"
            );
        }
    }
}
