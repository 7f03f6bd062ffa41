//! Encoding messages into frames, and their layered decoding: the envelope
//! first, then a request's id and operation, then its payload, each with its
//! own answer; and the canonical-form checks.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::ErrorCode;
use crate::frame::{FRAME_HEADER_LEN, FrameError, check_body_len};
use crate::value::take_value_error;

use super::PROTOCOL_VERSION;
use super::client::{
    CLIENT_KIND_AUTH, CLIENT_KIND_AUTH_WITH_OPTIONS, CLIENT_KIND_CANCEL, CLIENT_KIND_PING,
    CLIENT_KIND_REQUEST, ClientMessage, OPERATION_COUNT, Operation, Request,
};
use super::server::{
    SERVER_KIND_AUTH_OK, SERVER_KIND_ERROR, SERVER_KIND_GO_AWAY, SERVER_KIND_PONG,
    SERVER_KIND_RESPONSE, ServerMessage,
};

/// A message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded body is larger than the frame limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Serialization failed (not expected for netproc's own types).
    #[error("serialization failed: {0}")]
    Serialize(String),
}

/// A postcard flavor that appends to a `BytesMut`.
struct BytesMutFlavor<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for BytesMutFlavor<'_> {
    type Output = ();
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.put_u8(data);
        Ok(())
    }
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }
    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends `msg` as one frame to `dst`. On error `dst` is left as it was.
fn encode_frame_of<T: Serialize>(
    msg: &T,
    dst: &mut BytesMut,
    limit: u32,
) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.put_u32(0);
    if let Err(e) = postcard::serialize_with_flavor(msg, BytesMutFlavor(dst)) {
        dst.truncate(start);
        return Err(EncodeError::Serialize(e.to_string()));
    }
    let body_len = dst.len() - start - FRAME_HEADER_LEN;
    if let Err(e) = check_body_len(body_len, limit) {
        dst.truncate(start);
        return Err(e.into());
    }
    // check_body_len guarantees it fits in a u32.
    dst[start..start + FRAME_HEADER_LEN].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(())
}

impl ClientMessage {
    /// Appends this message as one frame (header and body) to `dst`.
    ///
    /// Fails, leaving `dst` unchanged, if the body would exceed `limit`.
    pub fn encode(&self, dst: &mut BytesMut, limit: u32) -> Result<(), EncodeError> {
        encode_frame_of(self, dst, limit)
    }

    /// Decodes one frame body.
    ///
    /// The error variant tells the server how to answer: see [`DecodeError`].
    ///
    /// ```
    /// use bytes::BytesMut;
    /// use netproc_wire::{ClientMessage, DecodeError, ErrorCode, FrameDecoder};
    ///
    /// let mut out = BytesMut::new();
    /// ClientMessage::Ping { nonce: 7 }.encode(&mut out, 1024).unwrap();
    /// let mut decoder = FrameDecoder::new(1024);
    /// decoder.feed(&out);
    /// let body = decoder.next_frame().unwrap().unwrap();
    /// assert_eq!(ClientMessage::decode(&body).unwrap(), ClientMessage::Ping { nonce: 7 });
    ///
    /// // Request 9 with operation tag 200: answered `invalid_operation`, session stays open.
    /// let err = ClientMessage::decode(&[1, 9, 200, 1]).unwrap_err();
    /// assert_eq!(err, DecodeError::InvalidOperation { id: 9, tag: 200 });
    /// assert_eq!(err.code(), ErrorCode::InvalidOperation);
    /// ```
    pub fn decode(body: &[u8]) -> Result<ClientMessage, DecodeError> {
        Self::decode_checked(body)
    }

