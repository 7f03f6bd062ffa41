//! `netproc doctor`: what is wrong with a client file and the servers it
//! names, or with a server file — each check with a fix hint.
//!
//! Client side, per server: files and their permissions, certificate and
//! key, chain to the configured CA, validity and key usage, address
//! resolution, TCP reach, the TLS handshake and ALPN, authentication, the
//! key's privileges and expiry (`whoami`), clock skew. Server side: the
//! file, TLS material, validity, CRL freshness, the key store, the listen
//! and metrics addresses, propagation settings.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use netproc::client::{ClientError, ServerAddr};
use netproc::config::{ClientFile, ServerFile};
use netproc::pki::{CertIdentity, Identity, KeyPurpose, TrustAnchors};
use netproc::wire::ErrorCode;
use serde::Serialize;

use super::{Failure, load_client_file, output, usage};

/// Certificates and keys that expire sooner than this are warned about.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);
/// Clock skew above this is warned about (Ed25519 proofs allow ±30 s).
const SKEW_WARNING: Duration = Duration::from_secs(5);
const SKEW_LIMIT: Duration = Duration::from_secs(30);
/// How long each network step may take.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    /// The server it is about (client side), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<String>,
    check: &'static str,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

/// The checks made so far.
#[derive(Default)]
struct Report {
    checks: Vec<Check>,
    server: Option<String>,
}

impl Report {
    fn push(&mut self, check: &'static str, status: Status, detail: String, hint: Option<String>) {
        self.checks.push(Check {
            server: self.server.clone(),
            check,
            status,
            detail,
            hint,
        });
    }
    fn ok(&mut self, check: &'static str, detail: impl Into<String>) {
        self.push(check, Status::Ok, detail.into(), None);
    }
    fn warn(&mut self, check: &'static str, detail: impl Into<String>, hint: impl Into<String>) {
        self.push(check, Status::Warn, detail.into(), Some(hint.into()));
    }
    fn fail(&mut self, check: &'static str, detail: impl Into<String>, hint: impl Into<String>) {
        self.push(check, Status::Fail, detail.into(), Some(hint.into()));
    }
    fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    /// Prints the checks; exit 1 when any failed.
    fn finish(self) -> Result<(), Failure> {
        let failed = self.failed();
        let warnings = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Warn)
            .count();
        if output::for_scripts() {
            let j = serde_json::json!({"ok": !failed, "checks": self.checks});
            outln!("{}", serde_json::to_string_pretty(&j).unwrap_or_default());
        } else {
            for c in &self.checks {
                let mark = match c.status {
                    Status::Ok => "ok  ",
                    Status::Warn => "WARN",
                    Status::Fail => "FAIL",
                };
                let server = c
                    .server
                    .as_deref()
                    .map(|s| format!("{s}: "))
                    .unwrap_or_default();
                outln!("{mark}  {server}{:<18} {}", c.check, c.detail);
                if let Some(hint) = &c.hint {
                    outln!("      fix: {hint}");
                }
            }
            let fails = self
                .checks
                .iter()
                .filter(|c| c.status == Status::Fail)
                .count();
            outln!(
                "{} checks: {fails} failed, {warnings} warning(s)",
                self.checks.len()
            );
        }
        if failed {
            Err(Failure::Failed(String::new()))
        } else {
            Ok(())
        }
    }
}

