//! Encode + decode of a 64-byte call request and of a 64 KiB response.
//!
//! `cargo bench -p netproc-wire --bench codec`

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use netproc_wire::*;
use std::hint::black_box;

fn round_trip_request(c: &mut Criterion) {
    let msg = ClientMessage::Request(Request {
        id: 123_456,
        op: Operation::Invoke {
            function: "echo".into(),
            args: vec![Value::Bytes(vec![7; 64].into())],
        },
        deadline_ms: Some(30_000),
    });
    let mut buf = BytesMut::with_capacity(256);
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_POST_AUTH_FRAME_BYTES);
    let mut group = c.benchmark_group("request_64b");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_decode", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&msg)
                .encode(&mut buf, DEFAULT_MAX_POST_AUTH_FRAME_BYTES)
                .unwrap();
            decoder.feed(&buf);
            let body = decoder.next_frame().unwrap().unwrap();
            black_box(ClientMessage::decode(&body).unwrap())
        })
    });
    group.finish();
}

fn round_trip_response(c: &mut Criterion) {
    let msg = ServerMessage::Response(Response {
        id: 123_456,
        outcome: Outcome::Ok(Value::Bytes(vec![7; 64 * 1024].into())),
    });
    let mut buf = BytesMut::with_capacity(70_000);
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_POST_AUTH_FRAME_BYTES);
    let mut group = c.benchmark_group("response_64kib");
    group.throughput(Throughput::Bytes(64 * 1024));
    group.bench_function("encode_decode", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&msg)
                .encode(&mut buf, DEFAULT_MAX_POST_AUTH_FRAME_BYTES)
                .unwrap();
            decoder.feed(&buf);
            let body = decoder.next_frame().unwrap().unwrap();
            black_box(ServerMessage::decode(&body).unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, round_trip_request, round_trip_response);
criterion_main!(benches);