    /// [`decode`](Self::decode), with binary values ([`Value::Bytes`](crate::Value::Bytes))
    /// sharing `body`'s buffer instead of being copied: what a server uses
    /// on the frames of [`FrameDecoder::next_frame`](crate::FrameDecoder::next_frame).
    ///
    /// ```
    /// use bytes::{Bytes, BytesMut};
    /// use netproc_wire::{ClientMessage, Operation, Request, Value};
    ///
    /// let req = ClientMessage::Request(Request {
    ///     id: 1,
    ///     op: Operation::Invoke { function: "put".into(), args: vec![Value::Bytes(vec![7; 4096].into())] },
    ///     deadline_ms: None,
    /// });
    /// let mut out = BytesMut::new();
    /// req.encode(&mut out, 1 << 20).unwrap();
    /// let body: Bytes = out.freeze().slice(4..);
    /// let ClientMessage::Request(r) = ClientMessage::decode_shared(&body).unwrap() else { unreachable!() };
    /// let Operation::Invoke { args, .. } = r.op else { unreachable!() };
    /// let Value::Bytes(b) = &args[0] else { unreachable!() };
    /// // The argument points into the frame: no copy was made.
    /// assert!(body.as_ptr_range().contains(&b.as_ptr()));
    /// ```
    pub fn decode_shared(body: &Bytes) -> Result<ClientMessage, DecodeError> {
        crate::value::with_source(body, || Self::decode_checked(body))
    }

    fn decode_checked(body: &[u8]) -> Result<ClientMessage, DecodeError> {
        // A call with scalar arguments: decoded by hand, canonical by
        // construction; everything else (and any doubt) below.
        match super::fast::request(body) {
            Some(msg) => Ok(msg),
            None => Self::decode_general(body),
        }
    }

    /// Decodes any client message through serde, then checks that it is
    /// the one canonical encoding.
    pub(super) fn decode_general(body: &[u8]) -> Result<ClientMessage, DecodeError> {
        let msg = Self::decode_loose(body)?;
        // Every value has exactly one encoding (wire contract §3).
        if canonical_len(&msg) != body.len() {
            return Err(match &msg {
                ClientMessage::Request(r) if is_canonical_request_head(body, r.id) => {
                    DecodeError::InvalidRequest {
                        id: r.id,
                        reason: NON_CANONICAL.to_owned(),
                    }
                }
                _ => DecodeError::malformed(NON_CANONICAL.to_owned()),
            });
        }
        Ok(msg)
    }

    /// Decodes without the canonical-encoding check.
    fn decode_loose(body: &[u8]) -> Result<ClientMessage, DecodeError> {
        let (kind, rest) = take::<u32>(body).map_err(DecodeError::malformed)?;
        match kind {
            CLIENT_KIND_AUTH => {
                // The version comes first, so a peer speaking another version
                // is told so even if the rest of its Auth is laid out differently.
                let (version, _) = take::<u32>(rest).map_err(DecodeError::malformed)?;
                if version != PROTOCOL_VERSION {
                    return Err(DecodeError::UnsupportedVersion { version });
                }
                take_all(rest)
                    .map(ClientMessage::Auth)
                    .map_err(DecodeError::malformed)
            }
            CLIENT_KIND_AUTH_WITH_OPTIONS => {
                // Its Auth comes first, version first: checked as for Auth.
                let (version, _) = take::<u32>(rest).map_err(DecodeError::malformed)?;
                if version != PROTOCOL_VERSION {
                    return Err(DecodeError::UnsupportedVersion { version });
                }
                take_all(rest)
                    .map(ClientMessage::AuthWithOptions)
                    .map_err(DecodeError::malformed)
            }
            CLIENT_KIND_REQUEST => decode_request(rest).map(ClientMessage::Request),
            CLIENT_KIND_CANCEL => take_all(rest)
                .map(|id| ClientMessage::Cancel { id })
                .map_err(DecodeError::malformed),
            CLIENT_KIND_PING => take_all(rest)
                .map(|nonce| ClientMessage::Ping { nonce })
                .map_err(DecodeError::malformed),
            kind => Err(DecodeError::UnsupportedMessageType { kind }),
        }
    }
}