/// `netproc doctor` for a client file: every server in it, or `only`.
pub(crate) async fn client(config: &Path, only: Option<&str>) -> Result<(), Failure> {
    let mut report = Report::default();
    let file = match load_client_file(config) {
        Ok(f) => {
            report.ok("config", format!("{} loads", config.display()));
            f
        }
        Err(Failure::Usage(e) | Failure::Failed(e)) => {
            let hint = if config.exists() {
                "fix the line and field named".to_owned()
            } else {
                "give --config, set NETPROC_CONFIG, or write ~/.config/netproc/client.toml"
                    .to_owned()
            };
            report.fail("config", e, hint);
            return report.finish();
        }
    };
    let names: Vec<String> = match only {
        Some(name) if file.servers.contains_key(name) => vec![name.to_owned()],
        Some(name) => {
            return Err(usage(format!(
                "no server {name:?} in {} (it has: {})",
                config.display(),
                file.servers.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        None => file.servers.keys().cloned().collect(),
    };
    for name in names {
        report.server = Some(name.clone());
        check_server_entry(&mut report, &file, config, &name).await;
    }
    report.finish()
}

/// The checks of one `[servers.<name>]` entry, from its files to a
/// `whoami` over a real session.
async fn check_server_entry(report: &mut Report, file: &ClientFile, config: &Path, name: &str) {
    let s = &file.servers[name];
    let field = |f: &str| format!("servers.{name}.{f}");
    let cert_path = file.path_of(&s.cert);
    let key_path = file.path_of(&s.key);
    let ca_path = file.path_of(&s.ca);
    let mut files_ok = true;
    for (f, path, secret) in [
        ("cert", &cert_path, false),
        ("key", &key_path, true),
        ("ca", &ca_path, false),
    ] {
        files_ok &= check_file(report, &field(f), path, secret);
    }
    if let Some(key_file) = &s.api_key_file {
        files_ok &= check_file(
            report,
            &field("api_key_file"),
            &file.path_of(key_file),
            true,
        );
    }
    if let Some(var) = &s.api_key_env
        && std::env::var_os(var).is_none_or(|v| v.is_empty())
    {
        files_ok = false;
        report.fail(
            "api key",
            format!("{} names {var}, which is not set", field("api_key_env")),
            format!("export {var}=npk_… (the key from `netproc keys create`)"),
        );
    }
    if s.api_key.is_some() {
        report.warn(
            "api key",
            format!("{} is inline in the file", field("api_key")),
            "move it to a 0600 file (api_key_file) or an environment variable (api_key_env)",
        );
    }
    if !files_ok {
        return;
    }
    let identity = match Identity::load(&cert_path, &key_path) {
        Ok(id) => {
            report.ok("cert and key", "the key matches the certificate");
            id
        }
        Err(e) => {
            report.fail(
                "cert and key",
                format!("{} / {}: {e}", field("cert"), field("key")),
                "point cert and key at the two halves of one pair (`netproc pki issue-client` writes NAME.crt and NAME.key)",
            );
            return;
        }
    };
    let roots = match TrustAnchors::load(&ca_path) {
        Ok(r) => r,
        Err(e) => {
            report.fail(
                "ca",
                format!("{}: {e}", field("ca")),
                "the CA certificate (ca.crt), not a leaf",
            );
            return;
        }
    };
    let now = SystemTime::now();
    check_validity(
        report,
        identity.cert_identity(),
        KeyPurpose::ClientAuth,
        now,
    );
    match roots.verify_client(identity.chain(), now) {
        Ok(()) => report.ok("chain", "the certificate chains to the configured CA"),
        Err(e) => report.warn(
            "chain",
            format!(
                "the client certificate does not chain to {}: {e}",
                field("ca")
            ),
            "fine only if the server's client_ca is another CA; otherwise issue it from this CA",
        ),
    }
    let Some(addrs) = resolve(report, &s.address).await else {
        return;
    };
    let Some(tcp) = reach(report, &addrs).await else {
        return;
    };
    if !handshake(report, tcp, &identity, &roots, &s.server_name).await {
        return;
    }
    authenticate(report, file, config, name).await;
}

/// A file named by the configuration exists; a secret one is not
/// readable by group or others.
fn check_file(report: &mut Report, field: &str, path: &Path, secret: bool) -> bool {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            report.fail(
                "files",
                format!("{field}: {}: {e}", path.display()),
                "fix the path (relative paths are from the config file's directory)",
            );
            return false;
        }
    };
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            report.fail(
                "files",
                format!("{field}: {} has mode {mode:o}", path.display()),
                format!("chmod 600 {}", path.display()),
            );
            return false;
        }
    }
    let _ = (meta, secret);
    report.ok("files", format!("{field}: {}", path.display()));
    true
}

/// Validity window, days left and key usage of a certificate.
fn check_validity(report: &mut Report, cert: &CertIdentity, purpose: KeyPurpose, now: SystemTime) {
    let renew = "issue a new one (`netproc pki issue-…`) and reload";
    if now < cert.not_before {
        report.fail(
            "validity",
            format!(
                "not valid before {}; this machine's clock says {}",
                output::rfc3339(cert.not_before),
                output::rfc3339(now)
            ),
            "check this machine's clock, or wait",
        );
    } else {
        match cert.not_after.duration_since(now) {
            Err(_) => report.fail(
                "validity",
                format!("expired at {}", output::rfc3339(cert.not_after)),
                renew,
            ),
            Ok(left) if left < EXPIRY_WARNING => report.warn(
                "validity",
                format!(
                    "expires in {} day(s), at {}",
                    left.as_secs() / 86_400,
                    output::rfc3339(cert.not_after)
                ),
                renew,
            ),
            Ok(left) => report.ok(
                "validity",
                format!(
                    "valid until {} ({} days)",
                    output::rfc3339(cert.not_after),
                    left.as_secs() / 86_400
                ),
            ),
        }
    }
    if cert.key_purposes.is_empty() || cert.key_purposes.contains(&purpose) {
        report.ok("key usage", format!("{purpose} allowed"));
    } else {
        let has: Vec<String> = cert.key_purposes.iter().map(ToString::to_string).collect();
        report.fail(
            "key usage",
            format!(
                "the certificate is for {} only, not {purpose}",
                has.join(", ")
            ),
            "issue the right kind (`pki issue-client` or `pki issue-server`)",
        );
    }
}

