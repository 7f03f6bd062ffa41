//! The signed event envelope and the target-side check.

use netproc_wire::unix_ms;
use std::time::{Duration, SystemTime};

use netproc_pki::{Ed25519Key, verify_ed25519};
use serde::{Deserialize, Serialize};

/// Prefixed to the event bytes before signing: a signature made for
/// anything else never verifies as an event.
const DOMAIN: &[u8] = b"netproc-propagation-event-v1\0";
/// The domain tag of the second format: an [`EpochEvent`].
const DOMAIN_V2: &[u8] = b"netproc-propagation-event-v2\0";

/// A credential as it travels: everything a target needs to verify it,
/// and nothing secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Credential {
    /// The key id.
    pub id: String,
    /// SHA-256 of an API key's secret (targets verify by hash); `None` for
    /// an Ed25519 key.
    pub secret_sha256: Option<[u8; 32]>,
    /// An Ed25519 public key; `None` for an API key.
    pub ed25519_public_key: Option<[u8; 32]>,
    /// The secret's generation (incremented by each rotation).
    pub generation: u64,
    /// Privilege names.
    pub privileges: Vec<String>,
    /// The function allow-list, if any.
    pub functions: Option<Vec<String>>,
    /// The certificate binding (`sha256:…`, `dns:…`, `uri:…`), if any.
    pub binding: Option<String>,
    /// Expiry, unix seconds.
    pub expires_at: Option<u64>,
    /// During a rotation's overlap window: the previous secret's SHA-256,
    /// its generation, and the unix milliseconds at which it stops working.
    pub previous: Option<([u8; 32], u64, u64)>,
}

impl Credential {
    /// The key store's view of this credential: refuses unknown privilege
    /// names, bad bindings, and a credential that is neither (or both) an
    /// API key and an Ed25519 key.
    pub fn to_key(&self) -> Result<netproc_auth::PropagatedKey, String> {
        let secret = match (self.secret_sha256, self.ed25519_public_key) {
            (Some(secret_sha256), None) => netproc_auth::PropagatedSecret::ApiKey { secret_sha256 },
            (None, Some(public_key)) => netproc_auth::PropagatedSecret::Ed25519 { public_key },
            _ => {
                return Err(format!(
                    "credential {:?}: exactly one of secret_sha256 and ed25519_public_key",
                    self.id
                ));
            }
        };
        let privileges = self
            .privileges
            .iter()
            .map(|p| p.parse::<netproc_wire::Privilege>())
            .collect::<Result<netproc_auth::PrivilegeSet, _>>()
            .map_err(|e| format!("credential {:?}: {e}", self.id))?;
        let mut key =
            netproc_auth::PropagatedKey::new(self.id.clone(), secret, self.generation, privileges);
        key.functions = self.functions.as_ref().map(|f| f.iter().cloned().collect());
        key.binding = self
            .binding
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| format!("credential {:?}: {e}", self.id))?;
        key.expires_at = self.expires_at;
        key.previous = self
            .previous
            .map(
                |(secret_sha256, generation, valid_until_ms)| netproc_auth::PreviousSecret {
                    secret_sha256,
                    generation,
                    valid_until_ms,
                },
            );
        Ok(key)
    }
}

/// What an event does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
// Events are built one at a time and sent at once; boxing the upsert would
// only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum EventKind {
    /// Create or replace one credential.
    Upsert(Credential),
    /// Remove one credential.
    Delete {
        /// The key id.
        id: String,
    },
    /// Everything the target should have; replaces every propagated
    /// credential (locally configured keys are untouched).
    Snapshot(Vec<Credential>),
    /// One part of a snapshot too large for one message: parts carry
    /// consecutive `seq`s, `index` 0 to `total - 1`. The target applies the
    /// whole snapshot when the last part arrives, as if it were one
    /// [`Snapshot`](EventKind::Snapshot); a snapshot interrupted between
    /// parts is resumed in order or replaced by a newer one.
    SnapshotPart {
        /// This part's position, from 0.
        index: u32,
        /// How many parts the snapshot has.
        total: u32,
        /// Its credentials.
        credentials: Vec<Credential>,
    },
    /// Refuse a client certificate at the handshake and end the sessions
    /// over it, until `not_after` (unix ms; the certificate's own expiry).
    /// Sent only to targets that announce it
    /// ([`EXTENSION_V3`](crate::EXTENSION_V3)).
    DenyCert {
        /// Which certificates.
        cert: CertRef,
        /// Until when, unix milliseconds.
        not_after: u64,
    },
    /// Stop refusing a certificate denied before.
    AllowCert {
        /// Which certificates.
        cert: CertRef,
    },
    /// The whole deny list (after a snapshot): replaces what the target
    /// holds.
    DenyList(Vec<(CertRef, u64)>),
}

