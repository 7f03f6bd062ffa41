//! `netproc ca serve` (the enrollment service) and `netproc enroll` (a new
//! host getting its certificate; making tokens on the service host).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use netproc::config::CaFile;
use netproc::enroll::{EnrollError, Profile, TokenEnrollment, TokenSpec};
use serde_json::json;

use super::creds::unavailable_or_usage;
use super::serve::{Signal, init_logging, wait_for_signal};
use super::{Failure, failed, output, usage};

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Run the enrollment service from a TOML file, until SIGINT or SIGTERM.
    #[command(after_help = "Example: netproc ca serve --config ca.toml")]
    Serve {
        /// The service configuration (ca.toml).
        #[arg(long)]
        config: PathBuf,
    },
}

/// `netproc enroll --server … --token … --ca-fingerprint … --out DIR`, or
/// `netproc enroll token create …` on the service host.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct EnrollArgs {
    #[command(subcommand)]
    command: Option<EnrollCommand>,
    #[command(flatten)]
    request: EnrollRequest,
}

#[derive(Debug, Args)]
struct EnrollRequest {
    /// The enrollment service, `host:port`.
    #[arg(long)]
    server: Option<String>,
    /// The name its certificate is checked for (default: the host part of --server).
    #[arg(long)]
    server_name: Option<String>,
    /// The one-time token (`npe1_…`); `@FILE` reads it from a file.
    #[arg(long)]
    token: Option<String>,
    /// The root certificate's SHA-256 fingerprint, given with the token.
    #[arg(long)]
    ca_fingerprint: Option<String>,
    /// The name the token was made for.
    #[arg(long)]
    name: Option<String>,
    /// client or server.
    #[arg(long, default_value = "client")]
    profile: String,
    /// Where to write key.pem (0600), cert.pem and ca.pem.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also make an Ed25519 key here and have it registered through the
    /// credential authority with what the token grants; written to
    /// ed25519.key (0600), usable as a client file's `api_key_file`.
    #[arg(long)]
    ed25519: bool,
}

#[derive(Debug, Subcommand)]
enum EnrollCommand {
    /// Tokens, made on the service host against its state database.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Renew the certificate in --dir (key.pem, cert.pem, ca.pem) over
    /// mTLS with it; with --daemon, keep it renewed at two thirds of its
    /// lifetime until SIGINT or SIGTERM (a server watching the files
    /// picks each one up).
    #[command(
        after_help = "Example: netproc enroll renew --server ca.example:7443 --ca-fingerprint 3a5f… --dir tls/ --daemon"
    )]
    Renew {
        /// The enrollment service, `host:port`.
        #[arg(long)]
        server: String,
        /// The name its certificate is checked for (default: the host part of --server).
        #[arg(long)]
        server_name: Option<String>,
        /// A root certificate's SHA-256 fingerprint to trust besides the
        /// roots in --dir's ca.pem (which a CA rotation updates).
        #[arg(long)]
        ca_fingerprint: Option<String>,
        /// The directory `netproc enroll --out` wrote.
        #[arg(long)]
        dir: PathBuf,
        /// A new key instead of the current one.
        #[arg(long)]
        rekey: bool,
        /// Keep renewing until SIGINT or SIGTERM.
        #[arg(long)]
        daemon: bool,
        /// With --daemon: serve Prometheus metrics here
        /// (`netproc_cert_expires_in_seconds`, `netproc_renewal_failures_total`).
        #[arg(long, requires = "daemon")]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Write the online intermediate's CRL: every certificate it issued
    /// and `enroll revoke` revoked, until it expires; servers list the file
    /// in `tls.crls` (re-run before --days pass, e.g. from cron).
    #[command(
        after_help = "Example: netproc enroll crl --config ca.toml --out pki/online.crl --days 7"
    )]
    Crl {
        /// The service configuration (ca.toml).
        #[arg(long)]
        config: PathBuf,
        /// Where to write the CRL (PEM; replaced).
        #[arg(long)]
        out: PathBuf,
        /// Days until the CRL's nextUpdate.
        #[arg(long, default_value_t = 7)]
        days: u32,
    },
    /// Mark a certificate this service issued as revoked: it can no longer
    /// renew (deny it fleet-wide with `netproc creds deny-cert` too).
    #[command(after_help = "Example: netproc enroll revoke --config ca.toml tls/cert.pem")]
    Revoke {
        /// The service configuration (ca.toml).
        #[arg(long)]
        config: PathBuf,
        /// The certificate (PEM).
        cert: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a one-time token: printed once with the root's fingerprint
    /// (only its hash is kept).
    #[command(
        after_help = "Example: netproc enroll token create --config ca.toml --name alice --ttl 15m"
    )]
    Create {
        /// The service configuration (ca.toml).
        #[arg(long)]
        config: PathBuf,
        /// The identity's name: 1 to 64 of [a-z0-9._-].
        #[arg(long)]
        name: String,
        /// client or server.
        #[arg(long, default_value = "client")]
        profile: String,
        /// DNS names and IP addresses (server profile; repeat).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Only from this source network (e.g. 10.0.0.0/8).
        #[arg(long)]
        source: Option<String>,
        /// How long the token lasts: 30s, 15m, 2h, 1d.
        #[arg(long, default_value = "15m")]
        ttl: String,
        /// Let the new host register an Ed25519 key (`enroll --ed25519`)
        /// with these comma-separated privileges, through the authority
        /// of ca.toml's `authority`.
        #[arg(long)]
        privileges: Option<String>,
        /// With --privileges: a comma-separated function allow-list.
        #[arg(long, requires = "privileges")]
        functions: Option<String>,
    },
}

