//! Run-time defined functions and dependencies, in the server's registry
//! next to native functions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use netproc_auth::Principal;
use netproc_script::{
    DependencySource as ScriptSource, ScriptError, ScriptFunction, ScriptRuntime,
};
use netproc_wire::{DefineFunction, DependencySource, ErrorCode, Privilege, Value};
use sha2::{Digest, Sha256};

use crate::audit::sanitize;
use crate::function::{CallError, FunctionGuard, valid_name};
use crate::server::Shared;
use crate::sessions::unix_ms;

/// A defined script function.
pub(crate) struct ScriptEntry {
    pub(crate) function: Arc<ScriptFunction>,
    sha256: [u8; 32],
    description: Option<String>,
    defined_by: String,
    defined_at_ms: u64,
    pub(crate) guard: Option<FunctionGuard>,
}

struct DepEntry {
    kind: &'static str,
    defined_by: String,
    defined_at_ms: u64,
}

/// The script side of the registry.
pub(crate) struct Scripts {
    pub(crate) runtime: ScriptRuntime,
    functions: ArcSwap<HashMap<String, Arc<ScriptEntry>>>,
    deps: ArcSwap<BTreeMap<String, DepEntry>>,
    /// Orders definitions: each compiles, then swaps the table.
    define: tokio::sync::Mutex<()>,
}

