//! Swapping certificates, trust anchors, CRLs and keys at run time: reload
//! from the reload source, file watching, and following a key store.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use netproc_pki::{Crl, Identity, TrustAnchors};
use netproc_wire::ErrorCode;

use crate::error::{ReloadError, ServerError};
use crate::server::ServerHandle;
use crate::sessions::SessionSelector;
use crate::shared::{ReloadReport, Shared};

impl ServerHandle {
    /// Reloads from the [`reload_source`](crate::ServerBuilder::reload_source):
    /// new handshakes use the new material; sessions over newly revoked
    /// certificates end; the report also names the changed settings the
    /// source says need a restart. On error the last good configuration
    /// stays.
    pub async fn reload(&self) -> Result<ReloadReport, ServerError> {
        self.inner.shared.reload().await
    }

    /// Replaces the server's certificate, the client CA bundle and the CRLs
    /// without a restart. New handshakes use them at once; established
    /// sessions continue, except those whose client certificate a new CRL
    /// revokes: they end with `GoAway{credential_revoked}`. Material that
    /// does not make a valid configuration is refused with its error and the
    /// last good configuration stays in force. Returns how many sessions
    /// were closed.
    pub fn reload_tls(
        &self,
        identity: &Identity,
        client_roots: &TrustAnchors,
        crls: &[Crl],
    ) -> Result<usize, ServerError> {
        self.inner.shared.reload_tls(identity, client_roots, crls)
    }
    /// Watches files (certificate, key, CA bundle, CRLs, key store) and
    /// calls [`reload`](ServerHandle::reload) when any of them changes:
    /// checked every `interval` by metadata (modification time, size,
    /// inode, following symlinks), so atomic renames and the symlink swaps
    /// of certificate managers are seen; a change is acted on once it has
    /// been stable for one interval. A bad file is refused by the reload,
    /// and the last good configuration stays. Stops at shutdown.
    pub fn watch_files(&self, paths: Vec<std::path::PathBuf>, interval: Duration) {
        watch(&self.inner.shared, paths, interval, |shared| async move {
            match shared.reload().await {
                Ok(report) => {
                    tracing::info!(server = %shared.name, sessions_closed = report.sessions_closed, "reloaded after a file change")
                }
                Err(e) => {
                    tracing::warn!(server = %shared.name, error = %e, "reload after a file change refused; the last good configuration stays")
                }
            }
        });
    }

    /// Watches the key store's file at `path` (as [`watch_files`] does) and
    /// re-reads `store` from it when it changes, so keys created, rotated or
    /// revoked by another process (`netproc keys …`) take effect without a
    /// reload; with [`follow_key_store`] the sessions of a revoked or
    /// rotated key end. A file that does not load is refused and the last
    /// good keys stay. Stops at shutdown.
    ///
    /// [`watch_files`]: ServerHandle::watch_files
    /// [`follow_key_store`]: ServerHandle::follow_key_store
    pub fn watch_key_store(
        &self,
        store: Arc<netproc_auth::ApiKeyStore>,
        path: std::path::PathBuf,
        interval: Duration,
    ) {
        watch(&self.inner.shared, vec![path], interval, move |shared| {
            let store = Arc::clone(&store);
            async move {
                match tokio::task::spawn_blocking(move || store.reload()).await {
                    Ok(Ok(())) => tracing::info!(server = %shared.name, "key store reloaded"),
                    Ok(Err(e)) => {
                        tracing::warn!(server = %shared.name, error = %e, "key store reload refused; the last good keys stay")
                    }
                    Err(e) => {
                        tracing::warn!(server = %shared.name, error = %e, "key store reload failed; the last good keys stay")
                    }
                }
            }
        });
    }

    /// Makes revocations and rotations in `store` end the live sessions
    /// that rely on them: a revoked or changed key's sessions get
    /// `GoAway{credential_revoked}`; a rotated key's sessions on the old
    /// secret do too, while sessions on the new secret continue.
    pub fn follow_key_store(&self, store: &netproc_auth::ApiKeyStore) {
        let shared = Arc::downgrade(&self.inner.shared);
        store.on_change(move |change| {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let selector = match change {
                netproc_auth::KeyChange::Revoked { id } | netproc_auth::KeyChange::Changed { id } => SessionSelector::Key {
                    key_id: id.clone(),
                    generation: None,
                },
                netproc_auth::KeyChange::Rotated { id, old_generation } => SessionSelector::Key {
                    key_id: id.clone(),
                    generation: Some(*old_generation),
                },
                _ => return,
            };
            let n = shared.close_sessions_inner(&selector, ErrorCode::CredentialRevoked);
            if n > 0 {
                tracing::info!(server = %shared.name, ?change, sessions = n, "closed sessions after a key change");
            }
        });
    }
}

