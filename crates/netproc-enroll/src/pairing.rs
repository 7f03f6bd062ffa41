//! Pairing: a client asks with its key from the start; the operator is
//! told a code and the short authentication string (SAS) of (request id,
//! key), checks the string with the requester, and gives the code — which
//! unlocks only the certificate for that request's key.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use netproc_pki::Fingerprint;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use zeroize::Zeroizing;

/// The short authentication string of a pairing: six digits as `123-456`,
/// from the request id and the SHA-256 of the requested key. The client
/// computes it from its own key; the operator sees the service's
/// computation from the request it received: equal strings mean the
/// operator approves this key.
pub fn pairing_sas(request_id: u64, key: Fingerprint) -> String {
    let mut h = Sha256::new();
    h.update(b"netproc-enroll-sas-v1\0");
    h.update(request_id.to_be_bytes());
    h.update(key.as_bytes());
    let d = h.finalize();
    let n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % 1_000_000;
    format!("{:03}-{:03}", n / 1000, n % 1000)
}

/// What the operator is told about a pairing request.
#[derive(Clone)]
#[non_exhaustive]
pub struct PairingNotice {
    /// The request.
    pub request_id: u64,
    /// The name asked for (`[a-z0-9._-]`, at most 64).
    pub name: String,
    /// Where the request came from.
    pub source: IpAddr,
    /// When.
    pub at: SystemTime,
    /// The short authentication string to check with the requester.
    pub sas: String,
    /// The code to give the requester once the string matches.
    pub code: Zeroizing<String>,
    /// How long the pairing waits.
    pub expires_in: Duration,
}

impl std::fmt::Debug for PairingNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairingNotice")
            .field("request_id", &self.request_id)
            .field("name", &self.name)
            .field("source", &self.source)
            .field("sas", &self.sas)
            .finish_non_exhaustive()
    }
}

impl PairingNotice {
    /// The message for a human: one field per line.
    pub fn message(&self) -> String {
        let at = self
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!(
            "netproc pairing request\nname: {}\nfrom: {}\nat: {} (unix seconds)\nrequest: {}\ncheck this string with the requester: {}\nthen give them this code: {}\nexpires in: {} s\n",
            self.name,
            self.source,
            at,
            self.request_id,
            self.sas,
            self.code.as_str(),
            self.expires_in.as_secs()
        )
    }
}

/// How the operator is told.
#[derive(Clone)]
#[non_exhaustive]
pub enum Notifier {
    /// A program, run directly (no shell), with the message on its
    /// standard input — never in its arguments; at most 10 s.
    Command(Vec<String>),
    /// A function in this process.
    Callback(Arc<dyn Fn(&PairingNotice) + Send + Sync>),
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notifier::Command(argv) => f.debug_tuple("Command").field(argv).finish(),
            Notifier::Callback(_) => f.write_str("Callback"),
        }
    }
}

impl Notifier {
    /// Tells the operator; an error if that failed (the pairing is then
    /// refused: nobody could approve it).
    pub(crate) async fn notify(&self, notice: &PairingNotice) -> Result<(), String> {
        match self {
            Notifier::Callback(f) => {
                f(notice);
                Ok(())
            }
            Notifier::Command(argv) => {
                let (program, args) = argv.split_first().ok_or("the notifier command is empty")?;
                let run = async {
                    let mut child = tokio::process::Command::new(program)
                        .args(args)
                        .stdin(std::process::Stdio::piped())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .kill_on_drop(true)
                        .spawn()
                        .map_err(|e| format!("{program}: {e}"))?;
                    if let Some(mut stdin) = child.stdin.take() {
                        stdin
                            .write_all(notice.message().as_bytes())
                            .await
                            .map_err(|e| format!("{program}: {e}"))?;
                    }
                    let status = child.wait().await.map_err(|e| format!("{program}: {e}"))?;
                    if status.success() {
                        Ok(())
                    } else {
                        Err(format!("{program}: {status}"))
                    }
                };
                tokio::time::timeout(Duration::from_secs(10), run)
                    .await
                    .map_err(|_| format!("{program}: no answer within 10 s"))?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_string_depends_on_the_request_and_the_key() {
        let k1 = Fingerprint::of(b"key one");
        let k2 = Fingerprint::of(b"key two");
        let s = pairing_sas(7, k1);
        assert_eq!(s.len(), 7);
        assert_eq!(s, pairing_sas(7, k1));
        assert_ne!(s, pairing_sas(8, k1));
        assert_ne!(s, pairing_sas(7, k2));
    }

    #[test]
    fn the_notice_never_shows_its_code_in_debug() {
        let n = PairingNotice {
            request_id: 1,
            name: "alice".into(),
            source: "127.0.0.1".parse().unwrap(),
            at: SystemTime::now(),
            sas: "123-456".into(),
            code: Zeroizing::new("98765432".into()),
            expires_in: Duration::from_secs(600),
        };
        assert!(!format!("{n:?}").contains("98765432"));
        assert!(n.message().contains("98765432"));
    }
}
