//! `netproc authority` and `netproc creds`: credential propagation.
//!
//! Both open the authority's SQLite database directly. `authority` runs the
//! delivery loop; `creds` commits a change (ensure, rotate, revoke) and
//! returns — a running `authority` picks it up within its poll interval —
//! or delivers now (`sync`), or reads the state (`status`, `targets`,
//! `list`). SQLite in WAL mode lets them share the file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use netproc::auth::{CertBinding, KeySpec, PrivilegeSet};
use netproc::config::AuthorityFile;
use netproc::propagation::{Authority, CertRef, CredentialSpec, DeliveryState};
use serde_json::json;

use super::pki::load_cert;
use super::serve::{Signal, init_logging, wait_for_signal};
use super::{Failure, failed, output, usage};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum CredsCommand {
    /// Create the authority's signing key if missing; print its public key
    /// (for the servers' `propagation.authority_public_keys`).
    #[command(after_help = "Example: netproc creds init --config authority.toml > authority.pub")]
    Init {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Create a server's reply key for deliveries through RabbitMQ (if the
    /// file is missing; mode 0600) and print its public half, for the
    /// authority's `amqp_targets.<name>.reply_public_key`.
    #[command(
        after_help = "Example: netproc creds reply-key --out /etc/netproc/reply.ed25519 > server_2.reply.pub"
    )]
    ReplyKey {
        /// The key file (the server's `propagation.reply_key`).
        #[arg(long)]
        out: PathBuf,
    },
    /// Create or update a credential on a set of targets. A new API key is
    /// printed once (only its hash is kept).
    #[command(
        after_help = "Example: netproc creds ensure --config authority.toml billing --privileges invoke_functions --targets server_1 --key-out billing.key"
    )]
    Ensure {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
        /// The key id: 1 to 64 of [a-z0-9-].
        id: String,
        /// Comma-separated privileges.
        #[arg(long, default_value = "invoke_functions")]
        privileges: String,
        /// Comma-separated target names (all of the file's targets when absent).
        #[arg(long)]
        targets: Option<String>,
        /// Comma-separated function allow-list.
        #[arg(long)]
        functions: Option<String>,
        /// Bind the key to this certificate (PEM file).
        #[arg(long)]
        bind_cert: Option<PathBuf>,
        /// Bind the key to a SAN, a certificate fingerprint or a key (dns:…, uri:…, sha256:…, spki:…).
        #[arg(long)]
        bind: Option<String>,
        /// Expire after this many days.
        #[arg(long)]
        expires_days: Option<u64>,
        /// An Ed25519 credential with this public key (64 hex digits)
        /// instead of an API key.
        #[arg(long)]
        ed25519_public_key: Option<String>,
        /// Write a new key to this file (mode 0600) instead of printing it.
        #[arg(long)]
        key_out: Option<PathBuf>,
        /// Bring back an id that was revoked (refused without it).
        #[arg(long)]
        recreate: bool,
    },
    /// Give an API key a new secret, printed once.
    #[command(
        after_help = "Example: netproc creds rotate --config authority.toml billing --overlap-secs 300 --key-out billing.key.new"
    )]
    Rotate {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
        /// The credential's id.
        id: String,
        /// Keep the old secret working this many seconds after the rotation.
        #[arg(long)]
        overlap_secs: Option<u64>,
        /// Write the new key to this file (mode 0600) instead of printing it.
        #[arg(long)]
        key_out: Option<PathBuf>,
    },
    /// Remove a credential from every target.
    #[command(after_help = "Example: netproc creds revoke --config authority.toml billing")]
    Revoke {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
        /// The credential's id.
        id: String,
    },
    /// Where a credential stands on each target; without an id, the
    /// authority's health: which process leads (since when, in which
    /// epoch) and every target's delivery state.
    #[command(after_help = "Example: netproc creds status --config authority.toml billing")]
    Status {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
        /// The credential's id (none: the authority's health).
        id: Option<String>,
    },
    /// Deliver everything pending now; exit 1 if a target failed.
    #[command(after_help = "Example: netproc creds sync --config authority.toml")]
    Sync {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Every target's delivery state (JSON).
    #[command(after_help = "Example: netproc creds targets --config authority.toml")]
    Targets {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Which authority process delivers (PostgreSQL: the lease's holder,
    /// epoch, since and until when; SQLite: one process, no lease).
    #[command(after_help = "Example: netproc creds leader --config authority.toml")]
    Leader {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Every credential, without secrets (JSON).
    #[command(after_help = "Example: netproc creds list --config authority.toml")]
    List {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Refuse a client certificate on every server (at the handshake; its
    /// live sessions end with credential_revoked), until its notAfter.
    #[command(
        after_help = "Example: netproc creds deny-cert --config authority.toml --cert stolen-laptop.crt"
    )]
    DenyCert {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        which: CertSelector,
        /// Without --cert: days the entry lasts (the certificate's remaining
        /// lifetime, at most).
        #[arg(long, default_value_t = 90)]
        days: u64,
    },
    /// Stop refusing a certificate denied with deny-cert.
    #[command(
        after_help = "Example: netproc creds allow-cert --config authority.toml --cert stolen-laptop.crt"
    )]
    AllowCert {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        which: CertSelector,
    },
    /// Who made the latest changes, newest first: the process, and on
    /// PostgreSQL the database role.
    #[command(
        after_help = "Example: netproc creds history --config authority.toml billing --limit 20"
    )]
    History {
        /// The authority configuration (authority.toml).
        #[arg(long)]
        config: PathBuf,
        /// Only this credential's changes.
        id: Option<String>,
        /// At most this many changes.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// Which certificate `deny-cert` / `allow-cert` mean.
#[derive(Debug, clap::Args)]
pub(crate) struct CertSelector {
    /// The certificate (PEM): denied by its issuer and serial and by its
    /// key, until its notAfter.
    #[arg(long, conflicts_with_all = ["serial", "issuer", "spki"])]
    cert: Option<PathBuf>,
    /// Its serial (hex), with --issuer.
    #[arg(long, requires = "issuer", conflicts_with = "spki")]
    serial: Option<String>,
    /// Its issuer's distinguished name as `netproc pki inspect` prints it
    /// (e.g. "CN=example CA"), with --serial.
    #[arg(long, requires = "serial")]
    issuer: Option<String>,
    /// The SHA-256 of its public key (64 hex digits): every certificate
    /// over that key.
    #[arg(long)]
    spki: Option<String>,
}

impl CertSelector {
    /// The entries meant, and the certificate's expiry when a file was given.
    fn entries(&self) -> Result<(Vec<CertRef>, Option<SystemTime>), Failure> {
        if let Some(file) = &self.cert {
            let cert = load_cert(file)?;
            let [serial, key] = netproc::pki::DeniedCert::of(&cert);
            return Ok((
                vec![CertRef::from_denied(&serial), CertRef::from_denied(&key)],
                Some(cert.not_after),
            ));
        }
        if let (Some(serial), Some(issuer)) = (&self.serial, &self.issuer) {
            let serial = serial.trim_start_matches("0x").to_ascii_lowercase();
            if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(usage("--serial: expected hex digits"));
            }
            return Ok((
                vec![CertRef::Serial {
                    issuer: issuer.clone(),
                    serial,
                }],
                None,
            ));
        }
        if let Some(spki) = &self.spki {
            let fp: netproc::pki::Fingerprint = spki
                .parse()
                .map_err(|_| usage("--spki: expected 64 hex digits"))?;
            return Ok((vec![CertRef::Spki(*fp.as_bytes())], None));
        }
        Err(usage(
            "give --cert FILE, --serial HEX --issuer DN, or --spki HEX",
        ))
    }
}