/// Polls `paths`' metadata every `interval` and runs `on_change` once a
/// change has been stable for one interval; stops when the server is gone
/// or shutting down. The baseline is taken now (a few `stat`s), so any
/// change after the call is seen.
fn watch<F, Fut>(
    shared: &Arc<Shared>,
    paths: Vec<std::path::PathBuf>,
    interval: Duration,
    on_change: F,
) where
    F: Fn(Arc<Shared>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let shared = Arc::downgrade(shared);
    let mut seen: Vec<_> = paths.iter().map(|p| file_stamp(p)).collect();
    tokio::spawn(async move {
        let stamp = move || {
            let paths = paths.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    paths.iter().map(|p| file_stamp(p)).collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default()
            }
        };
        let mut pending: Option<Vec<Option<FileStamp>>> = None;
        loop {
            tokio::time::sleep(interval).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if shared.shutdown.is_cancelled() {
                return;
            }
            let now = stamp().await;
            if now == seen {
                pending = None;
                continue;
            }
            if pending.as_ref() != Some(&now) {
                // Changed: wait until it stops changing.
                pending = Some(now);
                continue;
            }
            pending = None;
            seen = now;
            on_change(shared).await;
        }
    });
}

/// What a file watcher compares.
type FileStamp = (Option<SystemTime>, u64, u64);

fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((m.modified().ok(), m.len(), ino))
}

impl Shared {
    pub(crate) async fn reload(self: &Arc<Self>) -> Result<ReloadReport, ServerError> {
        let Some(source) = self.reload_source.clone() else {
            return Err(ServerError::Reload(ReloadError::NoSource));
        };
        let read = tokio::task::spawn_blocking(move || source()).await;
        match read {
            Ok(Ok(material)) => {
                let sessions_closed =
                    self.reload_tls(&material.identity, &material.client_roots, &material.crls)?;
                if !material.restart_required.is_empty() {
                    tracing::warn!(
                        server = %self.name,
                        fields = ?material.restart_required,
                        "reloaded; these changed settings apply only after a restart"
                    );
                }
                Ok(ReloadReport {
                    sessions_closed,
                    restart_required: material.restart_required,
                })
            }
            Ok(Err(e)) => {
                tracing::warn!(server = %self.name, error = %e, "reload refused; keeping the last good configuration");
                self.abuse
                    .count(crate::abuse::Counter::tls_reload_failure_count);
                Err(ServerError::Reload(ReloadError::Source(e)))
            }
            Err(e) => Err(ServerError::Reload(ReloadError::Source(e.to_string()))),
        }
    }

    fn reload_tls(
        &self,
        identity: &Identity,
        client_roots: &TrustAnchors,
        crls: &[Crl],
    ) -> Result<usize, ServerError> {
        let shared = self;
        // A certificate outside its validity would fail every handshake:
        // refuse it like any other bad material.
        let built = if identity.cert_identity().is_valid_at(SystemTime::now()) {
            netproc_pki::server_config_denying(
                identity,
                client_roots,
                crls,
                &shared.deny,
                &shared.tls_options,
            )
        } else {
            Err(netproc_pki::PkiError::BadCertificate {
                origin: "<reload: server certificate>".into(),
                reason: "expired or not yet valid".into(),
            })
        };
        let config = match built {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(server = %shared.name, error = %e, "TLS reload refused; keeping the last good configuration");
                shared
                    .abuse
                    .count(crate::abuse::Counter::tls_reload_failure_count);
                return Err(ServerError::Tls(e));
            }
        };
        shared.tls.store(Arc::new(config));
        shared.abuse.count(crate::abuse::Counter::tls_reload_count);
        tracing::info!(server = %shared.name, cert = %identity.cert_identity().fingerprint, "TLS configuration reloaded");
        // Revocation reaches live sessions: close those over a revoked certificate.
        let mut closed = 0;
        for session in shared.sessions.list_facts() {
            let cert = &session.cert;
            let revoked = crls.iter().any(|crl| {
                crl.issuer() == cert.issuer
                    && crl.revoked_serials().iter().any(|s| *s == cert.serial)
            });
            if revoked {
                closed += shared.close_sessions_inner(
                    &SessionSelector::Session(session.session_id),
                    ErrorCode::CredentialRevoked,
                );
            }
        }
        Ok(closed)
    }
}
