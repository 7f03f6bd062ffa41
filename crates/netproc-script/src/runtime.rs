//! The script runtime: compilation, dependencies, and a bounded pool of
//! worker threads that run calls under sandbox limits.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use netproc_wire::Value;
use rhai::module_resolvers::ModuleResolver;
use rhai::{AST, CallFnOptions, Dynamic, Engine, EvalAltResult, Module, Position, Scope, Shared};

/// A module shared between workers.
type SharedModule = Shared<Module>;
use tokio::sync::oneshot;

use crate::ScriptError;
use crate::convert::{from_dynamic, to_dynamic};
use crate::limits::ScriptLimits;

/// A compiled function, ready to call.
pub struct ScriptFunction {
    name: String,
    source: String,
    ast: AST,
    imports: Vec<String>,
}

impl fmt::Debug for ScriptFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptFunction")
            .field("name", &self.name)
            .field("imports", &self.imports)
            .finish_non_exhaustive()
    }
}

impl ScriptFunction {
    /// The entry point's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The source it was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The dependency aliases it imports (`import "alias" as m;`).
    pub fn imports(&self) -> &[String] {
        &self.imports
    }
}

/// Where a dependency's module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DependencySource {
    /// Rhai source, defined at run time.
    Script(String),
    /// A module the embedding application registered under this name.
    Host(String),
}

/// One call's state on a worker, read by the progress callback.
struct CallState {
    deadline: Instant,
    cancel: Arc<AtomicBool>,
    constants: Arc<BTreeMap<String, Value>>,
}

struct Job {
    function: Arc<ScriptFunction>,
    args: Vec<Value>,
    state: CallState,
    reply: oneshot::Sender<Result<Value, ScriptError>>,
}

struct Inner {
    limits: ScriptLimits,
    deps: ArcSwap<HashMap<String, SharedModule>>,
    host_modules: HashMap<String, SharedModule>,
    /// Compiles functions and dependency modules (workers have their own).
    compiler: Engine,
}

/// Resolves `import "alias"` to defined dependencies only: no file system,
/// no network. A path such as `"/etc/passwd"` is simply not found.
struct DependencyResolver(Arc<Inner>);

impl ModuleResolver for DependencyResolver {
    fn resolve(
        &self,
        _engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        self.0
            .deps
            .load()
            .get(path)
            .cloned()
            .ok_or_else(|| Box::new(EvalAltResult::ErrorModuleNotFound(path.into(), pos)))
    }
}

/// Builds a [`ScriptRuntime`].
pub struct ScriptRuntimeBuilder {
    workers: usize,
    queue: usize,
    limits: ScriptLimits,
    host_modules: HashMap<String, SharedModule>,
}

impl fmt::Debug for ScriptRuntimeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptRuntimeBuilder")
            .field("workers", &self.workers)
            .field("queue", &self.queue)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ScriptRuntimeBuilder {
    /// Worker threads. Default: the available cores.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Calls that may wait for a worker; past it calls are refused
    /// `overloaded`. Default 1024.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue = n.max(1);
        self
    }

    /// Sandbox limits.
    pub fn limits(mut self, limits: ScriptLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Exposes a native module to scripts, importable once a dependency
    /// names it (`define_dependency(alias, Host(name))`). Nothing native is
    /// exposed otherwise: this is the allow-list.
    pub fn host_module(mut self, name: impl Into<String>, module: Module) -> Self {
        self.host_modules.insert(name.into(), module.into());
        self
    }

    /// Starts the workers.
    pub fn build(self) -> ScriptRuntime {
        let inner = Arc::new_cyclic(|_| Inner {
            compiler: compile_engine(&self.limits),
            limits: self.limits.clone(),
            deps: ArcSwap::from_pointee(HashMap::new()),
            host_modules: self.host_modules,
        });
        let (tx, rx) = sync_channel::<Job>(self.queue);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..self.workers)
            .filter_map(|i| {
                let (inner, rx) = (Arc::clone(&inner), Arc::clone(&rx));
                std::thread::Builder::new()
                    .name(format!("netproc-script-{i}"))
                    // Rhai recursion in debug builds needs a deep stack.
                    .stack_size(self.limits.worker_stack_bytes)
                    .spawn(move || worker(&inner, &rx))
                    .map_err(|e| tracing::error!(error = %e, "cannot start a script worker"))
                    .ok()
            })
            .collect();
        ScriptRuntime {
            inner,
            jobs: Mutex::new(Some(tx)),
            workers: Mutex::new(workers),
        }
    }
}

