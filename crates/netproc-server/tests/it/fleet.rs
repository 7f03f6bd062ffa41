//! Limits shared by a fleet through a real Redis (`NETPROC_TEST_REDIS_URL`,
//! default `redis://127.0.0.1:6379`; skipped with a line when absent unless
//! `NETPROC_REQUIRE_SERVICES` is set). Each test uses its own fleet name
//! and deletes its keys; outages go through the in-process TCP proxy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use netproc_auth::{ApiKeyStore, KeySpec, PrivilegeSet};
use netproc_client::{Client, ClientError, ServerEndpoint};
use netproc_server::{ServerHandle, ServerOptions, SharedLimits};
use netproc_testkit::{TcpProxy, redis_or_skip};
use netproc_wire::{Privilege, SecretString};
use redis::AsyncCommands;

use crate::support::*;

/// A fleet name no other test uses.
fn fleet_name(test: &str) -> String {
    let mut r = [0u8; 4];
    netproc_pki::random_bytes(&mut r).unwrap();
    format!("t-{test}-{:08x}", u32::from_le_bytes(r))
}

/// Deletes the fleet's keys when dropped (also on a failed assertion).
struct Cleanup {
    url: String,
    fleet: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("netproc:{}:*", self.fleet))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
    }
}

/// What every Redis test starts with: the URL (or a skip), its own fleet
/// name whose keys go at the end, a PKI and a key store with one key that
/// may invoke.
struct Env {
    url: String,
    name: String,
    pki: Pki,
    keys: Arc<ApiKeyStore>,
    info: netproc_auth::KeyInfo,
    key: netproc_auth::ApiKey,
    _cleanup: Cleanup,
}

async fn env(test: &str, tag: &str) -> Option<Env> {
    let url = redis_or_skip(test).await?;
    let name = fleet_name(tag);
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (info, key) = keys
        .create(KeySpec::new(PrivilegeSet::from([
            Privilege::InvokeFunctions,
        ])))
        .unwrap();
    Some(Env {
        _cleanup: Cleanup {
            url: url.clone(),
            fleet: name.clone(),
        },
        url,
        name,
        pki: Pki::new(),
        keys,
        info,
        key,
    })
}

async fn redis_keys(url: &str, pattern: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys: Vec<String> = conn.keys(pattern).await.unwrap();
    keys.sort();
    keys
}

fn options() -> ServerOptions {
    let mut o = unlimited();
    o.auth_controls.enable_blocklist = true;
    o
}

/// `n` servers over one key store and one Redis fleet; returns when every
/// server is connected and has seen the others' heartbeats.
async fn fleet(
    pki: &Pki,
    keys: &Arc<ApiKeyStore>,
    url: &str,
    name: &str,
    n: usize,
    o: &ServerOptions,
) -> Vec<ServerHandle> {
    let mut servers = Vec::new();
    for i in 0..n {
        let server = builder(pki, &format!("s{i}"), Arc::clone(keys))
            .options(o.clone())
            .shared_limits(SharedLimits::new(url, name).heartbeat(Duration::from_millis(100)))
            .start()
            .await
            .unwrap();
        servers.push(server);
    }
    for s in &servers {
        until_connected(s, true).await;
    }
    // Every server has run a heartbeat after the last one started, so each
    // sees N = n.
    tokio::time::sleep(Duration::from_millis(300)).await;
    servers
}

async fn until_connected(server: &ServerHandle, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while (server.abuse_metrics().shared_limits_connected == 1) != want {
        assert!(
            Instant::now() < deadline,
            "shared_limits_connected never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn client_to(pki: &Pki, server: &ServerHandle, key: &SecretString) -> Client {
    let ep = ServerEndpoint::new(
        server.local_addr(),
        "localhost",
        pki.client.identity().unwrap(),
        pki.ca.trust_anchors(),
        key.clone(),
    );
    Client::builder().server("s", ep).build().unwrap()
}

/// Three servers share a per-key budget: a client spreading calls over the
/// three gets the fleet budget (within ε × burst), not three times it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_share_one_per_key_budget() {
    share_one_budget("three_servers_share_one_per_key_budget", |o| {
        &mut o.request_controls.per_api_key
    })
    .await;
}

/// The same for the per-address budget (every client here is 127.0.0.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_share_one_per_address_budget() {
    share_one_budget("three_servers_share_one_per_address_budget", |o| {
        &mut o.request_controls.per_ip
    })
    .await;
}