/// A denied certificate as it travels: by issuer and serial, or by its
/// public key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CertRef {
    /// The certificate with this serial (lowercase hex) from this issuer
    /// (its distinguished name).
    Serial {
        /// The issuer's distinguished name.
        issuer: String,
        /// The serial, lowercase hex.
        serial: String,
    },
    /// Every certificate over this public key: SHA-256 of its
    /// SubjectPublicKeyInfo.
    Spki([u8; 32]),
}

impl CertRef {
    /// As the server's deny list holds it.
    pub fn to_denied(&self) -> netproc_pki::DeniedCert {
        match self {
            CertRef::Serial { issuer, serial } => netproc_pki::DeniedCert::Serial {
                issuer: issuer.clone(),
                serial: serial.clone(),
            },
            CertRef::Spki(fp) => {
                netproc_pki::DeniedCert::Spki(netproc_pki::Fingerprint::from_bytes(*fp))
            }
        }
    }

    /// From the server's deny-list form.
    pub fn from_denied(d: &netproc_pki::DeniedCert) -> CertRef {
        match d {
            netproc_pki::DeniedCert::Serial { issuer, serial } => CertRef::Serial {
                issuer: issuer.clone(),
                serial: serial.clone(),
            },
            netproc_pki::DeniedCert::Spki(fp) => CertRef::Spki(*fp.as_bytes()),
        }
    }

    /// Its name where credentials have ids (delivery state, history):
    /// `spki:<64 hex>` or `serial:<hex>@<issuer>`.
    pub fn label(&self) -> String {
        match self {
            CertRef::Spki(fp) => format!("spki:{}", netproc_pki::Fingerprint::from_bytes(*fp)),
            CertRef::Serial { issuer, serial } => format!("serial:{serial}@{issuer}"),
        }
    }
}

impl EventKind {
    /// Whether this event starts a snapshot (and so may follow a gap).
    pub fn starts_snapshot(&self) -> bool {
        matches!(
            self,
            EventKind::Snapshot(_) | EventKind::SnapshotPart { index: 0, .. }
        )
    }
}

/// One event for one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Event {
    /// Identifies the change this event carries (the authority's record of
    /// it); the same change re-signed for a retry keeps its id.
    pub event_id: u64,
    /// The target server's name: an event for one target is refused by
    /// every other.
    pub target: String,
    /// Strictly increasing per target; the target's cursor.
    pub seq: u64,
    /// When this delivery attempt was signed, unix milliseconds.
    pub issued_at_ms: u64,
    /// What to do.
    pub kind: EventKind,
}

impl Event {
    /// An event for `target` with sequence number `seq`, issued at `now`
    /// (its `event_id` is `seq` until set otherwise).
    pub fn new(target: impl Into<String>, seq: u64, now: SystemTime, kind: EventKind) -> Event {
        Event {
            event_id: seq,
            target: target.into(),
            seq,
            issued_at_ms: unix_ms(now),
            kind,
        }
    }
}

/// An event as sent: its exact encoded bytes, the signer's public key and
/// the signature over those bytes. Targets verify the bytes they received,
/// never a re-encoding (postcard accepts more than one encoding of a value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SignedEvent {
    /// The postcard encoding of an [`Event`].
    pub body: Vec<u8>,
    /// The authority key that signed it.
    pub signer: [u8; 32],
    /// Ed25519 signature over the domain tag and `body`.
    pub signature: Vec<u8>,
}

/// An event could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode the event: {0}")]
pub struct EncodeError(String);

