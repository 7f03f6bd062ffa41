//! Property tests: round trips, and a decoder that never panics however the
//! bytes arrive.

use std::collections::BTreeMap;

use bytes::BytesMut;
use netproc_wire::*;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

pub(crate) fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_map(Value::Float),
        ".{0,12}".prop_map(Value::String),
        vec(any::<u8>(), 0..16).prop_map(|b| Value::Bytes(b.into())),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::List),
            btree_map(".{0,6}", inner, 0..6).prop_map(Value::Map),
        ]
    })
}

fn arb_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        proptest::sample::select(ErrorCode::ALL.to_vec()),
        "[a-z_]{1,20}".prop_map(|s| ErrorCode::from(s.as_str())),
    ]
}

fn arb_error() -> impl Strategy<Value = ErrorBody> {
    (arb_code(), ".{0,20}", arb_value()).prop_map(|(code, message, details)| ErrorBody {
        code,
        message,
        details,
    })
}

fn arb_operation() -> impl Strategy<Value = Operation> {
    let name = || "[a-z_]{0,10}";
    prop_oneof![
        (name(), vec(arb_value(), 0..4))
            .prop_map(|(function, args)| Operation::Invoke { function, args }),
        (
            name(),
            ".{0,30}",
            any::<[u8; 32]>(),
            proptest::option::of(".{0,10}"),
            proptest::option::of((
                proptest::option::of((any::<u32>(), any::<u32>(), any::<u32>())),
                proptest::option::of(any::<u32>())
            ))
        )
            .prop_map(|(name, source, source_sha256, description, limits)| {
                Operation::DefineFunction(DefineFunction {
                    name,
                    source,
                    source_sha256,
                    description,
                    limits: limits.map(|(rate, max_concurrency)| FunctionLimits {
                        rate: rate.map(|(t, i, b)| RateLimit {
                            tokens_per_interval: t,
                            interval_ms: i,
                            burst_tokens: b,
                        }),
                        max_concurrency,
                    }),
                })
            }),
        name().prop_map(|name| Operation::UndefineFunction { name }),
        (name(), arb_value()).prop_map(|(name, value)| Operation::DefineConstant { name, value }),
        name().prop_map(|name| Operation::UndefineConstant { name }),
        (name(), any::<bool>(), ".{0,20}").prop_map(|(alias, host, s)| {
            Operation::DefineDependency {
                alias,
                source: if host {
                    DependencySource::Host(s)
                } else {
                    DependencySource::Script(s)
                },
            }
        }),
        (name(), any::<bool>())
            .prop_map(|(alias, force)| Operation::UndefineDependency { alias, force }),
        Just(Operation::ListFunctions),
        Just(Operation::ListConstants),
        Just(Operation::ListDependencies),
        Just(Operation::ServerInfo),
        Just(Operation::AbuseMetrics),
        Just(Operation::ListSessions),
        any::<u64>().prop_map(|session_id| Operation::DisconnectSession { session_id }),
        name().prop_map(|principal| Operation::DisconnectPrincipal { principal }),
        Just(Operation::ListBlocked),
        name().prop_map(|entry| Operation::Unblock { entry }),
        Just(Operation::GetLimits),
        arb_value().prop_map(|limits| Operation::SetLimits { limits }),
        (name(), vec(any::<u8>(), 0..32))
            .prop_map(|(name, payload)| Operation::Extension { name, payload }),
        Just(Operation::Reload),
        Just(Operation::WhoAmI),
    ]
}

