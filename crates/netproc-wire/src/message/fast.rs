//! Hand-written decoders for the two messages on every call: a request to
//! invoke a function, and a successful response, when every argument or
//! the result is a scalar, a string or bytes (no list or map).
//!
//! They accept only canonical encodings (every varint minimal and in range,
//! booleans 0 or 1, UTF-8 strings, nothing left over), so whatever they
//! accept the general decoder accepts too, with the same result. Anything
//! else — another message, a nested value, any doubt — is `None`, and the
//! general decoder (postcard through serde, then the canonical-length
//! check) decides, errors included. A property test holds the two to the
//! same answers.

use crate::Value;

use super::client::CLIENT_KIND_REQUEST;
use super::server::SERVER_KIND_RESPONSE;
use super::{ClientMessage, Operation, Outcome, Request, Response, ServerMessage};

/// The tag of `Operation::Invoke` and of `Outcome::Ok`.
const TAG_FIRST: u64 = 0;

struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A minimal varint of at most `max_bytes` whose value fits `bits`.
    fn varint(&mut self, max_bytes: usize, bits: u32) -> Option<u64> {
        let mut value: u64 = 0;
        for i in 0..max_bytes {
            let (&byte, rest) = self.rest.split_first()?;
            self.rest = rest;
            value |= u64::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                // Minimal: a last byte of zero is an overlong form.
                let minimal = i == 0 || byte != 0;
                let fits = bits == 64 || value >> bits == 0;
                let no_overflow = i < 9 || byte <= 1;
                return (minimal && fits && no_overflow).then_some(value);
            }
        }
        None
    }

    fn u64(&mut self) -> Option<u64> {
        self.varint(10, 64)
    }

    fn u32(&mut self) -> Option<u32> {
        self.varint(5, 32).map(|v| v as u32)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(head)
    }

    fn blob(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u64()?).ok()?;
        self.take(len)
    }

    /// A value that is not a list or a map.
    fn scalar(&mut self) -> Option<Value> {
        Some(match self.u32()? {
            0 => Value::Null,
            1 => match self.take(1)? {
                [0] => Value::Bool(false),
                [1] => Value::Bool(true),
                _ => return None,
            },
            2 => {
                let zigzag = self.u64()?;
                Value::Int(((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64))
            }
            3 => Value::Float(f64::from_le_bytes(self.take(8)?.try_into().ok()?)),
            4 => Value::String(std::str::from_utf8(self.blob()?).ok()?.to_owned()),
            5 => Value::Bytes(crate::value::share(self.blob()?)),
            _ => return None,
        })
    }
}

/// `Request(Invoke)` with scalar arguments.
pub(super) fn request(body: &[u8]) -> Option<ClientMessage> {
    let mut c = Cursor { rest: body };
    if c.u32()? != CLIENT_KIND_REQUEST {
        return None;
    }
    let id = c.u64()?;
    if c.u64()? != TAG_FIRST {
        return None;
    }
    let function = std::str::from_utf8(c.blob()?).ok()?.to_owned();
    let count = usize::try_from(c.u64()?).ok()?;
    // Each argument takes at least one byte: a count beyond the bytes left
    // is refused by the general decoder.
    if count > c.rest.len() {
        return None;
    }
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        args.push(c.scalar()?);
    }
    let deadline_ms = match c.take(1)? {
        [0] => None,
        [1] => Some(c.u32()?),
        _ => return None,
    };
    c.rest.is_empty().then_some(ClientMessage::Request(Request {
        id,
        op: Operation::Invoke { function, args },
        deadline_ms,
    }))
}