/// A database that is down is a failure (exit 1), not bad usage: the file
/// is fine and a retry later may work.
pub(crate) fn unavailable_or_usage(e: netproc::config::ConfigError) -> Failure {
    match e {
        netproc::config::ConfigError::Unavailable { .. } => failed(e),
        e => usage(e),
    }
}

/// Which process delivers, as `creds leader` and `creds status` show it.
async fn leader_json(authority: &Authority) -> Result<serde_json::Value, Failure> {
    let leader = authority.leader().await.map_err(failed)?;
    Ok(match leader {
        Some(l) => json!({
            "holder": l.holder,
            "epoch": l.epoch,
            "since": super::output::rfc3339_ms(l.since_ms),
            "until": super::output::rfc3339_ms(l.expires_ms),
            "live": l.expires_ms > netproc::wire::unix_ms(std::time::SystemTime::now()),
        }),
        None => {
            json!({"holder": null, "note": "no delivery lease: SQLite (one delivering process), or no `netproc authority` has run yet"})
        }
    })
}

/// Every target's delivery state, as `creds targets` and `creds status`
/// show it.
async fn targets_json(
    file: &AuthorityFile,
    authority: &Authority,
) -> Result<serde_json::Value, Failure> {
    let out: Vec<_> = authority
        .targets()
        .await
        .map_err(failed)?
        .into_iter()
        .map(|t| {
            json!({
                "name": t.name, "transport": file.transport_of(&t.name), "acked_seq": t.acked_seq, "last_seq": t.last_seq,
                "pending_events": t.pending_events, "snapshot_needed": t.snapshot_needed,
                "attempts": t.attempts, "last_error": t.last_error,
            })
        })
        .collect();
    Ok(json!(out))
}

