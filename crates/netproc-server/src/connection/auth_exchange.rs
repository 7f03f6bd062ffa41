//! The authentication exchange, sans I/O: what the first frame of a
//! connection asks for, and what the authenticator's answer means. Plain
//! functions fed bytes and `now`, returning decisions; the connection task
//! does the reading, the waiting and the writing.
//!
//! | input | decision |
//! | --- | --- |
//! | no frame within `auth_message_timeout_ms` | refuse `timeout` |
//! | a frame header over `max_pre_auth_frame_bytes`, or a zero-length frame | refuse `frame_too_large` / `protocol_error` |
//! | `Auth` or `AuthWithOptions` of this version | authenticate (the client's frame limit: announced, else 1 MiB) |
//! | `Auth` of another version | refuse `unsupported_version` |
//! | any other message kind, known or not | refuse `not_authenticated` |
//! | a body that does not decode | refuse `protocol_error` |
//! | an Ed25519 proof without a channel binding | refuse `authentication_failed` |
//! | the authenticator's principal, unexpired at `now` | admit |
//! | a refusal, an expired principal, a panic, no answer in time | fail (`authentication_failed`), counted against the key or not |

use std::time::SystemTime;

use netproc_auth::{AuthRejected, Credential, Principal};
use netproc_wire::{
    AuthMethod, ClientMessage, DEFAULT_MAX_POST_AUTH_FRAME_BYTES, DecodeError, ErrorCode,
    FrameError,
};

use crate::audit::{claimed_key_id, sanitize};

/// How the wait for the first frame ended.
#[derive(Debug)]
pub(crate) enum FirstRead<'a> {
    /// A whole frame body.
    Frame(&'a [u8]),
    /// The frame header was refused.
    Refused(FrameError),
    /// Nothing arrived within `auth_message_timeout_ms` (its value).
    TimedOut(u64),
}

/// A credential to check.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) credential: Credential,
    /// The key id the credential claims (sanitized), to attribute failures.
    pub(crate) claimed_key: Option<String>,
    /// The client's name (sanitized), for the audit log.
    pub(crate) client_name: Option<String>,
    /// The largest frame the client accepts.
    pub(crate) client_limit: u32,
}

/// A refusal before the authenticator runs: answer `code` with `message`,
/// close, audit `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
    pub(crate) reason: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            reason: reason.into(),
        }
    }
}

/// What the first frame asks for.
pub(crate) fn first_frame(
    read: FirstRead<'_>,
    channel_binding: Option<[u8; 32]>,
) -> Result<Attempt, Refusal> {
    let body = match read {
        FirstRead::Frame(body) => body,
        FirstRead::Refused(e) => {
            return Err(Refusal::new(e.code(), e.to_string(), e.to_string()));
        }
        FirstRead::TimedOut(ms) => {
            return Err(Refusal::new(
                ErrorCode::Timeout,
                format!("no Auth message within {ms} ms"),
                "no Auth message in time",
            ));
        }
    };
    // What the client can take: announced with AuthWithOptions, else the
    // default every client accepts. The server never sends a larger frame.
    let (auth, client_limit) = match ClientMessage::decode(body) {
        Ok(ClientMessage::Auth(auth)) => (auth, DEFAULT_MAX_POST_AUTH_FRAME_BYTES),
        Ok(ClientMessage::AuthWithOptions(a)) => {
            let limit = a
                .max_inbound_frame_bytes()
                .unwrap_or(DEFAULT_MAX_POST_AUTH_FRAME_BYTES);
            (a.auth, limit)
        }
        Ok(_)
        | Err(
            DecodeError::UnsupportedMessageType { .. }
            | DecodeError::InvalidOperation { .. }
            | DecodeError::InvalidRequest { .. },
        ) => {
            return Err(Refusal::new(
                ErrorCode::NotAuthenticated,
                "the first message must be Auth",
                "first message was not Auth",
            ));
        }
        Err(e) => return Err(Refusal::new(e.code(), e.to_string(), e.to_string())),
    };
    let client_name = auth.client_name.as_deref().map(sanitize);
    let credential = match (auth.method, channel_binding) {
        (AuthMethod::ApiKey(key), _) => Credential::ApiKey(key),
        (AuthMethod::Ed25519(proof), Some(channel_binding)) => Credential::Ed25519 {
            proof,
            channel_binding,
        },
        _ => {
            return Err(Refusal::new(
                ErrorCode::AuthenticationFailed,
                "authentication failed",
                "authentication method not enabled",
            ));
        }
    };
    let claimed_key = match &credential {
        Credential::ApiKey(k) => claimed_key_id(k.expose()),
        Credential::Ed25519 { proof, .. } => Some(sanitize(&proof.key_id)),
        _ => None,
    };
    Ok(Attempt {
        credential,
        claimed_key,
        client_name,
        client_limit,
    })
}

