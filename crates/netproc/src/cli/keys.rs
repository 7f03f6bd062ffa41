//! `netproc keys`: manage an API-key store file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use netproc::auth::{ApiKeyStore, CertBinding, KeySpec, PrivilegeSet};

use super::pki::load_cert;
use super::{Failure, failed, output, usage};

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key; it is printed once, only its hash is stored.
    #[command(
        after_help = "Example: netproc keys create --store keys.json --privileges invoke_functions --bind-cert pki/alice.crt --key-out alice.apikey"
    )]
    Create {
        /// The key store file (JSON, mode 0600).
        #[arg(long)]
        store: PathBuf,
        /// Comma-separated privileges.
        #[arg(long, default_value = "invoke_functions")]
        privileges: String,
        /// Bind the key to this certificate (PEM file).
        #[arg(long)]
        bind_cert: Option<PathBuf>,
        /// Bind the key to a SAN, a certificate fingerprint or a key (dns:…, uri:…, sha256:…, spki:…).
        #[arg(long)]
        bind: Option<String>,
        /// Expire after this many days.
        #[arg(long)]
        expires_days: Option<u64>,
        /// Comma-separated function allow-list.
        #[arg(long)]
        functions: Option<String>,
        /// A note for `keys list` (who or what the key is for).
        #[arg(long)]
        label: Option<String>,
        /// Also write the key to this file (mode 0600), for `api_key_file`.
        #[arg(long)]
        key_out: Option<PathBuf>,
        /// Make an Ed25519 key instead of an API key: only its public half is
        /// stored; the private credential (`npe_…`) works in `api_key_file`.
        #[arg(long)]
        ed25519: bool,
        /// This key's own cap on concurrent sessions (0 = none), over the server's.
        #[arg(long)]
        max_sessions: Option<u32>,
        /// One active session for this key: a new one replaces the old.
        #[arg(long)]
        single_active_session: bool,
    },
    /// List keys (never secrets).
    #[command(after_help = "Example: netproc keys list --store keys.json")]
    List {
        /// The key store file (JSON, mode 0600).
        #[arg(long)]
        store: PathBuf,
    },
    /// Delete a key.
    #[command(after_help = "Example: netproc keys revoke --store keys.json k3x9q2m7w1ab")]
    Revoke {
        /// The key store file (JSON, mode 0600).
        #[arg(long)]
        store: PathBuf,
        /// The key's id (`keys list`; in a key `npk_<id>_…`).
        id: String,
    },
    /// New secret for a key; printed once.
    #[command(
        after_help = "Example: netproc keys rotate --store keys.json k3x9q2m7w1ab --key-out alice.apikey"
    )]
    Rotate {
        /// The key store file (JSON, mode 0600).
        #[arg(long)]
        store: PathBuf,
        /// The key's id (`keys list`; in a key `npk_<id>_…`).
        id: String,
        /// Write the new key to this file (mode 0600, replacing it
        /// atomically), for `api_key_file`, instead of printing it.
        #[arg(long)]
        key_out: Option<PathBuf>,
    },
}