/// Denying the certificate the authority delivers with would cut it off
/// from the fleet (the deny event ends its own session): refused.
fn refuse_own_certificate(file: &AuthorityFile, entries: &[CertRef]) -> Result<(), Failure> {
    for (name, path) in file.target_cert_paths() {
        let Ok(own) = load_cert(&path) else {
            continue;
        };
        if entries.iter().any(|e| e.to_denied().matches(&own)) {
            return Err(usage(format!(
                "that is the certificate the authority delivers with (targets.{name}.cert, {}): denying it would cut the authority off from the fleet; give the authority a new certificate first",
                path.display()
            )));
        }
    }
    Ok(())
}

/// `pki revoke --authority`: denies `cert` (by serial and by key, until
/// its notAfter) through the authority in `config`.
pub(crate) async fn deny_cert_file(config: &Path, cert: &Path) -> Result<(), Failure> {
    let which = CertSelector {
        cert: Some(cert.to_owned()),
        serial: None,
        issuer: None,
        spki: None,
    };
    let (entries, not_after) = which.entries()?;
    let until = not_after.unwrap_or_else(SystemTime::now);
    let (file, authority) = open(config)?;
    refuse_own_certificate(&file, &entries)?;
    for e in &entries {
        authority
            .deny_certificate(e.clone(), until)
            .await
            .map_err(failed)?;
    }
    eprintln!(
        "denied on every target through {} until {}",
        config.display(),
        super::output::rfc3339_ms(netproc::wire::unix_ms(until))
    );
    Ok(())
}

/// Delivering needs the authority's own role: a role that may only request
/// changes (PostgreSQL) cannot hold the lease or write the outbox.
fn refuse_requests_only(authority: &Authority, what: &str) -> Result<(), Failure> {
    match authority.requests_only() {
        true => Err(usage(format!(
            "{what}: this database role may only request changes; deliver with the authority's own role"
        ))),
        false => Ok(()),
    }
}

fn open(config: &Path) -> Result<(AuthorityFile, Authority), Failure> {
    let file = AuthorityFile::load(config).map_err(usage)?;
    let authority = file.authority(config).map_err(unavailable_or_usage)?;
    Ok((file, authority))
}

fn hand_out(id: &str, key: &str, key_out: Option<&Path>, what: &str) -> Result<(), Failure> {
    if let Some(path) = key_out {
        netproc::pki::write_secret_file(path, key.as_bytes(), false).map_err(failed)?;
        eprintln!("{what} {id}; written to {} (0600)", path.display());
    } else {
        eprintln!("{what} {id}; the key is shown once:");
        outln!("{key}");
    }
    Ok(())
}

fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `netproc authority --config FILE`: deliver until SIGINT or SIGTERM.
pub(crate) async fn authority(config: &Path) -> Result<(), Failure> {
    let file = AuthorityFile::load(config).map_err(usage)?;
    init_logging(file.log_format);
    let authority = file.authority(config).map_err(unavailable_or_usage)?;
    refuse_requests_only(&authority, "netproc authority")?;
    outln!(
        "authority for {} target(s); public key {}",
        file.target_names().len(),
        hex::encode(authority.public_key())
    );
    authority
        .run(async { while let Signal::Reload = wait_for_signal().await {} })
        .await;
    tracing::info!("authority stopped");
    Ok(())
}

