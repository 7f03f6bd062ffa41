//! Rhai, the first script language: a sandboxed engine per worker.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;
use netproc_wire::Value;
use rhai::module_resolvers::ModuleResolver;
use rhai::{AST, CallFnOptions, Dynamic, Engine, EvalAltResult, Module, Position, Scope, Shared};

use crate::convert::{from_dynamic, to_dynamic};
use crate::error::classify;
use crate::host::{HostFn, HostModule, MAX_HOST_ARGS};
use crate::lang::{Compiled, Control, DependencySource, Language, Worker};
use crate::{ScriptError, ScriptLimits};

/// A module shared between workers.
type SharedModule = Shared<Module>;

struct Inner {
    limits: ScriptLimits,
    deps: ArcSwap<HashMap<String, SharedModule>>,
    host_modules: HashMap<String, SharedModule>,
    /// Compiles functions and dependency modules (workers have their own).
    compiler: Engine,
    /// The output budget of dependency modules evaluated at definition.
    compiler_output: Arc<Mutex<Output>>,
}

/// Rhai behind the [`Language`] seam.
pub(crate) struct RhaiLanguage {
    inner: Arc<Inner>,
}

impl RhaiLanguage {
    pub(crate) fn new(
        limits: ScriptLimits,
        host_modules: HashMap<String, HostModule>,
    ) -> RhaiLanguage {
        let (mut compiler, compiler_output) = sandbox_engine(&limits);
        compiler.set_optimization_level(rhai::OptimizationLevel::Simple);
        RhaiLanguage {
            inner: Arc::new(Inner {
                compiler,
                compiler_output,
                deps: ArcSwap::from_pointee(HashMap::new()),
                host_modules: host_modules
                    .into_iter()
                    .map(|(k, m)| (k, to_rhai(&m).into()))
                    .collect(),
                limits,
            }),
        }
    }
}

