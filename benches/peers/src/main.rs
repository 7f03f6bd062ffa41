//! netproc beside the peer users would pick instead: gRPC unary calls
//! (tonic) over the same mutual TLS, and the raw tokio-rustls echo that is
//! the floor. Same PKI, same 64-byte payload, same layout: servers on one
//! 2-thread runtime, clients on another, in one process; the three
//! alternated in each round; medians of the rounds.
//!
//! `cargo run --release --manifest-path benches/peers/Cargo.toml`
//! Environment: `NETPROC_BENCH_SECS` (default 5), `NETPROC_BENCH_ROUNDS`
//! (default 3).

use std::time::Duration;

use bytes::Bytes;
use netproc_testkit::bench::{Load, PAYLOAD, Run, bench_server, run_netproc, run_raw, runtime};
use netproc_testkit::{TestPki, env_or, median};
use netproc_wire::Value;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The one message: bytes in, the same bytes out.
#[derive(Clone, PartialEq, prost::Message)]
struct EchoMessage {
    #[prost(bytes = "bytes", tag = "1")]
    payload: Bytes,
}

const ECHO_PATH: &str = "/bench.Echo/Echo";

/// The gRPC service `bench.Echo` with one unary method, `Echo`, written
/// out by hand (what tonic's code generator would write for it).
#[derive(Clone)]
struct EchoService;

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "bench.Echo";
}

struct EchoMethod;

impl tonic::server::UnaryService<EchoMessage> for EchoMethod {
    type Response = EchoMessage;
    type Future = std::future::Ready<Result<tonic::Response<EchoMessage>, tonic::Status>>;
    fn call(&mut self, request: tonic::Request<EchoMessage>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(request.into_inner())))
    }
}

impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for EchoService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        if req.uri().path() != ECHO_PATH {
            return Box::pin(async {
                Ok(tonic::Status::unimplemented("no such method").into_http())
            });
        }
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(EchoMethod, req).await)
        })
    }
}

/// Starts the gRPC server on the current runtime; its address.
async fn start_tonic(pki: &TestPki) -> std::net::SocketAddr {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            pki.server.cert_pem(),
            pki.server.key_pem().as_str(),
        ))
        .client_ca_root(Certificate::from_pem(pki.ca.cert_pem()));
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
        .unwrap()
        .with_nodelay(Some(true));
    let addr = incoming.local_addr().unwrap();
    let router = tonic::transport::Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(EchoService);
    tokio::spawn(router.serve_with_incoming(incoming));
    addr
}

/// `c` gRPC connections (one HTTP/2 channel each) with `k` unary calls in
/// flight each, for `secs`.
async fn run_tonic(
    pki: &TestPki,
    addr: std::net::SocketAddr,
    c: usize,
    k: usize,
    secs: f64,
) -> Run {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca.cert_pem()))
        .identity(Identity::from_pem(
            pki.client.cert_pem(),
            pki.client.key_pem().as_str(),
        ))
        .domain_name("localhost");
    let load = Load::new(k);
    let mut tasks = Vec::new();
    for _ in 0..c {
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tcp_nodelay(true)
            .tls_config(tls.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        for _ in 0..k {
            let state = (
                tonic::client::Grpc::new(channel.clone()),
                Bytes::from(vec![7u8; PAYLOAD]),
            );
            tasks.push(load.spawn_caller(state, |(mut grpc, payload)| async move {
                grpc.ready().await.unwrap();
                let request = tonic::Request::new(EchoMessage {
                    payload: payload.clone(),
                });
                let reply: tonic::Response<EchoMessage> = grpc
                    .unary(
                        request,
                        PathAndQuery::from_static(ECHO_PATH),
                        tonic_prost::ProstCodec::default(),
                    )
                    .await
                    .expect("gRPC call");
                assert_eq!(reply.get_ref().payload.len(), PAYLOAD);
                (grpc, payload)
            }));
        }
    }
    load.measure(secs, tasks).await
}

fn main() {
    let secs: f64 = env_or("NETPROC_BENCH_SECS", 5.0);
    let rounds: usize = env_or("NETPROC_BENCH_ROUNDS", 3);
    let (server_rt, client_rt) = (runtime(), runtime());
    let pki = TestPki::new();
    let (server, key) = server_rt.block_on(async {
        let (builder, key) = bench_server(&pki);
        (builder.start().await.unwrap(), key)
    });
    let tonic_addr = server_rt.block_on(start_tonic(&pki));
    println!("| C, K | system | calls/s | CPU µs per call | p50 µs | p99 µs |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for (c, k) in [(4usize, 32usize), (1, 1)] {
        let (mut raw, mut np, mut grpc) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            raw.push(client_rt.block_on(run_raw(&pki, (c, k, PAYLOAD), secs, server_rt.handle())));
            let echo = vec![Value::Bytes(vec![7u8; PAYLOAD].into())];
            np.push(client_rt.block_on(run_netproc(
                &pki,
                &server,
                &key,
                c,
                k,
                secs,
                ("echo", echo),
            )));
            grpc.push(client_rt.block_on(run_tonic(&pki, tonic_addr, c, k, secs)));
            eprintln!(
                "C={c} K={k} round {round}: raw {:.0}/s netproc {:.0}/s tonic {:.0}/s",
                raw[round].rate(),
                np[round].rate(),
                grpc[round].rate()
            );
        }
        let m = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        for (name, runs) in [
            ("raw TLS echo", &raw),
            ("netproc", &np),
            ("tonic (gRPC)", &grpc),
        ] {
            let latency = |f: fn(&Run) -> f64| {
                if k == 1 {
                    format!("{:.1}", m(runs, f))
                } else {
                    "—".to_owned()
                }
            };
            println!(
                "| C={c} K={k} | {name} | {:.0} | {:.1} | {} | {} |",
                m(runs, Run::rate),
                m(runs, Run::cpu_per_call),
                latency(|r| r.p50_us),
                latency(|r| r.p99_us),
            );
        }
    }
    server_rt.block_on(server.shutdown(Duration::from_secs(1)));
}
