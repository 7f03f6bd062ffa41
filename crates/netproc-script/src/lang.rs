//! The seam between the runtime and a script language.
//!
//! The runtime (queue, workers, deadlines) and the server know only these
//! traits; Rhai is one implementation ([`crate::rhai_lang`]). A second
//! language (JavaScript through an embedded engine is the likely next one)
//! implements them without touching either.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use netproc_wire::Value;

use crate::ScriptError;

/// What bounds one call, beyond the language's own sandbox limits.
pub(crate) struct Control {
    /// The caller's deadline when queued; the worker lowers it to the
    /// wall-clock limit counted from when it starts running the call.
    pub(crate) deadline: Instant,
    /// Set when the caller gives up.
    pub(crate) cancel: Arc<AtomicBool>,
    /// The server's constants, read-only.
    pub(crate) constants: Arc<BTreeMap<String, Value>>,
}

/// A compiled function in some language.
pub(crate) struct Compiled {
    /// The language's own compiled form.
    pub(crate) code: Box<dyn Any + Send + Sync>,
    /// Dependency aliases the source imports.
    pub(crate) imports: Vec<String>,
}

/// A script language.
pub(crate) trait Language: Send + Sync + 'static {
    /// Compiles `source`, whose entry point is `name`.
    fn compile(&self, name: &str, source: &str) -> Result<Compiled, ScriptError>;
    /// Makes `alias` importable.
    fn define_dependency(&self, alias: &str, source: &DependencySource) -> Result<(), ScriptError>;
    /// Forgets `alias`.
    fn undefine_dependency(&self, alias: &str);
    /// The importable aliases.
    fn dependencies(&self) -> Vec<String>;
    /// A worker's private interpreter, made on the worker's own thread.
    fn worker(&self) -> Box<dyn Worker>;
}

/// One worker thread's interpreter.
pub(crate) trait Worker {
    /// Runs `name` from `code` (made by the same language's `compile`),
    /// honouring `control` and the sandbox limits.
    fn call(
        &mut self,
        code: &(dyn Any + Send + Sync),
        name: &str,
        args: &[Value],
        control: Control,
    ) -> Result<Value, ScriptError>;
}

/// Where a dependency's module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DependencySource {
    /// Script source, defined at run time.
    Script(String),
    /// A module the embedding application registered under this name.
    Host(String),
}
