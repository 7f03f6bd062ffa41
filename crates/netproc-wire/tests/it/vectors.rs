//! The published test vectors in `fixtures/wire/vectors.json`: each names a
//! message and its exact bytes. Every vector must decode to its message and
//! re-encode byte-identically, so a client in another language can test
//! itself against the same file.
//!
//! To regenerate after adding a vector: `NETPROC_BLESS=1 cargo test -p netproc-wire --test it vectors`.

use std::collections::BTreeMap;

use bytes::BytesMut;
use netproc_wire::*;
use serde::{Deserialize, Serialize};

/// SHA-256 of `fn add(a, b) { a + b }`.
const ADD_SHA256: [u8; 32] = [
    0xc9, 0x4c, 0xab, 0x0a, 0x99, 0xb5, 0x9b, 0xb8, 0xb6, 0xdb, 0xc3, 0x95, 0x52, 0xe6, 0x51, 0x77,
    0x5b, 0x81, 0x94, 0x03, 0x5e, 0x77, 0x78, 0x40, 0x53, 0x77, 0xda, 0xd2, 0xa4, 0x92, 0x2d, 0x60,
];

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/wire/vectors.json"
);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Vector {
    name: String,
    direction: String,
    description: String,
    /// The whole frame: 4-byte length, then the body.
    hex: String,
}

enum Msg {
    C(ClientMessage),
    S(ServerMessage),
}

fn cases() -> Vec<(&'static str, &'static str, Msg)> {
    use Msg::{C, S};
    let req = |id, op, deadline_ms| {
        C(ClientMessage::Request(Request {
            id,
            op,
            deadline_ms,
        }))
    };
    vec![
        (
            "auth_api_key",
            "Auth, version 1, API key \"npk_k_s\", client name \"cli\"",
            C(ClientMessage::Auth(Auth {
                version: 1,
                method: AuthMethod::ApiKey(SecretString::new("npk_k_s")),
                client_name: Some("cli".into()),
            })),
        ),
        (
            "auth_ed25519",
            "Auth, version 1, Ed25519 proof: key id \"k1\", timestamp 1700000000000 ms, 64-byte signature of 0xaa, no client name",
            C(ClientMessage::Auth(Auth {
                version: 1,
                method: AuthMethod::Ed25519(Ed25519Proof {
                    key_id: "k1".into(),
                    timestamp_ms: 1_700_000_000_000,
                    signature: vec![0xaa; 64],
                }),
                client_name: None,
            })),
        ),
        (
            "request_invoke",
            "Request id 1: invoke \"add\" with args [Int 2, Int 3], deadline 5000 ms",
            req(
                1,
                Operation::Invoke {
                    function: "add".into(),
                    args: vec![Value::Int(2), Value::Int(3)],
                },
                Some(5000),
            ),
        ),
        (
            "request_invoke_all_value_kinds",
            "Request id 300: invoke \"f\" with one arg, a map {b: bytes [1,2], f: 1.5, l: [null, true, -1], s: \"x\"}, no deadline",
            req(
                300,
                Operation::Invoke {
                    function: "f".into(),
                    args: vec![Value::Map(BTreeMap::from([
                        ("b".to_owned(), Value::Bytes(vec![1, 2].into())),
                        ("f".to_owned(), Value::Float(1.5)),
                        (
                            "l".to_owned(),
                            Value::List(vec![Value::Null, Value::Bool(true), Value::Int(-1)]),
                        ),
                        ("s".to_owned(), Value::from("x")),
                    ]))],
                },
                None,
            ),
        ),
        (
            "request_define_function",
            "Request id 2: define function \"add\", source \"fn add(a, b) { a + b }\", its SHA-256, no description, limits {rate: 10 per 1000 ms burst 20, max_concurrency 4}",
            req(
                2,
                Operation::DefineFunction(DefineFunction {
                    name: "add".into(),
                    source: "fn add(a, b) { a + b }".into(),
                    source_sha256: ADD_SHA256,
                    description: None,
                    limits: Some(FunctionLimits {
                        rate: Some(RateLimit {
                            tokens_per_interval: 10,
                            interval_ms: 1000,
                            burst_tokens: 20,
                        }),
                        max_concurrency: Some(4),
                    }),
                }),
                None,
            ),
        ),
        (
            "request_define_constant",
            "Request id 3: define constant \"ratio\" = Float 2.5",
            req(
                3,
                Operation::DefineConstant {
                    name: "ratio".into(),
                    value: Value::Float(2.5),
                },
                None,
            ),
        ),
        (
            "request_define_dependency_host",
            "Request id 4: define dependency alias \"m\" from host module \"math\"",
            req(
                4,
                Operation::DefineDependency {
                    alias: "m".into(),
                    source: DependencySource::Host("math".into()),
                },
                None,
            ),
        ),
        (
            "request_list_functions",
            "Request id 5: list functions",
            req(5, Operation::ListFunctions, None),
        ),
        (
            "request_disconnect_session",
            "Request id 6: admin, disconnect session 42",
            req(6, Operation::DisconnectSession { session_id: 42 }, None),
        ),
        (
            "request_extension",
            "Request id 7: extension \"propagation.event\" with payload bytes [1, 2, 3]",
            req(
                7,
                Operation::Extension {
                    name: "propagation.event".into(),
                    payload: vec![1, 2, 3],
                },
                None,
            ),
        ),
        (
            "cancel",
            "Cancel request 1",
            C(ClientMessage::Cancel { id: 1 }),
        ),
        (
            "ping",
            "Ping with nonce 128 (a two-byte varint)",
            C(ClientMessage::Ping { nonce: 128 }),
        ),
        (
            "auth_ok",
            "AuthOk: version 1, server \"s1\", session 7, privileges [invoke_functions], limits in-flight 128 / pre-auth 65536 / post-auth 1048576, idle timeout 900000 ms",
            S(ServerMessage::AuthOk(AuthOk {
                version: 1,
                server_name: "s1".into(),
                session_id: 7,
                privileges: vec!["invoke_functions".into()],
                limits: AnnouncedLimits {
                    max_in_flight_requests: 128,
                    max_pre_auth_frame_bytes: 65536,
                    max_post_auth_frame_bytes: 1_048_576,
                },
                idle_timeout_ms: 900_000,
            })),
        ),
        (
            "response_ok",
            "Response to request 1: Ok(Int 5)",
            S(ServerMessage::Response(Response {
                id: 1,
                outcome: Outcome::Ok(Value::Int(5)),
            })),
        ),
        (
            "response_rate_limited",
            "Response to request 9: Err(rate_limited, \"slow down\", details {retry_after_ms: 50, scope: \"per_connection\"})",
            S(ServerMessage::Response(Response {
                id: 9,
                outcome: Outcome::Err(
                    ErrorBody::new(ErrorCode::RateLimited, "slow down").with_details(Value::Map(
                        BTreeMap::from([
                            ("retry_after_ms".to_owned(), Value::Int(50)),
                            ("scope".to_owned(), Value::from("per_connection")),
                        ]),
                    )),
                ),
            })),
        ),
        (
            "error_not_authenticated",
            "Connection error: not_authenticated, \"auth first\", no details",
            S(ServerMessage::Error(ErrorBody::new(
                ErrorCode::NotAuthenticated,
                "auth first",
            ))),
        ),
        (
            "pong",
            "Pong with nonce 128",
            S(ServerMessage::Pong { nonce: 128 }),
        ),
        (
            "go_away",
            "GoAway: reason shutting_down, last id 10, message \"bye\"",
            S(ServerMessage::GoAway(GoAway {
                reason: ErrorCode::ShuttingDown,
                last_id: 10,
                message: "bye".into(),
            })),
        ),
        (
            "auth_with_options",
            "AuthWithOptions: Auth version 1, API key \"npk_k_s\", no client name; options {max_inbound_frame_bytes: Int 4194304}",
            C(ClientMessage::AuthWithOptions(
                AuthWithOptions::new(Auth {
                    version: 1,
                    method: AuthMethod::ApiKey(SecretString::new("npk_k_s")),
                    client_name: None,
                })
                .with_max_inbound_frame_bytes(4 << 20),
            )),
        ),
        (
            "request_whoami",
            "Request id 11: whoami (operation tag 21), no deadline",
            C(ClientMessage::Request(Request {
                id: 11,
                op: Operation::WhoAmI,
                deadline_ms: None,
            })),
        ),
    ]
}

