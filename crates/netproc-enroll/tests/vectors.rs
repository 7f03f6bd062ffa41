//! Test vectors of the enrollment protocol (fixtures/wire/enroll.json):
//! each body decodes and re-encodes byte-identically; the SAS vector pins
//! the short authentication string's derivation.
//!
//! Regenerate after a deliberate change:
//! `NETPROC_BLESS=1 cargo test -p netproc-enroll --test vectors`.

use netproc_enroll::wire::{self, RefusalCode, Request, Response};
use netproc_pki::Fingerprint;
use serde::{Deserialize, Serialize};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/wire/enroll.json"
);

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Vector {
    name: String,
    description: String,
    hex: String,
}

fn v(name: &str, description: &str, bytes: Vec<u8>) -> Vector {
    Vector {
        name: name.into(),
        description: description.into(),
        hex: hex::encode(bytes),
    }
}

fn requests() -> Vec<(&'static str, &'static str, Request)> {
    vec![
        (
            "request_token",
            "Token: version 1, token \"npe1_ab\", name \"alice\", profile \"client\", csr 0x3003, no Ed25519 key",
            Request::Token {
                version: 1,
                token: "npe1_ab".into(),
                name: "alice".into(),
                profile: "client".into(),
                csr: vec![0x30, 0x03],
                ed25519: None,
            },
        ),
        (
            "request_token_ed25519",
            "Token as above with an Ed25519 public key of 32 bytes 0x11",
            Request::Token {
                version: 1,
                token: "npe1_ab".into(),
                name: "alice".into(),
                profile: "client".into(),
                csr: vec![0x30, 0x03],
                ed25519: Some([0x11; 32]),
            },
        ),
        (
            "request_renew",
            "Renew: version 1, csr 0x3003",
            Request::Renew {
                version: 1,
                csr: vec![0x30, 0x03],
            },
        ),
        (
            "request_pair",
            "Pair: version 1, name \"bob\", csr 0x3003",
            Request::Pair {
                version: 1,
                name: "bob".into(),
                csr: vec![0x30, 0x03],
            },
        ),
        (
            "request_pair_code",
            "PairCode: version 1, request id 300, code \"01234567\"",
            Request::PairCode {
                version: 1,
                request_id: 300,
                code: "01234567".into(),
            },
        ),
    ]
}

fn responses() -> Vec<(&'static str, &'static str, Response)> {
    vec![
        (
            "response_issued",
            "Issued: chain [0x01, 0x02, 0x03] (leaf, intermediate, root), bundle [0x04], key id \"carol\"",
            Response::Issued {
                chain: vec![vec![1], vec![2], vec![3]],
                bundle: vec![vec![4]],
                key_id: Some("carol".into()),
            },
        ),
        (
            "response_refused",
            "Refused: invalid_token, message \"no\"",
            Response::Refused {
                code: RefusalCode::InvalidToken,
                message: "no".into(),
            },
        ),
        (
            "response_pending",
            "Pending: request id 300, expires in 600 s",
            Response::Pending {
                request_id: 300,
                expires_in_s: 600,
            },
        ),
    ]
}

fn built() -> Vec<Vector> {
    let mut out = Vec::new();
    for (name, d, r) in requests() {
        out.push(v(name, d, postcard::to_stdvec(&r).unwrap()));
    }
    for (name, d, r) in responses() {
        out.push(v(name, d, postcard::to_stdvec(&r).unwrap()));
    }
    let mut frame = Vec::new();
    let body = postcard::to_stdvec(&requests()[2].2).unwrap();
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    out.push(v(
        "frame_request_renew",
        "request_renew as a frame: u32 big-endian length, then the body",
        frame,
    ));
    out.push(Vector {
        name: "pairing_sas".into(),
        description: "The short authentication string of request id 300 and key SHA-256 of the bytes \"key\" (UTF-8 of the string)".into(),
        hex: hex::encode(netproc_enroll::pairing_sas(300, Fingerprint::of(b"key"))),
    });
    out
}

#[test]
fn every_vector_decodes_and_re_encodes() {
    let built = built();
    if std::env::var_os("NETPROC_BLESS").is_some() {
        let json = serde_json::to_string_pretty(&built).unwrap();
        std::fs::write(PATH, json + "\n").unwrap();
    }
    let text = std::fs::read_to_string(PATH).expect("fixtures/wire/enroll.json");
    let file: Vec<Vector> = serde_json::from_str(&text).unwrap();
    assert_eq!(file, built);
    let bytes =
        |name: &str| hex::decode(&file.iter().find(|v| v.name == name).unwrap().hex).unwrap();
    for (name, _, r) in requests() {
        let raw = bytes(name);
        assert_eq!(wire::decode::<Request>(&raw).unwrap(), r, "{name}");
    }
    for (name, _, r) in responses() {
        let raw = bytes(name);
        assert_eq!(wire::decode::<Response>(&raw).unwrap(), r, "{name}");
    }
    // A trailing byte is refused.
    let mut longer = bytes("request_renew");
    longer.push(0);
    assert!(wire::decode::<Request>(&longer).is_err());
}