/// `f` over `items`, in order; a batch of 16 or more on several threads
/// (as many as the host has cores, at most 4): signing (~20 µs) and
/// checking (~50 µs) each event are the costly steps of propagation, and
/// independent of each other. `None` if a thread panicked.
pub(crate) fn map_batch<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
) -> Option<Vec<R>> {
    /// Below this, one thread: a thread costs more than it saves.
    const PARALLEL_FROM: usize = 16;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if items.len() < PARALLEL_FROM || threads < 2 {
        return Some(items.iter().map(&f).collect());
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let others: Vec<_> = items
            .chunks(chunk)
            .skip(1)
            .map(|c| scope.spawn(move || c.iter().map(f).collect::<Vec<_>>()))
            .collect();
        let mut out: Vec<R> = items[..chunk].iter().map(f).collect();
        for handle in others {
            out.extend(handle.join().ok()?);
        }
        Some(out)
    })
}

/// What signs an authority's events: a key in a file today
/// ([`Ed25519Key`]); a hardware key or a KMS later, behind the same seam.
/// Run one signing key per authority process — several processes each with
/// their own key, every one trusted by the targets — so a key never has to
/// be shared between hosts, and one can be removed on its own.
pub trait Signer: Send + Sync + 'static {
    /// The Ed25519 public key targets trust for this signer.
    fn public_key(&self) -> [u8; 32];

    /// An Ed25519 signature (64 bytes) of `message`.
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError>;
}

/// A signer could not sign (a device or service failed).
#[derive(Debug, Clone, thiserror::Error)]
#[error("signing failed: {0}")]
pub struct SignError(pub std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl Signer for Ed25519Key {
    fn public_key(&self) -> [u8; 32] {
        Ed25519Key::public_key(self)
    }

    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        Ok(Ed25519Key::sign(self, message))
    }
}

/// The second event format: an [`Event`] with the epoch of the authority
/// process that signed it (its delivery lease's term). A target keeps the
/// highest epoch it has applied and refuses lower ones
/// ([`RejectReason::StaleLeader`]), which fences a deposed leader. Sent
/// only to targets that accept the second delivery extension
/// ([`EXTENSION_V2`](crate::EXTENSION_V2)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EpochEvent {
    /// The signer's epoch (1 for an authority without a lease: SQLite).
    pub epoch: u64,
    /// The event.
    pub event: Event,
}

/// Encodes and signs `event` in the second format, with `epoch`.
pub fn sign_with_epoch<S: Signer + ?Sized>(
    event: &Event,
    epoch: u64,
    signer: &S,
) -> Result<SignedEvent, EncodeError> {
    let wrapped = EpochEvent {
        epoch,
        event: event.clone(),
    };
    let body = postcard::to_stdvec(&wrapped).map_err(|e| EncodeError(e.to_string()))?;
    let mut message = Vec::with_capacity(DOMAIN_V2.len() + body.len());
    message.extend_from_slice(DOMAIN_V2);
    message.extend_from_slice(&body);
    let signature = signer
        .sign(&message)
        .map_err(|e| EncodeError(e.to_string()))?
        .to_vec();
    Ok(SignedEvent {
        body,
        signer: signer.public_key(),
        signature,
    })
}

/// Encodes and signs `event` with the authority's signer.
pub fn sign<S: Signer + ?Sized>(event: &Event, signer: &S) -> Result<SignedEvent, EncodeError> {
    let body = postcard::to_stdvec(event).map_err(|e| EncodeError(e.to_string()))?;
    let signature = signer
        .sign(&signed_bytes(&body))
        .map_err(|e| EncodeError(e.to_string()))?
        .to_vec();
    Ok(SignedEvent {
        body,
        signer: signer.public_key(),
        signature,
    })
}

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + body.len());
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(body);
    out
}

/// A target's answer to one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Ack {
    /// Applied; the cursor is now the event's `seq`.
    Applied,
    /// `seq` ≤ cursor: already applied, nothing done.
    Duplicate,
    /// `seq` is past cursor + 1: events are missing; send a snapshot.
    NeedsSnapshot,
    /// Refused, nothing applied.
    Rejected(RejectReason),
}

