//! The state every part of a running server shares: settings and abuse
//! controls, TLS configuration, definitions, the authenticator, the
//! session table, liveness, shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use netproc_auth::Authenticator;
use netproc_pki::{Crl, Identity, TlsOptions, TrustAnchors};
use netproc_wire::ErrorCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::abuse::{Abuse, AbuseMetrics};
use crate::options::{InvalidOption, ServerOptions, Settings};
use crate::scripts::Definitions;
use crate::sessions::{Control, SessionSelector, SessionTable};

/// Reads fresh TLS material for a reload (and may reload other sources,
/// such as a key store file, as a side effect). Runs on a blocking thread.
pub type ReloadSource = Arc<dyn Fn() -> Result<ReloadMaterial, String> + Send + Sync>;

/// What a [`ReloadSource`] read: the TLS material to put in force, and the
/// changed settings this reload cannot apply.
///
/// ```
/// # use netproc_pki::{CaParams, CertificateAuthority, LeafParams};
/// use netproc_server::ReloadMaterial;
///
/// # let ca = CertificateAuthority::generate(&CaParams::new("example CA")).unwrap();
/// # let identity = ca.issue(&LeafParams::server("server", ["localhost"])).unwrap().identity().unwrap();
/// # let roots = ca.trust_anchors();
/// let material = ReloadMaterial::new(identity, roots, Vec::new())
///     .with_restart_required(vec!["bind".to_owned()]);
/// assert_eq!(material.restart_required, ["bind"]);
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct ReloadMaterial {
    /// The server's certificate and key.
    pub identity: Identity,
    /// The CAs client certificates must chain to.
    pub client_roots: TrustAnchors,
    /// The CRLs in force.
    pub crls: Vec<Crl>,
    /// Settings that changed at the source but apply only after a restart
    /// (by name, e.g. `"propagation"`): reported in the reload's answer.
    pub restart_required: Vec<String>,
}

impl ReloadMaterial {
    /// TLS material with no restart-only change.
    pub fn new(identity: Identity, client_roots: TrustAnchors, crls: Vec<Crl>) -> ReloadMaterial {
        ReloadMaterial {
            identity,
            client_roots,
            crls,
            restart_required: Vec::new(),
        }
    }

    /// Names the changed settings that only a restart applies.
    pub fn with_restart_required(mut self, fields: Vec<String>) -> ReloadMaterial {
        self.restart_required = fields;
        self
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ReloadReport {
    /// Sessions closed because a new CRL revokes their certificate.
    pub sessions_closed: usize,
    /// Changed settings the reload did not apply: they need a restart.
    pub restart_required: Vec<String>,
}

/// State shared by the accept loop and every session.
pub(crate) struct Shared {
    /// The settings in force (also read by the abuse layer).
    pub(crate) settings: Arc<Settings>,
    /// The server's clock, for every session decision and deadline.
    pub(crate) time: crate::time::Time,
    pub(crate) name: String,
    pub(crate) abuse: Abuse,
    /// The TLS configuration in force: swapped whole on reload, read at
    /// each accept (so new handshakes use new material at once).
    pub(crate) tls: arc_swap::ArcSwap<rustls::ServerConfig>,
    /// The TLS options, kept for reloads.
    pub(crate) tls_options: TlsOptions,
    /// Client certificates refused at the handshake (and whose sessions
    /// end when they are added).
    pub(crate) deny: netproc_pki::DenyList,
    /// Where reloads read new material from.
    pub(crate) reload_source: Option<ReloadSource>,
    /// Load balancers whose connections carry a PROXY v2 header.
    pub(crate) trusted_proxies: Vec<crate::proxy_protocol::TrustedProxy>,
    /// Natives, constants, run-time definitions and the state database.
    pub(crate) defs: Arc<Definitions>,
    pub(crate) authenticator: Arc<dyn Authenticator>,
    pub(crate) sessions: SessionTable,
    pub(crate) liveness: crate::liveness::LivenessTracker,
    pub(crate) started: Instant,
    pub(crate) next_session_id: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
}

impl Shared {
    pub(crate) fn next_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The settings in force (they can change at run time), for a short
    /// synchronous read.
    pub(crate) fn options(&self) -> arc_swap::Guard<Arc<ServerOptions>> {
        self.settings.load()
    }

    /// The settings in force, to hold across awaits (once per connection).
    pub(crate) fn options_arc(&self) -> Arc<ServerOptions> {
        self.settings.load_full()
    }

    /// Validates and applies new settings: the abuse layer's caps and
    /// windows follow at once, buckets on their next use.
    pub(crate) fn set_options(&self, options: ServerOptions) -> Result<(), InvalidOption> {
        options.validate()?;
        self.abuse.reconfigure(&options);
        self.settings.replace(options);
        Ok(())
    }

    pub(crate) fn close_sessions_inner(
        &self,
        selector: &SessionSelector,
        reason: ErrorCode,
    ) -> usize {
        let message = match reason {
            ErrorCode::DisconnectedByAdmin => "disconnected by an administrator".to_owned(),
            ErrorCode::CredentialRevoked => "the credential was revoked".to_owned(),
            ref other => format!("session closed: {other}"),
        };
        let revoking = matches!(
            reason,
            ErrorCode::CredentialRevoked | ErrorCode::CertificateExpired
        );
        let n = self
            .sessions
            .signal(Some(selector), &Control::Close { reason, message });
        if revoking {
            for _ in 0..n {
                self.abuse
                    .count(crate::abuse::Counter::sessions_revoked_count);
            }
        }
        n
    }

    /// The counters and gauges, with the liveness counts.
    pub(crate) fn metrics(&self) -> AbuseMetrics {
        let mut m = self
            .abuse
            .snapshot(self.sessions.len(), self.sessions.in_flight());
        let (online, unstable, offline) = self.liveness.counts();
        m.online_principal_count = online as u64;
        m.unstable_principal_count = unstable as u64;
        m.offline_principal_count = offline as u64;
        m
    }
}
