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

use crate::audit::sanitize;
use crate::function::{CallError, FunctionGuard, valid_name};
use crate::state::{StateDb, StoredDependency, StoredFunction};
use netproc_wire::unix_ms;

/// Runs a state-database write off the runtime threads; without a state
/// directory, does nothing. The caller applies the change only after this
/// returns `Ok` (the transaction committed).
/// Everything run-time definitions touch: the registry (natives and
/// constants), the script runtime and the state database. Shared by the
/// server and the sessions through one `Arc`; the definition operations
/// receive it and nothing else.
pub(crate) struct Definitions {
    pub(crate) registry: crate::function::Registry,
    pub(crate) scripts: Option<Scripts>,
    pub(crate) state: Option<Arc<crate::state::StateDb>>,
}

pub(crate) async fn persist(
    defs: &Definitions,
    write: impl FnOnce(&StateDb) -> crate::state::DbResult<()> + Send + 'static,
) -> Result<(), CallError> {
    let Some(db) = defs.state.clone() else {
        return Ok(());
    };
    match tokio::task::spawn_blocking(move || write(&db)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "state database write failed");
            Err(CallError::with_code(ErrorCode::Internal, "internal error"))
        }
        Err(_) => Err(CallError::with_code(ErrorCode::Internal, "internal error")),
    }
}

