//! The enrollment protocol (`netproc-enroll/1`, `docs/wire-contract.md`
//! §11): one request and one response per connection, each a frame of a
//! `u32` big-endian length and a postcard body.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame either side reads (bytes): a request holds a token,
/// a name, a few SANs and an 8 KiB certificate request at most.
pub const MAX_FRAME: usize = 64 * 1024;

/// The protocol version in every request.
pub const VERSION: u8 = 1;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A certificate for the key of `csr`, with a one-time token.
    Token {
        /// The protocol version ([`VERSION`]).
        version: u8,
        /// The token, as printed by `netproc enroll token create`.
        token: String,
        /// The name the token was made for.
        name: String,
        /// The profile the token was made for (`client` or `server`).
        profile: String,
        /// A PKCS#10 request (DER) for a key made on the client.
        csr: Vec<u8>,
        /// An Ed25519 public key made on the client, to register through
        /// the credential authority with what the token grants.
        ed25519: Option<[u8; 32]>,
    },
    /// A new certificate for the identity of the client certificate this
    /// connection presented (issued by this service, not revoked, not
    /// expired): the same name, profile and SANs, for the key of `csr` —
    /// the current key, or a new one to re-key.
    Renew {
        /// The protocol version ([`VERSION`]).
        version: u8,
        /// A PKCS#10 request (DER).
        csr: Vec<u8>,
    },
    /// Pairing, first step: a client certificate for `name`, for the key
    /// of `csr`, once an operator approves this very request. Answered
    /// [`Response::Pending`]; the operator is notified with a code and the
    /// short authentication string of (request id, key).
    Pair {
        /// The protocol version ([`VERSION`]).
        version: u8,
        /// The name asked for.
        name: String,
        /// A PKCS#10 request (DER) for a key made on the client.
        csr: Vec<u8>,
    },
    /// Pairing, second step: the code the operator gave, for that request.
    PairCode {
        /// The protocol version ([`VERSION`]).
        version: u8,
        /// From [`Response::Pending`].
        request_id: u64,
        /// The code.
        code: String,
    },
}

impl Request {
    /// The protocol version the request says.
    pub fn version(&self) -> u8 {
        match self {
            Request::Token { version, .. }
            | Request::Renew { version, .. }
            | Request::Pair { version, .. }
            | Request::PairCode { version, .. } => *version,
        }
    }
}

/// What the service answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The certificate, the chain up to the root (DER, leaf first, root
    /// last).
    Issued {
        /// Leaf first, then the online intermediate, then the root.
        chain: Vec<Vec<u8>>,
        /// The other roots to trust now (during a CA rotation: the next
        /// one before the switch, the previous one after it).
        bundle: Vec<Vec<u8>>,
        /// The id the Ed25519 key was registered under, if one was.
        key_id: Option<String>,
    },
    /// Refused.
    Refused {
        /// Why, as a stable code.
        code: RefusalCode,
        /// For humans; never a secret or an internal detail.
        message: String,
    },
    /// A pairing waits for its code.
    Pending {
        /// Names this request in [`Request::PairCode`] and, with the key,
        /// in the short authentication string.
        request_id: u64,
        /// Seconds until the pairing expires.
        expires_in_s: u32,
    },
}

/// Why a request was refused: stable codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum RefusalCode {
    /// The request did not decode, or its version is unknown.
    #[error("invalid_request")]
    InvalidRequest,
    /// No such token, or it expired, or it was used: one code for all, so
    /// a guess learns nothing.
    #[error("invalid_token")]
    InvalidToken,
    /// The token was made for another name or profile, or another source
    /// address.
    #[error("not_allowed")]
    NotAllowed,
    /// The certificate request is malformed, oversized, wrongly signed or
    /// of an unsupported key type.
    #[error("bad_csr")]
    BadCsr,
    /// Too many connections or requests from this address.
    #[error("rate_limited")]
    RateLimited,
    /// The service failed; the client may retry.
    #[error("internal")]
    Internal,
    /// Renewal: no client certificate was presented, or it is revoked, or
    /// this service did not issue it — enroll again.
    #[error("not_renewable")]
    NotRenewable,
    /// Pairing: no such pending request — expired, cancelled (another
    /// request for the name was approved), or closed after too many wrong
    /// codes.
    #[error("pairing_closed")]
    PairingClosed,
    /// Pairing: not the code of this request (a few tries are allowed).
    #[error("wrong_code")]
    WrongCode,
}

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The declared length is over [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// The body did not decode (or had bytes after it).
    #[error("undecodable frame")]
    Undecodable,
}

/// Writes one frame holding `message`.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    message: &T,
) -> Result<(), FrameError> {
    let body = postcard::to_stdvec(message).map_err(|_| FrameError::Undecodable)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame and decodes it; the length is checked before anything
/// is allocated.
pub async fn read_frame<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    decode(&body)
}

/// Decodes a frame's body; trailing bytes are an error.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes(body) {
        Ok((value, [])) => Ok(value),
        _ => Err(FrameError::Undecodable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused_before_reading() {
        let request = Request::Token {
            version: VERSION,
            token: "t".into(),
            name: "alice".into(),
            profile: "client".into(),
            csr: vec![1, 2, 3],
            ed25519: Some([9; 32]),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &request).await.unwrap();
        let back: Request = read_frame(&mut buf.as_slice()).await.unwrap();
        assert_eq!(back, request);
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(matches!(
            read_frame::<_, Request>(&mut huge.as_slice()).await,
            Err(FrameError::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
        }
    }
}
