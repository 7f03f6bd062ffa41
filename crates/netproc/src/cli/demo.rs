//! `netproc demo`: in-process and with no setup, what netproc does — a
//! throwaway PKI, two servers, an API key, calls on one server and on
//! `all_servers`, a script function defined everywhere, refused clients, and
//! a graceful shutdown.

use std::io::IsTerminal;
use std::time::Duration;

use netproc::auth::{ApiKeyStore, KeySpec};
use netproc::client::{Client, ClientError, ServerEndpoint, ServerOutcome};
use netproc::pki::{CaParams, CertificateAuthority, IssuedCert, LeafParams, TrustAnchors};
use netproc::server::{CallContext, CallError, Server, ServerHandle};
use netproc::wire::SecretString;

use super::Error;

struct Out {
    color: bool,
    step: u32,
}

impl Out {
    fn step(&mut self, text: &str) {
        self.step += 1;
        if self.color {
            println!("\x1b[1m[{}]\x1b[0m {text}", self.step);
        } else {
            println!("[{}] {text}", self.step);
        }
    }

    fn ok(&self, text: &str) {
        let mark = if self.color {
            "\x1b[32m✓\x1b[0m"
        } else {
            "ok"
        };
        println!("    {mark} {text}");
    }
}

async fn start_server(
    name: &str,
    ca: &CertificateAuthority,
    keys: std::sync::Arc<ApiKeyStore>,
) -> Result<ServerHandle, Error> {
    let cert = ca.issue(&LeafParams::server(name, ["localhost", "127.0.0.1"]))?;
    let server = Server::builder(name, cert.identity()?, ca.trust_anchors(), keys)
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
    Ok(server)
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
    println!("netproc demo: secure remote procedure calls over mutual TLS\n");

    out.step("a throwaway private CA, and a client certificate for alice");
    let ca = CertificateAuthority::generate(&CaParams::new("netproc demo CA"))?;
    let alice = ca.issue(&LeafParams::client("alice"))?;
    out.ok(&format!(
        "alice's certificate: sha256 {}",
        alice.cert_identity().fingerprint
    ));

    out.step("two servers on 127.0.0.1, sharing an API-key store");
    let keys = std::sync::Arc::new(ApiKeyStore::in_memory());
    let privileges = "invoke_functions,define_constants,define_functions".parse()?;
    let (_, key) = keys.create(KeySpec::new(privileges).label("alice"))?;
    let (_, weak_key) =
        keys.create(KeySpec::new("invoke_functions".parse()?).label("read-only"))?;
    let s1 = start_server("server_1", &ca, std::sync::Arc::clone(&keys)).await?;
    let s2 = start_server("server_2", &ca, std::sync::Arc::clone(&keys)).await?;
    out.ok(&format!(
        "server_1 on {}, server_2 on {}",
        s1.local_addr(),
        s2.local_addr()
    ));
    out.ok("an API key that may invoke and define functions (the store keeps only its hash)");

    out.step("alice calls add(2, 3) on server_1: TLS 1.3 with her certificate, then her API key");
    let roots = ca.trust_anchors();
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
    println!("    {}", serde_json::to_string(&json)?);
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
        .build()?;
    let e = expect(
        "missing privilege",
        weak.server("server_1")?.define_constant("x", 1).await,
        "insufficient_privileges",
    )?;
    out.ok(&format!("{} — {e}", e.code()));

    out.step("graceful shutdown: GoAway to every session, in-flight calls finish");
    s1.shutdown(Duration::from_secs(2)).await;
    s2.shutdown(Duration::from_secs(2)).await;
    let after = client.all_servers().call::<i64>("add", (1, 1)).await;
    if after.values().any(Result::is_ok) {
        return Err("a server still answered after shutdown".into());
    }
    out.ok("both servers stopped; later calls fail with unavailable / shutting_down");

    println!("\nall steps behaved as expected.");
    println!("next: cargo test --workspace        the test suite");
    println!("      cargo xtask pki               a dev PKI in fixtures/pki");
    println!("      cargo doc --workspace --open  the API, with runnable examples");
    println!(
        "also: `netproc serve|call|pki|keys|admin|metrics|bench` (see docs/operations.md); coming next: credential propagation."
    );
    Ok(())
}
