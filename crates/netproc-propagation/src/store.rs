//! The [`Store`] seam: everything the authority persists — credentials,
//! targets, per-target seq and cursor, the outbox, delivery state,
//! snapshots — so another backend (PostgreSQL) can stand in for the
//! embedded SQLite one ([`crate::sqlite`]).

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use netproc_auth::{ApiKey, BoxFuture};

use crate::EventKind;
use crate::types::*;
use crate::wire::DeliveryReply;

/// A batch ready to sign and send.
pub(crate) struct Batch {
    /// (seq, change id, kind)
    pub(crate) events: Vec<(u64, u64, EventKind)>,
    /// Who made each event's change (the process, the database role);
    /// `None` for snapshots.
    pub(crate) authors: Vec<(Option<String>, Option<String>)>,
}

/// What recording a delivery's outcome found.
pub(crate) struct Progress {
    pub(crate) acked: usize,
    pub(crate) error: Option<String>,
    pub(crate) more: bool,
}

/// What was sent: each event's seq, and its credential id with whether it
/// was a deletion (`None` for a snapshot).
pub(crate) type Sent = Vec<(u64, Option<(String, bool)>)>;

/// Everything the authority persists — credentials, targets, per-target seq
/// and cursor, the outbox, delivery state, snapshots — behind one seam, so
/// another backend (PostgreSQL) can stand in for SQLite. Every method
/// commits before it answers; changes that arrive together may share a
/// commit.
pub(crate) trait Store: Send + Sync + 'static {
    /// Creates or updates a credential and its targets (see
    /// [`Authority::ensure`](crate::Authority::ensure)).
    fn ensure(
        &self,
        spec: CredentialSpec,
        targets: BTreeSet<String>,
    ) -> BoxFuture<'_, Result<Ensured, AuthorityError>>;
    /// Gives an API key a new secret, queued for its targets.
    fn rotate(
        &self,
        id: String,
        overlap: Option<Duration>,
    ) -> BoxFuture<'_, Result<ApiKey, AuthorityError>>;
    /// Removes a credential, queuing its deletion for its targets.
    fn revoke(&self, id: String) -> BoxFuture<'_, Result<(), AuthorityError>>;
    /// Where credential `id` stands on each target; `in_flight` names the
    /// targets being delivered to now.
    fn status(
        &self,
        id: String,
        in_flight: HashSet<String>,
    ) -> BoxFuture<'_, Result<Vec<TargetDelivery>, AuthorityError>>;
    /// Every known target's delivery state.
    fn targets(&self) -> BoxFuture<'_, Result<Vec<TargetState>, AuthorityError>>;
    /// Every credential, without secrets.
    fn credentials(&self) -> BoxFuture<'_, Result<Vec<CredentialInfo>, AuthorityError>>;
    /// The leader applies pending change requests (PostgreSQL, least
    /// privilege); how many it took up.
    fn apply_requests(&self) -> BoxFuture<'_, Result<usize, AuthorityError>>;
    /// Whether this store only records change requests.
    fn requests_only(&self) -> bool;
    /// Denies a client certificate on every target until `not_after_ms`.
    fn deny_cert(
        &self,
        cert: crate::CertRef,
        not_after_ms: u64,
    ) -> BoxFuture<'_, Result<(), AuthorityError>>;
    /// Stops denying a certificate.
    fn allow_cert(&self, cert: crate::CertRef) -> BoxFuture<'_, Result<(), AuthorityError>>;
    /// The certificates denied now, with their expiry (unix ms).
    fn denied_certs(&self) -> BoxFuture<'_, Result<Vec<(crate::CertRef, u64)>, AuthorityError>>;
    /// The newest `limit` recorded changes (of `id` only, when given),
    /// newest first.
    fn history(
        &self,
        id: Option<String>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<ChangeRecord>, AuthorityError>>;
    /// Targets among `names` with work to do whose backoff has passed at
    /// `now_ms`.
    fn due_targets(
        &self,
        names: Vec<String>,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Vec<String>, AuthorityError>>;
    /// The next batch for `target`: its events, or a snapshot.
    fn prepare(
        &self,
        target: String,
        part_bytes: usize,
    ) -> BoxFuture<'_, Result<Batch, AuthorityError>>;
    /// Takes or renews the delivery lease for `holder` for `ttl`: the
    /// epoch when `holder` leads now, `None` when another process does.
    fn lease(
        &self,
        holder: String,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Option<u64>, AuthorityError>>;
    /// Who holds the delivery lease, if anyone ever did.
    fn leader(&self) -> BoxFuture<'_, Result<Option<LeaderInfo>, AuthorityError>>;
    /// Records a delivery's outcome (acks, cursor, errors, backoff).
    fn complete(
        &self,
        target: String,
        config: AuthorityConfig,
        sent: Sent,
        reply: Result<DeliveryReply, String>,
    ) -> BoxFuture<'_, Result<Progress, AuthorityError>>;
}
