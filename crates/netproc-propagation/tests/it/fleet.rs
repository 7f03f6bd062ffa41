//! A fleet for the TLS tests: the authority and several netproc servers in
//! one process, over real TLS on 127.0.0.1, with certificates from the
//! test kit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use netproc_auth::{ApiKey, ApiKeyStore, CertBinding, KeySpec, PrivilegeSet};
use netproc_client::{Client, ClientError, ServerEndpoint, ServerRef};
use netproc_pki::{Ed25519Key, IssuedCert};
use netproc_propagation::{
    Authority, AuthorityConfig, DeliveryState, NetprocTransport, PropagationTarget, TargetConfig,
};
use netproc_server::{CallContext, CallError, ServerHandle};
use netproc_testkit::TestPki;
use netproc_wire::ErrorCode;
use tokio::task::JoinHandle;

/// The workspace's test PKI plus the authority's and a user's certificates.
pub(crate) struct Pki {
    kit: TestPki,
    pub(crate) authority: IssuedCert,
    pub(crate) user: IssuedCert,
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let kit = TestPki::new();
        Pki {
            authority: kit.client_cert("authority"),
            user: kit.client_cert("user"),
            kit,
        }
    }
}

impl std::ops::Deref for Pki {
    type Target = TestPki;
    fn deref(&self) -> &TestPki {
        &self.kit
    }
}

/// One target server: its local keys (the authority's own key among
/// them), its state directory and the running server.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) keys: Arc<ApiKeyStore>,
    pub(crate) state: PathBuf,
    pub(crate) authority_key: ApiKey,
    pub(crate) target: Arc<PropagationTarget>,
    pub(crate) server: ServerHandle,
}

pub(crate) async fn start_node(
    pki: &Pki,
    name: &str,
    state: &Path,
    trusted: [u8; 32],
    bind: Option<SocketAddr>,
    authority_privilege: &str,
) -> Node {
    let config = TargetConfig::new(name, vec![trusted]);
    start_node_with(pki, config, state, bind, authority_privilege).await
}

/// [`start_node`] with the target's own configuration (its freshness).
pub(crate) async fn start_node_with(
    pki: &Pki,
    config: TargetConfig,
    state: &Path,
    bind: Option<SocketAddr>,
    authority_privilege: &str,
) -> Node {
    let name = config.name.clone();
    let name = name.as_str();
    std::fs::create_dir_all(state).unwrap();
    let keys = Arc::new(ApiKeyStore::in_memory());
    // The authority's credential on this server: bound to its certificate.
    let (_, authority_key) = keys
        .create(
            KeySpec::new(authority_privilege.parse::<PrivilegeSet>().unwrap()).binding(
                CertBinding::Fingerprint(pki.authority.cert_identity().fingerprint),
            ),
        )
        .unwrap();
    let db = netproc_server::StateDatabase::open(state).unwrap();
    let target = PropagationTarget::open(config, Arc::clone(&keys), &db).unwrap();
    let mut builder = pki
        .server_builder(name, Arc::clone(&keys))
        .state(db)
        .function("whoami", |ctx: CallContext, (): ()| async move {
            Ok::<_, CallError>(ctx.principal().id.clone())
        })
        .function("sleep_ms", |_: CallContext, (ms,): (u64,)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, CallError>(ms)
        });
    if let Some(addr) = bind {
        builder = builder.bind(addr);
    }
    let server = target.install(builder).start().await.unwrap();
    server.follow_key_store(&keys);
    Node {
        name: name.to_owned(),
        keys,
        state: state.to_owned(),
        authority_key,
        target,
        server,
    }
}

pub(crate) fn endpoint(
    pki: &Pki,
    cert: &IssuedCert,
    addr: SocketAddr,
    key: &ApiKey,
) -> ServerEndpoint {
    pki.endpoint(cert, addr, key)
        .connect_timeout(Duration::from_secs(2))
}

/// The authority's client: one server per target, each with its key there.
pub(crate) fn authority_client(pki: &Pki, nodes: &[(String, SocketAddr, ApiKey)]) -> Client {
    let mut b = Client::builder();
    for (name, addr, key) in nodes {
        b = b.server(name.clone(), endpoint(pki, &pki.authority, *addr, key));
    }
    b.build().unwrap()
}

pub(crate) fn open_authority(
    db: &Path,
    key: Ed25519Key,
    client: Client,
    targets: &[&str],
) -> Authority {
    let mut config = AuthorityConfig::new(db, targets.iter().map(|t| (*t).to_owned()).collect());
    config.delivery_timeout = Duration::from_secs(3);
    Authority::open(config, key, Arc::new(NetprocTransport::new(client))).unwrap()
}

pub(crate) fn user(pki: &Pki, node: &Node, key: &ApiKey) -> ServerRef {
    Client::builder()
        .server("s", endpoint(pki, &pki.user, node.server.local_addr(), key))
        .build()
        .unwrap()
        .server("s")
        .unwrap()
}

pub(crate) fn long_call(s: &ServerRef) -> JoinHandle<Result<u64, ClientError>> {
    let s = s.clone();
    tokio::spawn(async move { s.call::<u64>("sleep_ms", (20_000,)).await })
}

pub(crate) async fn ended_with(call: JoinHandle<Result<u64, ClientError>>) -> ErrorCode {
    match tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the session did not end in time")
        .unwrap()
    {
        Err(ClientError::Remote { code, .. }) => code,
        other => panic!("expected a remote reason, got {other:?}"),
    }
}

pub(crate) async fn refused(pki: &Pki, node: &Node, key: &ApiKey) -> bool {
    match user(pki, node, key).call::<String>("whoami", ()).await {
        Ok(_) => false,
        Err(e) => e.code() == ErrorCode::AuthenticationFailed,
    }
}

pub(crate) struct Fleet {
    pub(crate) pki: Pki,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) signing: [u8; 32],
    pub(crate) nodes: Vec<Node>,
    pub(crate) authority: Authority,
}

pub(crate) async fn fleet(names: &[&str]) -> Fleet {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let signing = Ed25519Key::generate().unwrap();
    let mut nodes = Vec::new();
    for n in names {
        let node = start_node(
            &pki,
            n,
            &dir.path().join(n),
            signing.public_key(),
            None,
            "receive_credentials",
        )
        .await;
        nodes.push(node);
    }
    let routes: Vec<_> = nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                n.server.local_addr(),
                n.authority_key.clone(),
            )
        })
        .collect();
    let client = authority_client(&pki, &routes);
    let seed = *signing.seed();
    let authority = open_authority(&dir.path().join("authority.db"), signing, client, names);
    Fleet {
        pki,
        dir,
        signing: seed,
        nodes,
        authority,
    }
}

pub(crate) fn states(
    status: Vec<netproc_propagation::TargetDelivery>,
) -> BTreeMap<String, DeliveryState> {
    status.into_iter().map(|s| (s.target, s.state)).collect()
}
