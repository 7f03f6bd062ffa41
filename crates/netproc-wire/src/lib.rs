//! The netproc/1 wire protocol, sans-I/O.
//!
//! netproc calls procedures on remote servers over mutual TLS. This crate is
//! the protocol's bytes and nothing else: no sockets, no runtime, no clock.
//! Feed a [`FrameDecoder`] the bytes you read, decode each frame body with
//! [`ClientMessage::decode`] or [`ServerMessage::decode`], and encode replies
//! into a `BytesMut` you write out. That is enough to write a netproc client
//! or server in any I/O model; `docs/wire-contract.md` in the repository
//! specifies every byte, for other languages.
//!
//! - Frames: a `u32` big-endian body length, then the body. The decoder
//!   refuses a length over its limit from the header alone, before buffering
//!   the body ([`FrameError::FrameTooLarge`]); zero-length frames are
//!   invalid. The limit changes at run time: 64 KiB before authentication,
//!   1 MiB after, by default.
//! - Bodies: postcard. A message kind first, then its payload; a request
//!   carries its id and operation tag before the operation's payload, so each
//!   kind of bad input gets its own answer ([`DecodeError`]).
//! - [`Value`]: the self-describing value of arguments and results, decoded
//!   with bounded depth and size.
//! - [`ErrorCode`] and [`Privilege`]: the stable vocabularies.
//!
//! # Example
//!
//! ```
//! use bytes::BytesMut;
//! use netproc_wire::*;
//!
//! // A client encodes a call...
//! let call = ClientMessage::Request(Request {
//!     id: 1,
//!     op: Operation::Invoke { function: "add".into(), args: vec![Value::Int(2), Value::Int(3)] },
//!     deadline_ms: Some(5_000),
//! });
//! let mut wire = BytesMut::new();
//! call.encode(&mut wire, DEFAULT_MAX_POST_AUTH_FRAME_BYTES).unwrap();
//!
//! // ...the server's decoder receives it in two pieces...
//! let mut decoder = FrameDecoder::new(DEFAULT_MAX_POST_AUTH_FRAME_BYTES);
//! decoder.feed(&wire[..3]);
//! assert!(decoder.next_frame().unwrap().is_none());
//! decoder.feed(&wire[3..]);
//! let body = decoder.next_frame().unwrap().unwrap();
//!
//! // ...and decodes it.
//! let ClientMessage::Request(req) = ClientMessage::decode(&body).unwrap() else { panic!() };
//! let Operation::Invoke { function, args } = req.op else { panic!() };
//! let (a, b): (i64, i64) = from_value(Value::List(args)).unwrap();
//! assert_eq!((function.as_str(), a + b), ("add", 5));
//!
//! // The answer goes back the same way.
//! let reply = ServerMessage::Response(Response { id: req.id, outcome: Outcome::Ok(to_value(&5).unwrap()) });
//! reply.encode(&mut wire, DEFAULT_MAX_POST_AUTH_FRAME_BYTES).unwrap();
//! ```
//!
//! # Features
//!
//! - `codec`: [`FrameCodec`], a `tokio_util::codec::{Decoder, Encoder}` for frames,
//!   and `FrameDecoder::read_frame`, which reads one frame from a tokio
//!   `AsyncRead` (the server's and the client's framed reader).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "codec")]
mod codec;
mod convert;
mod error_code;
mod frame;
mod idmap;
mod message;
mod privilege;
mod time;
mod value;

// The public interface.
#[cfg(feature = "codec")]
pub use codec::{CodecError, FrameCodec};
pub use convert::{ValueError, from_value, to_value};
pub use error_code::ErrorCode;
pub use frame::{
    DEFAULT_MAX_POST_AUTH_FRAME_BYTES, DEFAULT_MAX_PRE_AUTH_FRAME_BYTES, FRAME_HEADER_LEN,
    FrameDecoder, FrameError, encode_frame,
};
pub use idmap::{RequestIdHasher, RequestIdMap};
pub use message::{
    ALPN_PROTOCOL, AnnouncedLimits, Auth, AuthMethod, AuthOk, AuthWithOptions, ClientMessage,
    DecodeError, DefineFunction, DependencySource, Ed25519Proof, EncodeError, ErrorBody,
    FunctionLimits, GoAway, MIN_ANNOUNCED_FRAME_BYTES, Operation, Outcome, PROTOCOL_VERSION,
    RateLimit, Request, Response, SecretString, ServerMessage, WhoAmI,
};
pub use privilege::{Privilege, UnknownPrivilege};
pub use time::{from_unix_ms, unix_ms};
pub use value::{
    DEFAULT_MAX_VALUE_DEPTH, DEFAULT_MAX_VALUE_NODES, Value, ValueDecodeError, ValueLimits,
};