pub(crate) fn keys(cmd: KeysCommand) -> Result<(), Failure> {
    match cmd {
        KeysCommand::Create {
            store,
            privileges,
            bind_cert,
            bind,
            expires_days,
            functions,
            label,
            key_out,
            ed25519,
            max_sessions,
            single_active_session,
        } => {
            let keys = ApiKeyStore::open(&store).map_err(failed)?;
            let privileges: PrivilegeSet = privileges.parse().map_err(usage)?;
            let mut spec = KeySpec::new(privileges);
            match (bind_cert, bind) {
                (Some(file), None) => {
                    spec = spec.binding(CertBinding::Fingerprint(load_cert(&file)?.fingerprint))
                }
                (None, Some(b)) => spec = spec.binding(b.parse().map_err(usage)?),
                (None, None) => {}
                _ => return Err(usage("give --bind-cert or --bind, not both")),
            }
            if let Some(days) = expires_days {
                spec = spec.expires_at(SystemTime::now() + Duration::from_secs(days * 86_400));
            }
            if let Some(f) = functions {
                spec = spec.functions(f.split(',').map(str::trim).filter(|s| !s.is_empty()));
            }
            if let Some(l) = label {
                spec = spec.label(l);
            }
            spec = spec.session_policy(max_sessions, single_active_session.then_some(true));
            let (info, key) = if ed25519 {
                let signing = netproc::pki::Ed25519Key::generate().map_err(failed)?;
                let info = keys
                    .register_ed25519(spec, signing.public_key())
                    .map_err(failed)?;
                let text = netproc::config::format_ed25519_credential(&info.id, &signing);
                (info, netproc::wire::SecretString::new(text.to_string()))
            } else {
                let (info, key) = keys.create(spec).map_err(failed)?;
                (info, key.to_secret())
            };
            if let Some(path) = key_out {
                netproc::pki::write_secret_file(&path, key.expose().as_bytes(), false)
                    .map_err(failed)?;
                output::done(
                    &format!(
                        "created key {} ({}); written to {} (0600)",
                        info.id,
                        info.privileges,
                        path.display()
                    ),
                    serde_json::json!({"id": info.id, "file": path}),
                );
            } else if output::json() {
                output::done(
                    &format!("created key {} ({})", info.id, info.privileges),
                    serde_json::json!({"id": info.id, "key": key.expose()}),
                );
            } else {
                eprintln!(
                    "created key {} ({}); the key is shown once:",
                    info.id, info.privileges
                );
                outln!("{}", key.expose());
            }
        }
        KeysCommand::List { store } => {
            let keys = existing_store(&store)?.list();
            if output::for_scripts() {
                output::show(&serde_json::to_value(keys).unwrap_or_default());
            } else {
                // The columns an operator scans; `--json` has every field.
                let rows: Vec<serde_json::Value> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "id": k.id,
                            "kind": if k.ed25519_public_key.is_some() { "ed25519" } else { "api_key" },
                            "privileges": k.privileges.to_string(),
                            "functions": k.functions,
                            "binding": k.binding.as_ref().map(ToString::to_string),
                            "expires": k.expires_at_ms.map(output::rfc3339_ms),
                            "created": output::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(k.created_at)),
                            "label": k.label,
                        })
                    })
                    .collect();
                output::show(&serde_json::Value::Array(rows));
            }
        }
        KeysCommand::Revoke { store, id } => {
            existing_store(&store)?.revoke(&id).map_err(failed)?;
            output::done(
                &format!(
                    "revoked {id}; a running `netproc serve` over this store applies it within about a second (it watches the file) and ends the key's sessions"
                ),
                serde_json::json!({"id": id}),
            );
        }
        KeysCommand::Rotate { store, id, key_out } => {
            let key = existing_store(&store)?.rotate(&id).map_err(failed)?;
            if let Some(path) = key_out {
                netproc::pki::write_secret_file(&path, key.expose().as_bytes(), true)
                    .map_err(failed)?;
                output::done(
                    &format!(
                        "rotated {id}; the new key is written to {} (0600); running servers over this store apply it within about a second",
                        path.display()
                    ),
                    serde_json::json!({"id": id, "file": path}),
                );
            } else if output::json() {
                output::done(
                    &format!("rotated {id}"),
                    serde_json::json!({"id": id, "key": key.expose()}),
                );
            } else {
                eprintln!(
                    "rotated {id} (running servers over this store apply it within about a second); the new key is shown once:"
                );
                outln!("{}", key.expose());
            }
        }
    }
    Ok(())
}

/// The key store at `store`, which must exist: only `keys create` makes
/// one, so a mistyped path is an error (exit 2), not an empty store.
fn existing_store(store: &Path) -> Result<ApiKeyStore, Failure> {
    if !store.exists() {
        return Err(usage(format!(
            "--store {}: no such file; `netproc keys create --store {}` creates it",
            store.display(),
            store.display()
        )));
    }
    ApiKeyStore::open(store).map_err(failed)
}