async fn share_one_budget(
    test: &str,
    bucket: fn(&mut ServerOptions) -> &mut netproc_server::BucketControls,
) {
    let Some(env) = env(test, "budget").await else {
        return;
    };
    let Env {
        url,
        name,
        pki,
        keys,
        info: _,
        key,
        ..
    } = &env;
    let (url, name) = (url.clone(), name.clone());
    let mut o = options();
    let b = bucket(&mut o);
    b.enabled = true;
    b.tokens_per_interval = 100;
    b.interval_ms = 1000;
    b.burst_tokens = 200;
    let servers = fleet(pki, keys, &url, &name, 3, &o).await;
    let secret = key.to_secret();
    let clients: Vec<Client> = servers.iter().map(|s| client_to(pki, s, &secret)).collect();
    for c in &clients {
        c.server("s").unwrap().session().await.unwrap();
    }
    let started = Instant::now();
    let run_for = Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for c in &clients {
        for _ in 0..4 {
            let s = c.server("s").unwrap();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut limited) = (0u64, 0u64);
                while started.elapsed() < run_for {
                    match s.call::<i64>("add", (1, 1)).await {
                        Ok(_) => ok += 1,
                        Err(ClientError::RateLimited { .. }) => {
                            limited += 1;
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
                (ok, limited)
            }));
        }
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        let (o, l) = t.await.unwrap();
        ok += o;
        limited += l;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The bucket allows its burst plus the refill; the fleet may overspend
    // by at most ε × burst (ε = 5 %).
    let allowed = 200.0 + 100.0 * elapsed;
    let bound = 0.05 * 200.0;
    println!(
        "fleet budget: {ok} ok, {limited} rate-limited in {elapsed:.2} s; allowed {allowed:.0} + {bound}"
    );
    assert!(
        (ok as f64) <= allowed + bound,
        "{ok} calls passed; the fleet allows {allowed:.0} + {bound}"
    );
    assert!(
        (ok as f64) >= 0.95 * (200.0 + 100.0 * (elapsed - 0.1)),
        "only {ok} of about {allowed:.0} allowed calls passed"
    );
    assert!(limited > 0, "the load never reached the limit");
}