pub(crate) fn arb_client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        (".{0,40}", proptest::option::of(".{0,10}")).prop_map(|(key, client_name)| {
            ClientMessage::Auth(Auth {
                version: PROTOCOL_VERSION,
                method: AuthMethod::ApiKey(SecretString::new(key)),
                client_name,
            })
        }),
        (".{0,12}", any::<u64>(), vec(any::<u8>(), 64)).prop_map(
            |(key_id, timestamp_ms, signature)| {
                ClientMessage::Auth(Auth {
                    version: PROTOCOL_VERSION,
                    method: AuthMethod::Ed25519(Ed25519Proof {
                        key_id,
                        timestamp_ms,
                        signature,
                    }),
                    client_name: None,
                })
            }
        ),
        (
            any::<u64>(),
            arb_operation(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(id, op, deadline_ms)| ClientMessage::Request(Request {
                id,
                op,
                deadline_ms
            })),
        any::<u64>().prop_map(|id| ClientMessage::Cancel { id }),
        any::<u64>().prop_map(|nonce| ClientMessage::Ping { nonce }),
        (".{0,40}", arb_value()).prop_map(|(key, options)| {
            let mut msg = AuthWithOptions::new(Auth {
                version: PROTOCOL_VERSION,
                method: AuthMethod::ApiKey(SecretString::new(key)),
                client_name: None,
            });
            msg.options = options;
            ClientMessage::AuthWithOptions(msg)
        }),
    ]
}

pub(crate) fn arb_server_message() -> impl Strategy<Value = ServerMessage> {
    prop_oneof![
        (
            ".{0,10}",
            any::<u64>(),
            vec("[a-z_]{1,20}", 0..4),
            any::<(u32, u32, u32)>(),
            any::<u64>()
        )
            .prop_map(|(server_name, session_id, privileges, l, idle)| {
                ServerMessage::AuthOk(AuthOk {
                    version: PROTOCOL_VERSION,
                    server_name,
                    session_id,
                    privileges,
                    limits: AnnouncedLimits {
                        max_in_flight_requests: l.0,
                        max_pre_auth_frame_bytes: l.1,
                        max_post_auth_frame_bytes: l.2,
                    },
                    idle_timeout_ms: idle,
                })
            }),
        (any::<u64>(), arb_value()).prop_map(|(id, v)| ServerMessage::Response(Response {
            id,
            outcome: Outcome::Ok(v)
        })),
        (any::<u64>(), arb_error()).prop_map(|(id, e)| ServerMessage::Response(Response {
            id,
            outcome: Outcome::Err(e)
        })),
        arb_error().prop_map(ServerMessage::Error),
        any::<u64>().prop_map(|nonce| ServerMessage::Pong { nonce }),
        (arb_code(), any::<u64>(), ".{0,20}").prop_map(|(reason, last_id, message)| {
            ServerMessage::GoAway(GoAway {
                reason,
                last_id,
                message,
            })
        }),
    ]
}

fn frame_body(wire: &[u8]) -> &[u8] {
    &wire[FRAME_HEADER_LEN..]
}