/// Why a target refused an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// The key id exists locally (not propagated).
    #[error("conflict")]
    Conflict,
    /// The signature does not verify.
    #[error("bad_signature")]
    BadSignature,
    /// The signer is not a trusted authority key.
    #[error("unknown_signer")]
    UnknownSigner,
    /// The event is for another target.
    #[error("wrong_target")]
    WrongTarget,
    /// Issued outside the freshness window.
    #[error("stale")]
    Stale,
    /// The body does not decode.
    #[error("malformed")]
    Malformed,
    /// Signed by a leader of an earlier epoch than one this target has
    /// already applied: a deposed leader's late batch (second format
    /// only). Nothing applied, cursor unchanged.
    #[error("stale_leader")]
    StaleLeader,
}

/// The outcome of [`Verifier::check`] (exhaustive: a target handles both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Authentic, fresh, for this target and next in order: apply it,
    /// persist the cursor (`seq`) in the same transaction, answer
    /// [`Ack::Applied`].
    Apply(Box<Event>),
    /// Answer this without applying anything.
    Ack(Ack),
}

/// The target side: which authorities it trusts, its own name, and how
/// fresh an event must be.
#[derive(Debug, Clone)]
pub struct Verifier {
    target: String,
    trusted: Vec<[u8; 32]>,
    freshness: Duration,
}

impl Verifier {
    /// A verifier for the target named `target`, trusting these authority
    /// public keys (several, so the authority's key can be rotated), with
    /// events valid within `freshness` of the target's clock.
    pub fn new(target: impl Into<String>, trusted: Vec<[u8; 32]>, freshness: Duration) -> Verifier {
        Verifier {
            target: target.into(),
            trusted,
            freshness,
        }
    }

    /// Checks one delivery against the target's `cursor` (the last applied
    /// `seq`, 0 before any) at `now`. Checks run in an order that reveals
    /// nothing to a forger: signer, signature, decoding, target, freshness,
    /// then order. A snapshot (or a snapshot's first part) is accepted past
    /// a gap (that is its purpose)
    /// but, like any event, not at or below the cursor.
    pub fn check(&self, signed: &SignedEvent, cursor: u64, now: SystemTime) -> Check {
        self.check_format(signed, cursor, None, now).0
    }

    /// [`check`](Self::check) for the second format ([`EpochEvent`]): also
    /// refuses an epoch below `max_epoch` (the highest this target has
    /// applied) with [`RejectReason::StaleLeader`]. Returns the event's
    /// epoch when it is authentic and for this target (0 otherwise).
    pub fn check_epoch(
        &self,
        signed: &SignedEvent,
        cursor: u64,
        max_epoch: u64,
        now: SystemTime,
    ) -> (Check, u64) {
        self.check_format(signed, cursor, Some(max_epoch), now)
    }

    /// The signature part of a check: a trusted signer and a valid
    /// signature over the format's domain and the body.
    fn signature(&self, signed: &SignedEvent, with_epoch: bool) -> Result<(), RejectReason> {
        if !self.trusted.contains(&signed.signer) {
            return Err(RejectReason::UnknownSigner);
        }
        let domain = if with_epoch { DOMAIN_V2 } else { DOMAIN };
        let mut message = Vec::with_capacity(domain.len() + signed.body.len());
        message.extend_from_slice(domain);
        message.extend_from_slice(&signed.body);
        if !verify_ed25519(&signed.signer, &message, &signed.signature) {
            return Err(RejectReason::BadSignature);
        }
        Ok(())
    }

    /// The signature part of the checks of a whole delivery, index-aligned
    /// with `events`: the costly step (~50 µs an event) and the one that
    /// depends on no state, so a large batch is checked on several threads
    /// (at most 4). Pass each result to [`check_signed`](Self::check_signed).
    pub(crate) fn signatures(
        &self,
        events: &[SignedEvent],
        with_epoch: bool,
    ) -> Vec<Result<(), RejectReason>> {
        map_batch(events, |e| self.signature(e, with_epoch))
            // A check that panicked accepts nothing.
            .unwrap_or_else(|| vec![Err(RejectReason::BadSignature); events.len()])
    }