fn encode(msg: &Msg) -> Vec<u8> {
    let mut out = BytesMut::new();
    match msg {
        Msg::C(m) => m.encode(&mut out, u32::MAX).unwrap(),
        Msg::S(m) => m.encode(&mut out, u32::MAX).unwrap(),
    }
    out.to_vec()
}

fn built() -> Vec<Vector> {
    cases()
        .into_iter()
        .map(|(name, description, msg)| Vector {
            name: name.into(),
            direction: match msg {
                Msg::C(_) => "client_to_server",
                Msg::S(_) => "server_to_client",
            }
            .into(),
            description: description.into(),
            hex: hex::encode(encode(&msg)),
        })
        .collect()
}

#[test]
fn source_hash_in_the_define_vector_is_right() {
    use sha2::Digest;
    let Msg::C(ClientMessage::Request(Request {
        op: Operation::DefineFunction(def),
        ..
    })) = &cases()[4].2
    else {
        panic!("vector 4 is the define_function one")
    };
    assert_eq!(def.source, "fn add(a, b) { a + b }");
    let digest: [u8; 32] = sha2::Sha256::digest(def.source.as_bytes()).into();
    assert_eq!(def.source_sha256, digest);
}

#[test]
fn every_vector_decodes_and_re_encodes_byte_identically() {
    let built = built();
    if std::env::var_os("NETPROC_BLESS").is_some() {
        let json = serde_json::to_string_pretty(&built).unwrap();
        std::fs::write(PATH, json + "\n").unwrap();
    }
    let text = std::fs::read_to_string(PATH).expect("fixtures/wire/vectors.json");
    let file: Vec<Vector> = serde_json::from_str(&text).unwrap();
    assert_eq!(file.len(), built.len(), "vector count");
    for ((vector, expected), (_, _, msg)) in file.iter().zip(&built).zip(cases()) {
        assert_eq!(vector, expected, "vector {}", vector.name);
        let bytes = hex::decode(&vector.hex).unwrap();
        let declared = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(declared, bytes.len() - 4, "{}: length prefix", vector.name);
        let body = &bytes[4..];
        let again = match &msg {
            Msg::C(m) => {
                let decoded = ClientMessage::decode(body).unwrap();
                assert_eq!(&decoded, m, "{}", vector.name);
                encode(&Msg::C(decoded))
            }
            Msg::S(m) => {
                let decoded = ServerMessage::decode(body).unwrap();
                assert_eq!(&decoded, m, "{}", vector.name);
                encode(&Msg::S(decoded))
            }
        };
        assert_eq!(again, bytes, "{}: re-encoding", vector.name);
    }
}