/// A key blocked by failures on one server is refused on the others;
/// failures spread over the servers add up to one block; made-up key ids
/// never reach Redis; `admin unblock` on one server lifts it everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_on_one_server_holds_on_every_server_and_unblocks_fleet_wide() {
    let Some(env) = env(
        "a_block_on_one_server_holds_on_every_server_and_unblocks_fleet_wide",
        "blocks",
    )
    .await
    else {
        return;
    };
    let Env {
        url,
        name,
        pki,
        keys,
        info,
        key: good,
        ..
    } = &env;
    let (url, name) = (url.clone(), name.clone());
    let mut o = options();
    o.auth_controls.max_failed_auth_per_api_key_per_window = 3;
    o.auth_controls.max_failed_auth_per_ip_per_window = 1000;
    o.auth_controls.block_duration_ms = 60_000;
    let servers = fleet(pki, keys, &url, &name, 3, &o).await;
    let wrong = |id: &str| SecretString::new(format!("npk_{id}_{}", "Z".repeat(32)));
    // One failure on each server: three in the fleet's window.
    for s in &servers {
        let err = client_to(pki, s, &wrong(&info.id))
            .server("s")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::AuthenticationFailed { .. }),
            "{err:?}"
        );
    }
    // Now the right secret is throttled on every server (the block reaches
    // them through Redis: wait at most 5 s).
    let started = Instant::now();
    for s in &servers {
        loop {
            let got = client_to(pki, s, &good.to_secret())
                .server("s")
                .unwrap()
                .call::<i64>("add", (1, 1))
                .await;
            match got {
                Err(ClientError::AuthThrottled { .. }) => break,
                other => {
                    assert!(
                        started.elapsed() < Duration::from_secs(5),
                        "not blocked on every server after 5 s: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    println!("block reached every server in {:?}", started.elapsed());
    // Made-up ids leave no trace in Redis.
    let _ = client_to(pki, &servers[0], &wrong("madeup123456"))
        .server("s")
        .unwrap()
        .call::<i64>("add", (1, 1))
        .await;
    let traces = redis_keys(&url, &format!("netproc:{name}:*madeup*")).await;
    assert!(traces.is_empty(), "{traces:?}");
    // Every netproc key has a TTL.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for k in redis_keys(&url, &format!("netproc:{name}:*")).await {
        let ttl: i64 = conn.pttl(&k).await.unwrap();
        assert!(ttl > 0, "{k} has no TTL ({ttl})");
    }
    // An administrator lifts it on one server: it is lifted everywhere.
    let (_, admin) = keys
        .create(KeySpec::new(PrivilegeSet::from([
            Privilege::AdminPrivileges,
        ])))
        .unwrap();
    let lifted: bool = client_to(pki, &servers[1], &admin.to_secret())
        .server("s")
        .unwrap()
        .execute(netproc_wire::Operation::Unblock {
            entry: info.id.clone(),
        })
        .await
        .map(|v| v == netproc_wire::Value::Bool(true))
        .unwrap();
    assert!(lifted);
    let started = Instant::now();
    for s in &servers {
        loop {
            let got = client_to(pki, s, &good.to_secret())
                .server("s")
                .unwrap()
                .call::<i64>("add", (1, 1))
                .await;
            match got {
                Ok(2) => break,
                other => {
                    assert!(
                        started.elapsed() < Duration::from_secs(5),
                        "still blocked after the unblock: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// Redis cut mid-run: servers keep serving on their fallback share and
/// say so (the gauge reads 0); they return to shared limits when it is
/// back; a server started while it is down starts and converges later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_fall_back_while_redis_is_cut_and_converge_when_it_returns() {
    let Some(env) = env(
        "servers_fall_back_while_redis_is_cut_and_converge_when_it_returns",
        "outage",
    )
    .await
    else {
        return;
    };
    let Env {
        url,
        name,
        pki,
        keys,
        key,
        ..
    } = &env;
    // The proxy stands between the servers and Redis's host:port.
    let authority = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let authority = authority.split('/').next().unwrap_or(authority);
    let target = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let proxy = TcpProxy::start(target).await;
    let via = proxy.url(url);
    let mut o = options();
    o.request_controls.per_api_key.enabled = true;
    o.request_controls.per_api_key.tokens_per_interval = 10_000;
    o.request_controls.per_api_key.burst_tokens = 10_000;
    let servers = fleet(pki, keys, &via, name, 2, &o).await;
    let s0 = client_to(pki, &servers[0], &key.to_secret());
    assert_eq!(
        s0.server("s")
            .unwrap()
            .call::<i64>("add", (1, 1))
            .await
            .unwrap(),
        2
    );

    proxy.cut();
    for s in &servers {
        until_connected(s, false).await;
    }
    for _ in 0..20 {
        assert_eq!(
            s0.server("s")
                .unwrap()
                .call::<i64>("add", (2, 2))
                .await
                .unwrap(),
            4
        );
    }
    assert!(servers[0].abuse_metrics().shared_limits_fallback_count > 0);
    // A server started during the outage starts.
    let late = builder(pki, "late", Arc::clone(keys))
        .options(o.clone())
        .shared_limits(
            SharedLimits::new(via.as_str(), name.as_str()).heartbeat(Duration::from_millis(100)),
        )
        .start()
        .await
        .unwrap();
    let c = client_to(pki, &late, &key.to_secret());
    assert_eq!(
        c.server("s")
            .unwrap()
            .call::<i64>("add", (3, 3))
            .await
            .unwrap(),
        6
    );

    proxy.resume();
    for s in servers.iter().chain([&late]) {
        until_connected(s, true).await;
    }
    assert_eq!(
        c.server("s")
            .unwrap()
            .call::<i64>("add", (4, 4))
            .await
            .unwrap(),
        8
    );
}

/// A foreign value under a netproc key: a warning, and that key is limited
/// on the local fallback share — never unlimited, never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_value_under_a_netproc_key_falls_back_to_local_limits() {
    let capture = crate::auth::audit_capture();
    let Some(env) = env(
        "a_foreign_value_under_a_netproc_key_falls_back_to_local_limits",
        "foreign",
    )
    .await
    else {
        return;
    };
    let Env {
        url,
        name,
        pki,
        keys,
        info,
        key,
        ..
    } = &env;
    let (url, name) = (url.clone(), name.clone());
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = conn
        .set_ex(
            format!("netproc:{name}:bucket:key:{}", info.id),
            "garbage",
            60,
        )
        .await
        .unwrap();
    let mut o = options();
    o.request_controls.per_api_key.enabled = true;
    o.request_controls.per_api_key.tokens_per_interval = 5;
    o.request_controls.per_api_key.interval_ms = 60_000;
    o.request_controls.per_api_key.burst_tokens = 5;
    let servers = fleet(pki, keys, &url, &name, 1, &o).await;
    let c = client_to(pki, &servers[0], &key.to_secret());
    let s = c.server("s").unwrap();
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..40 {
        match s.call::<i64>("add", (1, 1)).await {
            Ok(_) => ok += 1,
            Err(ClientError::RateLimited { .. }) => limited += 1,
            Err(e) => panic!("{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        ok <= 5 + 1,
        "{ok} passed a bucket of 5: the foreign value must not fail open"
    );
    assert!(limited > 0);
    assert!(servers[0].abuse_metrics().shared_limits_fallback_count > 0);
    let log = String::from_utf8_lossy(&capture.lock().unwrap()).into_owned();
    assert!(log.contains("foreign value"), "no warning in the log");
}

/// A PROXY v2 header for TCP over IPv4 from `src`.
fn proxy_header(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0, 12]);
    h.extend(src);
    h.extend([127, 0, 0, 1]);
    h.extend(port.to_be_bytes());
    h.extend(6767u16.to_be_bytes());
    h
}

/// Behind a load balancer: a PROXY v2 header from a trusted address gives
/// the client's address (sessions, per-address limits, blocks see it); a
/// trusted peer without one is closed; from anyone else a header is never
/// read (it only breaks their TLS).
#[tokio::test]
async fn proxy_protocol_v2_from_trusted_balancers_only() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let server = builder(&pki, "s1", Arc::clone(&keys))
        .options(unlimited())
        .proxy_protocol_from(vec!["127.0.0.0/8".parse().unwrap()])
        .start()
        .await
        .unwrap();
    let mut raw = Raw::connect_after(&pki, &server, &proxy_header([203, 0, 113, 7], 5555)).await;
    raw.auth(&key).await;
    let peers: Vec<String> = server.sessions().into_iter().map(|s| s.peer).collect();
    assert_eq!(peers, ["203.0.113.7:5555"]);
    drop(raw);

    // A trusted peer that sends TLS at once (no header) is closed.
    let cfg = netproc_pki::client_config(
        &pki.client.identity().unwrap(),
        &pki.ca.trust_anchors(),
        &[],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let name = netproc_pki::rustls::ServerName::try_from("localhost").unwrap();
    let refused = tokio_rustls::TlsConnector::from(Arc::new(cfg.clone()))
        .connect(name.clone(), tcp)
        .await;
    assert!(
        refused.is_err(),
        "a trusted peer without a header got a handshake"
    );

    // A server that trusts no balancer never reads a header: it is just
    // bytes that break the client's TLS, never a changed address.
    let plain = start(&pki, "s2", Arc::clone(&keys)).await;
    let mut tcp = tokio::net::TcpStream::connect(plain.local_addr())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &proxy_header([198, 51, 100, 1], 1))
        .await
        .unwrap();
    let refused = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await;
    assert!(refused.is_err());
    assert!(plain.sessions().is_empty());
}
