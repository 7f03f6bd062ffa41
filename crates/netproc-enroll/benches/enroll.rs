//! Enrollment benchmark: token enrollment latency (new TCP + TLS 1.3 +
//! key generation + CSR + issue + SQLite commit) and renewals per second
//! the service sustains, with the baseline of a bare TLS handshake to the
//! same listener measured in the same run.
//!
//! `cargo bench -p netproc-enroll --bench enroll`
//! (`NETPROC_BENCH_ROUNDS`, default 200 per measure; `NETPROC_BENCH_CONCURRENCY`, default 4).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use netproc_enroll::*;
use netproc_pki::{CaParams, CertificateAuthority};
use netproc_testkit::{cpu_micros, env_or, median};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let rt = netproc_testkit::bench::runtime();
    rt.block_on(async {
        let rounds = env_or("NETPROC_BENCH_ROUNDS", 200);
        let concurrency = env_or("NETPROC_BENCH_CONCURRENCY", 4);
        let dir = tempfile::tempdir().unwrap();
        let root = CertificateAuthority::generate(&CaParams::new("root")).unwrap();
        let online = root.issue_intermediate(&CaParams::new("online")).unwrap();
        let store = TokenStore::open(dir.path().join("enroll.db")).unwrap();
        let mut config = EnrollConfig::new("127.0.0.1:0".parse().unwrap(), vec!["localhost".into()]);
        config.per_ip_per_minute = u32::MAX;
        config.max_connections = 1024;
        let service = EnrollService::start(config, online, root.certificate().clone(), store.clone())
            .await
            .unwrap();
        let server = format!("localhost:{}", service.local_addr().port());
        let fp = service.root_fingerprint();

        // Baseline: a TLS handshake to the listener, nothing sent.
        let tls = Arc::new(netproc_pki::enroll_client_config(&[fp], None).unwrap());
        let mut base = Vec::new();
        for _ in 0..rounds {
            let started = Instant::now();
            let tcp = tokio::net::TcpStream::connect(service.local_addr()).await.unwrap();
            let _s = tokio_rustls::TlsConnector::from(Arc::clone(&tls))
                .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            base.push(started.elapsed());
        }

        // Token enrollment, one at a time.
        let mut tokens = Vec::new();
        for i in 0..rounds {
            tokens.push(store.create(&TokenSpec::new(format!("h{i}"), Profile::Client), SystemTime::now()).await.unwrap());
        }
        let mut lat = Vec::new();
        let mut last = None;
        for (i, t) in tokens.iter().enumerate() {
            let started = Instant::now();
            let e = enroll_with_token(&TokenEnrollment::new(server.clone(), t.as_str(), format!("h{i}"), Profile::Client, fp))
                .await
                .unwrap();
            lat.push(started.elapsed());
            last = Some(e);
        }
        base.sort();
        lat.sort();
        println!(
            "token enrollment (TCP + TLS 1.3 + P-256 key + CSR + issue + commit), {rounds} sequential: p50 {:.2} ms, p90 {:.2} ms; bare TLS handshake p50 {:.2} ms → {:.1}×",
            ms(lat[lat.len() / 2]),
            ms(lat[lat.len() * 9 / 10]),
            ms(base[base.len() / 2]),
            lat[lat.len() / 2].as_secs_f64() / base[base.len() / 2].as_secs_f64(),
        );

        // Renewals per second, `concurrency` at once (same key kept).
        let current = Arc::new(last.unwrap());
        let renewal = Renewal::new(server.clone(), fp);
        let mut rates = Vec::new();
        let mut cpus = Vec::new();
        for _ in 0..3 {
            let cpu = cpu_micros();
            let started = Instant::now();
            let per = rounds / concurrency.max(1);
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let (r, c) = (renewal.clone(), Arc::clone(&current));
                tasks.push(tokio::spawn(async move {
                    for _ in 0..per {
                        renew(&r, &c).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let n = (per * concurrency) as f64;
            rates.push(n / started.elapsed().as_secs_f64());
            cpus.push((cpu_micros() - cpu) as f64 / n);
        }
        println!(
            "renewals/s over mTLS, {concurrency} at once (client and service in one process, 2 threads): median of 3 {:.0}/s @ {:.0} µs CPU per renewal (both sides)",
            median(rates),
            median(cpus),
        );
        service.shutdown().await;
    });
}
