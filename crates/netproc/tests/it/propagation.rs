//! `netproc creds` and `netproc authority` driving a served server over
//! real TLS: keys created, rotated and revoked at the authority reach it.

use crate::{netproc, setup, spawn_reading_line, text};

#[test]
fn creds_and_authority_propagate_keys_to_a_served_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let p = |f: &str| d.join(f).to_str().unwrap().to_owned();
    // The authority's own key on the server: receive_credentials only.
    let out = netproc(&[
        "keys",
        "create",
        "--store",
        &p("keys.json"),
        "--privileges",
        "receive_credentials",
        "--key-out",
        &p("authority.apikey"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(
        d.join("authority.toml"),
        "database = \"authority.db\"\nsigning_key = \"authority.ed25519\"\n",
    )
    .unwrap();
    let out = netproc(&["creds", "init", "--config", &p("authority.toml")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let public_key = text(&out.stdout).trim().to_owned();
    assert_eq!(public_key.len(), 64);

    std::fs::write(
        d.join("server.toml"),
        format!("name = \"s1\"\nbind = \"127.0.0.1:0\"\nkey_store = \"keys.json\"\nstate_dir = \"state\"\n\n[tls]\ncert = \"server.crt\"\nkey = \"server.key\"\nclient_ca = \"ca.crt\"\n\n[propagation]\nenabled = true\nauthority_public_keys = [\"{public_key}\"]\n"),
    )
    .unwrap();
    let (_server, line) = spawn_reading_line(&["serve", "--config", &p("server.toml")]);
    let port: u16 = line
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    let target = |key: &str| {
        format!(
            "[servers.s1]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\ncert = \"client.crt\"\nkey = \"client.key\"\nca = \"ca.crt\"\napi_key_file = \"{key}\"\n"
        )
    };
    std::fs::write(
        d.join("authority.toml"),
        format!(
            "database = \"authority.db\"\nsigning_key = \"authority.ed25519\"\n\n{}",
            target("authority.apikey").replace("[servers.", "[targets.")
        ),
    )
    .unwrap();
    std::fs::write(d.join("svc.toml"), target("svc.apikey")).unwrap();

    let out = netproc(&[
        "creds",
        "ensure",
        "--config",
        &p("authority.toml"),
        "svc",
        "--key-out",
        &p("svc.apikey"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = netproc(&["creds", "status", "--config", &p("authority.toml"), "svc"]);
    assert!(
        text(&out.stdout).contains("\"pending\""),
        "{}",
        text(&out.stdout)
    );
    let out = netproc(&["creds", "sync", "--config", &p("authority.toml")]);
    assert!(
        out.status.success(),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = netproc(&["creds", "status", "--config", &p("authority.toml"), "svc"]);
    assert!(
        text(&out.stdout).contains("\"success\""),
        "{}",
        text(&out.stdout)
    );
    let out = netproc(&["call", "--config", &p("svc.toml"), "s1", "echo", "\"hi\""]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("hi"));

    // A running authority delivers what `creds` commits.
    let (_authority, line) = spawn_reading_line(&["authority", "--config", &p("authority.toml")]);
    assert!(line.contains(&public_key), "{line}");
    let out = netproc(&["creds", "revoke", "--config", &p("authority.toml"), "svc"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let started = std::time::Instant::now();
    loop {
        let out = netproc(&["call", "--config", &p("svc.toml"), "s1", "echo", "\"hi\""]);
        if !out.status.success() {
            assert_eq!(out.status.code(), Some(1));
            // Refused at authentication, or — if the revocation landed
            // during the call — its session ended.
            let stderr = text(&out.stderr);
            assert!(
                stderr.contains("authentication_failed") || stderr.contains("credential_revoked"),
                "{stderr}"
            );
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the revocation never arrived"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = netproc(&["creds", "targets", "--config", &p("authority.toml")]);
    assert!(
        text(&out.stdout).contains("\"pending_events\": 0"),
        "{}",
        text(&out.stdout)
    );

    // Rotating the authority's signing key: a new key is refused until the
    // server trusts it, which a reload picks up without a restart.
    drop(_authority);
    let first = std::fs::read_to_string(d.join("authority.toml")).unwrap();
    std::fs::write(
        d.join("authority2.toml"),
        first.replace("authority.ed25519", "authority2.ed25519"),
    )
    .unwrap();
    let out = netproc(&["creds", "init", "--config", &p("authority2.toml")]);
    let second_key = text(&out.stdout).trim().to_owned();
    assert_ne!(second_key, public_key);
    let out = netproc(&[
        "creds",
        "ensure",
        "--config",
        &p("authority2.toml"),
        "svc2",
        "--key-out",
        &p("svc2.apikey"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = netproc(&["creds", "sync", "--config", &p("authority2.toml")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("unknown_signer"),
        "{}",
        text(&out.stdout)
    );
    let server_toml = std::fs::read_to_string(d.join("server.toml")).unwrap();
    std::fs::write(
        d.join("server.toml"),
        server_toml.replace(
            &format!("[\"{public_key}\"]"),
            &format!("[\"{public_key}\", \"{second_key}\"]"),
        ),
    )
    .unwrap();
    std::fs::write(d.join("admin.toml"), target("client.apikey")).unwrap();
    let out = netproc(&["admin", "--config", &p("admin.toml"), "s1", "reload"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = netproc(&["creds", "sync", "--config", &p("authority2.toml")]);
    assert!(
        out.status.success(),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    std::fs::write(d.join("svc2.toml"), target("svc2.apikey")).unwrap();
    let out = netproc(&["call", "--config", &p("svc2.toml"), "s1", "echo", "\"hi\""]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