/// Whether a request's kind and id (its envelope) are canonical, so that a
/// non-canonical payload is the request's fault (`invalid_request` with the
/// id) rather than the envelope's (`protocol_error`).
fn is_canonical_request_head(body: &[u8], id: u64) -> bool {
    let head = varint_len(u64::from(CLIENT_KIND_REQUEST)) + varint_len(id);
    let Some(bytes) = body.get(..head) else {
        return false;
    };
    matches!(
        take::<u32>(bytes).and_then(|(_, rest)| take::<u64>(rest)),
        Ok((got, rest)) if got == id && rest.is_empty()
    )
}

fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    let (id, rest) = take::<u64>(bytes).map_err(DecodeError::malformed)?;
    let invalid = |reason: String| DecodeError::InvalidRequest { id, reason };
    let (tag, _) = take::<u32>(rest).map_err(invalid)?;
    if tag >= OPERATION_COUNT {
        return Err(DecodeError::InvalidOperation { id, tag });
    }
    let (op, rest) = take::<Operation>(rest).map_err(invalid)?;
    let (deadline_ms, rest) = take::<Option<u32>>(rest).map_err(invalid)?;
    if !rest.is_empty() {
        return Err(invalid(trailing(rest)));
    }
    Ok(Request {
        id,
        op,
        deadline_ms,
    })
}

impl ServerMessage {
    /// Appends this message as one frame (header and body) to `dst`.
    ///
    /// Fails, leaving `dst` unchanged, if the body would exceed `limit`.
    pub fn encode(&self, dst: &mut BytesMut, limit: u32) -> Result<(), EncodeError> {
        encode_frame_of(self, dst, limit)
    }

    /// Decodes one frame body. A client treats any error except
    /// [`DecodeError::UnsupportedMessageType`] as fatal for the connection.
    pub fn decode(body: &[u8]) -> Result<ServerMessage, DecodeError> {
        Self::decode_checked(body)
    }

    /// [`decode`](Self::decode), with binary values sharing `body`'s buffer
    /// instead of being copied (see [`ClientMessage::decode_shared`]).
    pub fn decode_shared(body: &Bytes) -> Result<ServerMessage, DecodeError> {
        crate::value::with_source(body, || Self::decode_checked(body))
    }

    fn decode_checked(body: &[u8]) -> Result<ServerMessage, DecodeError> {
        match super::fast::response(body) {
            Some(msg) => Ok(msg),
            None => Self::decode_general(body),
        }
    }

    /// Decodes any server message through serde, then checks that it is
    /// the one canonical encoding.
    pub(super) fn decode_general(body: &[u8]) -> Result<ServerMessage, DecodeError> {
        let (kind, rest) = take::<u32>(body).map_err(DecodeError::malformed)?;
        let msg = match kind {
            SERVER_KIND_AUTH_OK => take_all(rest).map(ServerMessage::AuthOk),
            SERVER_KIND_RESPONSE => take_all(rest).map(ServerMessage::Response),
            SERVER_KIND_ERROR => take_all(rest).map(ServerMessage::Error),
            SERVER_KIND_PONG => take_all(rest).map(|nonce| ServerMessage::Pong { nonce }),
            SERVER_KIND_GO_AWAY => take_all(rest).map(ServerMessage::GoAway),
            kind => return Err(DecodeError::UnsupportedMessageType { kind }),
        };
        let msg = msg.map_err(DecodeError::malformed)?;
        if canonical_len(&msg) != body.len() {
            return Err(DecodeError::malformed(NON_CANONICAL.to_owned()));
        }
        Ok(msg)
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Why a frame body did not decode, and so how to answer it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The envelope (message kind, or a non-request payload) does not decode:
    /// answer `protocol_error` and close.
    #[error("malformed message: {reason}")]
    Malformed {
        /// What was wrong, safe to send to the peer.
        reason: String,
    },
    /// A message kind this version does not know: answer
    /// `unsupported_message_type`; the session stays open.
    #[error("unsupported message type {kind}")]
    UnsupportedMessageType {
        /// The kind received.
        kind: u32,
    },
    /// `Auth` for another protocol version: answer `unsupported_version` and close.
    #[error("unsupported protocol version {version}")]
    UnsupportedVersion {
        /// The version the peer asked for.
        version: u32,
    },
    /// A request with an unknown operation tag: answer `invalid_operation`
    /// with the id.
    #[error("request {id}: unknown operation tag {tag}")]
    InvalidOperation {
        /// The request's id.
        id: u64,
        /// The unknown tag.
        tag: u32,
    },
    /// A request whose operation payload does not decode: answer
    /// `invalid_request` with the id.
    #[error("request {id}: {reason}")]
    InvalidRequest {
        /// The request's id.
        id: u64,
        /// What was wrong, safe to send to the peer.
        reason: String,
    },
}

impl DecodeError {
    fn malformed(reason: String) -> Self {
        DecodeError::Malformed { reason }
    }

