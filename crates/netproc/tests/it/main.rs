//! Tests of the `netproc` command, against the built binary.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

mod docs;
mod propagation;

fn netproc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netproc"))
        .args(args)
        .output()
        .unwrap()
}

/// Replaces `from` with `to` in the file at `path`, which must contain it.
fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{}: no {from:?}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn demo_exits_zero_and_shows_each_step() {
    let out = netproc(&["demo"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(stdout.contains("add(2, 3) = 5"), "{stdout}");
    assert!(stdout.contains("hello alice, the answer is 42"), "{stdout}");
    assert!(stdout.contains("\"state\":\"ok\""), "{stdout}");
    for code in [
        "tls_error",
        "authentication_failed",
        "insufficient_privileges",
    ] {
        assert!(stdout.contains(code), "{code} missing: {stdout}");
    }
    assert!(
        stdout.contains("success on server_1 and server_2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("server_2: authentication_failed"),
        "{stdout}"
    );
    // The metrics snapshot counts what was refused.
    assert!(
        stdout.contains("TLS handshakes refused 1")
            && stdout.contains("failed 2")
            && stdout.contains("requests refused 1"),
        "{stdout}"
    );
    assert!(stdout.contains("all steps behaved as expected"), "{stdout}");
}

#[test]
fn unknown_command_exits_2_with_usage() {
    let out = netproc(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).to_lowercase().contains("usage"));
}

/// A CA, a server and a client certificate, a key store and a key file in `dir`.
fn setup(dir: &Path) {
    let d = dir.to_str().unwrap();
    assert!(netproc(&["pki", "init", "--out", d]).status.success());
    let out = netproc(&[
        "pki",
        "issue-server",
        "--ca-dir",
        d,
        "--name",
        "server",
        "--san",
        "localhost",
        "--san",
        "127.0.0.1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = netproc(&[
        "pki",
        "issue-client",
        "--ca-dir",
        d,
        "--name",
        "client",
        "--san",
        "uri:spiffe://t/client",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let store = dir.join("keys.json");
    let key = dir.join("client.apikey");
    let out = netproc(&[
        "keys",
        "create",
        "--store",
        store.to_str().unwrap(),
        "--privileges",
        "invoke_functions,define_functions,admin_privileges",
        "--key-out",
        key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn write_configs(dir: &Path, port: u16) {
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(dir.join("metrics.port"), metrics_port.to_string()).unwrap();
    std::fs::write(
        dir.join("server.toml"),
        format!("name = \"s1\"\nbind = \"127.0.0.1:0\"\nkey_store = \"keys.json\"\nmetrics_addr = \"127.0.0.1:{metrics_port}\"\n\n[tls]\ncert = \"server.crt\"\nkey = \"server.key\"\nclient_ca = \"ca.crt\"\n\n[request_controls.per_connection]\nenabled = false\n[request_controls.per_api_key]\nenabled = false\n[request_controls.per_ip]\nenabled = false\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("client.toml"),
        format!("[servers.s1]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\ncert = \"client.crt\"\nkey = \"client.key\"\nca = \"ca.crt\"\napi_key_file = \"client.apikey\"\n"),
    )
    .unwrap();
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `netproc serve` and returns it with its port.
fn serve(dir: &Path) -> (Serve, u16) {
    write_configs(dir, 0);
    let metrics_port = std::fs::read_to_string(dir.join("metrics.port")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_netproc"))
        .args([
            "serve",
            "--config",
            dir.join("server.toml").to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    // Keep the server's metrics port in the rewritten file.
    write_configs(dir, port);
    std::fs::write(dir.join("metrics.port"), metrics_port).unwrap();
    (Serve(child), port)
}

#[test]
fn pki_init_issue_and_inspect_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let out = netproc(&[
        "pki",
        "inspect",
        dir.path().join("client.crt").to_str().unwrap(),
    ]);
    let s = text(&out.stdout);
    assert!(out.status.success());
    assert!(
        s.contains("CN=client") && s.contains("uri:spiffe://t/client") && s.contains("clientAuth"),
        "{s}"
    );
    let fp = text(
        &netproc(&[
            "pki",
            "fingerprint",
            dir.path().join("client.crt").to_str().unwrap(),
        ])
        .stdout,
    );
    assert_eq!(fp.trim().len(), 64);
    assert!(s.contains(fp.trim()));
    // Keys are 0600; overwriting needs --force.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let out = netproc(&["pki", "init", "--out", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("already exists"));
}

#[test]
fn keys_then_serve_then_call_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let (server, _port) = serve(dir.path());
    let client = dir.path().join("client.toml");
    let c = client.to_str().unwrap();
    let out = netproc(&[
        "call",
        "--config",
        c,
        "s1",
        "echo",
        "{\"a\": [1, 2.5, null]}",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"a": [1, 2.5, null]}));
    // A script function, then all_servers.
    let src = dir.path().join("double.rhai");
    std::fs::write(&src, "fn double(x) { x * 2 }").unwrap();
    let out = netproc(&[
        "define",
        "--config",
        c,
        "s1",
        "double",
        "--source",
        src.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A change says what it did, not `null`.
    assert_eq!(text(&out.stdout).trim(), "defined function double on s1");
    let out = netproc(&["call", "--config", c, "all_servers", "double", "21"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"s1": {"state": "ok", "result": 42}}));
    // Errors: non-zero, code on stderr.
    let out = netproc(&["call", "--config", c, "s1", "missing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("function_not_found"));
    // Admin and metrics.
    let out = netproc(&["metrics", "--config", c, "s1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["connection_accepted_count"].as_u64().unwrap() >= 1);
    assert!(
        netproc(&["admin", "--config", c, "s1", "info"])
            .status
            .success()
    );
    // bench prints one parsable JSON line.
    let out = netproc(&[
        "bench",
        "--config",
        c,
        "s1",
        "--duration",
        "1s",
        "--connections",
        "2",
        "--in-flight",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["calls_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["errors"], serde_json::json!({}));

    // An Ed25519 key made by `keys create --ed25519` works where an API key
    // file does. (The server reads the store at start: hence a reload.)
    let ed_file = dir.path().join("client.ed25519");
    let out = netproc(&[
        "keys",
        "create",
        "--store",
        dir.path().join("keys.json").to_str().unwrap(),
        "--ed25519",
        "--key-out",
        ed_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        std::fs::read_to_string(&ed_file)
            .unwrap()
            .starts_with("npe_")
    );
    let ed_client = dir.path().join("client-ed25519.toml");
    std::fs::write(
        &ed_client,
        std::fs::read_to_string(&client)
            .unwrap()
            .replace("client.apikey", "client.ed25519"),
    )
    .unwrap();
    let out = netproc(&["admin", "--config", c, "s1", "reload"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = netproc(&[
        "call",
        "--config",
        ed_client.to_str().unwrap(),
        "s1",
        "echo",
        "\"signed\"",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "\"signed\"");

    // Reload by admin operation, then by SIGHUP.
    let reloads = || {
        let out = netproc(&["metrics", "--config", c, "s1", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["tls_reload_count"].as_u64().unwrap()
    };
    let out = netproc(&["admin", "--config", c, "s1", "reload"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("reloaded TLS files and keys on s1: "),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(reloads(), 2);
    // A changed setting a reload cannot apply is named in the reply.
    let server_toml = dir.path().join("server.toml");
    let before = std::fs::read_to_string(&server_toml).unwrap();
    std::fs::write(
        &server_toml,
        before.replace("name = \"s1\"", "name = \"renamed\""),
    )
    .unwrap();
    let out = netproc(&["admin", "--config", c, "s1", "reload"]);
    std::fs::write(&server_toml, before).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("restart_required: name"),
        "{}",
        text(&out.stdout)
    );
    #[cfg(unix)]
    {
        let pid = server.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        // The signal is handled asynchronously: poll, bounded.
        let mut seen = 0;
        for _ in 0..50 {
            seen = reloads();
            if seen == 4 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(seen, 4, "SIGHUP did not reload");
    }
}

#[test]
fn a_bad_config_exits_2_naming_the_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "name = \"s\"\nbind = \"127.0.0.1:0\"\nkey_store = \"k.json\"\nbindd = 1\n[tls]\ncert = \"a\"\nkey = \"b\"\nclient_ca = \"c\"\n").unwrap();
    let out = netproc(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("line 4") && err.contains("bindd"),
        "{err}"
    );
    // A wrong value type names the field's whole path.
    std::fs::write(&path, "name = \"s\"\nbind = \"127.0.0.1:0\"\nkey_store = \"k.json\"\n[tls]\ncert = \"a\"\nkey = \"b\"\nclient_ca = \"c\"\n[auth_controls]\nblock_duration_ms = \"x\"\n").unwrap();
    let out = netproc(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.toml")
            && err.contains("line 9")
            && err.contains("auth_controls.block_duration_ms"),
        "{err}"
    );
    // An unknown field names its table.
    std::fs::write(&path, "name = \"s\"\nbind = \"127.0.0.1:0\"\nkey_store = \"k.json\"\n[tls]\ncert = \"a\"\nkey = \"b\"\nclient_ca = \"c\"\n[request_controls.per_ip]\nburst = 1\n").unwrap();
    let out = netproc(&["serve", "--config", path.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert!(
        err.contains("request_controls.per_ip: unknown field `burst`"),
        "{err}"
    );
    // An impossible limit names its field.
    std::fs::write(&path, "name = \"s\"\nbind = \"127.0.0.1:0\"\nkey_store = \"k.json\"\n[tls]\ncert = \"a\"\nkey = \"b\"\nclient_ca = \"c\"\n[auth_controls]\nblock_duration_ms = 0\n").unwrap();
    let out = netproc(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("auth_controls.block_duration_ms"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn calling_a_stopped_server_fails_with_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    write_configs(dir.path(), port);
    let out = netproc(&[
        "call",
        "--config",
        dir.path().join("client.toml").to_str().unwrap(),
        "s1",
        "echo",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unavailable"),
        "{}",
        text(&out.stderr)
    );
}

/// Starts `netproc serve` on the test configs with the server file changed
/// by `change` first, and points `client.toml` at it.
fn serve_changed(dir: &Path, change: impl FnOnce(String) -> String) -> (Serve, u16) {
    write_configs(dir, 0);
    let server_toml = dir.join("server.toml");
    let body = std::fs::read_to_string(&server_toml).unwrap();
    std::fs::write(&server_toml, change(body)).unwrap();
    let (server, line) = spawn_reading_line(&["serve", "--config", server_toml.to_str().unwrap()]);
    let port: u16 = line
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    let client = std::fs::read_to_string(dir.join("client.toml")).unwrap();
    std::fs::write(
        dir.join("client.toml"),
        client.replace("127.0.0.1:0\"", &format!("127.0.0.1:{port}\"")),
    )
    .unwrap();
    (server, port)
}

/// The server file without its `[request_controls…]` tables: the
/// server's default request limits.
fn default_limits(body: String) -> String {
    let cut = body.find("[request_controls").unwrap_or(body.len());
    body[..cut].to_owned()
}

/// Starts `netproc <args>` and returns it with the port its first stdout
/// line ends with (or the line).
fn spawn_reading_line(args: &[&str]) -> (Serve, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netproc"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Serve(child), line.trim().to_owned())
}

#[test]
fn every_example_config_parses() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/examples");
    for name in ["netproc.toml", "bench.toml"] {
        netproc::config::ServerFile::load(format!("{dir}/{name}"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for name in ["client.toml", "bench-client.toml"] {
        netproc::config::ClientFile::load(format!("{dir}/{name}"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let authority = netproc::config::AuthorityFile::load(format!("{dir}/authority.toml")).unwrap();
    assert!(authority.targets.contains_key("server_1"));
}

#[test]
fn a_leaf_certificate_as_a_trust_anchor_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    write_configs(dir.path(), 1);
    let server = dir.path().join("server.toml");
    edit(
        &server,
        "client_ca = \"ca.crt\"",
        "client_ca = \"client.crt\"",
    );
    let out = netproc(&["serve", "--config", server.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("tls.client_ca") && err.contains("client.crt") && err.contains("not a CA"),
        "{err}"
    );
    // The client side: `ca` of a server.
    let client = dir.path().join("client.toml");
    edit(&client, "ca = \"ca.crt\"", "ca = \"client.crt\"");
    let out = netproc(&[
        "call",
        "--config",
        client.to_str().unwrap(),
        "s1",
        "echo",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("servers.s1.ca") && err.contains("not a CA"),
        "{err}"
    );
}

/// `netproc … | head -c 1`: a reader that closes the pipe early ends the
/// command quietly with exit 0, never with a panic (exit 101).
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("keys.json");
    let store = store.to_str().unwrap();
    for _ in 0..3 {
        let out = netproc(&["keys", "create", "--store", store]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_netproc"))
        .args(["keys", "list", "--store", store])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the command writes: its first write fails
    // with a broken pipe.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// Missing files are errors naming the field, exit 2: a server over a
/// mistyped key store, `keys list` of a mistyped store, an authority over
/// a mistyped database. Only `keys create` and `creds init` create them.
#[test]
fn missing_files_are_errors_naming_the_field_not_empty_stores() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    write_configs(dir.path(), 1);
    let server_toml = dir.path().join("server.toml");
    edit(
        &server_toml,
        "key_store = \"keys.json\"",
        "key_store = \"nokeys.json\"",
    );
    let out = netproc(&["serve", "--config", server_toml.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("key_store") && err.contains("nokeys.json"),
        "{err}"
    );

    let missing = dir.path().join("nothere").join("keys.json");
    for args in [
        vec!["keys", "list", "--store"],
        vec!["keys", "revoke", "--store"],
        vec!["keys", "rotate", "--store"],
    ] {
        let mut args = args.clone();
        args.push(missing.to_str().unwrap());
        if args[1] != "list" {
            args.push("someid");
        }
        let out = netproc(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("--store"),
            "{}",
            text(&out.stderr)
        );
        assert!(!missing.exists(), "{args:?} created the store");
    }

    let authority = dir.path().join("authority.toml");
    std::fs::write(
        &authority,
        "database = \"authority.db\"\nsigning_key = \"authority.ed25519\"\n",
    )
    .unwrap();
    let a = authority.to_str().unwrap();
    let out = netproc(&["creds", "list", "--config", a]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("database"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.path().join("authority.db").exists());
    // `creds init` creates the signing key and the database; then it works.
    let out = netproc(&["creds", "init", "--config", a]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dir.path().join("authority.db").exists());
    let out = netproc(&["creds", "list", "--config", a]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Client config problems are named: an unset `api_key_env` names the
/// variable (exit 2); an inline `api_key` is warned about on stderr.
#[test]
fn client_key_sources_are_named_and_an_inline_key_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    // A port nothing listens on: the call fails, after the config is read.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!(
        "[servers.s1]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\ncert = \"client.crt\"\nkey = \"client.key\"\nca = \"ca.crt\"\n"
    );
    let env_toml = dir.path().join("env.toml");
    std::fs::write(
        &env_toml,
        format!("{server}api_key_env = \"NETPROC_TEST_UNSET_KEY_VAR\"\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_netproc"))
        .args(["functions", "--config", env_toml.to_str().unwrap(), "s1"])
        .env_remove("NETPROC_TEST_UNSET_KEY_VAR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("api_key_env") && err.contains("NETPROC_TEST_UNSET_KEY_VAR"),
        "{err}"
    );

    // A key that does not match its certificate names both fields and the file.
    let mismatched = dir.path().join("mismatched.toml");
    std::fs::write(
        &mismatched,
        format!("{server}api_key_env = \"PATH\"\n")
            .replace("key = \"client.key\"", "key = \"server.key\""),
    )
    .unwrap();
    let out = netproc(&["functions", "--config", mismatched.to_str().unwrap(), "s1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("servers.s1.cert / servers.s1.key") && err.contains("server.key"),
        "{err}"
    );

    let inline_toml = dir.path().join("inline.toml");
    std::fs::write(
        &inline_toml,
        format!("{server}api_key = \"npk_abcdefghijkl_0123456789abcdefghijABCDEFGHIJ0123\"\n"),
    )
    .unwrap();
    let out = netproc(&["functions", "--config", inline_toml.to_str().unwrap(), "s1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("inline api_key"), "{err}");
    assert!(
        !err.contains("npk_abcdefghijkl"),
        "the key itself is never logged: {err}"
    );
}

/// `keys revoke` against a running `netproc serve`: the server watches its
/// key store, so the revocation takes effect without a reload.
#[test]
fn a_key_revoked_with_the_cli_stops_working_on_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let (_server, _port) = serve(dir.path());
    let client_toml = dir.path().join("client.toml");
    let c = client_toml.to_str().unwrap();
    let call = || {
        netproc(&[
            "call",
            "--config",
            c,
            "s1",
            "echo",
            "\"x\"",
            "--timeout",
            "5s",
            "-v",
        ])
    };
    let out = call();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Arguments as one JSON array: inline, from a file, from stdin.
    let args_file = dir.path().join("args.json");
    std::fs::write(&args_file, "[\"from a file\"]").unwrap();
    let at_file = format!("@{}", args_file.display());
    for (data, want) in [
        ("[\"inline\"]", "inline"),
        (at_file.as_str(), "from a file"),
    ] {
        let out = netproc(&["call", "--config", c, "s1", "echo", "-d", data]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), format!("\"{want}\""));
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_netproc"))
        .args(["call", "--config", c, "s1", "echo", "-d", "@-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"[\"from stdin\"]").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout).trim(), "\"from stdin\"");
    let out = netproc(&["call", "--config", c, "s1", "echo", "-d", "{}"]);
    assert_eq!(out.status.code(), Some(2), "not an array");

    let key = std::fs::read_to_string(dir.path().join("client.apikey")).unwrap();
    let id = key.trim().split('_').nth(1).unwrap().to_owned();
    let store = dir.path().join("keys.json");
    let out = netproc(&["keys", "revoke", "--store", store.to_str().unwrap(), &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("within about a second"),
        "{}",
        text(&out.stdout)
    );

    // Another process changed the file: poll the server (bounded) until the
    // key is refused.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let out = call();
        if !out.status.success() {
            // Refused at authentication — or, when the revocation lands
            // during the call, its session ended as revoked.
            let stderr = text(&out.stderr);
            assert!(
                stderr.contains("authentication") || stderr.contains("credential_revoked"),
                "{stderr}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked key still works"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Bad files named on the command line are usage errors (exit 2) naming the
/// file, in `pki` as in `serve` and `keys`.
#[test]
fn pki_commands_name_bad_files_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(netproc(&["pki", "init", "--out", d]).status.success());
    let key = dir.path().join("ca.key");
    let out = netproc(&["pki", "inspect", key.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("ca.key") && err.contains("no certificate"),
        "{err}"
    );
    let missing = dir.path().join("nothere.crt");
    let out = netproc(&["pki", "fingerprint", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("nothere.crt"));
    let no_ca = dir.path().join("no-ca");
    let out = netproc(&[
        "pki",
        "issue-client",
        "--ca-dir",
        no_ca.to_str().unwrap(),
        "--name",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--ca-dir"),
        "{}",
        text(&out.stderr)
    );
}

/// `bench` counts only successful calls as throughput, reports failures
/// apart, and exits 1 when too many calls fail.
#[test]
fn bench_reports_failures_apart_and_fails_above_the_error_rate() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let (_server, _port) = serve(dir.path());
    let client_toml = dir.path().join("client.toml");
    let c = client_toml.to_str().unwrap();
    let bench = |function: &str| {
        let out = netproc(&[
            "bench",
            "--config",
            c,
            "s1",
            "--function",
            function,
            "--duration",
            "300ms",
            "--connections",
            "1",
            "--in-flight",
            "4",
            "--json",
        ]);
        let line = text(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("{e}: {line} / {}", text(&out.stderr)));
        (out, v)
    };
    let (out, v) = bench("echo");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(v["ok_calls"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["failed_calls"], 0, "{v}");
    assert!(v["calls_per_s"].as_f64().unwrap() > 0.0, "{v}");

    // Every call fails: no throughput, no latency, exit 1.
    let (out, v) = bench("no_such_function");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(v["ok_calls"], 0, "{v}");
    assert_eq!(v["calls_per_s"].as_f64(), Some(0.0), "{v}");
    assert!(v["p50_us"].is_null(), "{v}");
    assert_eq!(v["error_rate"].as_f64(), Some(1.0), "{v}");
    assert!(
        text(&out.stderr).contains("max-error-rate"),
        "{}",
        text(&out.stderr)
    );
}

/// `keys rotate --key-out` writes the new key to the file (as `keys create`
/// does) instead of printing it.
#[test]
fn keys_rotate_writes_the_new_key_to_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("keys.json");
    let file = dir.path().join("svc.apikey");
    let (s, f) = (store.to_str().unwrap(), file.to_str().unwrap());
    let out = netproc(&["keys", "create", "--store", s, "--key-out", f]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let old = std::fs::read_to_string(&file).unwrap();
    let id = old.trim().split('_').nth(1).unwrap().to_owned();
    let out = netproc(&["keys", "rotate", "--store", s, &id, "--key-out", f]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let new = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text(&out.stdout).contains(new.trim()),
        "the key is not printed"
    );
    assert!(
        text(&out.stdout).contains("written to"),
        "{}",
        text(&out.stdout)
    );
    assert_ne!(old, new);
    assert!(new.starts_with(&format!("npk_{id}_")), "{new}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

/// `serve --check` reads the config and every file it names, reports, and
/// exits without binding; a bad file is exit 2 naming the field.
#[test]
fn serve_check_validates_every_file_without_binding() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    write_configs(dir.path(), 1);
    let server_toml = dir.path().join("server.toml");
    let s = server_toml.to_str().unwrap();
    let out = netproc(&["serve", "--config", s, "--check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains(": ok") && report.contains("keys         1"),
        "{report}"
    );
    // A key that does not match the certificate.
    std::fs::copy(dir.path().join("client.key"), dir.path().join("server.key")).unwrap();
    let out = netproc(&["serve", "--config", s, "--check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("tls.cert / tls.key"),
        "{}",
        text(&out.stderr)
    );
}

/// Completion scripts come from the clap model, for the usual shells.
#[test]
fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = netproc(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in [
            "netproc",
            "disconnect-session",
            "issue-client",
            "max-error-rate",
        ] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    let out = netproc(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Without `--config`: `NETPROC_CONFIG`, else the per-user file under
/// `XDG_CONFIG_HOME`, refused when group or others can write it.
#[cfg(unix)]
#[test]
fn the_client_config_defaults_to_netproc_config_then_the_user_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    // A port nothing listens on: reaching the connect step proves the file
    // was found and loaded (exit 1, unavailable), a refused file is exit 2.
    write_configs(dir.path(), 1);
    let xdg = dir.path().join("xdg");
    std::fs::create_dir_all(xdg.join("netproc")).unwrap();
    let user_file = xdg.join("netproc").join("client.toml");
    let body = std::fs::read_to_string(dir.path().join("client.toml"))
        .unwrap()
        .replace("\"client.", &format!("\"{}/client.", dir.path().display()))
        .replace(
            "\"ca.crt\"",
            &format!("\"{}/ca.crt\"", dir.path().display()),
        );
    std::fs::write(&user_file, body).unwrap();
    let run = |netproc_config: Option<&std::path::Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_netproc"));
        cmd.args(["functions", "s1", "--timeout", "2s"])
            .env("XDG_CONFIG_HOME", &xdg)
            .env_remove("NETPROC_CONFIG");
        if let Some(p) = netproc_config {
            cmd.env("NETPROC_CONFIG", p);
        }
        cmd.output().unwrap()
    };
    std::fs::set_permissions(&user_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("unavailable"),
        "{}",
        text(&out.stderr)
    );

    std::fs::set_permissions(&user_file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run(None);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("chmod go-w"),
        "{}",
        text(&out.stderr)
    );

    // NETPROC_CONFIG wins over the user file.
    let out = run(Some(&dir.path().join("client.toml")));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
}

/// `pki crl` and `pki revoke` make the `ca.crl` a server's `tls.crls` names.
#[test]
fn pki_revoke_and_crl_maintain_the_ca_crl() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(netproc(&["pki", "init", "--out", d]).status.success());
    for name in ["c1", "c2"] {
        let out = netproc(&["pki", "issue-client", "--ca-dir", d, "--name", name]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let crl_path = dir.path().join("ca.crl");
    let revoked = || {
        let crl = netproc::pki::Crl::load(&crl_path).unwrap();
        crl.revoked_serials().to_vec()
    };
    let serial = |name: &str| {
        let pem = std::fs::read(dir.path().join(format!("{name}.crt"))).unwrap();
        netproc::pki::CertIdentity::from_pem(&pem, name)
            .unwrap()
            .serial
    };
    let out = netproc(&["pki", "crl", "--ca-dir", d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(revoked().is_empty());
    let c1 = dir.path().join("c1.crt");
    for _ in 0..2 {
        let out = netproc(&["pki", "revoke", "--ca-dir", d, c1.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert_eq!(
        revoked(),
        vec![serial("c1")],
        "revoking twice lists it once"
    );
    let c2 = dir.path().join("c2.crt");
    let out = netproc(&["pki", "revoke", "--ca-dir", d, c2.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut all = revoked();
    all.sort();
    let mut want = vec![serial("c1"), serial("c2")];
    want.sort();
    assert_eq!(all, want);
    // A refresh keeps them.
    let out = netproc(&["pki", "crl", "--ca-dir", d, "--days", "7"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(revoked().len(), 2);
}

/// Prometheus: every series from the start (counters at 0, `_total`
/// names), with `# HELP` and `# TYPE`, and the gauges current.
#[test]
fn prometheus_shows_every_series_from_the_start_with_help_and_type() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let (_server, _port) = serve(dir.path());
    let port: u16 = std::fs::read_to_string(dir.path().join("metrics.port"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let scrape = || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                    .unwrap();
                let mut body = String::new();
                tcp.read_to_string(&mut body).unwrap();
                if body.contains("netproc_active_session_count") {
                    return body;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no metrics at :{port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let body = scrape();
    for line in [
        "# TYPE netproc_auth_failure_total counter",
        "netproc_auth_failure_total 0",
        "# HELP netproc_connection_accepted_total Connections admitted at accept.",
        "# TYPE netproc_active_session_count gauge",
        "# HELP netproc_active_session_count Authenticated sessions now.",
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
    }
}

/// `bench --hold` reports the connections still held at the end, not the
/// ones opened: sessions an administrator ended are not counted.
#[test]
fn bench_hold_counts_only_connections_still_held() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let (_server, _port) = serve(dir.path());
    let client_toml = dir.path().join("client.toml");
    let c = client_toml.to_str().unwrap();
    let hold = |duration: &str| {
        Command::new(env!("CARGO_BIN_EXE_netproc"))
            .args([
                "bench",
                "--config",
                c,
                "s1",
                "--hold",
                "2",
                "--duration",
                duration,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let report = |child: Child| {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["opened"].as_u64().unwrap(), v["held"].as_u64().unwrap())
    };
    assert_eq!(report(hold("200ms")), (2, 2));

    // Open two, then end their sessions while they are held.
    let mut child = hold("2s");
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("holding 2 connections"), "{line}");
    let key = std::fs::read_to_string(dir.path().join("client.apikey")).unwrap();
    let id = key.trim().split('_').nth(1).unwrap().to_owned();
    let out = netproc(&["admin", "--config", c, "s1", "disconnect-principal", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(report(child), (2, 0));
}

/// `--json` everywhere: listings, `pki inspect` (RFC 3339 dates), changes
/// (`{"ok": true, "message": …}`) and errors (`{"error": …}` on stderr).
#[test]
fn json_output_for_listings_changes_inspect_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = netproc(&["pki", "init", "--out", d, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = netproc(&["pki", "inspect", &format!("{d}/ca.crt"), "--json"]);
    let ca: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let not_after = ca["not_after"].as_str().unwrap();
    assert!(
        not_after.len() == 20 && not_after.ends_with('Z') && not_after.as_bytes()[10] == b'T',
        "{ca}"
    );
    assert_eq!(ca["ca"], true);

    let store = dir.path().join("keys.json");
    let s = store.to_str().unwrap();
    let out = netproc(&["keys", "create", "--store", s, "--json"]);
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["ok"], true);
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(created["key"].as_str().unwrap().starts_with("npk_"));
    let out = netproc(&["keys", "list", "--store", s, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    let out = netproc(&["--json", "keys", "revoke", "--store", s, &id]);
    let revoked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (revoked["ok"].clone(), revoked["id"].clone()),
        (true.into(), id.into())
    );

    let out = netproc(&["keys", "list", "--store", "nothere.json", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["error"]["exit_code"], 2);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothere.json"),
        "{err}"
    );
}

/// `address = "localhost:PORT"`: a host name is accepted and resolved at
/// connect time (each resolved address tried in turn); a malformed one is a
/// usage error naming the field.
#[test]
fn a_host_name_address_is_resolved_at_connect() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let (_server, port) = serve(dir.path());
    write_configs(dir.path(), port);
    let client = dir.path().join("client.toml");
    edit(&client, "127.0.0.1:", "localhost:");
    let c = client.to_str().unwrap();
    let out = netproc(&["call", "--config", c, "s1", "echo", "\"by name\""]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "\"by name\"");
    edit(&client, "localhost:", "local host:");
    let out = netproc(&["call", "--config", c, "s1", "echo", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("address"),
        "{}",
        text(&out.stderr)
    );
}

/// `netproc doctor`: all good against a running server (through to
/// `whoami` and the clock), and each problem found with a fix hint: a key
/// file others can read, a server that is not running, a bad server file.
#[test]
fn doctor_checks_a_client_file_through_to_whoami_and_names_problems() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let (server, port) = serve(dir.path());
    write_configs(dir.path(), port);
    let client = dir.path().join("client.toml");
    let c = client.to_str().unwrap();
    let checks = |out: &Output| -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
        v["checks"].as_array().unwrap().clone()
    };
    let find = |checks: &[serde_json::Value], name: &str| {
        checks
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
            .clone()
    };
    let out = netproc(&["doctor", "--config", c, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let all = checks(&out);
    for name in [
        "files",
        "cert and key",
        "validity",
        "chain",
        "address",
        "tcp",
        "tls",
        "auth",
        "privileges",
        "clock",
    ] {
        assert_eq!(find(&all, name)["status"], "ok", "{name}: {all:?}");
    }
    assert!(
        find(&all, "auth")["detail"]
            .as_str()
            .unwrap()
            .contains("authenticated as"),
        "{all:?}"
    );

    // `whoami` on its own.
    let out = netproc(&["whoami", "--config", c, "s1", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let me: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(me["server_name"], "s1");
    assert!(
        me["privileges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "admin_privileges"),
        "{me}"
    );

    // The server side, from its file.
    let out = netproc(&[
        "doctor",
        "--server-config",
        dir.path().join("server.toml").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert_eq!(find(&checks(&out), "key store")["status"], "ok");

    // A stopped server: TCP fails, with a hint; exit 1.
    drop(server);
    let out = netproc(&["doctor", "--config", c, "s1", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let tcp = find(&checks(&out), "tcp");
    assert_eq!(tcp["status"], "fail");
    assert!(tcp["hint"].as_str().unwrap().contains("running"), "{tcp}");

    // A key others can read: named, with the chmod that fixes it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.path().join("client.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = netproc(&["doctor", "--config", c, "--json"]);
        assert_eq!(out.status.code(), Some(1));
        let bad = checks(&out)
            .into_iter()
            .find(|c| c["status"] == "fail")
            .unwrap();
        assert!(
            bad["detail"].as_str().unwrap().contains("servers.s1.key")
                && bad["hint"].as_str().unwrap().starts_with("chmod 600"),
            "{bad}"
        );
    }
    // An unknown server name is bad usage.
    let out = netproc(&["doctor", "--config", c, "nope"]);
    assert_eq!(out.status.code(), Some(2));
}

/// `admin_socket` in the server file and `netproc admin --socket`: admin
/// operations on the server's machine without a certificate or key.
#[cfg(unix)]
#[test]
fn admin_over_the_local_socket_needs_no_certificate_or_key() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let (_server, _port) = serve_changed(dir.path(), |body| {
        body.replace(
            "key_store = ",
            "admin_socket = \"admin.sock\"\nkey_store = ",
        )
    });
    let socket = dir.path().join("admin.sock");
    let s = socket.to_str().unwrap();
    let out = netproc(&["admin", "--socket", s, "info", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["name"], "s1");
    let out = netproc(&["admin", "--socket", s, "reload"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("reloaded TLS files and keys on the admin socket"),
        "{}",
        text(&out.stdout)
    );
    let out = netproc(&["admin", "--socket", s, "unblock", "203.0.113.9"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("nothing to do"),
        "{}",
        text(&out.stdout)
    );
    // A path with no socket: bad usage, with a hint.
    let out = netproc(&[
        "admin",
        "--socket",
        dir.path().join("none.sock").to_str().unwrap(),
        "info",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("admin_socket"),
        "{}",
        text(&out.stderr)
    );
}

/// `bench` warns before the run when the server's request limits will
/// refuse a closed-loop load, prints a progress line a second where there
/// is no terminal, and on Ctrl-C prints the summary of what it did.
#[cfg(unix)]
#[test]
fn bench_warns_about_limits_shows_progress_and_reports_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    // The server's default request limits this time.
    let (_server, _port) = serve_changed(dir.path(), default_limits);
    let client = dir.path().join("client.toml");
    let mut bench = Command::new(env!("CARGO_BIN_EXE_netproc"))
        .args([
            "bench",
            "--config",
            client.to_str().unwrap(),
            "s1",
            "--duration",
            "30s",
            "--connections",
            "1",
            "--in-flight",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(bench.stderr.take().unwrap());
    let mut seen = String::new();
    // The warning, then the first progress line (about a second in).
    while !seen.contains("bench: 1 s of 30 s") {
        let mut l = String::new();
        assert!(
            stderr.read_line(&mut l).unwrap() > 0,
            "stderr ended: {seen}"
        );
        seen.push_str(&l);
    }
    assert!(
        seen.contains("200/s per connection") && seen.contains("rate_limited"),
        "{seen}"
    );
    assert!(
        Command::new("kill")
            .args(["-INT", &bench.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let out = bench.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(rest.contains("interrupted"), "{rest}");
    assert!(
        text(&out.stdout).contains("successful calls in"),
        "{}",
        text(&out.stdout)
    );
}

/// `[shared_limits]` in the server file: a bad setting is a usage error
/// naming the field; a good one connects to Redis (the gauge reads 1).
#[test]
fn shared_limits_from_the_server_file() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    write_configs(dir.path(), 0);
    let server_toml = dir.path().join("server.toml");
    let body = std::fs::read_to_string(&server_toml).unwrap();
    let cut = body.find("[request_controls").unwrap();
    let with = |extra: &str| format!("{}{extra}\n{}", &body[..cut], &body[cut..]);
    std::fs::write(
        &server_toml,
        with("[shared_limits]\nredis_url = \"redis://127.0.0.1:6379\"\nfleet = \"x\"\npassword_env = \"NETPROC_TEST_NO_SUCH_VAR\"\n"),
    )
    .unwrap();
    let out = netproc(&["serve", "--config", server_toml.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("shared_limits.password_env"),
        "{}",
        text(&out.stderr)
    );
    let url =
        std::env::var("NETPROC_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let reachable = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:6379".parse().unwrap(),
        std::time::Duration::from_secs(1),
    )
    .is_ok();
    if !reachable || !url.starts_with("redis://127.0.0.1:6379") {
        assert!(
            std::env::var_os("NETPROC_REQUIRE_SERVICES").is_none()
                || !url.starts_with("redis://127.0.0.1:6379"),
            "Redis is required but not reachable"
        );
        println!(
            "skipped the connected half of shared_limits_from_the_server_file: no Redis at 127.0.0.1:6379"
        );
        return;
    }
    let fleet = format!("cli-{}", std::process::id());
    let (_server, _port) = serve_changed(dir.path(), |body| {
        let cut = body.find("[request_controls").unwrap_or(body.len());
        format!(
            "{}[shared_limits]\nredis_url = \"{url}\"\nfleet = \"{fleet}\"\n\n{}",
            &body[..cut],
            &body[cut..]
        )
    });
    let c = dir.path().join("client.toml");
    let mut connected = false;
    for _ in 0..100 {
        let out = netproc(&["metrics", "--config", c.to_str().unwrap(), "s1", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if v["shared_limits_connected"] == 1 {
            connected = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(connected, "the server never connected to Redis");
    drop(_server);
    // The test's keys go with it (the heartbeat set would expire anyway).
    use std::io::{Read, Write};
    let key = format!("netproc:{fleet}:servers");
    let mut redis = std::net::TcpStream::connect("127.0.0.1:6379").unwrap();
    write!(redis, "*2\r\n$3\r\nDEL\r\n${}\r\n{key}\r\n", key.len()).unwrap();
    let mut reply = [0u8; 8];
    let _ = redis.read(&mut reply).unwrap();
}

/// `proxy_protocol_from` entries are checked: a bad one names the field.
#[test]
fn proxy_protocol_from_names_a_bad_entry() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    write_configs(dir.path(), 0);
    let server_toml = dir.path().join("server.toml");
    edit(
        &server_toml,
        "key_store = ",
        "proxy_protocol_from = [\"10.0.0.0/24\", \"balancer.internal\"]\nkey_store = ",
    );
    let out = netproc(&["serve", "--config", server_toml.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("proxy_protocol_from") && err.contains("balancer.internal"),
        "{err}"
    );
}

/// `database = "postgres://…"` in authority.toml: `creds init` creates the
/// tables (in their own schema here), `creds` works against them, and a
/// schema without them is refused with the way to make them.
#[test]
fn creds_work_against_postgresql() {
    let url = std::env::var("NETPROC_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let reachable = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5432".parse().unwrap(),
        std::time::Duration::from_secs(1),
    )
    .is_ok();
    if !reachable {
        assert!(
            std::env::var_os("NETPROC_REQUIRE_SERVICES").is_none(),
            "PostgreSQL is required but not reachable"
        );
        println!("skipped creds_work_against_postgresql: no PostgreSQL at 127.0.0.1:5432");
        return;
    }
    let schema = format!("np_cli_{}", std::process::id());
    struct Drop_(String, String);
    impl Drop for Drop_ {
        fn drop(&mut self) {
            if let Ok(mut c) = postgres::Client::connect(&self.0, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.1));
            }
        }
    }
    let _drop = Drop_(url.clone(), schema.clone());
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let file = |schema: &str| {
        format!(
            "database = \"{url}\"\ndatabase_schema = \"{schema}\"\nsigning_key = \"authority.ed25519\"\n\n[targets.s1]\naddress = \"127.0.0.1:1\"\nserver_name = \"localhost\"\ncert = \"client.crt\"\nkey = \"client.key\"\nca = \"ca.crt\"\napi_key_file = \"client.apikey\"\n"
        )
    };
    let config = dir.path().join("authority.toml");
    std::fs::write(&config, file(&schema)).unwrap();
    let c = config.to_str().unwrap();
    let out = netproc(&["creds", "init", "--config", c]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = netproc(&[
        "creds",
        "ensure",
        "--config",
        c,
        "billing",
        "--targets",
        "s1",
        "--key-out",
        dir.path().join("billing.key").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = netproc(&["creds", "list", "--config", c, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], "billing", "{list}");
    // PostgreSQL records the database role beside the process.
    let out = netproc(&["creds", "history", "--config", c, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let history: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(history[0]["action"], "create", "{history}");
    assert!(history[0]["db_role"].is_string(), "{history}");
    // No `netproc authority` has run: no lease yet, said plainly.
    let out = netproc(&["creds", "leader", "--config", c, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let leader: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(leader["holder"].is_null(), "{leader}");

    // Least privilege: an operator's role that may only request changes,
    // with a file that has no signing key and no targets.
    let role = format!("{schema}_req");
    struct DropRole(String, String);
    impl Drop for DropRole {
        fn drop(&mut self) {
            if let Ok(mut c) = postgres::Client::connect(&self.0, postgres::NoTls) {
                let _ = c.batch_execute(&format!(
                    "DROP OWNED BY {0}; DROP ROLE IF EXISTS {0}",
                    self.1
                ));
            }
        }
    }
    let _role = DropRole(url.clone(), role.clone());
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {schema} TO {role};
             GRANT EXECUTE ON FUNCTION {schema}.netproc_request(text, text, bytea, text),
               {schema}.netproc_request_outcome(bigint) TO {role};"
        ))
        .unwrap();
    let role_url = url.replacen("postgres@", &format!("{role}@"), 1);
    let operator = dir.path().join("operator.toml");
    std::fs::write(
        &operator,
        format!(
            "database = \"{role_url}\"\ndatabase_schema = \"{schema}\"\nrequest_timeout_ms = 300\n"
        ),
    )
    .unwrap();
    let o = operator.to_str().unwrap();
    let ensure_req = || {
        netproc(&[
            "creds",
            "ensure",
            "--config",
            o,
            "requested",
            "--targets",
            "s1",
            "--key-out",
            dir.path().join("requested.key").to_str().unwrap(),
        ])
    };
    // Nobody applies it yet: exit 1, saying it is queued.
    let out = ensure_req();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("queued"),
        "{}",
        text(&out.stderr)
    );
    // This role cannot deliver.
    let out = netproc(&["creds", "sync", "--config", o]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("only request changes"),
        "{}",
        text(&out.stderr)
    );
    // The authority (its own role) applies the queued request.
    let _authority = spawn_reading_line(&["authority", "--config", c]).0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = netproc(&["creds", "history", "--config", c, "requested", "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(first) = h.as_array().and_then(|a| a.first()) {
            assert_eq!(first["db_role"], role.as_str(), "{h}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the request was never applied"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = netproc(&[
        "creds",
        "rotate",
        "--config",
        o,
        "requested",
        "--key-out",
        dir.path().join("requested.key").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        std::fs::read_to_string(dir.path().join("requested.key"))
            .unwrap()
            .starts_with("npk_requested_")
    );

    // PostgreSQL unreachable: a failure (exit 1) that says so, not a
    // configuration error.
    let down = "database = \"postgres://postgres@127.0.0.1:1/test\"\nsigning_key = \"authority.ed25519\"\n";
    let down_config = dir.path().join("down.toml");
    std::fs::write(&down_config, down).unwrap();
    let out = netproc(&["creds", "list", "--config", down_config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot be reached"),
        "{}",
        text(&out.stderr)
    );
    // A schema without the tables: refused, with the way to make them.
    std::fs::write(&config, file(&format!("{schema}_typo"))).unwrap();
    let out = netproc(&["creds", "list", "--config", c]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("creds init"),
        "{}",
        text(&out.stderr)
    );
}