/// Runs run-time defined functions (Rhai scripts) in a sandbox, on a
/// bounded pool of dedicated threads.
///
/// Calls are queued (bounded: a full queue answers `overloaded`) and awaited
/// without blocking the async runtime. Each call runs under the limits of
/// [`ScriptLimits`]: operations, call depth, expression depth, string /
/// array / map sizes, and a wall-clock limit enforced every few thousand
/// operations together with the caller's deadline and cancellation. Scripts
/// have no file, network or process access; `import` sees only defined
/// dependencies.
///
/// ```
/// use std::collections::BTreeMap;
/// use std::sync::Arc;
/// use std::time::{Duration, Instant};
/// use netproc_script::ScriptRuntime;
/// use netproc_wire::Value;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let runtime = ScriptRuntime::builder().workers(1).build();
/// let add = Arc::new(runtime.compile("add", "fn add(a, b) { a + b }").unwrap());
/// let deadline = Instant::now() + Duration::from_secs(1);
/// let sum = runtime.call(&add, vec![Value::Int(2), Value::Int(3)], Arc::new(BTreeMap::new()), deadline)
///     .unwrap()
///     .await
///     .unwrap();
/// assert_eq!(sum, Value::Int(5));
/// # }
/// ```
pub struct ScriptRuntime {
    inner: Arc<Inner>,
    jobs: Mutex<Option<SyncSender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for ScriptRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptRuntime")
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

fn compile_engine(limits: &ScriptLimits) -> Engine {
    let mut engine = sandbox_engine(limits);
    engine.set_optimization_level(rhai::OptimizationLevel::Simple);
    engine
}

/// An engine with only the standard packages and every limit set.
fn sandbox_engine(limits: &ScriptLimits) -> Engine {
    let mut engine = Engine::new_raw();
    engine.register_global_module(rhai::packages::Package::as_shared_module(
        &rhai::packages::StandardPackage::new(),
    ));
    engine.disable_symbol("eval");
    engine.set_max_operations(limits.max_operations);
    engine.set_max_call_levels(limits.max_call_depth);
    engine.set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth);
    engine.set_max_string_size(limits.max_string_bytes);
    engine.set_max_array_size(limits.max_array_len);
    engine.set_max_map_size(limits.max_map_len);
    engine.set_max_modules(limits.max_imports);
    engine.on_print(|s| tracing::debug!(target: "netproc::script", "print: {}", truncate(s)));
    engine.on_debug(
        |s, _, pos| tracing::debug!(target: "netproc::script", "debug at {pos}: {}", truncate(s)),
    );
    engine
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(1024);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The aliases of `import "alias"` statements, by a plain scan of the
/// source (only string-literal imports resolve anyway).
fn scan_imports(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(i) = rest.find("import") {
        rest = &rest[i + "import".len()..];
        let trimmed = rest.trim_start();
        if let Some(lit) = trimmed.strip_prefix('"')
            && let Some(end) = lit.find('"')
        {
            let alias = &lit[..end];
            if !out.iter().any(|a| a == alias) {
                out.push(alias.to_owned());
            }
        }
    }
    out
}

fn worker(inner: &Arc<Inner>, rx: &Mutex<Receiver<Job>>) {
    let state: Arc<Mutex<Option<CallState>>> = Arc::new(Mutex::new(None));
    let mut engine = sandbox_engine(&inner.limits);
    engine.set_module_resolver(DependencyResolver(Arc::clone(inner)));
    let every = inner.limits.check_every_operations.max(1);
    {
        let state = Arc::clone(&state);
        engine.on_progress(move |ops| {
            if ops % every != 0 {
                return None;
            }
            let st = state.lock().unwrap_or_else(PoisonError::into_inner);
            let st = st.as_ref()?;
            if st.cancel.load(Ordering::Relaxed) {
                return Some(Dynamic::from("cancelled"));
            }
            (Instant::now() >= st.deadline).then(|| Dynamic::from("timeout"))
        });
    }
    {
        let state = Arc::clone(&state);
        engine.register_fn(
            "constant",
            move |name: &str| -> Result<Dynamic, Box<EvalAltResult>> {
                let st = state.lock().unwrap_or_else(PoisonError::into_inner);
                st.as_ref()
                    .and_then(|s| s.constants.get(name))
                    .map(to_dynamic)
                    .ok_or_else(|| format!("constant \"{}\" is not defined", truncate(name)).into())
            },
        );
    }
    loop {
        let job = match rx.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(_) => return, // the runtime was dropped
        };
        let Job {
            function,
            args,
            state: call,
            reply,
        } = job;
        if call.cancel.load(Ordering::Relaxed) {
            let _ = reply.send(Err(ScriptError::Cancelled));
            continue;
        }
        if Instant::now() >= call.deadline {
            let _ = reply.send(Err(ScriptError::Timeout));
            continue;
        }
        *state.lock().unwrap_or_else(PoisonError::into_inner) = Some(call);
        let args: Vec<Dynamic> = args.iter().map(to_dynamic).collect();
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(false);
        let result = engine
            .call_fn_with_options::<Dynamic>(
                options,
                &mut Scope::new(),
                &function.ast,
                &function.name,
                args,
            )
            .map_err(|e| crate::error::classify(*e))
            .and_then(|d| from_dynamic(d, 0));
        *state.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let _ = reply.send(result);
    }
}