async fn resolve(report: &mut Report, addr: &ServerAddr) -> Option<Vec<std::net::SocketAddr>> {
    match tokio::time::timeout(NETWORK_TIMEOUT, addr.resolve()).await {
        Ok(Ok(addrs)) => {
            let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            report.ok("address", format!("{addr} is {}", list.join(", ")));
            Some(addrs)
        }
        Ok(Err(e)) => {
            report.fail(
                "address",
                format!("{addr}: {e}"),
                "check the host name (and /etc/hosts or DNS)",
            );
            None
        }
        Err(_) => {
            report.fail(
                "address",
                format!("{addr}: no answer from the resolver in {NETWORK_TIMEOUT:?}"),
                "check DNS, or use an IP address",
            );
            None
        }
    }
}

async fn reach(
    report: &mut Report,
    addrs: &[std::net::SocketAddr],
) -> Option<tokio::net::TcpStream> {
    let mut errors = Vec::new();
    for addr in addrs {
        match tokio::time::timeout(NETWORK_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                report.ok("tcp", format!("{addr} accepts connections"));
                return Some(tcp);
            }
            Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
            Err(_) => errors.push(format!("{addr}: no answer in {NETWORK_TIMEOUT:?}")),
        }
    }
    report.fail(
        "tcp",
        errors.join("; "),
        "is the server running and listening on that address (its `bind`)? is a firewall in the way?",
    );
    None
}

/// The TLS handshake alone (no authentication), with ALPN, and the
/// server certificate's validity.
async fn handshake(
    report: &mut Report,
    tcp: tokio::net::TcpStream,
    identity: &Identity,
    roots: &TrustAnchors,
    server_name: &str,
) -> bool {
    let config = match netproc::pki::client_config(identity, roots, &[]) {
        Ok(c) => c,
        Err(e) => {
            report.fail("tls", e.to_string(), "check the certificate and key");
            return false;
        }
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(server_name.to_owned()) else {
        report.fail(
            "tls",
            format!("server_name {server_name:?} is not a DNS name or IP address"),
            "set server_name to a name in the server certificate's SANs",
        );
        return false;
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = match tokio::time::timeout(NETWORK_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let text = e.to_string();
            let hint = if text.contains("NotValidForName") || text.contains("not valid for name") {
                format!(
                    "server_name {server_name:?} is not in the server certificate's SANs: fix server_name or re-issue the server certificate"
                )
            } else if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
                "the server's certificate is not from the CA in `ca`: point `ca` at the CA that issued it".to_owned()
            } else if text.contains("eof") || text.contains("reset") {
                "the server closed the connection before the handshake completed: it may have refused this address (blocked after failed logins, or over its connection limits); `netproc admin … blocked` from another host, or wait".to_owned()
            } else {
                "compare the CA and server_name with the server's certificate (`netproc pki inspect`)".to_owned()
            };
            report.fail("tls", text, hint);
            return false;
        }
        Err(_) => {
            report.fail(
                "tls",
                format!("no handshake in {NETWORK_TIMEOUT:?}"),
                "is this a netproc server port?",
            );
            return false;
        }
    };
    let (_, conn) = stream.get_ref();
    match conn.alpn_protocol() {
        Some(p) if p == netproc::wire::ALPN_PROTOCOL => {
            report.ok(
                "tls",
                format!("TLS 1.3 handshake, ALPN {}", String::from_utf8_lossy(p)),
            );
        }
        other => {
            report.fail(
                "tls",
                format!(
                    "ALPN {:?}, not netproc/1",
                    other.map(String::from_utf8_lossy)
                ),
                "this port is not a netproc server",
            );
            return false;
        }
    }
    if let Some(cert) = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|der| CertIdentity::from_der(der).ok())
    {
        let mut sub = Report::default();
        check_validity(&mut sub, &cert, KeyPurpose::ServerAuth, SystemTime::now());
        for c in sub.checks {
            let check = if c.check == "validity" {
                "server cert"
            } else {
                "server key usage"
            };
            report.push(check, c.status, c.detail, c.hint);
        }
    }
    true
}