/// How the authenticator answered.
#[derive(Debug)]
pub(crate) enum Answer {
    /// It returned.
    Returned(Result<Principal, AuthRejected>),
    /// It panicked.
    Panicked,
    /// It did not answer before the auth deadline.
    TimedOut,
}

/// A failed authentication: the audit reason, and whether it counts
/// against the claimed key (if that key exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) reason: String,
    pub(crate) against_key: bool,
}

/// What the authenticator's answer means at `now`.
pub(crate) fn judge(answer: Answer, now: SystemTime) -> Result<Principal, Failure> {
    let fail = |reason: &str, against_key| Failure {
        reason: reason.to_owned(),
        against_key,
    };
    match answer {
        Answer::Returned(Ok(p)) if p.expires_at.is_none_or(|t| t > now) => Ok(p),
        Answer::Returned(Ok(_)) => Err(fail("credential expired", true)),
        Answer::Returned(Err(rejected)) => Err(Failure {
            reason: rejected.reason,
            against_key: rejected.counts_against_key,
        }),
        Answer::Panicked => Err(fail("the authenticator panicked", true)),
        Answer::TimedOut => Err(fail("the authenticator did not answer in time", true)),
    }
}

/// Feeds `data` to the exchange as a first frame, with and without a
/// channel binding: never panics (the fuzz target and its seed replay).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn exercise(data: &[u8]) {
    for binding in [None, Some([7u8; 32])] {
        if let Ok(attempt) = first_frame(FirstRead::Frame(data), binding) {
            assert!(attempt.client_limit >= netproc_wire::MIN_ANNOUNCED_FRAME_BYTES);
            if let Some(k) = &attempt.claimed_key {
                assert_eq!(k, &sanitize(k), "claimed key ids are sanitized");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::BytesMut;
    use netproc_wire::{Auth, AuthWithOptions, Ed25519Proof, PROTOCOL_VERSION, SecretString};

    use super::*;

    fn body(msg: &ClientMessage) -> Vec<u8> {
        let mut out = BytesMut::new();
        msg.encode(&mut out, u32::MAX).unwrap();
        out[4..].to_vec()
    }

    fn api_key_auth(key: &str) -> Auth {
        Auth {
            version: PROTOCOL_VERSION,
            method: AuthMethod::ApiKey(SecretString::new(key)),
            client_name: Some("cli\nforged".into()),
        }
    }

    fn refused(read: FirstRead<'_>) -> ErrorCode {
        first_frame(read, None).unwrap_err().code
    }

    #[test]
    fn an_api_key_auth_is_an_attempt_with_the_default_client_limit() {
        let b = body(&ClientMessage::Auth(api_key_auth(
            "npk_abcdefghijkl_secret",
        )));
        let a = first_frame(FirstRead::Frame(&b), None).unwrap();
        assert_eq!(a.claimed_key.as_deref(), Some("abcdefghijkl"));
        assert_eq!(a.client_limit, DEFAULT_MAX_POST_AUTH_FRAME_BYTES);
        assert_eq!(a.client_name.as_deref(), Some("cli\\nforged"));
    }

    #[test]
    fn auth_with_options_carries_the_client_limit_and_ignores_bad_values() {
        let with = |n| {
            body(&ClientMessage::AuthWithOptions(
                AuthWithOptions::new(api_key_auth("k")).with_max_inbound_frame_bytes(n),
            ))
        };
        let b = with(4 << 20);
        assert_eq!(
            first_frame(FirstRead::Frame(&b), None)
                .unwrap()
                .client_limit,
            4 << 20
        );
        let b = with(10); // below the minimum: the default applies
        assert_eq!(
            first_frame(FirstRead::Frame(&b), None)
                .unwrap()
                .client_limit,
            DEFAULT_MAX_POST_AUTH_FRAME_BYTES
        );
    }

    #[test]
    fn each_bad_first_frame_gets_its_code() {
        assert_eq!(refused(FirstRead::TimedOut(5000)), ErrorCode::Timeout);
        let big = FrameError::FrameTooLarge {
            declared: 100_000,
            limit: 65_536,
        };
        assert_eq!(refused(FirstRead::Refused(big)), ErrorCode::FrameTooLarge);
        assert_eq!(
            refused(FirstRead::Refused(FrameError::ZeroLength)),
            ErrorCode::ProtocolError
        );
        let ping = body(&ClientMessage::Ping { nonce: 1 });
        assert_eq!(
            refused(FirstRead::Frame(&ping)),
            ErrorCode::NotAuthenticated
        );
        assert_eq!(
            refused(FirstRead::Frame(&[42])),
            ErrorCode::NotAuthenticated
        );
        assert_eq!(
            refused(FirstRead::Frame(&[0, 7])),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(refused(FirstRead::Frame(&[0xff])), ErrorCode::ProtocolError);
        let mut trailing = body(&ClientMessage::Auth(api_key_auth("k")));
        trailing.push(0);
        assert_eq!(
            refused(FirstRead::Frame(&trailing)),
            ErrorCode::ProtocolError
        );
    }

    #[test]
    fn an_ed25519_proof_needs_the_channel_binding() {
        let b = body(&ClientMessage::Auth(Auth {
            version: PROTOCOL_VERSION,
            method: AuthMethod::Ed25519(Ed25519Proof {
                key_id: "k1".into(),
                timestamp_ms: 1,
                signature: vec![0; 64],
            }),
            client_name: None,
        }));
        let r = first_frame(FirstRead::Frame(&b), None).unwrap_err();
        assert_eq!(r.code, ErrorCode::AuthenticationFailed);
        // The peer learns nothing more than authentication_failed.
        assert_eq!(r.message, "authentication failed");
        let a = first_frame(FirstRead::Frame(&b), Some([1; 32])).unwrap();
        assert_eq!(a.claimed_key.as_deref(), Some("k1"));
    }

    #[test]
    fn the_authenticator_s_answer_is_judged_at_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let p = Principal::new("p", netproc_auth::PrivilegeSet::empty());
        assert!(judge(Answer::Returned(Ok(p.clone())), now).is_ok());
        let expired = p.clone().with_expiry(now);
        assert_eq!(
            judge(Answer::Returned(Ok(expired)), now).unwrap_err(),
            Failure {
                reason: "credential expired".into(),
                against_key: true
            }
        );
        let later = p.with_expiry(now + Duration::from_millis(1));
        assert!(judge(Answer::Returned(Ok(later)), now).is_ok());
        let bound = AuthRejected::new("bound elsewhere").not_against_key();
        assert!(
            !judge(Answer::Returned(Err(bound)), now)
                .unwrap_err()
                .against_key
        );
        assert!(judge(Answer::Panicked, now).unwrap_err().against_key);
        assert!(judge(Answer::TimedOut, now).is_err());
    }

    /// The fuzz target's seed corpus (`fuzz/seeds/auth_exchange`) replays
    /// here, so every `cargo test` runs it.
    #[test]
    fn the_fuzz_seed_corpus_replays() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/seeds/auth_exchange"
        );
        let mut n = 0;
        for entry in std::fs::read_dir(dir).expect("fuzz/seeds/auth_exchange") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            exercise(&data);
            n += 1;
        }
        assert!(n >= 8, "{n} seeds");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_first_frames_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            exercise(&data);
        }
    }
}
