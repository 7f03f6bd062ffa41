//! `netproc demo`: in-process and with no setup, what netproc does — a
//! throwaway PKI, two servers kept in step by a credential authority, an API
//! key, calls on one server and on `all_servers`, a script function defined
//! everywhere, refused clients, a revocation reaching every server, and a
//! graceful shutdown.

use std::io::IsTerminal;
use std::time::Duration;

use std::sync::Arc;

use netproc::auth::{ApiKeyStore, CertBinding, KeySpec};
use netproc::client::{Client, ClientError, ServerEndpoint, ServerOutcome};
use netproc::pki::{
    CaParams, CertificateAuthority, Ed25519Key, IssuedCert, LeafParams, TrustAnchors,
};
use netproc::propagation::{
    Authority, AuthorityConfig, CredentialSpec, NetprocTransport, PropagationTarget, TargetConfig,
};
use netproc::server::{CallContext, CallError, Server, ServerHandle};
use netproc::wire::SecretString;

use super::Error;

/// Removes the demo's state directory when the demo ends, however it ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Out {
    color: bool,
    step: u32,
}

impl Out {
    fn step(&mut self, text: &str) {
        self.step += 1;
        if self.color {
            outln!("\x1b[1m[{}]\x1b[0m {text}", self.step);
        } else {
            outln!("[{}] {text}", self.step);
        }
    }

    fn ok(&self, text: &str) {
        let mark = if self.color {
            "\x1b[32m✓\x1b[0m"
        } else {
            "ok"
        };
        outln!("    {mark} {text}");
    }
}

/// A server with its own key store and state directory, receiving
/// credentials from the authority whose public key is `authority_key`;
/// returns it with the key the authority uses there.
async fn start_server(
    name: &str,
    ca: &CertificateAuthority,
    authority_cert: &IssuedCert,
    authority_key: [u8; 32],
    state: &std::path::Path,
) -> Result<(ServerHandle, netproc::auth::ApiKey), Error> {
    let keys = Arc::new(ApiKeyStore::in_memory());
    // The authority's own credential here: receive_credentials, bound to its certificate.
    let (_, for_authority) = keys.create(KeySpec::new("receive_credentials".parse()?).binding(
        CertBinding::Fingerprint(authority_cert.cert_identity().fingerprint),
    ))?;
    let dir = state.join(name);
    std::fs::create_dir_all(&dir)?;
    let db = netproc::server::StateDatabase::open(&dir)?;
    let target = PropagationTarget::open(
        TargetConfig::new(name, vec![authority_key]),
        Arc::clone(&keys),
        &db,
    )?;
    let cert = ca.issue(&LeafParams::server(name, ["localhost", "127.0.0.1"]))?;
    let builder = Server::builder(
        name,
        cert.identity()?,
        ca.trust_anchors(),
        Arc::clone(&keys),
    )
    .state(db);
    let server = target
        .install(builder)
        .function("add", |_: CallContext, (a, b): (i64, i64)| async move {
            a.checked_add(b)
                .ok_or(CallError::invalid_argument("the sum overflows"))
        })
        .function("whoami", |ctx: CallContext, (): ()| async move {
            Ok::<_, CallError>(format!(
                "key {} over certificate CN={}",
                ctx.principal().id,
                ctx.cert().common_name.as_deref().unwrap_or("?")
            ))
        })
        .scripts(netproc::script::ScriptRuntime::builder().workers(2).build())
        .start()
        .await?;
    server.follow_key_store(&keys);
    Ok((server, for_authority))
}

fn endpoint(
    server: &ServerHandle,
    cert: &IssuedCert,
    roots: &TrustAnchors,
    key: SecretString,
) -> Result<ServerEndpoint, Error> {
    Ok(ServerEndpoint::new(
        server.local_addr(),
        "localhost",
        cert.identity()?,
        roots.clone(),
        key,
    )
    .connect_timeout(Duration::from_secs(5))
    .request_timeout(Duration::from_secs(5)))
}

fn expect<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, ClientError>,
    code: &str,
) -> Result<ClientError, Error> {
    match r {
        Err(e) if e.code().as_str() == code => Ok(e),
        other => Err(format!("{what}: expected {code}, got {other:?}").into()),
    }
}

