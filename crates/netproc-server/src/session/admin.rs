//! Operations answered at once, without running user code: listings and
//! the admin operations.

use netproc_wire::{ErrorBody, ErrorCode, Operation, Outcome, PROTOCOL_VERSION, Value, to_value};

use super::Session;
use crate::audit::{self};
use crate::sessions::SessionSelector;

impl Session {
    /// Operations answered at once, without running user code.
    pub(super) fn run_inline(&self, op: Operation) -> Outcome {
        let shared = &self.shared;
        let principal = &self.facts.principal;
        let err = |code, msg: String| Outcome::Err(ErrorBody::new(code, msg));
        match op {
            Operation::ListFunctions => {
                let may_invoke = principal
                    .privileges
                    .satisfies(netproc_wire::Privilege::InvokeFunctions);
                let mut entries: Vec<(String, Value)> = shared
                    .defs
                    .registry
                    .functions
                    .keys()
                    .filter(|n| may_invoke && principal.may_call(n))
                    .map(|n| {
                        let v = Value::Map(
                            [
                                ("kind".to_owned(), Value::from("native")),
                                ("name".to_owned(), Value::from(n.as_str())),
                            ]
                            .into(),
                        );
                        (n.clone(), v)
                    })
                    .collect();
                if let Some(scripts) = &shared.defs.scripts {
                    entries.extend(scripts.list(principal));
                }
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Outcome::Ok(Value::List(entries.into_iter().map(|(_, v)| v).collect()))
            }
            Operation::ListConstants => {
                Outcome::Ok(Value::Map((*shared.defs.registry.constants()).clone()))
            }
            Operation::ListDependencies => Outcome::Ok(
                shared
                    .defs
                    .scripts
                    .as_ref()
                    .map_or(Value::List(Vec::new()), |s| s.list_dependencies()),
            ),
            Operation::WhoAmI => {
                let cert = &self.facts.cert;
                let me = netproc_wire::WhoAmI {
                    principal: principal.id.clone(),
                    key_id: principal.key_id.clone(),
                    key_generation: principal.key_generation,
                    privileges: principal.privileges.names(),
                    functions: principal
                        .functions
                        .as_ref()
                        .map(|f| f.iter().cloned().collect()),
                    expires_at_ms: principal.expires_at.map(netproc_wire::unix_ms),
                    cert_binding: principal.cert_binding.clone(),
                    cert_fingerprint: cert.fingerprint.to_string(),
                    cert_not_after_ms: netproc_wire::unix_ms(cert.not_after),
                    session_id: self.facts.session_id,
                    server_name: shared.name.clone(),
                    server_time_ms: netproc_wire::unix_ms(std::time::SystemTime::now()),
                };
                Outcome::Ok(to_value(&me).unwrap_or_default())
            }
            Operation::ServerInfo => {
                audit::admin_action(&self.facts, "server_info", "");
                let info = ServerInfoReply {
                    name: &shared.name,
                    version: env!("CARGO_PKG_VERSION"),
                    protocol_version: PROTOCOL_VERSION,
                    uptime_ms: u64::try_from(shared.started.elapsed().as_millis())
                        .unwrap_or(u64::MAX),
                    sessions: shared.sessions.len(),
                };
                Outcome::Ok(to_value(&info).unwrap_or_default())
            }
            Operation::ListSessions => {
                audit::admin_action(&self.facts, "list_sessions", "");
                Outcome::Ok(to_value(&shared.sessions.list(&shared.liveness)).unwrap_or_default())
            }
            Operation::DisconnectSession { session_id } => {
                audit::admin_action(&self.facts, "disconnect_session", &session_id.to_string());
                let n = shared.close_sessions_inner(
                    &SessionSelector::Session(session_id),
                    ErrorCode::DisconnectedByAdmin,
                );
                Outcome::Ok(Value::Int(n as i64))
            }
            Operation::DisconnectPrincipal { principal: target } => {
                audit::admin_action(&self.facts, "disconnect_principal", &target);
                let n = shared.close_sessions_inner(
                    &SessionSelector::Principal(target),
                    ErrorCode::DisconnectedByAdmin,
                );
                Outcome::Ok(Value::Int(n as i64))
            }
            Operation::AbuseMetrics => {
                audit::admin_action(&self.facts, "abuse_metrics", "");
                let snapshot = shared.metrics();
                Outcome::Ok(to_value(&snapshot).unwrap_or_default())
            }
            Operation::ListBlocked => {
                audit::admin_action(&self.facts, "list_blocked", "");
                Outcome::Ok(shared.abuse.blocked_value())
            }
            Operation::Unblock { entry } => {
                audit::admin_action(&self.facts, "unblock", &entry);
                let lifted = shared.abuse.blocklist.unblock(&entry);
                if lifted {
                    tracing::warn!(server = %shared.name, entry = %entry, "unblocked by an administrator");
                }
                Outcome::Ok(Value::Bool(lifted))
            }
            Operation::GetLimits => {
                audit::admin_action(&self.facts, "get_limits", "");
                Outcome::Ok(shared.abuse.options_value())
            }
            Operation::SetLimits { limits } => {
                let applied = parse_limits(limits)
                    .and_then(|o| shared.set_options(o).map_err(|e| e.to_string()));
                match applied {
                    Ok(()) => {
                        audit::admin_action(&self.facts, "set_limits", "");
                        Outcome::Ok(Value::Null)
                    }
                    Err(message) => err(ErrorCode::InvalidArgument, message),
                }
            }
            other => err(
                ErrorCode::InvalidOperation,
                format!("operation {} is not supported by this server", other.name()),
            ),
        }
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