/// A defined script function.
pub(crate) struct ScriptEntry {
    pub(crate) function: Arc<ScriptFunction>,
    sha256: [u8; 32],
    description: Option<String>,
    defined_by: String,
    defined_at_ms: u64,
    pub(crate) guard: Option<FunctionGuard>,
}
#[derive(Clone)]
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
        defs: Arc<Definitions>,
        def: DefineFunction,
        principal: Principal,
    ) -> Result<Value, CallError> {
        let Some(scripts) = defs.scripts.as_ref() else {
            return Err(disabled());
        };
        let name = def.name.clone();
        check_name("name", "function", &name)?;
        if defs.registry.functions.contains_key(&name) {
            return Err(CallError::invalid_argument(format!(
                "\"{name}\" belongs to a native function and cannot be redefined"
            )));
        }
        if !def.source_matches() {
            return Err(CallError::invalid_argument(
                "source_sha256 does not match the SHA-256 of the source",
            ));
        }
        let _ordered = scripts.define.lock().await;
        let digest = def.source_sha256;
        if scripts.get(&name).is_some_and(|e| e.sha256 == digest) {
            return Ok(Value::Null);
        }
        let compiled = {
            let defs = Arc::clone(&defs);
            let (name, source) = (name.clone(), def.source);
            tokio::task::spawn_blocking(move || {
                defs.scripts
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
        let description: Option<String> = def.description.map(|d| d.chars().take(1024).collect());
        let stored = StoredFunction {
            name: name.clone(),
            source: function.source().to_owned(),
            description: description.clone(),
            defined_by: who(&principal),
            defined_at_ms: unix_ms(SystemTime::now()),
        };
        let defined_at_ms = stored.defined_at_ms;
        persist(&defs, move |db| db.put_function(&stored, &digest)).await?;
        let entry = Arc::new(ScriptEntry {
            function,
            sha256: digest,
            description,
            defined_by: who(&principal),
            defined_at_ms,
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
            source_sha256 = %hex::encode(digest),
            key_id = %who(&principal),
        );
        Ok(Value::Null)
    }
    pub(crate) async fn undefine_function(
        defs: Arc<Definitions>,
        name: String,
        principal: Principal,
    ) -> Result<Value, CallError> {
        let (name, principal) = (name.as_str(), &principal);
        let Some(scripts) = defs.scripts.as_ref() else {
            return Err(disabled());
        };
        check_name("name", "function", name)?;
        if defs.registry.functions.contains_key(name) {
            return Err(CallError::invalid_argument(format!(
                "\"{name}\" belongs to a native function and cannot be undefined"
            )));
        }
        let _ordered = scripts.define.lock().await;
        let owned = name.to_owned();
        persist(&defs, move |db| db.delete_function(&owned)).await?;
        scripts.functions.rcu(|table| {
            let mut next = (**table).clone();
            next.remove(name);
            next
        });
        tracing::info!(target: crate::AUDIT_TARGET, event = "undefine_function", outcome = "ok", function = %sanitize(name), key_id = %who(principal));
        Ok(Value::Null)
    }

    pub(crate) async fn define_dependency(
        defs: Arc<Definitions>,
        alias: String,
        source: DependencySource,
        principal: Principal,
    ) -> Result<Value, CallError> {
        if defs.scripts.is_none() {
            return Err(disabled());
        }
        check_name("alias", "dependency", &alias)?;
        let (kind, source) = match source {
            // An empty module is always a mistake (a wrong file, a lost
            // paste): refused rather than defined as a module with nothing.
            DependencySource::Script(s) if s.trim().is_empty() => {
                return Err(CallError::invalid_argument(
                    "source: a dependency's script source is empty",
                ));
            }
            DependencySource::Script(s) => ("script", ScriptSource::Script(s)),
            DependencySource::Host(h) => ("host", ScriptSource::Host(h)),
            _ => return Err(CallError::invalid_argument("unknown dependency source")),
        };
        let stored_source = match &source {
            ScriptSource::Script(s) | ScriptSource::Host(s) => s.clone(),
            _ => String::new(),
        };
        let ordered = match defs.scripts.as_ref() {
            Some(s) => s.define.lock().await,
            None => return Err(disabled()),
        };
        let defined = {
            let (defs, alias) = (Arc::clone(&defs), alias.clone());
            tokio::task::spawn_blocking(move || {
                defs.scripts
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
        let stored = StoredDependency {
            alias: alias.clone(),
            kind: kind.to_owned(),
            source: stored_source,
            defined_by: who(&principal),
            defined_at_ms: unix_ms(SystemTime::now()),
        };
        if let Err(e) = persist(&defs, move |db| db.put_dependency(&stored)).await {
            // Not committed: take the module back out.
            if let Some(s) = defs.scripts.as_ref() {
                s.runtime.undefine_dependency(&alias);
            }
            return Err(e);
        }
        if let Some(scripts) = defs.scripts.as_ref() {
            let entry = || DepEntry {
                kind,
                defined_by: who(&principal),
                defined_at_ms: unix_ms(SystemTime::now()),
            };
            scripts.deps.rcu(|deps| {
                let mut next = (**deps).clone();
                next.insert(alias.clone(), entry());
                next
            });
        }
        drop(ordered);
        tracing::info!(target: crate::AUDIT_TARGET, event = "define_dependency", outcome = "ok", alias = %alias, kind, key_id = %who(&principal));
        Ok(Value::Null)
    }
    pub(crate) async fn undefine_dependency(
        defs: Arc<Definitions>,
        alias: String,
        force: bool,
        principal: Principal,
    ) -> Result<Value, CallError> {
        let (alias, principal) = (alias.as_str(), &principal);
        let Some(scripts) = defs.scripts.as_ref() else {
            return Err(disabled());
        };
        check_name("alias", "dependency", alias)?;
        let _ordered = scripts.define.lock().await;
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
        let owned = alias.to_owned();
        persist(&defs, move |db| db.delete_dependency(&owned)).await?;
        scripts.runtime.undefine_dependency(alias);
        scripts.deps.rcu(|deps| {
            let mut next = (**deps).clone();
            next.remove(alias);
            next
        });
        tracing::info!(target: crate::AUDIT_TARGET, event = "undefine_dependency", outcome = "ok", alias = %sanitize(alias), key_id = %who(principal));
        Ok(Value::Null)
    }
    /// Reloads stored definitions at start. A definition that no longer
    /// compiles (or a host module no longer registered) is reported and
    /// skipped, not fatal.
    pub(crate) fn restore(&self, deps: Vec<StoredDependency>, functions: Vec<StoredFunction>) {
        let mut restored_deps = BTreeMap::new();
        for d in deps {
            let host = d.kind == "host";
            let source = if host {
                ScriptSource::Host(d.source)
            } else {
                ScriptSource::Script(d.source)
            };
            match self.runtime.define_dependency(&d.alias, &source) {
                Ok(()) => {
                    restored_deps.insert(
                        d.alias,
                        DepEntry {
                            kind: if host { "host" } else { "script" },
                            defined_by: d.defined_by,
                            defined_at_ms: d.defined_at_ms,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(alias = %d.alias, error = %e, "skipping a stored dependency")
                }
            }
        }
        self.deps.store(Arc::new(restored_deps));
        let mut table = HashMap::new();
        for f in functions {
            match self.runtime.compile(&f.name, &f.source) {
                Ok(function) => {
                    let sha256 = DefineFunction::source_digest(&f.source);
                    let entry = ScriptEntry {
                        function: Arc::new(function),
                        sha256,
                        description: f.description,
                        defined_by: f.defined_by,
                        defined_at_ms: f.defined_at_ms,
                        guard: None,
                    };
                    table.insert(f.name, Arc::new(entry));
                }
                Err(e) => {
                    tracing::warn!(function = %f.name, error = %e, "skipping a stored function that no longer compiles")
                }
            }
        }
        tracing::info!(functions = table.len(), "restored script functions");
        self.functions.store(Arc::new(table));
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
                    (
                        "source_sha256".to_owned(),
                        Value::from(hex::encode(e.sha256)),
                    ),
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

/// Every name in a define or undefine operation is checked the same way:
/// `invalid_argument` naming the field.
fn check_name(field: &str, what: &str, name: &str) -> Result<(), CallError> {
    if valid_name(name) {
        return Ok(());
    }
    Err(CallError::invalid_argument(format!(
        "{field}: \"{}\" is not a valid {what} name (1 to 128 letters, digits and _, not starting with a digit)",
        sanitize(name)
    )))
}

fn disabled() -> CallError {
    CallError::with_code(
        ErrorCode::InvalidOperation,
        "script functions are not enabled on this server",
    )
}

/// Defines a run-time constant: committed to the state database (if any)
/// before it is applied and acknowledged.
pub(crate) async fn define_constant(
    defs: Arc<Definitions>,
    name: String,
    value: Value,
    principal: Principal,
) -> Result<Value, CallError> {
    check_name("name", "constant", &name)?;
    let (stored_name, stored_value) = (name.clone(), value.clone());
    persist(&defs, move |db| {
        db.put_constant(&stored_name, &stored_value)
    })
    .await?;
    defs.registry.define_constant(name.clone(), value);
    tracing::info!(target: crate::AUDIT_TARGET, event = "define_constant", outcome = "ok", constant = %name, key_id = %who(&principal));
    Ok(Value::Null)
}

/// Removes a run-time constant (an unknown name succeeds).
pub(crate) async fn undefine_constant(
    defs: Arc<Definitions>,
    name: String,
    principal: Principal,
) -> Result<Value, CallError> {
    check_name("name", "constant", &name)?;
    let stored_name = name.clone();
    persist(&defs, move |db| db.delete_constant(&stored_name)).await?;
    defs.registry.undefine_constant(&name);
    tracing::info!(target: crate::AUDIT_TARGET, event = "undefine_constant", outcome = "ok", constant = %sanitize(&name), key_id = %who(&principal));
    Ok(Value::Null)
}