/// A host module as a Rhai module: each function registered for 0 to
/// [`MAX_HOST_ARGS`] arguments, converting through `Value`.
fn to_rhai(host: &HostModule) -> Module {
    let mut module = Module::new();
    for (name, f) in &host.functions {
        let call = |f: &HostFn, args: Vec<Dynamic>| -> Result<Dynamic, Box<EvalAltResult>> {
            let values = args
                .into_iter()
                .map(|d| from_dynamic(d, 0))
                .collect::<Result<Vec<Value>, ScriptError>>()
                .map_err(|e| -> Box<EvalAltResult> { e.to_string().into() })?;
            f(&values)
                .map(|v| to_dynamic(&v))
                .map_err(|e| -> Box<EvalAltResult> { e.into() })
        };
        let f0 = Arc::clone(f);
        module.set_native_fn(name.as_str(), move || call(&f0, vec![]));
        let f1 = Arc::clone(f);
        module.set_native_fn(name.as_str(), move |a: Dynamic| call(&f1, vec![a]));
        let f2 = Arc::clone(f);
        module.set_native_fn(name.as_str(), move |a: Dynamic, b: Dynamic| {
            call(&f2, vec![a, b])
        });
        let f3 = Arc::clone(f);
        module.set_native_fn(name.as_str(), move |a: Dynamic, b: Dynamic, c: Dynamic| {
            call(&f3, vec![a, b, c])
        });
        let f4 = Arc::clone(f);
        module.set_native_fn(
            name.as_str(),
            move |a: Dynamic, b: Dynamic, c: Dynamic, d: Dynamic| call(&f4, vec![a, b, c, d]),
        );
    }
    debug_assert_eq!(MAX_HOST_ARGS, 4);
    module
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

/// An engine with only the standard packages and every limit set, and the
/// budget its `print` and `debug` output draws from.
fn sandbox_engine(limits: &ScriptLimits) -> (Engine, Arc<Mutex<Output>>) {
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
    let output = Arc::new(Mutex::new(Output::new(limits, "")));
    set_output(&mut engine, Arc::clone(&output));
    (engine, output)
}

/// What one call has logged through `print` and `debug`: script output is
/// peer text (a caller with `define_functions` wrote it), so it is capped
/// per call, escaped and length-capped like audit fields.
struct Output {
    function: String,
    lines: usize,
    bytes: usize,
    max_lines: usize,
    max_bytes: usize,
    truncated: bool,
}

/// Longest line kept, in characters before escaping.
const MAX_OUTPUT_LINE: usize = 512;

impl Output {
    fn new(limits: &ScriptLimits, function: &str) -> Output {
        Output {
            function: function.to_owned(),
            lines: 0,
            bytes: 0,
            max_lines: limits.max_output_lines,
            max_bytes: limits.max_output_bytes,
            truncated: false,
        }
    }

    /// Starts a new call's budget.
    fn reset(&mut self, function: &str) {
        self.function.clear();
        self.function.push_str(function);
        self.lines = 0;
        self.bytes = 0;
        self.truncated = false;
    }

    /// Logs one line of output, or drops it past the budget (with a single
    /// `output truncated` line).
    fn emit(&mut self, kind: &str, text: &str) {
        if self.truncated {
            return;
        }
        let line = escape_output(text);
        if self.lines >= self.max_lines || self.bytes + line.len() > self.max_bytes {
            self.truncated = true;
            tracing::debug!(target: "netproc::script", function = %self.function, "output truncated: the rest of this call's print/debug output is dropped");
            return;
        }
        self.lines += 1;
        self.bytes += line.len();
        tracing::debug!(target: "netproc::script", function = %self.function, "{kind}: {line}");
    }
}

/// Escapes control and non-ASCII characters and caps the line, so a script
/// cannot forge log lines or flood them.
pub(crate) fn escape_output(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX_OUTPUT_LINE {
            out.push('…');
            break;
        }
        if c.is_ascii_graphic() || c == ' ' {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

/// The size checks Rhai does not make on its own.
///
/// Rhai checks a value's size when a function or operator returns it and on
/// property assignment, but not when `m[k] = v` adds a key to a map (nor
/// when that map sits inside an array or another map): a loop of index
/// assignments could grow a map without bound. Every growth of a value goes
/// through an access to the variable holding it, so each access of a
/// variable holding a map or array is checked here:
///
/// - its own length, every time (a top-level map or array is refused at the
///   first access after the insertion that crossed its limit);
/// - the values nested in it, walked again once the accesses since the last
///   walk reach 1/16 of the size found then (amortized O(1) per access; a
///   nested map or array can pass its limit by at most that much before it
///   is refused).
struct Growth {
    max_map: usize,
    max_array: usize,
    max_string: usize,
    /// Per variable name: (elements found by the last walk, accesses since).
    seen: HashMap<String, (usize, usize)>,
}

/// Deeper than this a value is refused as too large (the wire's own depth
/// limit is 64; this also bounds the walk's recursion).
const MAX_WALK_DEPTH: usize = 128;

impl Growth {
    fn new(limits: &ScriptLimits) -> Growth {
        Growth {
            max_map: limits.max_map_len,
            max_array: limits.max_array_len,
            max_string: limits.max_string_bytes,
            seen: HashMap::new(),
        }
    }

    fn reset(&mut self) {
        self.seen.clear();
    }

    /// Checks the value of variable `name` on an access.
    fn check(&mut self, name: &str, value: &Dynamic) -> Result<(), &'static str> {
        let len = if let Some(m) = value.read_lock::<rhai::Map>() {
            if m.len() > self.max_map {
                return Err("Size of object map");
            }
            m.len()
        } else if let Some(a) = value.read_lock::<rhai::Array>() {
            if a.len() > self.max_array {
                return Err("Size of array");
            }
            a.len()
        } else {
            return Ok(());
        };
        let walk = match self.seen.get_mut(name) {
            Some((size, since)) => {
                *since += 1;
                *since > *size / 16
            }
            None => true,
        };
        if walk {
            let size = self.walk(value, 0)?.max(len);
            // Bounded: names are the script's own variables, cleared per call.
            self.seen.insert(name.to_owned(), (size, 0));
        }
        Ok(())
    }

    /// Checks every value nested in `value`; returns the elements visited.
    fn walk(&self, value: &Dynamic, depth: usize) -> Result<usize, &'static str> {
        if depth > MAX_WALK_DEPTH {
            return Err("Nesting of data");
        }
        if let Some(m) = value.read_lock::<rhai::Map>() {
            if m.len() > self.max_map {
                return Err("Size of object map");
            }
            let mut n = m.len();
            for v in m.values() {
                n += self.walk(v, depth + 1)?;
            }
            Ok(n)
        } else if let Some(a) = value.read_lock::<rhai::Array>() {
            if a.len() > self.max_array {
                return Err("Size of array");
            }
            let mut n = a.len();
            for v in a.iter() {
                n += self.walk(v, depth + 1)?;
            }
            Ok(n)
        } else if let Some(s) = value.read_lock::<rhai::ImmutableString>() {
            if s.len() > self.max_string {
                return Err("Length of string");
            }
            Ok(0)
        } else {
            Ok(0)
        }
    }
}

fn set_growth_check(engine: &mut Engine, growth: Arc<Mutex<Growth>>) {
    // `on_var` is marked deprecated only as "volatile" (Rhai's wording: the
    // API is not deprecated but may change); rhai is pinned to 1.27 in the
    // workspace and the growth tests would catch a change.
    #[allow(deprecated)]
    engine.on_var(move |name, _index, context| {
        let Some(value) = context.scope().get(name) else {
            return Ok(None);
        };
        if !(value.is_map() || value.is_array()) {
            return Ok(None);
        }
        growth
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check(name, value)
            .map_err(|what| {
                Box::new(EvalAltResult::ErrorDataTooLarge(
                    what.into(),
                    Position::NONE,
                ))
            })?;
        Ok(None)
    });
}

fn set_output(engine: &mut Engine, output: Arc<Mutex<Output>>) {
    let out = Arc::clone(&output);
    engine.on_print(move |s| {
        out.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .emit("print", s);
    });
    engine.on_debug(move |s, _, pos| {
        output
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .emit(&format!("debug at {pos}"), s);
    });
}

pub(crate) fn truncate(s: &str) -> &str {
    let mut end = s.len().min(1024);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn syntax(e: &rhai::ParseError) -> ScriptError {
    let pos = e.position();
    ScriptError::Syntax {
        message: e.err_type().to_string(),
        line: pos.line().unwrap_or(0),
        column: pos.position().unwrap_or(0),
    }
}

/// The aliases of `import "alias"` statements, by a plain scan of the
/// source (only string-literal imports resolve anyway).
pub(crate) fn scan_imports(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(i) = rest.find("import") {
        rest = &rest[i + "import".len()..];
        if let Some(lit) = rest.trim_start().strip_prefix('"')
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

impl Language for RhaiLanguage {
    fn compile(&self, name: &str, source: &str) -> Result<Compiled, ScriptError> {
        let ast = self
            .inner
            .compiler
            .compile(source)
            .map_err(|e| syntax(&e))?;
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
        Ok(Compiled {
            imports: scan_imports(source),
            code: Box::new(ast),
        })
    }

    fn define_dependency(&self, alias: &str, source: &DependencySource) -> Result<(), ScriptError> {
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
                self.inner
                    .compiler_output
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .reset(alias);
                let ast = engine.compile(src).map_err(|e| syntax(&e))?;
                Module::eval_ast_as_new(Scope::new(), &ast, engine)
                    .map_err(|e| classify(*e))?
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

    fn undefine_dependency(&self, alias: &str) {
        self.inner.deps.rcu(|deps| {
            let mut next = (**deps).clone();
            next.remove(alias);
            next
        });
    }

    fn dependencies(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.deps.load().keys().cloned().collect();
        v.sort();
        v
    }

    fn worker(&self) -> Box<dyn Worker> {
        let state: Arc<Mutex<Option<Control>>> = Arc::new(Mutex::new(None));
        let (mut engine, output) = sandbox_engine(&self.inner.limits);
        let growth = Arc::new(Mutex::new(Growth::new(&self.inner.limits)));
        set_growth_check(&mut engine, Arc::clone(&growth));
        engine.set_module_resolver(DependencyResolver(Arc::clone(&self.inner)));
        let every = self.inner.limits.check_every_operations.max(1);
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
                        // Like reading an undefined variable: script_error,
                        // kind runtime_error (only `throw` is operation_failed).
                        .ok_or_else(|| {
                            Box::new(EvalAltResult::ErrorVariableNotFound(
                                format!("constant \"{}\" (it is not defined)", truncate(name)),
                                Position::NONE,
                            ))
                        })
                },
            );
        }
        Box::new(RhaiWorker {
            engine,
            state,
            output,
            growth,
        })
    }
}

struct RhaiWorker {
    engine: Engine,
    /// The current call's control, read by the progress callback.
    state: Arc<Mutex<Option<Control>>>,
    /// The current call's output budget.
    output: Arc<Mutex<Output>>,
    /// The current call's size checks.
    growth: Arc<Mutex<Growth>>,
}

impl Worker for RhaiWorker {
    fn call(
        &mut self,
        code: &(dyn Any + Send + Sync),
        name: &str,
        args: &[Value],
        control: Control,
    ) -> Result<Value, ScriptError> {
        let Some(ast) = code.downcast_ref::<AST>() else {
            return Err(ScriptError::Stopped);
        };
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Some(control);
        self.output
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reset(name);
        self.growth
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reset();
        let args: Vec<Dynamic> = args.iter().map(to_dynamic).collect();
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(false);
        let growth = Arc::clone(&self.growth);
        let result = self
            .engine
            .call_fn_with_options::<Dynamic>(options, &mut Scope::new(), ast, name, args)
            .map_err(|e| classify(*e))
            .and_then(|d| {
                // The result, whole: nothing over a limit leaves the sandbox.
                growth
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .walk(&d, 0)
                    .map_err(|what| ScriptError::Limit {
                        kind: "too_large",
                        message: format!("{what} exceeds its limit"),
                    })?;
                from_dynamic(d, 0)
            });
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = None;
        result
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