pub(crate) async fn demo() -> Result<(), Error> {
    let mut out = Out {
        color: std::io::stdout().is_terminal(),
        step: 0,
    };
    outln!("netproc demo: secure remote procedure calls over mutual TLS\n");

    out.step("a throwaway private CA, and a client certificate for alice");
    let ca = CertificateAuthority::generate(&CaParams::new("netproc demo CA"))?;
    let alice = ca.issue(&LeafParams::client("alice"))?;
    out.ok(&format!(
        "alice's certificate: sha256 {}",
        alice.cert_identity().fingerprint
    ));

    out.step("two servers on 127.0.0.1, each with its own key store, kept in step by an authority");
    let state = std::env::temp_dir().join(format!("netproc-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state); // a leftover from a killed run
    let _cleanup = RemoveOnDrop(state.clone());
    let signing = Ed25519Key::generate()?;
    let authority_cert = ca.issue(&LeafParams::client("authority"))?;
    let (s1, a1) = start_server(
        "server_1",
        &ca,
        &authority_cert,
        signing.public_key(),
        &state,
    )
    .await?;
    let (s2, a2) = start_server(
        "server_2",
        &ca,
        &authority_cert,
        signing.public_key(),
        &state,
    )
    .await?;
    out.ok(&format!(
        "server_1 on {}, server_2 on {}",
        s1.local_addr(),
        s2.local_addr()
    ));
    let roots = ca.trust_anchors();
    let transport = Client::builder()
        .server(
            "server_1",
            endpoint(&s1, &authority_cert, &roots, a1.to_secret())?,
        )
        .server(
            "server_2",
            endpoint(&s2, &authority_cert, &roots, a2.to_secret())?,
        )
        .build()?;
    let config = AuthorityConfig::new(
        state.join("authority.db"),
        vec!["server_1".into(), "server_2".into()],
    );
    let authority = Authority::open(config, signing, Arc::new(NetprocTransport::new(transport)))?;
    let both = ["server_1", "server_2"];
    let privileges: netproc::auth::PrivilegeSet =
        "invoke_functions,define_constants,define_functions".parse()?;
    let key = authority
        .ensure(CredentialSpec::api_key("alice", privileges), &both)
        .await?
        .api_key
        .ok_or("the authority returned no key")?;
    let weak_key = authority
        .ensure(
            CredentialSpec::api_key(
                "read-only",
                "invoke_functions".parse::<netproc_auth::PrivilegeSet>()?,
            ),
            &both,
        )
        .await?
        .api_key
        .ok_or("the authority returned no key")?;
    let report = authority.sync().await;
    if !report.all_ok() {
        return Err(format!("propagation: {report:?}").into());
    }
    out.ok("API keys for alice (invoke, define) and a read-only one, created by the authority");
    out.ok("delivered to both servers as signed events carrying only each key's hash: success on server_1 and server_2");

    out.step("alice calls add(2, 3) on server_1: TLS 1.3 with her certificate, then her API key");
    let client = Client::builder()
        .server("server_1", endpoint(&s1, &alice, &roots, key.to_secret())?)
        .server("server_2", endpoint(&s2, &alice, &roots, key.to_secret())?)
        .build()?;
    let sum: i64 = client.server("server_1")?.call("add", (2, 3)).await?;
    if sum != 5 {
        return Err(format!("add(2, 3) returned {sum}").into());
    }
    out.ok(&format!("add(2, 3) = {sum}"));
    let who: String = client.server("server_1")?.call("whoami", ()).await?;
    out.ok(&format!("whoami: {who}"));

    out.step(
        "alice defines a constant and calls whoami on all_servers (concurrently, no fail-fast)",
    );
    let defined = client
        .all_servers()
        .define_constant("greeting", "hello")
        .await;
    if defined.values().any(Result::is_err) {
        return Err(format!("define_constant on all_servers: {defined:?}").into());
    }
    out.ok("define_constant(\"greeting\") ok on both servers");
    let all = client.all_servers().call::<String>("whoami", ()).await;
    let json: std::collections::BTreeMap<_, _> = all
        .into_iter()
        .map(|(k, v)| (k, ServerOutcome::from(v)))
        .collect();
    outln!("    {}", serde_json::to_string(&json)?);
    out.step("alice defines a sandboxed script function on all_servers and calls it everywhere");
    let source = "fn greet(name) { `hello ${name}, the answer is ${constant(\"answer\")}` }";
    client.all_servers().define_constant("answer", 42).await;
    let defined = client.all_servers().define_function("greet", source).await;
    if defined.values().any(Result::is_err) {
        return Err(format!("define_function on all_servers: {defined:?}").into());
    }
    let greetings = client
        .all_servers()
        .call::<String>("greet", ("alice",))
        .await;
    for (server, greeting) in &greetings {
        let greeting = greeting.as_ref().map_err(|e| format!("{server}: {e}"))?;
        out.ok(&format!("{server}: {greeting}"));
    }

    out.step("refused: a client whose certificate comes from a rogue CA");
    let rogue_ca = CertificateAuthority::generate(&CaParams::new("rogue CA"))?;
    let mallory = rogue_ca.issue(&LeafParams::client("mallory"))?;
    let rogue = Client::builder()
        .server(
            "server_1",
            endpoint(&s1, &mallory, &roots, key.to_secret())?,
        )
        .build()?;
    let e = expect(
        "rogue certificate",
        rogue.server("server_1")?.call::<i64>("add", (1, 1)).await,
        "tls_error",
    )?;
    out.ok(&format!("{} — {e}", e.code()));

    out.step("refused: a valid certificate with a wrong API key, then a key without the privilege");
    let wrong = Client::builder()
        .server(
            "server_1",
            endpoint(
                &s1,
                &alice,
                &roots,
                SecretString::new("npk_aaaaaaaaaaaa_wrongwrongwrongwrongwrongwrongwr"),
            )?,
        )
        .build()?;
    let e = expect(
        "wrong key",
        wrong.server("server_1")?.call::<i64>("add", (1, 1)).await,
        "authentication_failed",
    )?;
    out.ok(&format!("{} — {e}", e.code()));
    let weak = Client::builder()
        .server(
            "server_1",
            endpoint(&s1, &alice, &roots, weak_key.to_secret())?,
        )
        .server(
            "server_2",
            endpoint(&s2, &alice, &roots, weak_key.to_secret())?,
        )
        .build()?;
    let e = expect(
        "missing privilege",
        weak.server("server_1")?.define_constant("x", 1).await,
        "insufficient_privileges",
    )?;
    out.ok(&format!("{} — {e}", e.code()));

    out.step("the authority revokes the read-only key: every server refuses it from then on");
    let before = weak.all_servers().call::<i64>("add", (1, 1)).await;
    if before.values().any(Result::is_err) {
        return Err(format!("read-only key before revocation: {before:?}").into());
    }
    authority.revoke("read-only").await?;
    if !authority.sync().await.all_ok() {
        return Err("the revocation was not delivered".into());
    }
    // Its open sessions were told GoAway{credential_revoked}; a new
    // connection is refused.
    weak.flush_all();
    for (server, r) in weak.all_servers().call::<i64>("add", (1, 1)).await {
        match r {
            Err(e) if e.code().as_str() == "authentication_failed" => {
                out.ok(&format!("{server}: {}", e.code()));
            }
            other => {
                return Err(
                    format!("revoked key on {server}: expected a refusal, got {other:?}").into(),
                );
            }
        }
    }

    out.step("what server_1's abuse controls counted (netproc metrics / abuse_metrics())");
    let m = s1.abuse_metrics();
    out.ok(&format!(
        "connections accepted {}, TLS handshakes refused {} (the rogue CA)",
        m.connection_accepted_count, m.handshake_failure_count
    ));
    out.ok(&format!(
        "authentications ok {}, failed {} (wrong key, revoked key); sessions open now {}",
        m.auth_success_count, m.auth_failure_count, m.active_session_count
    ));
    out.ok(&format!(
        "requests refused {} (the missing privilege), rate-limited {}, addresses blocked now {}",
        m.request_refused_count,
        m.rate_limited_per_connection_count
            + m.rate_limited_per_api_key_count
            + m.rate_limited_per_ip_count
            + m.rate_limited_in_flight_count
            + m.rate_limited_refusals_count,
        m.blocked_ip_count
    ));

    out.step("graceful shutdown: GoAway to every session, in-flight calls finish");
    s1.shutdown(Duration::from_secs(2)).await;
    s2.shutdown(Duration::from_secs(2)).await;
    let after = client.all_servers().call::<i64>("add", (1, 1)).await;
    if after.values().any(Result::is_ok) {
        return Err("a server still answered after shutdown".into());
    }
    out.ok("both servers stopped; later calls fail with unavailable / shutting_down");

    outln!("\nall steps behaved as expected.");
    outln!("next: cargo test --workspace        the test suite");
    outln!("      netproc pki dev --out DIR     a dev PKI (CA, server, clients, negative cases)");
    outln!("      cargo doc --workspace --open  the API, with runnable examples");
    outln!(
        "also: `netproc serve|call|pki|keys|admin|metrics|bench` (docs/operations.md), `netproc authority|creds` (docs/propagation.md)."
    );
    Ok(())
}