    /// [`check`](Self::check) or [`check_epoch`](Self::check_epoch) (with
    /// `max_epoch`) whose signature part was done by
    /// [`signatures`](Self::signatures).
    pub(crate) fn check_signed(
        &self,
        signed: &SignedEvent,
        signature: Result<(), RejectReason>,
        cursor: u64,
        max_epoch: Option<u64>,
        now: SystemTime,
    ) -> (Check, u64) {
        self.check_with(signed, Some(signature), cursor, max_epoch, now)
    }

    fn check_format(
        &self,
        signed: &SignedEvent,
        cursor: u64,
        max_epoch: Option<u64>,
        now: SystemTime,
    ) -> (Check, u64) {
        self.check_with(signed, None, cursor, max_epoch, now)
    }

    fn check_with(
        &self,
        signed: &SignedEvent,
        signature: Option<Result<(), RejectReason>>,
        cursor: u64,
        max_epoch: Option<u64>,
        now: SystemTime,
    ) -> (Check, u64) {
        let reject = |r| (Check::Ack(Ack::Rejected(r)), 0);
        let signature = signature.unwrap_or_else(|| self.signature(signed, max_epoch.is_some()));
        if let Err(r) = signature {
            return reject(r);
        }
        let decoded = match max_epoch {
            None => decode_exact::<Event>(&signed.body).map(|e| (e, 0)),
            Some(_) => decode_exact::<EpochEvent>(&signed.body).map(|w| (w.event, w.epoch)),
        };
        let (event, epoch) = match decoded {
            Ok(e) => e,
            Err(_) => return reject(RejectReason::Malformed),
        };
        if event.target != self.target {
            return reject(RejectReason::WrongTarget);
        }
        let window = u64::try_from(self.freshness.as_millis()).unwrap_or(u64::MAX);
        if unix_ms(now).abs_diff(event.issued_at_ms) > window {
            return reject(RejectReason::Stale);
        }
        if max_epoch.is_some_and(|max| epoch < max) {
            return reject(RejectReason::StaleLeader);
        }
        if event.seq <= cursor {
            return (Check::Ack(Ack::Duplicate), epoch);
        }
        let in_order = event.seq == cursor + 1 || event.kind.starts_snapshot();
        if !in_order {
            return (Check::Ack(Ack::NeedsSnapshot), epoch);
        }
        (Check::Apply(Box::new(event)), epoch)
    }
}

/// Decodes a `T` that must use all of `bytes`: postcard's `from_bytes`
/// ignores trailing bytes, every decoder of peer bytes here refuses them.
pub(crate) fn decode_exact<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
) -> Result<T, postcard::Error> {
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(postcard::Error::DeserializeBadEncoding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch large enough to be checked on several threads keeps each
    /// event's own answer, in order.
    #[test]
    fn signatures_checked_on_several_threads_stay_with_their_events() {
        let key = Ed25519Key::generate().unwrap();
        let rogue = Ed25519Key::generate().unwrap();
        let verifier = Verifier::new("t1", vec![key.public_key()], Duration::from_secs(300));
        let now = SystemTime::now();
        let event = |seq| Event::new("t1", seq, now, EventKind::Delete { id: "k".into() });
        let mut events: Vec<SignedEvent> = (1..=40)
            .map(|seq| sign(&event(seq), &key).unwrap())
            .collect();
        events[25].signature[0] ^= 1;
        events[33] = sign(&event(34), &rogue).unwrap();
        let got = verifier.signatures(&events, false);
        assert_eq!(got.len(), events.len());
        for (i, r) in got.iter().enumerate() {
            let expected = match i {
                25 => Err(RejectReason::BadSignature),
                33 => Err(RejectReason::UnknownSigner),
                _ => Ok(()),
            };
            assert_eq!(*r, expected, "event {i}");
            assert_eq!(*r, verifier.signature(&events[i], false), "event {i}");
        }
        // The second format's domain: the first format's signatures fail.
        assert!(
            verifier
                .signatures(&events, true)
                .iter()
                .all(Result::is_err)
        );
    }
}