pub(crate) fn script_error(e: ScriptError) -> CallError {
    let details = e.details();
    CallError::with_code(e.code(), e.to_string()).details(details)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn who(principal: &Principal) -> String {
    principal
        .key_id
        .clone()
        .unwrap_or_else(|| principal.id.clone())
}

impl Scripts {
    pub(crate) fn new(runtime: ScriptRuntime) -> Scripts {
        Scripts {
            runtime,
            functions: ArcSwap::from_pointee(HashMap::new()),
            deps: ArcSwap::from_pointee(BTreeMap::new()),
            define: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<ScriptEntry>> {
        self.functions.load().get(name).cloned()
    }

    /// Defines or replaces a function. The same source again is a no-op; a
    /// different one replaces it atomically (calls in progress finish on
    /// the old version).
    pub(crate) async fn define_function(
        shared: Arc<Shared>,
        def: DefineFunction,
        principal: Principal,
    ) -> Result<Value, CallError> {
        let Some(scripts) = shared.scripts.as_ref() else {
            return Err(disabled());
        };
        let name = def.name.clone();
        if !valid_name(&name) {
            return Err(CallError::invalid_argument(format!(
                "\"{}\" is not a valid function name (letters, digits and _, not starting with a digit)",
                sanitize(&name)
            )));
        }
        if shared.registry.functions.contains_key(&name) {
            return Err(CallError::invalid_argument(format!(
                "\"{name}\" belongs to a native function and cannot be redefined"
            )));
        }
        let digest: [u8; 32] = Sha256::digest(def.source.as_bytes()).into();
        if digest != def.source_sha256 {
            return Err(CallError::invalid_argument(
                "source_sha256 does not match the SHA-256 of the source",
            ));
        }
        let _ordered = scripts.define.lock().await;
        if scripts.get(&name).is_some_and(|e| e.sha256 == digest) {
            return Ok(Value::Null);
        }
        let compiled = {
            let shared = Arc::clone(&shared);
            let (name, source) = (name.clone(), def.source);
            tokio::task::spawn_blocking(move || {
                shared
                    .scripts
                    .as_ref()
                    .map(|s| s.runtime.compile(&name, &source))
            })
            .await
        };
        let function = match compiled {
            Ok(Some(Ok(f))) => Arc::new(f),
            Ok(Some(Err(e))) => return Err(script_error(e)),
            _ => return Err(CallError::with_code(ErrorCode::Internal, "internal error")),
        };
        let now = Instant::now();
        let entry = Arc::new(ScriptEntry {
            function,
            sha256: digest,
            description: def.description.map(|d| d.chars().take(1024).collect()),
            defined_by: who(&principal),
            defined_at_ms: unix_ms(SystemTime::now()),
            guard: def.limits.as_ref().map(|l| FunctionGuard::new(l, now)),
        });
        scripts.functions.rcu(|table| {
            let mut next = (**table).clone();
            next.insert(name.clone(), Arc::clone(&entry));
            next
        });
        tracing::info!(
            target: crate::AUDIT_TARGET,
            event = "define_function",
            outcome = "ok",
            function = %name,
            source_sha256 = %hex(&digest),
            key_id = %who(&principal),
        );
        Ok(Value::Null)
    }

    pub(crate) fn undefine_function(
        shared: &Shared,
        name: &str,
        principal: &Principal,
    ) -> Result<Value, CallError> {
        let Some(scripts) = shared.scripts.as_ref() else {
            return Err(disabled());
        };
        if shared.registry.functions.contains_key(name) {
            return Err(CallError::invalid_argument(format!(
                "\"{name}\" belongs to a native function and cannot be undefined"
            )));
        }
        scripts.functions.rcu(|table| {
            let mut next = (**table).clone();
            next.remove(name);
            next
        });
        tracing::info!(target: crate::AUDIT_TARGET, event = "undefine_function", outcome = "ok", function = %sanitize(name), key_id = %who(principal));
        Ok(Value::Null)
    }

    pub(crate) async fn define_dependency(
        shared: Arc<Shared>,
        alias: String,
        source: DependencySource,
        principal: Principal,
    ) -> Result<Value, CallError> {
        if shared.scripts.is_none() {
            return Err(disabled());
        }
        if !valid_name(&alias) {
            return Err(CallError::invalid_argument(format!(
                "\"{}\" is not a valid alias",
                sanitize(&alias)
            )));
        }
        let (kind, source) = match source {
            DependencySource::Script(s) => ("script", ScriptSource::Script(s)),
            DependencySource::Host(h) => ("host", ScriptSource::Host(h)),
            _ => return Err(CallError::invalid_argument("unknown dependency source")),
        };
        let defined = {
            let (shared, alias) = (Arc::clone(&shared), alias.clone());
            tokio::task::spawn_blocking(move || {
                shared
                    .scripts
                    .as_ref()
                    .map(|s| s.runtime.define_dependency(&alias, &source))
            })
            .await
        };
        match defined {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => return Err(script_error(e)),
            _ => return Err(CallError::with_code(ErrorCode::Internal, "internal error")),
        }
        if let Some(scripts) = shared.scripts.as_ref() {
            let entry = || DepEntry {
                kind,
                defined_by: who(&principal),
                defined_at_ms: unix_ms(SystemTime::now()),
            };
            scripts.deps.rcu(|deps| {
                let mut next: BTreeMap<String, DepEntry> = deps
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            DepEntry {
                                kind: v.kind,
                                defined_by: v.defined_by.clone(),
                                defined_at_ms: v.defined_at_ms,
                            },
                        )
                    })
                    .collect();
                next.insert(alias.clone(), entry());
                next
            });
        }
        tracing::info!(target: crate::AUDIT_TARGET, event = "define_dependency", outcome = "ok", alias = %alias, kind, key_id = %who(&principal));
        Ok(Value::Null)
    }

    pub(crate) fn undefine_dependency(
        shared: &Shared,
        alias: &str,
        force: bool,
        principal: &Principal,
    ) -> Result<Value, CallError> {
        let Some(scripts) = shared.scripts.as_ref() else {
            return Err(disabled());
        };
        if !force {
            let mut users: Vec<String> = scripts
                .functions
                .load()
                .iter()
                .filter(|(_, e)| e.function.imports().iter().any(|a| a == alias))
                .map(|(n, _)| n.clone())
                .collect();
            if !users.is_empty() {
                users.sort();
                return Err(CallError::invalid_argument(format!(
                    "dependency \"{}\" is imported by {}; undefine them first or force",
                    sanitize(alias),
                    users.join(", ")
                )));
            }
        }
        scripts.runtime.undefine_dependency(alias);
        scripts.deps.rcu(|deps| {
            deps.iter()
                .filter(|(k, _)| k.as_str() != alias)
                .map(|(k, v)| {
                    (
                        k.clone(),
                        DepEntry {
                            kind: v.kind,
                            defined_by: v.defined_by.clone(),
                            defined_at_ms: v.defined_at_ms,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>()
        });
        tracing::info!(target: crate::AUDIT_TARGET, event = "undefine_dependency", outcome = "ok", alias = %sanitize(alias), key_id = %who(principal));
        Ok(Value::Null)
    }

    /// Listing entries of the script functions `principal` may call.
    pub(crate) fn list(&self, principal: &Principal) -> Vec<(String, Value)> {
        if !principal.privileges.satisfies(Privilege::InvokeFunctions) {
            return Vec::new();
        }
        self.functions
            .load()
            .iter()
            .filter(|(n, _)| principal.may_call(n))
            .map(|(n, e)| {
                let mut m = BTreeMap::from([
                    ("kind".to_owned(), Value::from("script")),
                    ("name".to_owned(), Value::from(n.as_str())),
                    ("source_sha256".to_owned(), Value::from(hex(&e.sha256))),
                    ("defined_by".to_owned(), Value::from(e.defined_by.as_str())),
                    (
                        "defined_at_unix_ms".to_owned(),
                        Value::Int(e.defined_at_ms as i64),
                    ),
                ]);
                if let Some(d) = &e.description {
                    m.insert("description".to_owned(), Value::from(d.as_str()));
                }
                (n.clone(), Value::Map(m))
            })
            .collect()
    }

    pub(crate) fn list_dependencies(&self) -> Value {
        Value::List(
            self.deps
                .load()
                .iter()
                .map(|(alias, d)| {
                    Value::Map(BTreeMap::from([
                        ("alias".to_owned(), Value::from(alias.as_str())),
                        ("kind".to_owned(), Value::from(d.kind)),
                        ("defined_by".to_owned(), Value::from(d.defined_by.as_str())),
                        (
                            "defined_at_unix_ms".to_owned(),
                            Value::Int(d.defined_at_ms as i64),
                        ),
                    ]))
                })
                .collect(),
        )
    }
}

fn disabled() -> CallError {
    CallError::with_code(
        ErrorCode::InvalidOperation,
        "script functions are not enabled on this server",
    )
}
