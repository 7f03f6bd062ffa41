//! The dev PKI: a CA, a server, clients, and the negative fixtures tests and
//! demos need (a rogue CA, expired / not-yet-valid / wrong-EKU / revoked
//! clients and a CRL).

use std::path::Path;
use std::time::{Duration, SystemTime};

use netproc::pki::{
    CaParams, CertIdentity, CertificateAuthority, IssuedCert, KeyPurpose, LeafParams, PkiError,
    SubjectAltName, Validity,
};

const DAY: Duration = Duration::from_secs(86_400);

/// One file pair written: its base name and what the certificate says.
pub(crate) struct Written {
    pub(crate) name: &'static str,
    pub(crate) identity: CertIdentity,
}

/// Every file base name this writes (`.crt` + `.key`), plus `ca.crl`.
pub(crate) const NAMES: &[&str] = &[
    "ca",
    "server",
    "client",
    "client2",
    "admin",
    "rogue-ca",
    "rogue-client",
    "expired-client",
    "future-client",
    "wrong-eku-client",
    "revoked-client",
];

/// Writes the dev PKI into `dir`. Refuses to overwrite any existing file
/// unless `force`.
pub(crate) fn write(dir: &Path, force: bool) -> Result<Vec<Written>, PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    if !force {
        let existing = NAMES
            .iter()
            .flat_map(|n| [format!("{n}.crt"), format!("{n}.key")])
            .chain(["ca.crl".to_owned()])
            .map(|f| dir.join(f))
            .find(|p| p.exists());
        if let Some(path) = existing {
            return Err(PkiError::AlreadyExists { path });
        }
    }
    let now = SystemTime::now();
    let ca =
        CertificateAuthority::generate(&CaParams::new("netproc dev CA").organization("netproc"))?;
    let rogue_ca = CertificateAuthority::generate(&CaParams::new("rogue CA"))?;
    let client = |cn: &str| {
        LeafParams::client(cn).san(SubjectAltName::Uri(format!("spiffe://netproc.dev/{cn}")))
    };

    let leaves: Vec<(&'static str, &CertificateAuthority, LeafParams)> = vec![
        (
            "server",
            &ca,
            LeafParams::server("netproc dev server", ["localhost", "127.0.0.1", "::1"]),
        ),
        ("client", &ca, client("client")),
        ("client2", &ca, client("client2")),
        ("admin", &ca, client("admin")),
        ("rogue-client", &rogue_ca, client("rogue-client")),
        (
            "expired-client",
            &ca,
            client("expired-client").validity(Validity::new(now - 30 * DAY, now - DAY)),
        ),
        (
            "future-client",
            &ca,
            client("future-client").validity(Validity::new(now + DAY, now + 30 * DAY)),
        ),
        (
            "wrong-eku-client",
            &ca,
            client("wrong-eku-client").purposes(vec![KeyPurpose::ServerAuth]),
        ),
        ("revoked-client", &ca, client("revoked-client")),
    ];

    let mut written = Vec::new();
    ca.save(dir.join("ca.crt"), dir.join("ca.key"), force)?;
    written.push(Written {
        name: "ca",
        identity: ca.cert_identity().clone(),
    });
    rogue_ca.save(dir.join("rogue-ca.crt"), dir.join("rogue-ca.key"), force)?;
    written.push(Written {
        name: "rogue-ca",
        identity: rogue_ca.cert_identity().clone(),
    });
    let mut revoked_serial = String::new();
    for (name, issuer, params) in leaves {
        let cert: IssuedCert = issuer.issue(&params)?;
        cert.save(
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
            force,
        )?;
        if name == "revoked-client" {
            revoked_serial = cert.cert_identity().serial.clone();
        }
        written.push(Written {
            name,
            identity: cert.cert_identity().clone(),
        });
    }
    ca.crl(&[revoked_serial.as_str()], 30)?
        .save(dir.join("ca.crl"), force)?;
    Ok(written)
}

/// A day, as `2026-11-28`.
fn date(t: SystemTime) -> String {
    super::output::rfc3339(t)[..10].to_owned()
}

/// A table of what was written: name, subject, fingerprint, validity.
pub(crate) fn table(written: &[Written]) -> String {
    let mut out = format!(
        "{:<18} {:<28} {:<18} {}\n",
        "name", "subject", "fingerprint", "valid"
    );
    for w in written {
        let fp = w.identity.fingerprint.to_string();
        out.push_str(&format!(
            "{:<18} {:<28} {:<18} {} .. {}\n",
            w.name,
            w.identity.subject,
            format!("{}…", &fp[..16]),
            date(w.identity.not_before),
            date(w.identity.not_after),
        ));
    }
    out.push_str("\nalso: ca.crl (revokes revoked-client)");
    out
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn writes_every_file_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let written = write(dir.path(), false).unwrap();
        assert_eq!(written.len(), NAMES.len());
        for name in NAMES {
            assert!(dir.path().join(format!("{name}.crt")).exists(), "{name}");
            assert!(dir.path().join(format!("{name}.key")).exists(), "{name}");
        }
        assert!(dir.path().join("ca.crl").exists());
        let err = write(dir.path(), false).err().unwrap();
        assert!(matches!(err, PkiError::AlreadyExists { .. }), "{err}");
        write(dir.path(), true).unwrap();
        let t = table(&written);
        assert!(
            t.contains("revoked-client") && t.contains("CN=netproc dev CA"),
            "{t}"
        );
    }

    /// `openssl verify` agrees with us about the dev PKI, when openssl exists.
    #[test]
    fn openssl_verifies_the_good_chain_and_refuses_the_rogue_one() {
        if Command::new("openssl").arg("version").output().is_err() {
            println!("skipped: openssl is not on PATH");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), false).unwrap();
        let verify = |cert: &str| {
            Command::new("openssl")
                .current_dir(dir.path())
                .args(["verify", "-CAfile", "ca.crt", cert])
                .output()
                .unwrap()
        };
        for good in ["client.crt", "server.crt", "admin.crt"] {
            let out = verify(good);
            assert!(
                out.status.success(),
                "{good}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = verify("rogue-client.crt");
        assert!(!out.status.success(), "rogue client verified");
        // With the CRL, openssl sees the revocation too.
        let out = Command::new("openssl")
            .current_dir(dir.path())
            .args([
                "verify",
                "-crl_check",
                "-CAfile",
                "ca.crt",
                "-CRLfile",
                "ca.crl",
                "revoked-client.crt",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "revoked client verified");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("revoked")
                || String::from_utf8_lossy(&out.stderr).contains("revoked")
        );
    }
}