/// `Response(Ok)` with a scalar result.
pub(super) fn response(body: &[u8]) -> Option<ServerMessage> {
    let mut c = Cursor { rest: body };
    if c.u32()? != SERVER_KIND_RESPONSE {
        return None;
    }
    let id = c.u64()?;
    if c.u64()? != TAG_FIRST {
        return None;
    }
    let value = c.scalar()?;
    c.rest
        .is_empty()
        .then_some(ServerMessage::Response(Response {
            id,
            outcome: Outcome::Ok(value),
        }))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            prop_oneof![Just(i64::MIN), Just(-1), Just(63), Just(64), Just(i64::MAX)]
                .prop_map(Value::Int),
            any::<f64>().prop_map(Value::Float),
            ".{0,20}".prop_map(Value::String),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| Value::Bytes(b.into())),
        ]
    }

    fn argument() -> impl Strategy<Value = Value> {
        // Mostly scalars; sometimes a list, which the fast path leaves alone.
        prop_oneof![
            9 => scalar(),
            1 => proptest::collection::vec(scalar(), 0..3).prop_map(Value::List),
        ]
    }

    /// The general (postcard through serde) encoding of a message body.
    fn general<T: serde::Serialize>(msg: &T) -> Vec<u8> {
        postcard::to_stdvec(msg).unwrap()
    }

    fn mutated(mut body: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
        for &(at, op, byte) in edits {
            if body.is_empty() {
                body.push(byte);
                continue;
            }
            let at = at % (body.len() + 1);
            match op % 4 {
                0 if at < body.len() => body[at] = byte,
                1 => body.insert(at, byte),
                2 if at < body.len() => {
                    body.remove(at);
                }
                _ => body.truncate(at),
            }
        }
        body
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// On real calls and on every corruption of them: whatever the
        /// fast path accepts, the general decoder accepts with the same
        /// message; and what it leaves alone, the general decoder decides.
        #[test]
        fn the_fast_request_decoder_agrees_with_the_general_one(
            id in any::<u64>(),
            function in ".{0,12}",
            args in proptest::collection::vec(argument(), 0..4),
            deadline_ms in any::<Option<u32>>(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..3),
        ) {
            let msg = ClientMessage::Request(Request { id, op: Operation::Invoke { function, args }, deadline_ms });
            let body = general(&msg);
            let all_scalar = matches!(&msg, ClientMessage::Request(Request { op: Operation::Invoke { args, .. }, .. })
                if args.iter().all(|a| !matches!(a, Value::List(_) | Value::Map(_))));
            let fast = request(&body);
            prop_assert_eq!(fast.is_some(), all_scalar);
            if let Some(m) = fast {
                prop_assert_eq!(&m, &msg);
            }
            let corrupt = mutated(body, &edits);
            if let Some(m) = request(&corrupt) {
                prop_assert_eq!(ClientMessage::decode_general(&corrupt), Ok(m));
            }
        }

        #[test]
        fn the_fast_response_decoder_agrees_with_the_general_one(
            id in any::<u64>(),
            value in argument(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..3),
        ) {
            let msg = ServerMessage::Response(Response { id, outcome: Outcome::Ok(value.clone()) });
            let body = general(&msg);
            let fast = response(&body);
            let scalar = !matches!(value, Value::List(_) | Value::Map(_));
            prop_assert_eq!(fast.is_some(), scalar);
            if let Some(m) = fast {
                prop_assert_eq!(&m, &msg);
            }
            let corrupt = mutated(body, &edits);
            if let Some(m) = response(&corrupt) {
                prop_assert_eq!(ServerMessage::decode_general(&corrupt), Ok(m));
            }
        }

        /// Arbitrary bytes: the same rule.
        #[test]
        fn on_arbitrary_bytes_the_fast_decoders_never_accept_more(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut body = body;
            if let Some(first) = body.first_mut() {
                *first = 1; // the kind of a request and of a response
            }
            if let Some(m) = request(&body) {
                prop_assert_eq!(ClientMessage::decode_general(&body), Ok(m));
            }
            if let Some(m) = response(&body) {
                prop_assert_eq!(ServerMessage::decode_general(&body), Ok(m));
            }
        }
    }

    #[test]
    fn overlong_and_out_of_range_varints_are_left_to_the_general_decoder() {
        // Request 5, invoke "f", no arguments, no deadline; then the id overlong.
        assert!(request(&[1, 5, 0, 1, b'f', 0, 0]).is_some());
        assert!(request(&[1, 0x85, 0x00, 0, 1, b'f', 0, 0]).is_none());
        // A u32 deadline of 2^32.
        assert!(request(&[1, 5, 0, 1, b'f', 0, 1, 0x80, 0x80, 0x80, 0x80, 0x10]).is_none());
        // A bool of 2.
        assert!(response(&[1, 5, 0, 1, 2]).is_none());
        assert_eq!(
            response(&[1, 5, 0, 1, 1]),
            Some(ServerMessage::Response(Response {
                id: 5,
                outcome: Outcome::Ok(Value::Bool(true))
            }))
        );
    }
}
