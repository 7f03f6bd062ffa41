//! `netproc pki`: make and inspect certificates.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Subcommand;
use netproc::pki::{
    CaParams, CertIdentity, CertificateAuthority, LeafParams, SubjectAltName, Validity,
};

use super::{Failure, failed, output, usage};

#[derive(Debug, Subcommand)]
pub(crate) enum PkiCommand {
    /// A new CA: ca.crt and ca.key (0600) in --out.
    #[command(after_help = "Example: netproc pki init --out pki")]
    Init {
        /// The directory for ca.crt and ca.key (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "netproc CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3652)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// A server certificate for DNS names and IPs, signed by the CA in --ca-dir.
    #[command(
        after_help = "Example: netproc pki issue-server --ca-dir pki --name server --san api.internal --san 10.0.0.5"
    )]
    IssueServer {
        /// The CA's directory (ca.crt, ca.key, ca.crl).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Written as NAME.crt and NAME.key in --ca-dir.
        #[arg(long)]
        name: String,
        /// DNS names and IP addresses (repeat).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// An online intermediate CA for an enrollment service (`netproc ca
    /// serve`): pathLen 0, short-lived, signed by the root in --ca-dir;
    /// written as NAME.crt and NAME.key (0600) in --ca-dir. The root's key
    /// can then go offline.
    #[command(
        after_help = "Example: netproc pki issue-intermediate --ca-dir pki --name online --days 30"
    )]
    IssueIntermediate {
        /// The root CA's directory (ca.crt, ca.key).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Common name; written as NAME.crt and NAME.key in --ca-dir.
        #[arg(long, default_value = "online")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// A client certificate, signed by the CA in --ca-dir.
    #[command(
        after_help = "Example: netproc pki issue-client --ca-dir pki --name alice --san uri:spiffe://example/alice"
    )]
    IssueClient {
        /// The CA's directory (ca.crt, ca.key, ca.crl).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Common name; written as NAME.crt and NAME.key in --ca-dir.
        #[arg(long)]
        name: String,
        /// Extra SANs: uri:…, dns:…, email:…, ip:… (repeat).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// A complete development PKI in --out: a CA, a server certificate for
    /// localhost / 127.0.0.1 / ::1, clients (client, client2, admin), the
    /// negative cases tests need (a rogue CA and client; expired, not yet
    /// valid, wrong-key-usage and revoked clients) and ca.crl. Not for
    /// production: the CA key is written beside the rest.
    ///
    /// Example: `netproc pki dev --out fixtures/pki`.
    Dev {
        /// The directory (created if missing).
        #[arg(long, default_value = "fixtures/pki")]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Subject, SANs, validity, EKUs and fingerprint of a PEM certificate.
    #[command(after_help = "Example: netproc pki inspect pki/alice.crt --json")]
    Inspect {
        /// The certificate (PEM).
        file: PathBuf,
    },
    /// The SHA-256 fingerprint of a PEM certificate.
    #[command(after_help = "Example: netproc pki fingerprint pki/alice.crt")]
    Fingerprint {
        /// The certificate (PEM).
        file: PathBuf,
    },
    /// Revoke a certificate: its serial is added to `ca.crl` in --ca-dir
    /// (created if missing), which servers list in `tls.crls`.
    #[command(after_help = "Example: netproc pki revoke --ca-dir pki pki/bob.crt")]
    Revoke {
        /// The CA's directory (ca.crt, ca.key, ca.crl).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The certificate to revoke (PEM).
        cert: PathBuf,
        /// Days until the CRL's nextUpdate; re-run `pki crl` before then.
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// Also deny it on every server through this authority
        /// (authority.toml): in seconds, without a CRL copy or reload.
        #[arg(long)]
        authority: Option<PathBuf>,
    },
    /// Write (or refresh) `ca.crl` in --ca-dir, keeping the certificates it
    /// already revokes; an empty CRL when there is none yet.
    #[command(after_help = "Example: netproc pki crl --ca-dir pki --days 30")]
    Crl {
        /// The CA's directory (ca.crt, ca.key, ca.crl).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Days until the CRL's nextUpdate.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
}

impl PkiCommand {
    /// `pki revoke --authority`: the authority file and the certificate to
    /// deny through it once the CRL is written.
    pub(crate) fn publish_to(&self) -> Option<(PathBuf, PathBuf)> {
        match self {
            PkiCommand::Revoke {
                authority: Some(a),
                cert,
                ..
            } => Some((a.clone(), cert.clone())),
            _ => None,
        }
    }
}

pub(crate) fn pki(cmd: PkiCommand) -> Result<(), Failure> {
    let validity = |days: u32| Validity::days_from_now(days);
    match cmd {
        PkiCommand::Init {
            out,
            name,
            days,
            force,
        } => {
            std::fs::create_dir_all(&out).map_err(|e| failed(format!("{}: {e}", out.display())))?;
            let ca = CertificateAuthority::generate(&CaParams::new(name).validity(validity(days)))
                .map_err(failed)?;
            ca.save(out.join("ca.crt"), out.join("ca.key"), force)
                .map_err(failed)?;
            print_identity("ca", ca.cert_identity());
        }
        PkiCommand::IssueServer {
            ca_dir,
            name,
            sans,
            days,
            force,
        } => {
            let params = LeafParams::server(name.clone(), sans).validity(validity(days));
            issue_into(&ca_dir, &name, &params, force)?;
        }
        PkiCommand::IssueClient {
            ca_dir,
            name,
            sans,
            days,
            force,
        } => {
            let mut params = LeafParams::client(name.clone()).validity(validity(days));
            for san in sans {
                params = params.san(san.parse::<SubjectAltName>().map_err(usage)?);
            }
            issue_into(&ca_dir, &name, &params, force)?;
        }
        PkiCommand::IssueIntermediate {
            ca_dir,
            name,
            days,
            force,
        } => {
            let online = load_ca(&ca_dir)?
                .issue_intermediate(&CaParams::new(name.clone()).validity(validity(days)))
                .map_err(failed)?;
            online
                .save(
                    ca_dir.join(format!("{name}.crt")),
                    ca_dir.join(format!("{name}.key")),
                    force,
                )
                .map_err(failed)?;
            print_identity(&name, online.cert_identity());
        }
        PkiCommand::Dev { out, force } => {
            let written = super::dev_pki::write(&out, force).map_err(|e| match e {
                netproc::pki::PkiError::AlreadyExists { .. } => usage(e),
                e => failed(e),
            })?;
            if output::json() {
                let names: Vec<&str> = written.iter().map(|w| w.name).collect();
                output::done(
                    &format!("dev PKI written to {}", out.display()),
                    serde_json::json!({"dir": out, "written": names}),
                );
            } else {
                outln!("dev PKI written to {}\n", out.display());
                outln!("{}", super::dev_pki::table(&written));
            }
        }
        PkiCommand::Inspect { file } => {
            print_identity(&file.display().to_string(), &load_cert(&file)?)
        }
        PkiCommand::Fingerprint { file } => outln!("{}", load_cert(&file)?.fingerprint),
        PkiCommand::Revoke {
            ca_dir, cert, days, ..
        } => {
            let serial = load_cert(&cert)?.serial;
            let n = write_crl(&ca_dir, Some(&serial), days)?;
            output::done(
                &format!(
                    "revoked serial {serial}; {} now lists {n} certificate(s) — servers apply it at their next reload (SIGHUP, `netproc admin … reload`, or watch_interval_ms)",
                    ca_dir.join("ca.crl").display()
                ),
                serde_json::json!({"serial": serial, "revoked": n}),
            );
        }
        PkiCommand::Crl { ca_dir, days } => {
            let n = write_crl(&ca_dir, None, days)?;
            output::done(
                &format!(
                    "wrote {} ({n} revoked, valid {days} days)",
                    ca_dir.join("ca.crl").display()
                ),
                serde_json::json!({"revoked": n}),
            );
        }
    }
    Ok(())
}

/// A certificate file named on the command line: missing, unreadable or
/// not a certificate is bad input (exit 2), naming the file.
pub(crate) fn load_cert(file: &Path) -> Result<CertIdentity, Failure> {
    let pem = std::fs::read(file).map_err(|e| usage(format!("{}: {e}", file.display())))?;
    CertIdentity::from_pem(&pem, &file.display().to_string()).map_err(usage)
}

/// Re-issues `ca.crl` in `ca_dir` with the serials it already lists, plus
/// `add`; returns how many it lists.
fn write_crl(ca_dir: &Path, add: Option<&str>, days: u32) -> Result<usize, Failure> {
    let ca = load_ca(ca_dir)?;
    let path = ca_dir.join("ca.crl");
    let mut serials: Vec<String> = if path.exists() {
        netproc::pki::Crl::load(&path)
            .map_err(|e| usage(format!("{}: {e}", path.display())))?
            .revoked_serials()
            .to_vec()
    } else {
        Vec::new()
    };
    if let Some(serial) = add
        && !serials.iter().any(|s| s.eq_ignore_ascii_case(serial))
    {
        serials.push(serial.to_owned());
    }
    let refs: Vec<&str> = serials.iter().map(String::as_str).collect();
    let crl = ca.crl(&refs, days).map_err(failed)?;
    crl.save(&path, true).map_err(failed)?;
    Ok(serials.len())
}

/// Issues a leaf from the CA in `ca_dir` and writes it there as
/// `NAME.crt` / `NAME.key`, then shows it.
fn issue_into(ca_dir: &Path, name: &str, params: &LeafParams, force: bool) -> Result<(), Failure> {
    let cert = load_ca(ca_dir)?.issue(params).map_err(failed)?;
    cert.save(
        ca_dir.join(format!("{name}.crt")),
        ca_dir.join(format!("{name}.key")),
        force,
    )
    .map_err(failed)?;
    print_identity(name, cert.cert_identity());
    Ok(())
}

/// The CA in `--ca-dir`: a missing or unusable CA is bad input (exit 2).
fn load_ca(ca_dir: &Path) -> Result<CertificateAuthority, Failure> {
    CertificateAuthority::load(ca_dir.join("ca.crt"), ca_dir.join("ca.key"))
        .map_err(|e| usage(format!("--ca-dir {}: {e}", ca_dir.display())))
}

/// A certificate's facts, as `--json` prints them (dates in RFC 3339).
pub(crate) fn identity_json(id: &CertIdentity) -> serde_json::Value {
    serde_json::json!({
        "subject": id.subject,
        "issuer": id.issuer,
        "sans": id.sans.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "key_usage": id.key_purposes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ca": id.is_ca,
        "serial": id.serial,
        "not_before": output::rfc3339(id.not_before),
        "not_after": output::rfc3339(id.not_after),
        "sha256": id.fingerprint.to_string(),
    })
}

fn print_identity(name: &str, id: &CertIdentity) {
    if output::json() {
        let mut j = identity_json(id);
        j["name"] = serde_json::Value::from(name);
        outln!("{j}");
        return;
    }
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    let days_left = id.not_after.duration_since(SystemTime::now()).map_or_else(
        |_| "expired".to_owned(),
        |d| format!("{} days left", d.as_secs() / 86_400),
    );
    outln!("{name}");
    outln!("  subject      {}", id.subject);
    outln!("  issuer       {}", id.issuer);
    outln!(
        "  sans         {}",
        list(id.sans.iter().map(ToString::to_string).collect())
    );
    outln!(
        "  key usage    {}",
        list(id.key_purposes.iter().map(ToString::to_string).collect())
    );
    outln!("  ca           {}", id.is_ca);
    outln!("  serial       {}", id.serial);
    outln!(
        "  valid        {} .. {} ({days_left})",
        output::rfc3339(id.not_before),
        output::rfc3339(id.not_after)
    );
    outln!("  sha256       {}", id.fingerprint);
}