/// Sets the call's cancel flag when the caller stops waiting.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl ScriptRuntime {
    /// A builder.
    pub fn builder() -> ScriptRuntimeBuilder {
        ScriptRuntimeBuilder {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue: 1024,
            limits: ScriptLimits::default(),
            host_modules: HashMap::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &ScriptLimits {
        &self.inner.limits
    }

    /// Compiles `source` as the function `name`. The source must be one or
    /// more `fn` definitions (helpers allowed), one of which is `name`; any
    /// other top-level statement is refused.
    pub fn compile(&self, name: &str, source: &str) -> Result<ScriptFunction, ScriptError> {
        let ast = self.inner.compiler.compile(source).map_err(|e| {
            let pos = e.position();
            ScriptError::Syntax {
                message: e.err_type().to_string(),
                line: pos.line().unwrap_or(0),
                column: pos.position().unwrap_or(0),
            }
        })?;
        if !ast.statements().is_empty() {
            return Err(ScriptError::Shape(
                "only fn definitions are allowed at the top level of a function's source".into(),
            ));
        }
        if !ast.iter_functions().any(|f| f.name == name) {
            return Err(ScriptError::Shape(format!(
                "the source does not define fn {name}(…)"
            )));
        }
        Ok(ScriptFunction {
            name: name.to_owned(),
            source: source.to_owned(),
            imports: scan_imports(source),
            ast,
        })
    }

    /// Defines (or replaces) dependency `alias`. Script sources are
    /// compiled and evaluated as a module now, under the sandbox limits.
    pub fn define_dependency(
        &self,
        alias: &str,
        source: &DependencySource,
    ) -> Result<(), ScriptError> {
        let module: SharedModule = match source {
            DependencySource::Host(name) => {
                self.inner.host_modules.get(name).cloned().ok_or_else(|| {
                    ScriptError::UnknownDependency(format!(
                        "no host module named \"{}\"",
                        truncate(name)
                    ))
                })?
            }
            DependencySource::Script(src) => {
                let engine = &self.inner.compiler;
                let ast = engine.compile(src).map_err(|e| {
                    let pos = e.position();
                    ScriptError::Syntax {
                        message: e.err_type().to_string(),
                        line: pos.line().unwrap_or(0),
                        column: pos.position().unwrap_or(0),
                    }
                })?;
                Module::eval_ast_as_new(Scope::new(), &ast, engine)
                    .map_err(|e| crate::error::classify(*e))?
                    .into()
            }
        };
        self.inner.deps.rcu(|deps| {
            let mut next = (**deps).clone();
            next.insert(alias.to_owned(), module.clone());
            next
        });
        Ok(())
    }

    /// Removes dependency `alias` (an unknown alias succeeds). Whether
    /// functions still import it is the caller's check.
    pub fn undefine_dependency(&self, alias: &str) {
        self.inner.deps.rcu(|deps| {
            let mut next = (**deps).clone();
            next.remove(alias);
            next
        });
    }

    /// The defined dependency aliases.
    pub fn dependencies(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.deps.load().keys().cloned().collect();
        v.sort();
        v
    }

    /// Queues a call. Fails at once with `Overloaded` when the queue is
    /// full; otherwise the returned future resolves with the result.
    /// Dropping the future cancels the call (the worker stops at its next
    /// check).
    pub fn call(
        &self,
        function: &Arc<ScriptFunction>,
        args: Vec<Value>,
        constants: Arc<BTreeMap<String, Value>>,
        deadline: Instant,
    ) -> Result<impl Future<Output = Result<Value, ScriptError>> + Send + 'static, ScriptError>
    {
        let cancel = Arc::new(AtomicBool::new(false));
        let (reply, rx) = oneshot::channel();
        let wall = Instant::now() + Duration::from_millis(self.inner.limits.wall_clock_ms);
        let job = Job {
            function: Arc::clone(function),
            args,
            state: CallState {
                deadline: deadline.min(wall),
                cancel: Arc::clone(&cancel),
                constants,
            },
            reply,
        };
        let sender = self
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(sender) = sender else {
            return Err(ScriptError::Stopped);
        };
        match sender.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ScriptError::Overloaded {
                    retry_after: Duration::from_millis(10),
                });
            }
            Err(TrySendError::Disconnected(_)) => return Err(ScriptError::Stopped),
        }
        let guard = CancelOnDrop(cancel);
        Ok(async move {
            let result = rx.await.unwrap_or(Err(ScriptError::Stopped));
            drop(guard);
            result
        })
    }
}

impl Drop for ScriptRuntime {
    fn drop(&mut self) {
        // Closing the queue ends the workers after their current call.
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let workers =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
        drop(workers); // detached: a worker finishing a long call must not block the drop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_scanned() {
        let src =
            r#"fn f() { import "math" as m; import  "str" as s; import "math" as again; m::x() }"#;
        assert_eq!(scan_imports(src), ["math", "str"]);
    }
}
