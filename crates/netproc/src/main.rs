//! The `netproc` command.
//!
//! `netproc demo` runs, in-process and with no setup, what netproc can do so
//! far. The full command set (serve, call, pki, keys, metrics, bench) arrives
//! with the CLI issue.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use netproc::pki::{
    CaParams, CertificateAuthority, LeafParams, PkiError, client_config, server_config,
};
use netproc::wire::{
    ClientMessage, DEFAULT_MAX_POST_AUTH_FRAME_BYTES, FrameDecoder, ServerMessage,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const USAGE: &str = "usage: netproc demo

netproc demo   make a throwaway PKI, then run a mutual-TLS netproc/1 exchange
               on 127.0.0.1 and show a rogue certificate being refused";

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(demo()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn step(n: u32, text: &str) {
    println!("[{n}] {text}");
}

async fn demo() -> Result<(), Error> {
    println!("netproc demo (foundation release: PKI and wire protocol)\n");

    step(
        1,
        "generating a throwaway private CA, a server and a client certificate",
    );
    let ca = CertificateAuthority::generate(&CaParams::new("netproc demo CA"))?;
    let server = ca.issue(&LeafParams::server(
        "demo server",
        ["localhost", "127.0.0.1"],
    ))?;
    let client = ca.issue(&LeafParams::client("demo client"))?;
    println!(
        "    client certificate fingerprint {}",
        client.cert_identity().fingerprint
    );

    let server_tls = Arc::new(server_config(
        &server.identity()?,
        &ca.trust_anchors(),
        &[],
    )?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    step(
        2,
        &format!("mutual-TLS listener on {addr} (TLS 1.3, client certificate required)"),
    );
    let acceptor = TlsAcceptor::from(server_tls);
    let server_task = tokio::spawn(async move {
        // Two connections: the good client, then the rogue one.
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await?;
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut decoder = FrameDecoder::new(DEFAULT_MAX_POST_AUTH_FRAME_BYTES);
            loop {
                if tls.read_buf(decoder.buffer_mut()).await? == 0 {
                    break;
                }
                if let Some(body) = decoder.next_frame()? {
                    if let ClientMessage::Ping { nonce } = ClientMessage::decode(&body)? {
                        let mut out = BytesMut::new();
                        ServerMessage::Pong { nonce }
                            .encode(&mut out, DEFAULT_MAX_POST_AUTH_FRAME_BYTES)?;
                        tls.write_all(&out).await?;
                        tls.flush().await?;
                    }
                    break;
                }
            }
        }
        Ok::<_, Error>(())
    });

    step(
        3,
        "client connects with its certificate and sends a netproc/1 Ping",
    );
    let good = client_config(&client.identity()?, &ca.trust_anchors(), &[])?;
    let nonce = 0x6e65_7470;
    let pong = ping(good, addr, nonce).await?;
    if pong != nonce {
        return Err(format!("pong carried nonce {pong}, expected {nonce}").into());
    }
    println!("    got Pong {{ nonce: {pong:#x} }}: authenticated both ways");

    step(
        4,
        "a client whose certificate comes from a rogue CA tries the same",
    );
    let rogue_ca = CertificateAuthority::generate(&CaParams::new("rogue CA"))?;
    let rogue = rogue_ca.issue(&LeafParams::client("mallory"))?;
    let rogue_cfg = client_config(&rogue.identity()?, &ca.trust_anchors(), &[])?;
    match ping(rogue_cfg, addr, 1).await {
        Ok(_) => return Err("the rogue client was accepted".into()),
        Err(e) => println!("    refused as expected: {e}"),
    }
    tokio::time::timeout(Duration::from_secs(5), server_task).await???;

    println!("\nall steps behaved as expected.");
    println!("next: cargo test --workspace   |   cargo xtask pki   (dev PKI in fixtures/pki)");
    println!("the RPC server, client and `netproc serve|call` arrive with the next releases.");
    Ok(())
}

async fn ping(
    config: netproc::pki::rustls::ClientConfig,
    addr: std::net::SocketAddr,
    nonce: u64,
) -> Result<u64, Error> {
    let connector = TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let exchange = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connector.connect(name, tcp).await?;
        let mut out = BytesMut::new();
        ClientMessage::Ping { nonce }.encode(&mut out, DEFAULT_MAX_POST_AUTH_FRAME_BYTES)?;
        tls.write_all(&out).await?;
        tls.flush().await?;
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_POST_AUTH_FRAME_BYTES);
        loop {
            // In TLS 1.3 a refused client certificate shows on this first read.
            if tls.read_buf(decoder.buffer_mut()).await? == 0 {
                return Err::<u64, Error>("connection closed".into());
            }
            if let Some(body) = decoder.next_frame()? {
                return match ServerMessage::decode(&body)? {
                    ServerMessage::Pong { nonce } => Ok(nonce),
                    other => Err(format!("unexpected answer {other:?}").into()),
                };
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| -> Error { "timed out".into() })?
}

// PkiError must stay Send + Sync for `?` into Error.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<PkiError>();
};
