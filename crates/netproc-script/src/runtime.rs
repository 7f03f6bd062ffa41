//! The script runtime: compilation, dependencies, and a bounded pool of
//! worker threads that run calls under sandbox limits. Language-neutral:
//! the language sits behind [`crate::lang::Language`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netproc_wire::Value;
use tokio::sync::oneshot;

use crate::ScriptError;
use crate::host::HostModule;
use crate::lang::{Compiled, Control, DependencySource, Language};
use crate::limits::ScriptLimits;
use crate::rhai_lang::RhaiLanguage;

/// A compiled function, ready to call.
pub struct ScriptFunction {
    name: String,
    source: String,
    compiled: Compiled,
}

impl fmt::Debug for ScriptFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptFunction")
            .field("name", &self.name)
            .field("imports", &self.compiled.imports)
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
        &self.compiled.imports
    }
}

struct Job {
    function: Arc<ScriptFunction>,
    args: Vec<Value>,
    control: Control,
    reply: oneshot::Sender<Result<Value, ScriptError>>,
}

/// Builds a [`ScriptRuntime`].
pub struct ScriptRuntimeBuilder {
    workers: usize,
    queue: usize,
    limits: ScriptLimits,
    host_modules: HashMap<String, HostModule>,
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
    pub fn host_module(mut self, name: impl Into<String>, module: HostModule) -> Self {
        self.host_modules.insert(name.into(), module);
        self
    }

    /// Starts the workers.
    pub fn build(self) -> ScriptRuntime {
        let lang: Arc<dyn Language> =
            Arc::new(RhaiLanguage::new(self.limits.clone(), self.host_modules));
        let (tx, rx) = sync_channel::<Job>(self.queue);
        let rx = Arc::new(Mutex::new(rx));
        let wall_clock = Duration::from_millis(self.limits.wall_clock_ms);
        let workers = (0..self.workers)
            .filter_map(|i| {
                let (lang, rx) = (Arc::clone(&lang), Arc::clone(&rx));
                std::thread::Builder::new()
                    .name(format!("netproc-script-{i}"))
                    // Rhai recursion in debug builds needs a deep stack.
                    .stack_size(self.limits.worker_stack_bytes)
                    .spawn(move || worker(lang.as_ref(), &rx, wall_clock))
                    .map_err(|e| tracing::error!(error = %e, "cannot start a script worker"))
                    .ok()
            })
            .collect();
        ScriptRuntime {
            lang,
            limits: self.limits,
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
    lang: Arc<dyn Language>,
    limits: ScriptLimits,
    jobs: Mutex<Option<SyncSender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for ScriptRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptRuntime")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn worker(lang: &dyn Language, rx: &Mutex<Receiver<Job>>, wall_clock: Duration) {
    let mut interpreter = lang.worker();
    loop {
        let job = match rx.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(_) => return, // the runtime was dropped
        };
        let Job {
            function,
            args,
            mut control,
            reply,
        } = job;
        if control.cancel.load(Ordering::Relaxed) {
            let _ = reply.send(Err(ScriptError::Cancelled));
            continue;
        }
        let started = Instant::now();
        if started >= control.deadline {
            let _ = reply.send(Err(ScriptError::Timeout));
            continue;
        }
        // The script's own limit starts now, not when it was queued.
        control.deadline = control.deadline.min(started + wall_clock);
        let result = interpreter.call(&*function.compiled.code, &function.name, &args, control);
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
        &self.limits
    }

    /// Compiles `source` as the function `name`. The source must be one or
    /// more `fn` definitions (helpers allowed), one of which is `name`; any
    /// other top-level statement is refused.
    pub fn compile(&self, name: &str, source: &str) -> Result<ScriptFunction, ScriptError> {
        Ok(ScriptFunction {
            name: name.to_owned(),
            source: source.to_owned(),
            compiled: self.lang.compile(name, source)?,
        })
    }

    /// Defines (or replaces) dependency `alias`. Script sources are
    /// compiled and evaluated as a module now, under the sandbox limits.
    pub fn define_dependency(
        &self,
        alias: &str,
        source: &DependencySource,
    ) -> Result<(), ScriptError> {
        self.lang.define_dependency(alias, source)
    }

    /// Removes dependency `alias` (an unknown alias succeeds). Whether
    /// functions still import it is the caller's check.
    pub fn undefine_dependency(&self, alias: &str) {
        self.lang.undefine_dependency(alias);
    }

    /// The defined dependency aliases.
    pub fn dependencies(&self) -> Vec<String> {
        self.lang.dependencies()
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
        let job = Job {
            function: Arc::clone(function),
            args,
            control: Control {
                deadline,
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
        // Closing the queue ends the workers after their current call; they
        // are detached, so a long call cannot block the drop.
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(std::mem::take(
            &mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner),
        ));
    }
}
