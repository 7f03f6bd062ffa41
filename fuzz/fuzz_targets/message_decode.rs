//! Message and value decoding on arbitrary bodies: never panics, and
//! whatever decodes re-encodes to bytes that decode to the same encoding
//! again (a canonical fixed point).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use netproc_wire::{ClientMessage, ServerMessage, Value, ValueLimits};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = ClientMessage::decode(data) {
        let mut first = BytesMut::new();
        msg.encode(&mut first, u32::MAX).expect("re-encode");
        let again = ClientMessage::decode(&first[4..]).expect("re-decode");
        let mut second = BytesMut::new();
        again.encode(&mut second, u32::MAX).expect("re-encode");
        assert_eq!(first, second);
    }
    if let Ok(msg) = ServerMessage::decode(data) {
        let mut first = BytesMut::new();
        msg.encode(&mut first, u32::MAX).expect("re-encode");
        let again = ServerMessage::decode(&first[4..]).expect("re-decode");
        let mut second = BytesMut::new();
        again.encode(&mut second, u32::MAX).expect("re-encode");
        assert_eq!(first, second);
    }
    if let Ok(value) = Value::decode(data, ValueLimits::default()) {
        let bytes = value.encode();
        let again = Value::decode(&bytes, ValueLimits::default()).expect("re-decode");
        assert_eq!(again.encode(), bytes);
    }
});
