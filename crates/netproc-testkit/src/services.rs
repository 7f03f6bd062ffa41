//! External services in tests (Redis, PostgreSQL, RabbitMQ): where they
//! are, skipping when they are absent (unless `NETPROC_REQUIRE_SERVICES`
//! is set), and an in-process TCP proxy to cut or stall the way to them —
//! no test stops, flushes or pauses a shared service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The service's URL: `env_var` if set, else `default`.
pub fn service_url(env_var: &str, default: &str) -> String {
    std::env::var(env_var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// `host:port` of a URL such as `redis://user:pw@127.0.0.1:6379/0`.
fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    }
}

/// Whether the service answers a TCP connect within a second; when it
/// does not, the test should return at once: this prints the skip line,
/// or panics when `NETPROC_REQUIRE_SERVICES` is set (CI, where `.ci/run`
/// started the services).
pub async fn service_or_skip(what: &str, url: &str, default_port: u16, test: &str) -> bool {
    let addr = host_port(url, default_port);
    let up = matches!(
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&addr)).await,
        Ok(Ok(_))
    );
    if up {
        return true;
    }
    if std::env::var_os("NETPROC_REQUIRE_SERVICES").is_some_and(|v| !v.is_empty()) {
        panic!(
            "{test}: {what} is required (NETPROC_REQUIRE_SERVICES) but nothing answers at {addr}"
        );
    }
    println!("skipped {test}: no {what} at {addr} (set its URL, or start it)");
    false
}

/// The Redis URL for tests (`NETPROC_TEST_REDIS_URL`, default
/// `redis://127.0.0.1:6379`), or `None` after printing a skip line.
pub async fn redis_or_skip(test: &str) -> Option<String> {
    let url = service_url("NETPROC_TEST_REDIS_URL", "redis://127.0.0.1:6379");
    service_or_skip("Redis", &url, 6379, test)
        .await
        .then_some(url)
}

/// The PostgreSQL URL for tests (`NETPROC_TEST_POSTGRES_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`), or `None` after printing a
/// skip line.
pub async fn postgres_or_skip(test: &str) -> Option<String> {
    let url = service_url(
        "NETPROC_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    service_or_skip("PostgreSQL", &url, 5432, test)
        .await
        .then_some(url)
}

/// The RabbitMQ URL for tests (`NETPROC_TEST_AMQP_URL`, default
/// `amqp://guest:guest@127.0.0.1:5672/%2f`), or `None` after printing a
/// skip line.
pub async fn amqp_or_skip(test: &str) -> Option<String> {
    let url = service_url(
        "NETPROC_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    );
    service_or_skip("RabbitMQ", &url, 5672, test)
        .await
        .then_some(url)
}

/// A PostgreSQL schema of one test's own, dropped at the end (also on
/// failure): tests that share the database never see each other's tables.
#[derive(Debug)]
pub struct PgSchema {
    /// The database URL.
    pub url: String,
    /// The schema's name (`np_` and 12 random hex digits).
    pub schema: String,
}

impl PgSchema {
    /// A fresh schema name, or `None` (after a skip line) without
    /// PostgreSQL; the schema itself is made by whoever connects first.
    pub async fn new(test: &str) -> Option<PgSchema> {
        let url = postgres_or_skip(test).await?;
        let mut r = [0u8; 6];
        netproc_pki::random_bytes(&mut r).expect("random bytes");
        let schema = format!(
            "np_{}",
            r.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        Some(PgSchema { url, schema })
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        // The blocking client may not run on the test's runtime thread.
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = postgres::Client::connect(&url, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            }
        })
        .join();
    }
}

/// A test's RabbitMQ queues and exchanges, deleted when dropped (also on
/// failure): tests that share the broker leave nothing behind.
#[derive(Debug)]
pub struct AmqpCleanup {
    /// The broker URL.
    pub url: String,
    /// Queues to delete.
    pub queues: Vec<String>,
    /// Exchanges to delete.
    pub exchanges: Vec<String>,
}

impl Drop for AmqpCleanup {
    fn drop(&mut self) {
        let url = self.url.clone();
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        // A thread of its own: Drop may run inside the test's runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let props = lapin::ConnectionProperties::default();
                let Ok(conn) = lapin::Connection::connect(&url, props).await else {
                    return;
                };
                let Ok(ch) = conn.create_channel().await else {
                    return;
                };
                for q in queues {
                    let _ = ch.queue_delete(q.into(), Default::default()).await;
                }
                for e in exchanges {
                    let _ = ch.exchange_delete(e.into(), Default::default()).await;
                }
                let _ = conn.close(200, "bye".into()).await;
            });
        })
        .join();
    }
}