/// Splits `stream` at the given fractions and returns what a decoder yields.
fn decode_chunked(
    stream: &[u8],
    cuts: &[prop::sample::Index],
    limit: u32,
) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
    points.push(0);
    points.push(stream.len());
    points.sort_unstable();
    let mut decoder = FrameDecoder::new(limit);
    let mut frames = Vec::new();
    for w in points.windows(2) {
        decoder.feed(&stream[w[0]..w[1]]);
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => frames.push(f.to_vec()),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn value_round_trips_byte_exactly(v in arb_value()) {
        let bytes = v.encode();
        let back = Value::decode(&bytes, ValueLimits::default()).unwrap();
        prop_assert_eq!(back.encode(), bytes);
    }

    #[test]
    fn value_through_serde_round_trips(v in arb_value()) {
        // to_value(from_value(v)) through a type that keeps the shape.
        let back: Value = postcard::from_bytes(&postcard::to_stdvec(&v).unwrap()).unwrap();
        prop_assert_eq!(back.encode(), v.encode());
    }

    #[test]
    fn to_value_and_from_value_are_identities_on_values(v in arb_value()) {
        prop_assert_eq!(to_value(&v).unwrap().encode(), v.encode());
        prop_assert_eq!(from_value::<Value>(v.clone()).unwrap().encode(), v.encode());
    }

    #[test]
    fn client_messages_round_trip(msg in arb_client_message()) {
        let mut wire = BytesMut::new();
        msg.encode(&mut wire, u32::MAX).unwrap();
        let back = ClientMessage::decode(frame_body(&wire)).unwrap();
        let mut again = BytesMut::new();
        back.encode(&mut again, u32::MAX).unwrap();
        prop_assert_eq!(wire, again);
    }

    #[test]
    fn server_messages_round_trip(msg in arb_server_message()) {
        let mut wire = BytesMut::new();
        msg.encode(&mut wire, u32::MAX).unwrap();
        let back = ServerMessage::decode(frame_body(&wire)).unwrap();
        let mut again = BytesMut::new();
        back.encode(&mut again, u32::MAX).unwrap();
        prop_assert_eq!(wire, again);
    }

    /// Sharing the frame's buffer changes nothing but where bytes live:
    /// the same message or the same error as a copying decode.
    #[test]
    fn a_shared_decode_is_the_same_as_a_copying_one(
        client in arb_client_message(),
        server in arb_server_message(),
        garbage in vec(any::<u8>(), 0..64),
    ) {
        let mut wire = BytesMut::new();
        client.encode(&mut wire, u32::MAX).unwrap();
        let body = bytes::Bytes::copy_from_slice(frame_body(&wire));
        prop_assert_eq!(ClientMessage::decode_shared(&body), ClientMessage::decode(&body));
        let mut wire = BytesMut::new();
        server.encode(&mut wire, u32::MAX).unwrap();
        let body = bytes::Bytes::copy_from_slice(frame_body(&wire));
        prop_assert_eq!(ServerMessage::decode_shared(&body), ServerMessage::decode(&body));
        let garbage = bytes::Bytes::from(garbage);
        prop_assert_eq!(ClientMessage::decode_shared(&garbage), ClientMessage::decode(&garbage));
        prop_assert_eq!(ServerMessage::decode_shared(&garbage), ServerMessage::decode(&garbage));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(body in vec(any::<u8>(), 0..256)) {
        let _ = ClientMessage::decode(&body);
        let _ = ServerMessage::decode(&body);
        let _ = Value::decode(&body, ValueLimits::default());
    }

    /// Every value has exactly one encoding: whatever decodes (arbitrary
    /// bytes included) re-encodes to exactly the bytes it came from.
    #[test]
    fn what_decodes_re_encodes_to_the_same_bytes(body in vec(any::<u8>(), 0..256)) {
        if let Ok(msg) = ClientMessage::decode(&body) {
            let mut wire = BytesMut::new();
            msg.encode(&mut wire, u32::MAX).unwrap();
            prop_assert_eq!(frame_body(&wire), &body[..]);
        }
        if let Ok(msg) = ServerMessage::decode(&body) {
            let mut wire = BytesMut::new();
            msg.encode(&mut wire, u32::MAX).unwrap();
            prop_assert_eq!(frame_body(&wire), &body[..]);
        }
    }

    /// Lengthening any varint of a valid message (an extra 0x80 continuation
    /// before its last byte) is refused.
    #[test]
    fn an_overlong_varint_anywhere_is_refused(msg in arb_client_message(), at in any::<prop::sample::Index>()) {
        let mut wire = BytesMut::new();
        msg.encode(&mut wire, u32::MAX).unwrap();
        let body = frame_body(&wire).to_vec();
        // Pick a byte; if it ends a varint (< 0x80), make it 0x80|b, 0x00.
        let i = at.index(body.len());
        if body[i] < 0x80 && body[i] != 0 {
            let mut longer = body[..i].to_vec();
            longer.push(0x80 | body[i]);
            longer.push(0);
            longer.extend_from_slice(&body[i + 1..]);
            prop_assert!(ClientMessage::decode(&longer).map(|m| m != msg).unwrap_or(true));
        }
    }

    #[test]
    fn truncating_a_message_is_an_error_not_a_panic(msg in arb_client_message(), cut in any::<prop::sample::Index>()) {
        let mut wire = BytesMut::new();
        msg.encode(&mut wire, u32::MAX).unwrap();
        let body = frame_body(&wire);
        let cut = cut.index(body.len());
        prop_assert!(ClientMessage::decode(&body[..cut]).is_err());
    }

    #[test]
    fn trailing_bytes_are_always_refused(msg in arb_client_message(), extra in vec(any::<u8>(), 1..4)) {
        let mut wire = BytesMut::new();
        msg.encode(&mut wire, u32::MAX).unwrap();
        let mut body = frame_body(&wire).to_vec();
        body.extend(extra);
        prop_assert!(ClientMessage::decode(&body).is_err());
    }

    #[test]
    fn chunking_does_not_change_the_frames(
        bodies in vec(vec(any::<u8>(), 1..64), 0..8),
        cuts in vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut stream = BytesMut::new();
        for b in &bodies {
            encode_frame(b, &mut stream, 64).unwrap();
        }
        let (frames, err) = decode_chunked(&stream, &cuts, 64);
        prop_assert_eq!(err, None);
        prop_assert_eq!(frames, bodies);
    }

    #[test]
    fn decoder_never_panics_and_is_chunking_independent(
        stream in vec(any::<u8>(), 0..512),
        cuts in vec(any::<prop::sample::Index>(), 0..12),
        limit in 1u32..128,
    ) {
        let whole = decode_chunked(&stream, &[], limit);
        let pieces = decode_chunked(&stream, &cuts, limit);
        prop_assert_eq!(whole, pieces);
    }
}

#[test]
fn a_map_built_in_any_order_has_one_encoding() {
    let a: BTreeMap<String, Value> =
        [("b".into(), Value::Int(1)), ("a".into(), Value::Int(2))].into();
    let b: BTreeMap<String, Value> =
        [("a".into(), Value::Int(2)), ("b".into(), Value::Int(1))].into();
    assert_eq!(Value::Map(a).encode(), Value::Map(b).encode());
}

#[test]
fn overlong_varints_are_refused_at_their_layer() {
    // Ping with nonce 1 as 81 00: the envelope, protocol_error.
    let e = ClientMessage::decode(&[3, 0x81, 0x00]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::ProtocolError);
    assert!(e.to_string().contains("non-canonical"), "{e}");
    // The kind itself overlong.
    let e = ClientMessage::decode(&[0x83, 0x00, 1]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::ProtocolError);
    // A request id overlong: the envelope too.
    assert!(ClientMessage::decode(&[1, 5, 7, 0]).is_ok());
    let e = ClientMessage::decode(&[1, 0x85, 0x00, 7, 0]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::ProtocolError);
    // invoke(5, "f", []) with the name's length as 81 00: the request's.
    assert!(ClientMessage::decode(&[1, 5, 0, 1, b'f', 0, 0]).is_ok());
    let e = ClientMessage::decode(&[1, 5, 0, 0x81, 0x00, b'f', 0, 0]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidRequest);
    assert_eq!(e.request_id(), Some(5));
    assert!(e.to_string().contains("non-canonical"), "{e}");
    // A 10-byte length: never a value that fits.
    let mut ten = vec![1, 5, 0];
    ten.extend([0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00]);
    ten.extend([b'f', 0, 0]);
    assert!(ClientMessage::decode(&ten).is_err());
    // The server side too.
    assert!(ServerMessage::decode(&[3, 1]).is_ok());
    assert_eq!(
        ServerMessage::decode(&[3, 0x81, 0x00]).unwrap_err().code(),
        ErrorCode::ProtocolError
    );
}

#[test]
fn decode_errors_use_the_contract_s_words_only() {
    for body in [
        &[
            1u8, 5, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ][..],
        &[1, 5, 0, 10, b'f'],
        &[1, 5, 0, 1, 0xff, 0, 0],
        &[3],
    ] {
        let e = ClientMessage::decode(body).unwrap_err();
        let text = e.to_string();
        for internal in ["usize", "platform", "Hit the end", "Tried to", "postcard"] {
            assert!(!text.contains(internal), "{text}");
        }
    }
}
