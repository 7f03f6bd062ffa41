//! Shared test support: an in-process PKI and a one-shot TLS handshake over
//! 127.0.0.1.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use netproc_pki::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A CA with a server certificate for localhost / 127.0.0.1.
pub(crate) struct TestPki {
    pub(crate) ca: CertificateAuthority,
    pub(crate) server: IssuedCert,
}

impl TestPki {
    pub(crate) fn new() -> TestPki {
        let ca = CertificateAuthority::generate(&CaParams::new("test CA")).unwrap();
        let server = ca
            .issue(&LeafParams::server("server", ["localhost", "127.0.0.1"]))
            .unwrap();
        TestPki { ca, server }
    }

    pub(crate) fn client(&self, cn: &str) -> IssuedCert {
        self.ca.issue(&LeafParams::client(cn)).unwrap()
    }

    pub(crate) fn server_config(&self, crls: &[Crl]) -> ::rustls::ServerConfig {
        server_config(
            &self.server.identity().unwrap(),
            &self.ca.trust_anchors(),
            crls,
        )
        .unwrap()
    }

    pub(crate) fn client_config(
        &self,
        client: &IssuedCert,
        pins: &[Pin],
    ) -> ::rustls::ClientConfig {
        client_config(&client.identity().unwrap(), &self.ca.trust_anchors(), pins).unwrap()
    }
}

/// What each side saw.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The client's result: the handshake, then a read of the server's greeting.
    pub(crate) client: Result<(), io::Error>,
    /// The server's handshake result.
    pub(crate) server: Result<ServerSide, io::Error>,
}

#[derive(Debug)]
pub(crate) struct ServerSide {
    pub(crate) alpn: Option<Vec<u8>>,
    pub(crate) version: Option<::rustls::ProtocolVersion>,
    pub(crate) handshake_kind: Option<::rustls::HandshakeKind>,
    pub(crate) peer_fingerprint: Option<Fingerprint>,
}

/// The rustls error inside an I/O error from tokio-rustls.
pub(crate) fn tls_error(e: &io::Error) -> Option<&::rustls::Error> {
    e.get_ref()?.downcast_ref::<::rustls::Error>()
}

/// One connection: the server greets with "ok" after its handshake; the
/// client reads before deciding, because in TLS 1.3 a client learns that its
/// certificate was refused only on its first read.
pub(crate) async fn handshake(
    server: ::rustls::ServerConfig,
    client: ::rustls::ClientConfig,
    server_name: &str,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let (_, conn) = tls.get_ref();
        let side = ServerSide {
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            version: conn.protocol_version(),
            handshake_kind: conn.handshake_kind(),
            peer_fingerprint: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Fingerprint::of(c)),
        };
        tls.write_all(b"ok").await?;
        tls.flush().await?;
        // Wait for the client to finish reading.
        let mut buf = [0u8; 1];
        let _ = tls.read(&mut buf).await;
        Ok::<_, io::Error>(side)
    });
    let connector = TlsConnector::from(Arc::new(client));
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let client_result = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connector.connect(name, tcp).await?;
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ok");
        tls.shutdown().await?;
        Ok::<_, io::Error>(())
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client_result)
        .await
        .expect("client side timed out");
    let server = tokio::time::timeout(Duration::from_secs(10), server_task)
        .await
        .expect("server side timed out")
        .unwrap();
    Outcome { client, server }
}