/// A TCP proxy on 127.0.0.1 to `target`, for outages on demand: [`cut`]
/// closes every connection through it and refuses new ones until
/// [`resume`]; [`stall`] stops forwarding (connections stay open, bytes
/// wait) until [`resume`].
///
/// [`cut`]: TcpProxy::cut
/// [`stall`]: TcpProxy::stall
/// [`resume`]: TcpProxy::resume
#[derive(Debug, Clone)]
pub struct TcpProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
}

#[derive(Debug)]
struct ProxyState {
    cut: AtomicBool,
    /// Bumped by `cut`: live connections of an older generation close.
    generation: watch::Sender<(u64, bool)>,
}

impl TcpProxy {
    /// Starts a proxy to `target` (a `host:port`).
    pub async fn start(target: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (tx, _) = watch::channel((0u64, false));
        let state = Arc::new(ProxyState {
            cut: AtomicBool::new(false),
            generation: tx,
        });
        let target = target.to_owned();
        let accept_state = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if accept_state.cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut rx = accept_state.generation.subscribe();
                let born = rx.borrow().0;
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    pipe(inbound, outbound, &mut rx, born).await;
                });
            }
        });
        TcpProxy { addr, state }
    }

    /// The proxy's address: give it to the code under test.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let creds = authority
            .rsplit_once('@')
            .map(|(c, _)| format!("{c}@"))
            .unwrap_or_default();
        format!("{scheme}://{creds}{}{path}", self.addr)
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.generation.send_modify(|(g, _)| *g += 1);
    }

    /// Stops forwarding; connections stay open.
    pub fn stall(&self) {
        self.state
            .generation
            .send_modify(|(_, stalled)| *stalled = true);
    }

    /// Forwards again and accepts new connections.
    pub fn resume(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        self.state
            .generation
            .send_modify(|(_, stalled)| *stalled = false);
    }
}

/// Copies both ways until either side closes, the proxy is cut, or —
/// while stalled — holds the bytes.
async fn pipe(
    inbound: TcpStream,
    outbound: TcpStream,
    rx: &mut watch::Receiver<(u64, bool)>,
    born: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ir, mut iw) = inbound.into_split();
    let (mut or, mut ow) = outbound.into_split();
    let mut a = [0u8; 16 * 1024];
    let mut b = [0u8; 16 * 1024];
    loop {
        let (generation, stalled) = *rx.borrow();
        if generation != born {
            return;
        }
        if stalled {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            n = ir.read(&mut a) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if ow.write_all(&a[..n]).await.is_err() { return },
            },
            n = or.read(&mut b) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if iw.write_all(&b[..n]).await.is_err() { return },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_and_rewritten() {
        assert_eq!(host_port("redis://127.0.0.1:6379", 1), "127.0.0.1:6379");
        assert_eq!(host_port("redis://:pw@h:7000/0", 1), "h:7000");
        assert_eq!(host_port("postgres://u@db/test", 5432), "db:5432");
    }

    #[tokio::test]
    async fn the_proxy_forwards_cuts_and_resumes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = TcpProxy::start(&target).await;
        assert!(
            proxy
                .url("redis://:pw@127.0.0.1:6379/0")
                .ends_with(&format!("@{}/0", proxy.addr()))
        );
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        proxy.cut();
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).await.unwrap(), 0, "cut closes");
        proxy.resume();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"ok").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ok");
    }
}
