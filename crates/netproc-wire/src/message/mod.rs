//! The messages of netproc/1, and their layered decoding: `client` (client
//! to server), `server` (server to client), `codec` (encoding, layered
//! decoding, the canonical-form checks).
//!
//! # Compatibility rule
//!
//! postcard encodes a struct as its fields in order, with no names and no
//! lengths, so **a struct can never gain a field**. Messages evolve only by
//! adding enum variants at the end (a new message kind, a new operation, a new
//! authentication method); existing variants and their fields are frozen.
//! That is why the first version already carries request deadlines,
//! `GoAway { reason, last_id }`, `Auth` as an enum of methods, the limits
//! announced in `AuthOk`, error details as a [`Value`] and the
//! [`Operation::Extension`] escape hatch for higher layers.

mod client;
mod codec;
mod fast;
mod server;
mod whoami;

pub use client::{
    Auth, AuthMethod, AuthWithOptions, ClientMessage, DefineFunction, DependencySource,
    Ed25519Proof, FunctionLimits, MIN_ANNOUNCED_FRAME_BYTES, Operation, RateLimit, Request,
    SecretString,
};
pub use codec::{DecodeError, EncodeError};
pub use server::{AnnouncedLimits, AuthOk, ErrorBody, GoAway, Outcome, Response, ServerMessage};
pub use whoami::WhoAmI;

/// The protocol version this crate speaks, sent in `Auth` and `AuthOk`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The TLS ALPN protocol name of netproc/1. Servers refuse connections that
/// did not negotiate it.
pub const ALPN_PROTOCOL: &[u8] = b"netproc/1";

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::client::{
        CLIENT_KIND_AUTH, CLIENT_KIND_AUTH_WITH_OPTIONS, CLIENT_KIND_CANCEL, CLIENT_KIND_PING,
        CLIENT_KIND_REQUEST, OPERATION_COUNT,
    };
    use super::*;
    use crate::Value;
    use crate::frame::{FRAME_HEADER_LEN, FrameError};

    fn body_of(msg: &ClientMessage) -> Vec<u8> {
        let mut out = BytesMut::new();
        msg.encode(&mut out, u32::MAX).unwrap();
        out[FRAME_HEADER_LEN..].to_vec()
    }

    #[test]
    fn kind_constants_match_the_enum_order() {
        let cases = [
            (
                ClientMessage::Auth(Auth {
                    version: 1,
                    method: AuthMethod::ApiKey(SecretString::new("k")),
                    client_name: None,
                }),
                CLIENT_KIND_AUTH,
            ),
            (
                ClientMessage::Request(Request {
                    id: 1,
                    op: Operation::ListFunctions,
                    deadline_ms: None,
                }),
                CLIENT_KIND_REQUEST,
            ),
            (ClientMessage::Cancel { id: 1 }, CLIENT_KIND_CANCEL),
            (ClientMessage::Ping { nonce: 1 }, CLIENT_KIND_PING),
            (
                ClientMessage::AuthWithOptions(AuthWithOptions::new(Auth {
                    version: 1,
                    method: AuthMethod::ApiKey(SecretString::new("k")),
                    client_name: None,
                })),
                CLIENT_KIND_AUTH_WITH_OPTIONS,
            ),
        ];
        for (msg, kind) in cases {
            assert_eq!(u32::from(body_of(&msg)[0]), kind, "{msg:?}");
        }
    }

    #[test]
    fn operation_count_matches_the_last_tag() {
        let msg = ClientMessage::Request(Request {
            id: 0,
            op: Operation::WhoAmI,
            deadline_ms: None,
        });
        // kind, id, tag
        assert_eq!(u32::from(body_of(&msg)[2]), OPERATION_COUNT - 1);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let auth = AuthMethod::ApiKey(SecretString::new("npk_abc_supersecret"));
        assert!(!format!("{auth:?}").contains("supersecret"));
    }

    #[test]
    fn each_layer_of_bad_input_gets_its_own_error() {
        // Empty body: no kind.
        assert!(matches!(
            ClientMessage::decode(&[]),
            Err(DecodeError::Malformed { .. })
        ));
        // Unknown kind.
        assert_eq!(
            ClientMessage::decode(&[9]),
            Err(DecodeError::UnsupportedMessageType { kind: 9 })
        );
        // Request without an id.
        assert!(matches!(
            ClientMessage::decode(&[1]),
            Err(DecodeError::Malformed { .. })
        ));
        // Request 5, no tag.
        assert!(matches!(
            ClientMessage::decode(&[1, 5]),
            Err(DecodeError::InvalidRequest { id: 5, .. })
        ));
        // Request 5, a tag past the last this version knows.
        let unknown = OPERATION_COUNT as u8;
        assert_eq!(
            ClientMessage::decode(&[1, 5, unknown, 0]),
            Err(DecodeError::InvalidOperation {
                id: 5,
                tag: OPERATION_COUNT
            })
        );
        // Request 5, Invoke with a truncated payload.
        assert!(matches!(
            ClientMessage::decode(&[1, 5, 0, 3, b'a']),
            Err(DecodeError::InvalidRequest { id: 5, .. })
        ));
        // Request 5, ListFunctions, no deadline, then a trailing byte.
        let err = ClientMessage::decode(&[1, 5, 7, 0, 0]).unwrap_err();
        assert!(
            matches!(&err, DecodeError::InvalidRequest { id: 5, reason } if reason.contains("trailing"))
        );
        // Ping with a trailing byte.
        assert!(matches!(
            ClientMessage::decode(&[3, 1, 0]),
            Err(DecodeError::Malformed { .. })
        ));
        // Auth for version 2.
        assert_eq!(
            ClientMessage::decode(&[0, 2]),
            Err(DecodeError::UnsupportedVersion { version: 2 })
        );
    }

    #[test]
    fn value_errors_keep_their_reason_inside_requests() {
        // Request 1, Invoke "f" with one argument nested 100 deep.
        let mut body = vec![1, 1, 0, 1, b'f', 1];
        body.extend(std::iter::repeat_n([6u8, 1], 100).flatten());
        body.extend([0, 0]);
        let err = ClientMessage::decode(&body).unwrap_err();
        assert!(
            matches!(&err, DecodeError::InvalidRequest { id: 1, reason } if reason.contains("nested too deeply")),
            "{err:?}"
        );
    }

    #[test]
    fn encode_over_limit_leaves_the_buffer_untouched() {
        let mut out = BytesMut::from(&b"xy"[..]);
        let msg = ServerMessage::Response(Response {
            id: 1,
            outcome: Outcome::Ok(Value::Bytes(vec![0; 100].into())),
        });
        assert!(matches!(
            msg.encode(&mut out, 50),
            Err(EncodeError::Frame(FrameError::FrameTooLarge { .. }))
        ));
        assert_eq!(out.as_ref(), b"xy");
    }
}