/// Authenticates with the file's credential and asks `whoami`: the key's
/// privileges and expiry, and the clock skew.
async fn authenticate(report: &mut Report, file: &ClientFile, config: &Path, name: &str) {
    let client = match file.client(config) {
        Ok(c) => c,
        Err(e) => {
            report.fail("credential", e.to_string(), "fix the field named");
            return;
        }
    };
    let Ok(server) = client.server(name) else {
        return;
    };
    let sent = SystemTime::now();
    let me = tokio::time::timeout(NETWORK_TIMEOUT, server.who_am_i()).await;
    let received = SystemTime::now();
    let me = match me {
        Ok(Ok(me)) => me,
        Ok(Err(e)) if e.code() == ErrorCode::InvalidOperation => {
            report.ok("auth", "authenticated");
            report.warn(
                "whoami",
                "the server predates `whoami`: privileges, expiry and clock skew not checked",
                "upgrade the server",
            );
            return;
        }
        Ok(Err(e)) => {
            let hint = auth_hint(&e);
            report.fail("auth", format!("{}: {e}", e.code()), hint);
            return;
        }
        Err(_) => {
            report.fail(
                "auth",
                format!("no answer in {NETWORK_TIMEOUT:?}"),
                "the server may be overloaded; try `netproc admin … info`",
            );
            return;
        }
    };
    report.ok(
        "auth",
        format!(
            "authenticated as {} (session {})",
            me.principal, me.session_id
        ),
    );
    if me.privileges.is_empty() {
        report.warn(
            "privileges",
            "none: this key may only list and ping",
            "`netproc keys create --privileges invoke_functions,…` for a key that can call",
        );
    } else {
        let only = me
            .functions
            .as_ref()
            .map(|f| format!("; only functions {}", f.join(", ")))
            .unwrap_or_default();
        report.ok("privileges", format!("{}{only}", me.privileges.join(", ")));
    }
    if let Some(binding) = &me.cert_binding {
        report.ok("binding", format!("key bound to {binding}"));
    }
    match me.expires_at_ms {
        None => report.ok("key expiry", "the key does not expire"),
        Some(ms) => {
            let at = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
            match at.duration_since(SystemTime::now()) {
                Ok(left) if left < EXPIRY_WARNING => report.warn(
                    "key expiry",
                    format!(
                        "expires in {} day(s), at {}",
                        left.as_secs() / 86_400,
                        output::rfc3339(at)
                    ),
                    "`netproc keys rotate` or a new key before then",
                ),
                _ => report.ok("key expiry", format!("expires at {}", output::rfc3339(at))),
            }
        }
    }
    // The server's clock against the middle of the round trip.
    let mid = sent + received.duration_since(sent).unwrap_or_default() / 2;
    let server_time = SystemTime::UNIX_EPOCH + Duration::from_millis(me.server_time_ms);
    let (skew, ahead) = match server_time.duration_since(mid) {
        Ok(d) => (d, true),
        Err(e) => (e.duration(), false),
    };
    let detail = format!(
        "server clock {} ms {} this one",
        skew.as_millis(),
        if ahead { "ahead of" } else { "behind" }
    );
    let hint = "run NTP (chrony, systemd-timesyncd) on both machines";
    if skew > SKEW_LIMIT {
        report.fail(
            "clock",
            format!("{detail}: Ed25519 proofs and certificate checks will fail"),
            hint,
        );
    } else if skew > SKEW_WARNING {
        report.warn("clock", detail, hint);
    } else {
        report.ok("clock", detail);
    }
}

fn auth_hint(e: &ClientError) -> String {
    match e.code() {
        ErrorCode::AuthenticationFailed => "the key was refused: check it is in the server's key store (`netproc keys list`), not revoked or expired, and not bound to another certificate".to_owned(),
        ErrorCode::AuthThrottled => "this address or key is blocked after failed logins: wait for retry_after, or `netproc admin … unblock` (or the admin socket)".to_owned(),
        ErrorCode::CredentialRevoked => "the credential is revoked: issue a new certificate or key".to_owned(),
        _ => "see the error; `-v` shows more".to_owned(),
    }
}