pub(crate) async fn creds(cmd: CredsCommand) -> Result<(), Failure> {
    match cmd {
        CredsCommand::ReplyKey { out } => {
            if !out.exists() {
                let key = netproc::pki::Ed25519Key::generate().map_err(failed)?;
                let seed = zeroize::Zeroizing::new(hex::encode(key.seed()));
                netproc::pki::write_secret_file(&out, seed.as_bytes(), false).map_err(failed)?;
            }
            let key = netproc::config::read_reply_key(&out).map_err(failed)?;
            eprintln!(
                "reply key in {} (mode 0600); put this public key in the authority's amqp_targets.<name>.reply_public_key:",
                out.display()
            );
            outln!("{}", hex::encode(key.public_key()));
        }
        CredsCommand::Init { config } => {
            let file = AuthorityFile::load(&config).map_err(usage)?;
            let public = file.init_signing_key().map_err(failed)?;
            // Blocking: SQLite.
            let init = file.clone();
            let path = config.clone();
            tokio::task::spawn_blocking(move || init.init_database(&path))
                .await
                .map_err(failed)?
                .map_err(usage)?;
            eprintln!(
                "signing key in {}; put this public key in each server's propagation.authority_public_keys:",
                file.signing_key_path().unwrap_or_default().display()
            );
            outln!("{public}");
        }
        CredsCommand::Ensure {
            config,
            id,
            privileges,
            targets,
            functions,
            bind_cert,
            bind,
            expires_days,
            ed25519_public_key,
            key_out,
            recreate,
        } => {
            let (file, authority) = open(&config)?;
            let privileges: PrivilegeSet = privileges.parse().map_err(usage)?;
            let mut key = KeySpec::new(privileges);
            match (bind_cert, bind) {
                (Some(f), None) => {
                    key = key.binding(CertBinding::Fingerprint(load_cert(&f)?.fingerprint));
                }
                (None, Some(b)) => key = key.binding(b.parse().map_err(usage)?),
                (None, None) => {}
                _ => return Err(usage("give --bind-cert or --bind, not both")),
            }
            if let Some(days) = expires_days {
                key = key.expires_at(SystemTime::now() + Duration::from_secs(days * 86_400));
            }
            if let Some(f) = functions {
                key = key.functions(list(&f));
            }
            let spec = match ed25519_public_key {
                Some(pk) => {
                    let pk: netproc::pki::Fingerprint = pk
                        .parse()
                        .map_err(|_| usage("--ed25519-public-key: expected 64 hex digits"))?;
                    CredentialSpec::ed25519(&id, *pk.as_bytes(), key)
                }
                None => CredentialSpec::api_key(&id, key),
            }
            .recreate(recreate);
            let targets = targets.map_or_else(|| file.target_names(), |t| list(&t));
            let names: Vec<&str> = targets.iter().map(String::as_str).collect();
            let ensured = authority.ensure(spec, &names).await.map_err(failed)?;
            match ensured.api_key {
                Some(key) => hand_out(&id, key.expose(), key_out.as_deref(), "created")?,
                None => eprintln!(
                    "{id}: {}",
                    if ensured.changed {
                        "updated"
                    } else {
                        "unchanged"
                    }
                ),
            }
        }
        CredsCommand::Rotate {
            config,
            id,
            overlap_secs,
            key_out,
        } => {
            let (_, authority) = open(&config)?;
            let key = authority
                .rotate(&id, overlap_secs.map(Duration::from_secs))
                .await
                .map_err(failed)?;
            hand_out(&id, key.expose(), key_out.as_deref(), "rotated")?;
        }
        CredsCommand::Revoke { config, id } => {
            let (_, authority) = open(&config)?;
            authority.revoke(&id).await.map_err(failed)?;
            eprintln!("revoked {id}; it is removed from each target as it is delivered");
        }
        CredsCommand::Status { config, id: None } => {
            let (file, authority) = open(&config)?;
            let leader = leader_json(&authority).await?;
            let targets = targets_json(&file, &authority).await?;
            let denied: Vec<_> = authority
                .denied_certificates()
                .await
                .map_err(failed)?
                .into_iter()
                .map(|(c, until)| {
                    json!({"cert": c.label(), "until": super::output::rfc3339_ms(netproc::wire::unix_ms(until))})
                })
                .collect();
            output::show(
                &json!({"leader": leader, "targets": targets, "denied_certificates": denied}),
            );
        }
        CredsCommand::Status {
            config,
            id: Some(id),
        } => {
            let (_, authority) = open(&config)?;
            let rows = authority.status(&id).await.map_err(failed)?;
            let out: Vec<_> = rows
                .into_iter()
                .map(|r| match r.state {
                    DeliveryState::Error {
                        reason,
                        attempts,
                        last_attempt,
                    } => json!({
                        "target": r.target, "state": "error", "reason": reason,
                        "attempts": attempts, "last_attempt_ms": last_attempt.map(netproc_wire::unix_ms),
                    }),
                    DeliveryState::Pending => json!({"target": r.target, "state": "pending"}),
                    DeliveryState::Sent => json!({"target": r.target, "state": "sent"}),
                    DeliveryState::Success => json!({"target": r.target, "state": "success"}),
                    _ => json!({"target": r.target, "state": "unknown"}),
                })
                .collect();
            output::show(&json!(out));
        }
        CredsCommand::Sync { config } => {
            let (_, authority) = open(&config)?;
            refuse_requests_only(&authority, "netproc creds sync")?;
            let report = authority.sync().await;
            let out: Vec<_> = report
                .targets
                .iter()
                .map(|t| json!({"target": t.target, "delivered": t.delivered, "error": t.error}))
                .collect();
            output::show(&json!(out));
            if !report.all_ok() {
                return Err(failed(
                    "some targets were not reached; they are retried by the next sync",
                ));
            }
        }
        CredsCommand::Leader { config } => {
            let (_, authority) = open(&config)?;
            output::show(&leader_json(&authority).await?);
        }
        CredsCommand::Targets { config } => {
            let (file, authority) = open(&config)?;
            output::show(&targets_json(&file, &authority).await?);
        }
        CredsCommand::List { config } => {
            let (_, authority) = open(&config)?;
            let out: Vec<_> = authority
                .credentials()
                .await
                .map_err(failed)?
                .into_iter()
                .map(|c| {
                    json!({
                        "id": c.id, "kind": c.kind, "generation": c.generation,
                        "privileges": c.privileges, "targets": c.targets,
                    })
                })
                .collect();
            output::show(&json!(out));
        }
        CredsCommand::DenyCert {
            config,
            which,
            days,
        } => {
            let (entries, not_after) = which.entries()?;
            let until =
                not_after.unwrap_or_else(|| SystemTime::now() + Duration::from_secs(days * 86_400));
            let (file, authority) = open(&config)?;
            refuse_own_certificate(&file, &entries)?;
            for e in &entries {
                authority
                    .deny_certificate(e.clone(), until)
                    .await
                    .map_err(failed)?;
            }
            let labels: Vec<String> = entries.iter().map(CertRef::label).collect();
            output::done(
                &format!(
                    "denied {} on every target until {}; delivered like any change (`creds status --config … <label>` per target)",
                    labels.join(" and "),
                    super::output::rfc3339_ms(netproc::wire::unix_ms(until))
                ),
                json!({"denied": labels, "until": super::output::rfc3339_ms(netproc::wire::unix_ms(until))}),
            );
        }
        CredsCommand::AllowCert { config, which } => {
            let (entries, _) = which.entries()?;
            let (_, authority) = open(&config)?;
            let mut allowed = Vec::new();
            for e in &entries {
                match authority.allow_certificate(e).await {
                    Ok(()) => allowed.push(e.label()),
                    // With --cert, one of its two entries may not be listed.
                    Err(netproc::propagation::AuthorityError::UnknownCredential(_))
                        if entries.len() > 1 => {}
                    Err(e) => return Err(failed(e)),
                }
            }
            if allowed.is_empty() {
                return Err(failed("no such certificate is denied"));
            }
            output::done(
                &format!("allowed {} again on every target", allowed.join(" and ")),
                json!({"allowed": allowed}),
            );
        }
        CredsCommand::History { config, id, limit } => {
            let (_, authority) = open(&config)?;
            let out: Vec<_> = authority
                .history(id.as_deref(), limit)
                .await
                .map_err(failed)?
                .into_iter()
                .map(|c| {
                    json!({
                        "change": c.change_id, "credential": c.credential_id, "action": c.action,
                        "by": c.changed_by, "db_role": c.db_role,
                        "at": super::output::rfc3339_ms(netproc::wire::unix_ms(c.at)),
                    })
                })
                .collect();
            output::show(&json!(out));
        }
    }
    Ok(())
}
