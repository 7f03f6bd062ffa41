//! The admin operations, once for both ways in: a session with
//! `admin_privileges`, and the local admin socket. Each is audited through
//! the caller's `audit` (who asked differs between the two).

use std::sync::Arc;

use netproc_auth::BoxFuture;
use netproc_wire::{ErrorBody, ErrorCode, Operation, Outcome, PROTOCOL_VERSION, Value, to_value};

use crate::function::CallError;
use crate::sessions::SessionSelector;
use crate::shared::Shared;

/// How an admin operation is answered.
pub(crate) enum AdminAnswer {
    /// At once.
    Now(Outcome),
    /// When the future completes (a reload reads files on a blocking thread).
    Later(BoxFuture<'static, Result<Value, CallError>>),
    /// Not an admin operation: handed back.
    NotAdmin(Operation),
}

/// Runs `op` if it is an admin operation. `audit(operation, target)`
/// records it (for `set_limits`, only once the limits are accepted).
pub(crate) fn run(
    shared: &Arc<Shared>,
    op: Operation,
    audit: &dyn Fn(&'static str, &str),
) -> AdminAnswer {
    let err = |code, msg: String| AdminAnswer::Now(Outcome::Err(ErrorBody::new(code, msg)));
    let ok = |v: Value| AdminAnswer::Now(Outcome::Ok(v));
    match op {
        Operation::ServerInfo => {
            audit("server_info", "");
            let info = ServerInfoReply {
                name: &shared.name,
                version: env!("CARGO_PKG_VERSION"),
                protocol_version: PROTOCOL_VERSION,
                uptime_ms: u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                sessions: shared.sessions.len(),
            };
            ok(to_value(&info).unwrap_or_default())
        }
        Operation::ListSessions => {
            audit("list_sessions", "");
            ok(to_value(&shared.sessions.list(&shared.liveness)).unwrap_or_default())
        }
        Operation::DisconnectSession { session_id } => {
            audit("disconnect_session", &session_id.to_string());
            let n = shared.close_sessions_inner(
                &SessionSelector::Session(session_id),
                ErrorCode::DisconnectedByAdmin,
            );
            ok(Value::Int(n as i64))
        }
        Operation::DisconnectPrincipal { principal } => {
            audit("disconnect_principal", &principal);
            let n = shared.close_sessions_inner(
                &SessionSelector::Principal(principal),
                ErrorCode::DisconnectedByAdmin,
            );
            ok(Value::Int(n as i64))
        }
        Operation::AbuseMetrics => {
            audit("abuse_metrics", "");
            ok(to_value(&shared.metrics()).unwrap_or_default())
        }
        Operation::ListBlocked => {
            audit("list_blocked", "");
            ok(shared.abuse.blocked_value())
        }
        Operation::Unblock { entry } => {
            audit("unblock", &entry);
            let lifted = shared.abuse.blocklist.unblock(&entry);
            if let Some(fleet) = shared.abuse.fleet.get() {
                fleet.unblocked(&entry);
            }
            if lifted {
                tracing::warn!(server = %shared.name, entry = %entry, "unblocked by an administrator");
            }
            ok(Value::Bool(lifted))
        }
        Operation::GetLimits => {
            audit("get_limits", "");
            ok(shared.abuse.options_value())
        }
        Operation::SetLimits { limits } => {
            let applied =
                parse_limits(limits).and_then(|o| shared.set_options(o).map_err(|e| e.to_string()));
            match applied {
                Ok(()) => {
                    audit("set_limits", "");
                    ok(Value::Null)
                }
                Err(message) => err(ErrorCode::InvalidArgument, message),
            }
        }
        Operation::Reload => {
            audit("reload", "");
            let shared = Arc::clone(shared);
            AdminAnswer::Later(Box::pin(async move {
                let report = shared
                    .reload()
                    .await
                    .map_err(|e| CallError::with_code(ErrorCode::InvalidArgument, e.to_string()))?;
                let fields = report
                    .restart_required
                    .into_iter()
                    .map(Value::String)
                    .collect();
                Ok(Value::Map(
                    [
                        (
                            "sessions_closed".to_owned(),
                            Value::Int(report.sessions_closed as i64),
                        ),
                        ("restart_required".to_owned(), Value::List(fields)),
                    ]
                    .into(),
                ))
            }))
        }
        other => AdminAnswer::NotAdmin(other),
    }
}

#[derive(serde::Serialize)]
struct ServerInfoReply<'a> {
    name: &'a str,
    version: &'static str,
    protocol_version: u32,
    uptime_ms: u64,
    sessions: usize,
}

/// The limits of a `set_limits` request, in the shape `get_limits` returns,
/// validated: the error names the field.
fn parse_limits(limits: Value) -> Result<crate::ServerOptions, String> {
    let options = netproc_wire::from_value::<crate::ServerOptions>(limits)
        .map_err(|e| format!("invalid limits: {e}"))?;
    options.validate().map_err(|e| e.to_string())?;
    Ok(options)
}

#[cfg(test)]
mod tests {
    use netproc_wire::to_value;

    use super::*;

    #[test]
    fn set_limits_takes_what_get_limits_gives_and_names_a_bad_field() {
        let mut o = crate::ServerOptions::default();
        o.request_controls.per_ip.burst_tokens = 7;
        let parsed = parse_limits(to_value(&o).unwrap()).unwrap();
        assert_eq!(parsed, o);
        o.request_controls.per_ip.interval_ms = 0;
        let err = parse_limits(to_value(&o).unwrap()).unwrap_err();
        assert!(err.contains("request_controls.per_ip.interval_ms"), "{err}");
        let err = parse_limits(Value::from("no")).unwrap_err();
        assert!(err.starts_with("invalid limits"), "{err}");
    }
}
