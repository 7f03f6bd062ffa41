//! Native functions the embedding application offers to scripts, in terms
//! of netproc's own [`Value`]: nothing of the script engine shows, so the
//! same module serves any language behind the seam.

use std::fmt;
use std::sync::Arc;

use netproc_wire::Value;

/// A native function: called with the script's arguments, answering a
/// value or an error message (a script sees it as a thrown error:
/// `operation_failed`).
pub(crate) type HostFn = Arc<dyn Fn(&[Value]) -> Result<Value, String> + Send + Sync>;

/// The most arguments a host function is called with.
pub const MAX_HOST_ARGS: usize = 4;

/// Native functions exposed to scripts under one module name, importable
/// once a dependency names it
/// ([`DependencySource::Host`](crate::DependencySource::Host)). Nothing
/// native is exposed otherwise: this is the allow-list.
///
/// ```
/// use netproc_script::HostModule;
/// use netproc_wire::Value;
///
/// let math = HostModule::new().function("triple", |args| match args {
///     [Value::Int(x)] => Ok(Value::Int(x * 3)),
///     _ => Err("triple(x) takes one integer".into()),
/// });
/// assert_eq!(math.names(), ["triple"]);
/// ```
#[derive(Clone, Default)]
pub struct HostModule {
    pub(crate) functions: Vec<(String, HostFn)>,
}

impl fmt::Debug for HostModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostModule")
            .field("functions", &self.names())
            .finish()
    }
}

impl HostModule {
    /// No functions yet.
    pub fn new() -> HostModule {
        HostModule::default()
    }

    /// Adds `name`, callable from scripts with 0 to [`MAX_HOST_ARGS`]
    /// arguments (`f` checks how many it got). Arguments and the result
    /// convert like a script function's (same limits); an `Err` is thrown
    /// into the script.
    pub fn function(
        mut self,
        name: impl Into<String>,
        f: impl Fn(&[Value]) -> Result<Value, String> + Send + Sync + 'static,
    ) -> HostModule {
        self.functions.push((name.into(), Arc::new(f)));
        self
    }

    /// The function names, in the order they were added.
    pub fn names(&self) -> Vec<&str> {
        self.functions.iter().map(|(n, _)| n.as_str()).collect()
    }
}
