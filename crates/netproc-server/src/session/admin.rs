//! Operations answered at once, without running user code: listings,
//! `whoami`, and the admin operations (in [`crate::admin_ops`]).

use netproc_wire::{ErrorBody, ErrorCode, Operation, Outcome, Value, to_value};

use super::Session;
use crate::admin_ops::AdminAnswer;
use crate::audit::{self};

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
            other => {
                let facts = &self.facts;
                let audit = |op: &'static str, target: &str| audit::admin_action(facts, op, target);
                match crate::admin_ops::run(shared, other, &audit) {
                    AdminAnswer::Now(outcome) => outcome,
                    // Run as calls by the dispatcher, not inline.
                    AdminAnswer::Later(_) => err(
                        ErrorCode::Internal,
                        "an operation that must run as a call".to_owned(),
                    ),
                    AdminAnswer::NotAdmin(other) => err(
                        ErrorCode::InvalidOperation,
                        format!("operation {} is not supported by this server", other.name()),
                    ),
                }
            }
        }
    }
}
