//! Change requests (PostgreSQL, least privilege): a role that may not
//! write the authority's tables records `ensure`, `rotate` and `revoke`
//! through the `netproc_request` function (migration 4), which stores the
//! requester's login role as the database authenticated it; the leading
//! authority process applies each request in one transaction with its
//! outcome, audits it, and signs what follows as usual. A new API key's
//! secret is made by the requester: only its hash is sent.
//!
//! The request body comes from a less trusted role: it is decoded and
//! checked here exactly as `Authority::ensure`'s own input is.

use std::collections::BTreeSet;
use std::time::{Duration, UNIX_EPOCH};

use netproc_auth::{CertBinding, KeySpec, PrivilegeSet, valid_key_id};
use serde::{Deserialize, Serialize};

use crate::query::{Sql, args, encode, i64_of, u64_of};
use crate::types::{AuthorityError, CredentialSpec, DatabaseError};

/// Requests the leader takes up per turn, at most.
const PER_TURN: i64 = 64;

/// What is asked, besides the action and the credential id.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Body {
    pub(crate) targets: Vec<String>,
    privileges: Vec<String>,
    functions: Option<Vec<String>>,
    binding: Option<String>,
    /// Unix seconds.
    expires_at: Option<u64>,
    ed25519_public_key: Option<[u8; 32]>,
    recreate: bool,
    /// A new API key's (or a rotation's) secret hash.
    pub(crate) secret_sha256: Option<[u8; 32]>,
    pub(crate) overlap_ms: Option<u64>,
    /// A certificate to deny or allow back.
    pub(crate) cert: Option<crate::CertRef>,
    /// Until when a denial lasts, unix ms.
    pub(crate) not_after_ms: Option<u64>,
}

impl Body {
    pub(crate) fn ensure(
        spec: &CredentialSpec,
        targets: BTreeSet<String>,
        secret: Option<[u8; 32]>,
    ) -> Body {
        let k = &spec.key;
        Body {
            targets: targets.into_iter().collect(),
            privileges: k.privileges.names(),
            functions: k.functions.as_ref().map(|f| f.iter().cloned().collect()),
            binding: k.binding.as_ref().map(ToString::to_string),
            expires_at: k
                .expires_at
                .map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())),
            ed25519_public_key: spec.ed25519_public_key,
            recreate: spec.recreate,
            secret_sha256: secret,
            overlap_ms: None,
            cert: None,
            not_after_ms: None,
        }
    }

    pub(crate) fn cert(cert: crate::CertRef, not_after_ms: Option<u64>) -> Body {
        Body {
            cert: Some(cert),
            not_after_ms,
            ..Body::default()
        }
    }

    pub(crate) fn rotate(secret: [u8; 32], overlap: Option<Duration>) -> Body {
        Body {
            secret_sha256: Some(secret),
            overlap_ms: overlap.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            ..Body::default()
        }
    }

    /// The spec this body asks for, checked as `Authority::ensure` checks
    /// its input.
    pub(crate) fn spec(&self, id: &str) -> Result<CredentialSpec, AuthorityError> {
        if !valid_key_id(id) {
            return Err(AuthorityError::Invalid(
                "key id: expected 1 to 64 characters of [a-z0-9-]".into(),
            ));
        }
        let privileges: PrivilegeSet = self
            .privileges
            .join(",")
            .parse()
            .map_err(|e| AuthorityError::Invalid(format!("privileges: {e}")))?;
        let mut key = KeySpec::new(privileges);
        if let Some(f) = &self.functions {
            key = key.functions(f.iter().cloned());
        }
        if let Some(b) = &self.binding {
            let b: CertBinding = b
                .parse()
                .map_err(|e| AuthorityError::Invalid(format!("binding: {e}")))?;
            key = key.binding(b);
        }
        if let Some(secs) = self.expires_at {
            key = key.expires_at(UNIX_EPOCH + Duration::from_secs(secs));
        }
        let spec = match self.ed25519_public_key {
            Some(pk) => CredentialSpec::ed25519(id, pk, key),
            None => CredentialSpec::api_key(id, key),
        };
        Ok(spec.recreate(self.recreate))
    }
}

/// A request's outcome, as the leader records it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Outcome {
    Ensured { created: bool, changed: bool },
    Done,
    Refused(Refusal),
}

/// Why a request was refused: the [`AuthorityError`] it would have been.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Refusal {
    UnknownCredential(String),
    UnknownTarget(String),
    Invalid(String),
    NotAnApiKey(String),
    AlreadyExists(String),
    Revoked(String),
    Failed(String),
}