    /// The wire error code to answer with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Malformed { .. } => ErrorCode::ProtocolError,
            DecodeError::UnsupportedMessageType { .. } => ErrorCode::UnsupportedMessageType,
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::InvalidOperation { .. } => ErrorCode::InvalidOperation,
            DecodeError::InvalidRequest { .. } => ErrorCode::InvalidRequest,
        }
    }

    /// The request id, when the error belongs to one request.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            DecodeError::InvalidOperation { id, .. } | DecodeError::InvalidRequest { id, .. } => {
                Some(*id)
            }
            _ => None,
        }
    }

    /// Whether the connection must close after answering.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            DecodeError::Malformed { .. } | DecodeError::UnsupportedVersion { .. }
        )
    }
}

/// What a peer is told about bytes that did not decode: the contract's own
/// words (docs/wire-contract.md §7), never a decoder's internals.
fn describe(e: postcard::Error) -> String {
    use postcard::Error as E;
    if let Some(reason) = take_value_error() {
        return reason.to_owned();
    }
    match e {
        E::DeserializeUnexpectedEnd => "the message ends before its last field",
        E::DeserializeBadVarint => "a varint is longer than its type allows",
        E::DeserializeBadBool => "a bool is neither 0 nor 1",
        E::DeserializeBadChar | E::DeserializeBadUtf8 => "a string is not valid UTF-8",
        E::DeserializeBadOption => "an option tag is neither 0 nor 1",
        E::DeserializeBadEnum => "an enum tag is unknown",
        _ => "a field does not decode",
    }
    .to_owned()
}

/// The reason given for a value encoded in more bytes than it needs.
pub(super) const NON_CANONICAL: &str =
    "non-canonical encoding: a value is encoded in more bytes than it needs";

/// A postcard flavor that only counts bytes.
struct Count(usize);

impl postcard::ser_flavors::Flavor for Count {
    type Output = usize;
    fn try_push(&mut self, _: u8) -> postcard::Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0 += data.len();
        Ok(())
    }
    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.0)
    }
}

/// The length of `v`'s one canonical encoding. Decoding then comparing
/// this with the bytes consumed refuses every overlong varint (lengths,
/// counts, integers, tags) in one pass, with no allocation.
fn canonical_len<T: Serialize + ?Sized>(v: &T) -> usize {
    postcard::serialize_with_flavor(v, Count(0)).unwrap_or(usize::MAX)
}

/// Bytes of the canonical varint of `n`.
fn varint_len(n: u64) -> usize {
    (64 - (n | 1).leading_zeros() as usize).div_ceil(7)
}

/// Decodes a `T` from the front of `bytes`, returning the rest.
fn take<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8]), String> {
    take_value_error();
    postcard::take_from_bytes(bytes).map_err(describe)
}

/// Decodes a `T` that must use all of `bytes` (postcard's `from_bytes`
/// ignores trailing bytes; we refuse them).
fn take_all<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    let (value, rest) = take(bytes)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(trailing(rest))
    }
}

fn trailing(rest: &[u8]) -> String {
    format!("{} trailing bytes after the message", rest.len())
}

/// serde helpers for `Vec<u8>` as postcard bytes (length, raw bytes).
pub(super) mod as_bytes {
    use serde::de::DeserializeSeed;
    use serde::{Deserializer, Serializer};

    use crate::value::BytesSeed;

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        BytesSeed.deserialize(d)
    }
}
