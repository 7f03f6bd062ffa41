//! Test support: a PKI, servers with a standard set of functions, clients,
//! and a raw wire-level connection for protocol tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use netproc_auth::{ApiKey, ApiKeyStore};
use netproc_client::{Client, ServerEndpoint};
use netproc_pki::IssuedCert;
use netproc_server::{CallContext, CallError, ServerBuilder, ServerHandle, ServerOptions};
use netproc_wire::{ClientMessage, FrameDecoder, ServerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

/// The test PKI of the whole workspace: a CA, a server and a client
/// certificate.
pub(crate) use netproc_testkit::{TestPki as Pki, key, only, unlimited};

/// Set by `cancellable` when its future is dropped or sees cancellation.
pub(crate) static CANCEL_SEEN: AtomicBool = AtomicBool::new(false);

struct DropFlag;
impl Drop for DropFlag {
    fn drop(&mut self) {
        CANCEL_SEEN.store(true, Ordering::SeqCst);
    }
}

/// A server with the test functions, over `keys`.
pub(crate) fn builder(pki: &Pki, name: &str, keys: Arc<ApiKeyStore>) -> ServerBuilder {
    pki.server_builder(name, keys)
        .function("ping_fn", |_: CallContext, (): ()| async move {
            Ok::<_, CallError>("ok")
        })
        .function("add", |_: CallContext, (a, b): (i64, i64)| async move {
            Ok::<_, CallError>(a + b)
        })
        .function(
            "echo",
            |_: CallContext, (v,): (netproc_wire::Value,)| async move { Ok::<_, CallError>(v) },
        )
        .function("sleep_ms", |_: CallContext, (ms,): (u64,)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, CallError>(ms)
        })
        .function("fail", |_: CallContext, (msg,): (String,)| async move {
            Err::<(), _>(CallError::new(msg))
        })
        .function("boom", |_: CallContext, (): ()| async move {
            if true {
                panic!("secret internal detail");
            }
            Ok::<(), CallError>(())
        })
        .function("whoami", |ctx: CallContext, (): ()| async move {
            Ok::<_, CallError>(ctx.principal().id.clone())
        })
        .function("cancellable", |ctx: CallContext, (): ()| async move {
            let _flag = DropFlag;
            ctx.cancellation().cancelled().await;
            Ok::<(), CallError>(())
        })
}

pub(crate) async fn start(pki: &Pki, name: &str, keys: Arc<ApiKeyStore>) -> ServerHandle {
    builder(pki, name, keys).start().await.unwrap()
}

pub(crate) async fn start_with(
    pki: &Pki,
    keys: Arc<ApiKeyStore>,
    options: ServerOptions,
) -> ServerHandle {
    builder(pki, "s1", keys)
        .options(options)
        .start()
        .await
        .unwrap()
}

pub(crate) fn endpoint(pki: &Pki, server: &ServerHandle, key: &ApiKey) -> ServerEndpoint {
    endpoint_as(pki, &pki.client, server, key)
}

pub(crate) fn endpoint_as(
    pki: &Pki,
    cert: &IssuedCert,
    server: &ServerHandle,
    key: &ApiKey,
) -> ServerEndpoint {
    pki.endpoint(cert, server.local_addr(), key)
}

pub(crate) fn client(pki: &Pki, server: &ServerHandle, key: &ApiKey) -> Client {
    Client::builder()
        .server("s1", endpoint(pki, server, key))
        .build()
        .unwrap()
}

/// A wire-level connection for protocol tests: TLS done, nothing else.
pub(crate) struct Raw {
    tls: TlsStream<tokio::net::TcpStream>,
    decoder: FrameDecoder,
}

impl Raw {
    pub(crate) async fn connect(pki: &Pki, server: &ServerHandle) -> Raw {
        Raw::connect_after(pki, server, &[]).await
    }

    /// Like `connect`, sending `prefix` on the TCP connection before TLS
    /// (a load balancer's PROXY header).
    pub(crate) async fn connect_after(pki: &Pki, server: &ServerHandle, prefix: &[u8]) -> Raw {
        let cfg = netproc_pki::client_config(
            &pki.client.identity().unwrap(),
            &pki.ca.trust_anchors(),
            &[],
        )
        .unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let mut tcp = tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, prefix)
            .await
            .unwrap();
        let name = netproc_pki::rustls::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        Raw {
            tls,
            decoder: FrameDecoder::new(u32::MAX),
        }
    }

    /// The certificate the server presented.
    pub(crate) fn server_fingerprint(&self) -> netproc_pki::Fingerprint {
        let chain = self.tls.get_ref().1.peer_certificates().unwrap();
        netproc_pki::Fingerprint::of(&chain[0])
    }

    /// This connection's TLS exporter value, as an Ed25519 proof signs it.
    pub(crate) fn channel_binding(&self) -> [u8; 32] {
        self.tls
            .get_ref()
            .1
            .export_keying_material([0u8; 32], netproc_pki::AUTH_EXPORTER_LABEL, None)
            .unwrap()
    }

    pub(crate) async fn send(&mut self, msg: &ClientMessage) {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf, u32::MAX).unwrap();
        self.send_bytes(&buf).await;
    }

    pub(crate) async fn send_body(&mut self, body: &[u8]) {
        let mut buf = BytesMut::new();
        netproc_wire::encode_frame(body, &mut buf, u32::MAX).unwrap();
        self.send_bytes(&buf).await;
    }

    pub(crate) async fn send_bytes(&mut self, bytes: &[u8]) {
        self.try_send_bytes(bytes).await.unwrap();
    }

    /// Sends, reporting rather than panicking when the server has closed.
    pub(crate) async fn try_send(&mut self, msg: &ClientMessage) -> std::io::Result<()> {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf, u32::MAX).unwrap();
        self.try_send_bytes(&buf).await
    }

    async fn try_send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tls.write_all(bytes).await?;
        self.tls.flush().await
    }

    /// The next message, or `None` when the server closed the connection.
    pub(crate) async fn recv(&mut self) -> Option<ServerMessage> {
        let read = async {
            loop {
                if let Some(body) = self.decoder.next_frame().unwrap() {
                    return Some(ServerMessage::decode(&body).unwrap());
                }
                match self.tls.read_buf(self.decoder.buffer_mut()).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("no answer in 10 s")
    }

    pub(crate) async fn auth(&mut self, key: &ApiKey) -> netproc_wire::AuthOk {
        self.send(&ClientMessage::Auth(netproc_wire::Auth {
            version: netproc_wire::PROTOCOL_VERSION,
            method: netproc_wire::AuthMethod::ApiKey(key.to_secret()),
            client_name: Some("raw".into()),
        }))
        .await;
        match self.recv().await {
            Some(ServerMessage::AuthOk(ok)) => ok,
            other => panic!("expected AuthOk, got {other:?}"),
        }
    }
}