impl From<&AuthorityError> for Refusal {
    fn from(e: &AuthorityError) -> Refusal {
        match e {
            AuthorityError::UnknownCredential(s) => Refusal::UnknownCredential(s.clone()),
            AuthorityError::UnknownTarget(s) => Refusal::UnknownTarget(s.clone()),
            AuthorityError::Invalid(s) => Refusal::Invalid(s.clone()),
            AuthorityError::NotAnApiKey(s) => Refusal::NotAnApiKey(s.clone()),
            AuthorityError::AlreadyExists(s) => Refusal::AlreadyExists(s.clone()),
            AuthorityError::Revoked(s) => Refusal::Revoked(s.clone()),
            other => Refusal::Failed(other.to_string()),
        }
    }
}

impl Outcome {
    pub(crate) fn into_result(self) -> Result<Outcome, AuthorityError> {
        match self {
            Outcome::Refused(r) => Err(match r {
                Refusal::UnknownCredential(s) => AuthorityError::UnknownCredential(s),
                Refusal::UnknownTarget(s) => AuthorityError::UnknownTarget(s),
                Refusal::Invalid(s) => AuthorityError::Invalid(s),
                Refusal::NotAnApiKey(s) => AuthorityError::NotAnApiKey(s),
                Refusal::AlreadyExists(s) => AuthorityError::AlreadyExists(s),
                Refusal::Revoked(s) => AuthorityError::Revoked(s),
                Refusal::Failed(s) => {
                    AuthorityError::Database(DatabaseError::new("the change request failed", s))
                }
            }),
            done => Ok(done),
        }
    }
}

/// Records a request; its number.
pub(crate) fn submit(
    c: &mut dyn Sql,
    action: &str,
    id: &str,
    body: &Body,
    label: &str,
) -> Result<u64, AuthorityError> {
    let body = encode(body)?;
    let row = c
        .first(
            "SELECT netproc_request($1, $2, $3, $4)",
            args![action, id, &body, label],
        )?
        .ok_or_else(|| AuthorityError::Database(DatabaseError::new("", "no request number")))?;
    Ok(u64_of(row.i64(0)?))
}

/// A request's outcome, once applied.
pub(crate) fn outcome(c: &mut dyn Sql, request: u64) -> Result<Option<Outcome>, AuthorityError> {
    let Some(row) = c.first(
        "SELECT state, result FROM netproc_request_outcome($1)",
        args![i64_of(request)],
    )?
    else {
        return Err(AuthorityError::Database(DatabaseError::new(
            "",
            format!("change request {request} is not this role's"),
        )));
    };
    if row.string(0)? == "pending" {
        return Ok(None);
    }
    let result = row.bytes(1)?;
    postcard::from_bytes(&result)
        .map(Some)
        .map_err(|e| AuthorityError::Database(DatabaseError::new("unreadable request outcome", e)))
}

/// The oldest pending requests (none on SQLite).
pub(crate) fn pending(c: &mut dyn Sql) -> Result<Vec<u64>, AuthorityError> {
    if c.dialect() == crate::query::Dialect::Sqlite {
        return Ok(Vec::new());
    }
    c.query(
        "SELECT id FROM change_requests WHERE state = 'pending' ORDER BY id LIMIT $1",
        args![PER_TURN],
    )?
    .iter()
    .map(|r| r.i64(0).map(u64_of))
    .collect()
}

/// A pending request, claimed: its row locked until the transaction
/// ends, so it is applied once however many processes try.
pub(crate) struct Claimed {
    pub(crate) action: String,
    pub(crate) credential_id: String,
    /// `None`: undecodable.
    pub(crate) body: Option<Body>,
    pub(crate) requested_by: String,
    pub(crate) label: String,
}

/// Claims request `request` if it is still pending.
pub(crate) fn claim(c: &mut dyn Sql, request: u64) -> Result<Option<Claimed>, AuthorityError> {
    let Some(row) = c.first(
        "SELECT action, credential_id, body, requested_by, label FROM change_requests
         WHERE id = $1 AND state = 'pending' FOR UPDATE",
        args![i64_of(request)],
    )?
    else {
        return Ok(None);
    };
    Ok(Some(Claimed {
        action: row.string(0)?,
        credential_id: row.string(1)?,
        body: postcard::from_bytes(&row.bytes(2)?).ok(),
        requested_by: row.string(3)?,
        label: row.string(4)?,
    }))
}

/// Records a claimed request's outcome (and prunes requests applied over a
/// day ago).
pub(crate) fn record(
    c: &mut dyn Sql,
    request: u64,
    outcome: &Outcome,
) -> Result<(), AuthorityError> {
    let state = match outcome {
        Outcome::Refused(_) => "refused",
        _ => "done",
    };
    c.exec(
        "UPDATE change_requests SET state = $2, result = $3, done_at = now() WHERE id = $1",
        args![i64_of(request), state, &encode(outcome)?],
    )?;
    c.exec(
        "DELETE FROM change_requests WHERE state <> 'pending' AND done_at < now() - interval '1 day'",
        &[],
    )?;
    Ok(())
}