pub(crate) async fn ca(cmd: CaCommand) -> Result<(), Failure> {
    let CaCommand::Serve { config } = cmd;
    let file = CaFile::load(&config).map_err(usage)?;
    init_logging(file.log_format);
    if let Some(addr) = file.metrics_addr {
        super::serve::install_metrics(addr)?;
    }
    let root = file.root(&config).map_err(usage)?;
    let online = file.intermediate(&config).map_err(usage)?;
    let store = file.store(&config).await.map_err(unavailable_or_usage)?;
    let mut settings = file.service_config(&config).map_err(usage)?;
    let (authority_file, authority_path) = (file.clone(), config.clone());
    let authority = tokio::task::spawn_blocking(move || authority_file.authority(&authority_path))
        .await
        .map_err(failed)?
        .map_err(unavailable_or_usage)?;
    if let Some((authority, targets)) = authority {
        settings.registrar = Some(CaFile::registrar(authority.clone(), targets));
        // The authority's deny list, refreshed: a certificate denied
        // fleet-wide cannot renew either.
        let deny = settings.deny.clone();
        tokio::spawn(async move {
            loop {
                match authority.denied_certificates().await {
                    Ok(list) => {
                        deny.replace(list.into_iter().map(|(c, until)| (c.to_denied(), until)))
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the authority's deny list"),
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
    }
    let service = netproc::enroll::EnrollService::start(settings, online, root, store)
        .await
        .map_err(|e| usage(format!("{}: {e}", config.display())))?;
    outln!(
        "enrollment service on {}; root fingerprint {}",
        service.local_addr(),
        service.root_fingerprint()
    );
    while let Signal::Reload = wait_for_signal().await {}
    tracing::info!("shutting down");
    service.shutdown().await;
    Ok(())
}

pub(crate) async fn enroll(args: EnrollArgs) -> Result<(), Failure> {
    match args.command {
        Some(EnrollCommand::Token(TokenCommand::Create {
            config,
            name,
            profile,
            sans,
            source,
            ttl,
            privileges,
            functions,
        })) => {
            let file = CaFile::load(&config).map_err(usage)?;
            let profile = parse_profile(&profile)?;
            let mut spec = TokenSpec::new(name.clone(), profile);
            spec.sans = sans;
            spec.source = source;
            let list = |s: &str| {
                s.split(',')
                    .map(|p| p.trim().to_owned())
                    .collect::<Vec<_>>()
            };
            spec.grant = privileges.map(|p| {
                let mut grant = netproc::enroll::KeyGrant::new(list(&p));
                grant.functions = functions.as_deref().map(list);
                grant
            });
            spec.ttl = parse_duration(&ttl).ok_or_else(|| {
                usage(format!("--ttl {ttl:?}: expected a number and s, m, h or d"))
            })?;
            spec.validate().map_err(usage)?;
            let fingerprint = netproc::pki::Fingerprint::of(&file.root(&config).map_err(usage)?);
            let store = file.store(&config).await.map_err(unavailable_or_usage)?;
            let token = store
                .create(&spec, SystemTime::now())
                .await
                .map_err(failed)?;
            if output::json() {
                output::show(&json!({
                    "token": token.as_str(), "name": name, "profile": profile.as_str(),
                    "ca_fingerprint": fingerprint.to_string(), "ttl": ttl,
                }));
            } else {
                eprintln!(
                    "a token for {name} ({}), valid {ttl}, shown once; on the new host: netproc enroll --server HOST:PORT --name {name} --token … --ca-fingerprint {fingerprint} --out DIR",
                    profile.as_str()
                );
                outln!("{}", token.as_str());
                outln!("{fingerprint}");
            }
            Ok(())
        }
        Some(EnrollCommand::Renew {
            server,
            server_name,
            ca_fingerprint,
            dir,
            rekey,
            daemon,
            metrics_addr,
        }) => {
            let current = netproc::enroll::Enrolled::read_from(&dir).map_err(usage)?;
            let root = match ca_fingerprint {
                Some(f) => fingerprint(&f)?,
                None => current.root_fingerprints()[0],
            };
            let mut renewal = netproc::enroll::Renewal::new(server, root);
            renewal.rekey = rekey;
            if let Some(n) = server_name {
                renewal.server_name = n;
            }
            if !daemon {
                let next = netproc::enroll::renew(&renewal, &current)
                    .await
                    .map_err(failed)?;
                next.replace_in(&dir).map_err(failed)?;
                let leaf = next.identity().map_err(failed)?.cert_identity().clone();
                output::done(
                    &format!(
                        "renewed {}: valid until {}",
                        dir.join("cert.pem").display(),
                        super::output::rfc3339_ms(netproc::wire::unix_ms(leaf.not_after))
                    ),
                    json!({"serial": leaf.serial, "not_after": super::output::rfc3339_ms(netproc::wire::unix_ms(leaf.not_after))}),
                );
                return Ok(());
            }
            init_logging(netproc::config::LogFormat::default());
            if let Some(addr) = metrics_addr {
                super::serve::install_metrics(addr)?;
            }
            outln!("keeping {} renewed", dir.join("cert.pem").display());
            let out = dir.clone();
            netproc::enroll::keep_renewed(
                renewal,
                current,
                move |next| match next.replace_in(&out) {
                    Ok(()) => tracing::info!(dir = %out.display(), "certificate renewed"),
                    Err(e) => tracing::error!(error = %e, "cannot write the renewed certificate"),
                },
                async { while let Signal::Reload = wait_for_signal().await {} },
            )
            .await;
            Ok(())
        }
        Some(EnrollCommand::Crl { config, out, days }) => {
            let file = CaFile::load(&config).map_err(usage)?;
            let online = file.intermediate(&config).map_err(usage)?;
            let store = file.store(&config).await.map_err(unavailable_or_usage)?;
            let serials = store
                .revoked_serials(SystemTime::now())
                .await
                .map_err(failed)?;
            let refs: Vec<&str> = serials.iter().map(String::as_str).collect();
            let crl = online.crl(&refs, days.max(1)).map_err(failed)?;
            crl.save(&out, true).map_err(failed)?;
            output::done(
                &format!(
                    "{}: {} revoked certificate(s), signed by the online intermediate, next update in {days} day(s)",
                    out.display(),
                    serials.len()
                ),
                json!({"crl": out, "revoked": serials, "days": days}),
            );
            Ok(())
        }
        Some(EnrollCommand::Revoke { config, cert }) => {
            let file = CaFile::load(&config).map_err(usage)?;
            let pem =
                std::fs::read(&cert).map_err(|e| usage(format!("{}: {e}", cert.display())))?;
            let id = netproc::pki::CertIdentity::from_pem(&pem, &cert.display().to_string())
                .map_err(usage)?;
            let store = file.store(&config).await.map_err(unavailable_or_usage)?;
            let done = store
                .revoke(&id.serial, SystemTime::now())
                .await
                .map_err(failed)?;
            if !done {
                return Err(failed(format!(
                    "serial {} was not issued by this service, or is revoked already",
                    id.serial
                )));
            }
            output::done(
                &format!("revoked serial {}: it cannot renew", id.serial),
                json!({"revoked": id.serial}),
            );
            Ok(())
        }
        None => enroll_with_token(args.request).await,
    }
}

fn fingerprint(text: &str) -> Result<netproc::pki::Fingerprint, Failure> {
    netproc::enroll::parse_fingerprint(text).ok_or_else(|| {
        usage(format!(
            "--ca-fingerprint {text:?}: expected 64 hex digits (colons allowed)"
        ))
    })
}

async fn enroll_with_token(r: EnrollRequest) -> Result<(), Failure> {
    let missing = |flag: &str| {
        usage(format!(
            "netproc enroll needs {flag} (or a subcommand: token, renew, revoke)"
        ))
    };
    let server = r.server.ok_or_else(|| missing("--server"))?;
    let name = r.name.ok_or_else(|| missing("--name"))?;
    let out = r.out.ok_or_else(|| missing("--out"))?;
    let fingerprint = r
        .ca_fingerprint
        .ok_or_else(|| missing("--ca-fingerprint"))?;
    let root = self::fingerprint(&fingerprint)?;
    if out.join("key.pem").exists() {
        return Err(usage(format!(
            "{}: a key is there already; enroll into another directory",
            out.join("key.pem").display()
        )));
    }
    // Without a token: pairing, approved by an operator.
    let Some(token) = r.token else {
        let mut pairing = netproc::enroll::Pairing::new(server, name.clone(), root);
        if let Some(n) = r.server_name {
            pairing.server_name = n;
        }
        return pair(&pairing, &out).await;
    };
    let token = match token.strip_prefix('@') {
        Some(path) => {
            let bytes = netproc::pki::read_secret_file(Path::new(path))
                .map_err(|e| usage(format!("--token @{path}: {e}")))?;
            String::from_utf8_lossy(&bytes).trim().to_owned()
        }
        None => token,
    };
    let profile = parse_profile(&r.profile)?;
    let mut request = TokenEnrollment::new(server, token, name.clone(), profile, root);
    if let Some(n) = r.server_name {
        request.server_name = n;
    }
    request.ed25519 = r.ed25519;
    let enrolled = netproc::enroll::enroll_with_token(&request)
        .await
        .map_err(|e| match e {
            EnrollError::Invalid(_) => usage(e),
            e => failed(e),
        })?;
    written(&enrolled, &name, &out)
}

/// Pairing: the request goes out with this host's key; the operator, told
/// a code and a string, checks the string with whoever runs this and
/// gives the code, typed here.
async fn pair(pairing: &netproc::enroll::Pairing, out: &Path) -> Result<(), Failure> {
    let pending = netproc::enroll::start_pairing(pairing)
        .await
        .map_err(failed)?;
    outln!(
        "pairing request {} sent; check this string with the operator: {}",
        pending.request_id,
        pending.sas
    );
    loop {
        eprint!(
            "the code the operator gives (valid {} s): ",
            pending.expires_in.as_secs()
        );
        // One line from standard input, off the runtime's threads.
        let line = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map(|n| (n > 0).then_some(line))
        })
        .await
        .map_err(failed)?
        .map_err(failed)?;
        let Some(code) = line else {
            return Err(failed("no code given"));
        };
        match pending.complete(&code).await {
            Ok(enrolled) => return written(&enrolled, &pairing.name, out),
            Err(EnrollError::Refused {
                code: netproc::enroll::RefusalCode::WrongCode,
                ..
            }) => eprintln!("not the code of this request; try again"),
            Err(e) => return Err(failed(e)),
        }
    }
}

fn written(enrolled: &netproc::enroll::Enrolled, name: &str, out: &Path) -> Result<(), Failure> {
    enrolled.write_to(out).map_err(failed)?;
    if let Some(k) = &enrolled.ed25519 {
        let text = netproc::config::format_ed25519_credential(&k.key_id, &k.key);
        netproc::pki::write_secret_file(&out.join("ed25519.key"), text.as_bytes(), false)
            .map_err(failed)?;
        eprintln!(
            "Ed25519 key {} registered; {} (0600) is a client file's api_key_file",
            k.key_id,
            out.join("ed25519.key").display()
        );
    }
    let leaf = enrolled.identity().map_err(failed)?.cert_identity().clone();
    output::done(
        &format!(
            "enrolled {name}: {} (key 0600, never sent), cert.pem, ca.pem; valid until {}",
            out.join("key.pem").display(),
            super::output::rfc3339_ms(netproc::wire::unix_ms(leaf.not_after))
        ),
        json!({"name": name, "dir": out, "serial": leaf.serial,
               "not_after": super::output::rfc3339_ms(netproc::wire::unix_ms(leaf.not_after))}),
    );
    Ok(())
}

fn parse_profile(text: &str) -> Result<Profile, Failure> {
    Profile::parse(text).ok_or_else(|| usage(format!("--profile {text:?}: client or server")))
}

fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (n, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("15"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("5y"), None);
    }
}