/// `netproc doctor --server-config FILE`: the server's side.
pub(crate) fn server(config: &Path) -> Result<(), Failure> {
    let mut report = Report::default();
    let file = match ServerFile::load(config) {
        Ok(f) => {
            report.ok("config", format!("{} loads", config.display()));
            f
        }
        Err(e) => {
            report.fail("config", e.to_string(), "fix the line and field named");
            return report.finish();
        }
    };
    let tls = file.watched_files();
    let names = ["tls.cert", "tls.key", "tls.client_ca"];
    let mut files_ok = true;
    for (i, path) in tls.iter().enumerate() {
        let field = names
            .get(i)
            .map_or_else(|| format!("tls.crls[{}]", i - 3), |n| (*n).to_owned());
        files_ok &= check_file(&mut report, &field, path, i == 1);
    }
    let store = file.key_store_path();
    files_ok &= check_file(&mut report, "key_store", &store, true);
    if files_ok {
        match file.tls_material() {
            Ok((identity, _roots, crls)) => {
                report.ok(
                    "cert and key",
                    "the key matches the certificate; CA and CRLs load",
                );
                let now = SystemTime::now();
                check_validity(
                    &mut report,
                    identity.cert_identity(),
                    KeyPurpose::ServerAuth,
                    now,
                );
                for (crl, path) in crls.iter().zip(tls.iter().skip(3)) {
                    check_crl(&mut report, path, crl.next_update(), now);
                }
            }
            Err(e) => report.fail("tls", e, "fix the file named"),
        }
        match file.open_key_store(config) {
            Ok(keys) => {
                let list = keys.list();
                let now_ms = netproc::wire::unix_ms(SystemTime::now());
                let expired = list
                    .iter()
                    .filter(|k| k.expires_at_ms.is_some_and(|e| e <= now_ms))
                    .count();
                let admins = list
                    .iter()
                    .filter(|k| k.privileges.to_string().contains("admin_privileges"))
                    .count();
                report.ok(
                    "key store",
                    format!(
                        "{} key(s), {expired} expired, {admins} with admin_privileges",
                        list.len()
                    ),
                );
                if list.is_empty() {
                    report.warn(
                        "key store",
                        "no keys: every client will be refused",
                        format!("netproc keys create --store {}", store.display()),
                    );
                }
            }
            Err(e) => report.fail("key store", e.to_string(), "fix or recreate the key store"),
        }
    }
    check_bind(&mut report, "bind", file.bind);
    if let Some(addr) = file.metrics_addr {
        check_bind(&mut report, "metrics_addr", addr);
    }
    if let Some(p) = file.propagation.as_ref().filter(|p| p.enabled) {
        match p.public_keys() {
            Ok(keys) if keys.is_empty() => report.fail(
                "propagation",
                "enabled with no authority_public_keys",
                "add the authority's key (`netproc creds init` prints it)",
            ),
            Ok(keys) => report.ok(
                "propagation",
                format!("enabled; {} trusted authority key(s)", keys.len()),
            ),
            Err(e) => report.fail(
                "propagation",
                e,
                "authority_public_keys are 64 hex digits each",
            ),
        }
        if file.state_dir.is_none() {
            report.fail(
                "propagation",
                "no state_dir: applied credentials would not survive a restart",
                "set state_dir",
            );
        }
    }
    report.finish()
}

fn check_crl(report: &mut Report, path: &Path, next_update: Option<SystemTime>, now: SystemTime) {
    let hint = "refresh it (`netproc pki crl --ca-dir …`) and reload";
    match next_update {
        None => report.ok("crl", format!("{}: no nextUpdate", path.display())),
        Some(next) => match next.duration_since(now) {
            Err(_) => report.fail(
                "crl",
                format!("{}: stale since {}", path.display(), output::rfc3339(next)),
                hint,
            ),
            Ok(left) if left < Duration::from_secs(3 * 86_400) => report.warn(
                "crl",
                format!(
                    "{}: next update due {}",
                    path.display(),
                    output::rfc3339(next)
                ),
                hint,
            ),
            Ok(_) => report.ok(
                "crl",
                format!("{}: fresh until {}", path.display(), output::rfc3339(next)),
            ),
        },
    }
}

/// Whether the address can be bound now: in use usually means the
/// server is running, which is worth saying but not a failure.
fn check_bind(report: &mut Report, field: &'static str, addr: std::net::SocketAddr) {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => report.ok(field, format!("{addr} is free to listen on")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => report.warn(
            field,
            format!("{addr} is in use (the server running, or another program)"),
            "if the server is not running, find the program: `ss -ltnp`",
        ),
        Err(e) => report.fail(
            field,
            format!("{addr}: {e}"),
            "use an address of this machine (and a port ≥ 1024 unless privileged)",
        ),
    }
}
