//! Native functions: what a call sees, what it may return, and the registry
//! shared by all sessions.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use netproc_auth::{BoxFuture, Principal};
use netproc_limits::{Gate, GatePermit, TokenBucket};
use netproc_pki::CertIdentity;
use netproc_wire::{ErrorBody, ErrorCode, FunctionLimits, Privilege, Value, from_value, to_value};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// Facts about the session a call arrives on, shared by its calls.
#[derive(Debug)]
pub(crate) struct SessionFacts {
    pub(crate) session_id: u64,
    pub(crate) principal: Principal,
    pub(crate) peer: SocketAddr,
    pub(crate) cert: Arc<CertIdentity>,
}

/// A call's cancellation token, made only when someone needs one: a
/// function that asks for it, or the session when the call does not finish
/// on its first poll (only then can it be cancelled). Most calls never
/// need one.
#[derive(Debug, Default)]
pub(crate) struct CallCancel(std::sync::OnceLock<CancellationToken>);

impl CallCancel {
    /// The token (the same one for the function and the session).
    pub(crate) fn token(&self) -> &CancellationToken {
        self.0.get_or_init(CancellationToken::new)
    }
}

/// What a function knows about its call.
#[derive(Debug, Clone)]
pub struct CallContext {
    session: Arc<SessionFacts>,
    cancel: Arc<CallCancel>,
    deadline: Instant,
}

impl CallContext {
    pub(crate) fn new(
        session: Arc<SessionFacts>,
        cancel: Arc<CallCancel>,
        deadline: Instant,
    ) -> Self {
        CallContext {
            session,
            cancel,
            deadline,
        }
    }

    /// Who is calling.
    pub fn principal(&self) -> &Principal {
        &self.session.principal
    }

    /// The caller's address.
    pub fn peer(&self) -> SocketAddr {
        self.session.peer
    }

    /// The caller's verified client certificate.
    pub fn cert(&self) -> &CertIdentity {
        &self.session.cert
    }

    /// The session's id.
    pub fn session_id(&self) -> u64 {
        self.session.session_id
    }

    /// Cancelled when the caller cancels, the deadline passes, or the
    /// session ends. Long-running work should watch it; the call's future is
    /// also dropped at that point.
    pub fn cancellation(&self) -> &CancellationToken {
        self.cancel.token()
    }

    /// When the caller stops waiting (the earlier of its deadline and the
    /// server's request timeout).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// An error a function returns. By default `operation_failed` with the
/// message; the message is sent to the caller, so it must not hold secrets
/// or internal details.
#[derive(Debug, Clone, PartialEq)]
pub struct CallError {
    code: ErrorCode,
    message: String,
    details: Value,
}

impl CallError {
    /// `operation_failed` with `message`.
    pub fn new(message: impl Into<String>) -> CallError {
        CallError::with_code(ErrorCode::OperationFailed, message)
    }

    /// `invalid_argument` with `message`.
    pub fn invalid_argument(message: impl Into<String>) -> CallError {
        CallError::with_code(ErrorCode::InvalidArgument, message)
    }

    /// An error with a specific code.
    pub fn with_code(code: ErrorCode, message: impl Into<String>) -> CallError {
        CallError {
            code,
            message: message.into(),
            details: Value::Null,
        }
    }

    /// Adds structured details.
    pub fn details(mut self, details: Value) -> CallError {
        self.details = details;
        self
    }

    /// The code.
    pub fn code(&self) -> &ErrorCode {
        &self.code
    }

    pub(crate) fn into_body(self) -> ErrorBody {
        ErrorBody::new(self.code, self.message).with_details(self.details)
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for CallError {}

impl From<String> for CallError {
    fn from(message: String) -> Self {
        CallError::new(message)
    }
}

impl From<&str> for CallError {
    fn from(message: &str) -> Self {
        CallError::new(message)
    }
}

/// A function callable over the wire. Implemented for async closures by
/// [`ServerBuilder::function`](crate::ServerBuilder::function); implement it
/// directly to take the raw argument list.
pub trait NativeFunction: Send + Sync + 'static {
    /// Runs one call. `args` are the positional arguments.
    fn call(
        &self,
        ctx: CallContext,
        args: Vec<Value>,
    ) -> BoxFuture<'static, Result<Value, CallError>>;
}

/// Adapts `Fn(CallContext, A) -> Future<Output = Result<R, CallError>>`.
pub(crate) struct TypedFunction<F, A, R> {
    name: Arc<str>,
    f: F,
    _types: PhantomData<fn(A) -> R>,
}

impl<F, A, R> TypedFunction<F, A, R> {
    pub(crate) fn new(name: &str, f: F) -> Self {
        TypedFunction {
            name: name.into(),
            f,
            _types: PhantomData,
        }
    }
}

impl<F, A, R, Fut> NativeFunction for TypedFunction<F, A, R>
where
    F: Fn(CallContext, A) -> Fut + Send + Sync + 'static,
    A: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    Fut: Future<Output = Result<R, CallError>> + Send + 'static,
{
    fn call(
        &self,
        ctx: CallContext,
        args: Vec<Value>,
    ) -> BoxFuture<'static, Result<Value, CallError>> {
        let args = match from_value::<A>(Value::List(args)) {
            Ok(args) => args,
            Err(e) => {
                let msg = format!(
                    "function \"{}\" expects arguments {}: {e}",
                    self.name,
                    short_type_name::<A>()
                );
                return Box::pin(std::future::ready(Err(CallError::invalid_argument(msg))));
            }
        };
        let fut = (self.f)(ctx, args);
        Box::pin(async move { into_value(fut.await?) })
    }
}

/// A function's result as a `Value`: moved when it is one already (no
/// copy of its bytes or strings), else serialized.
fn into_value<R: Serialize + 'static>(result: R) -> Result<Value, CallError> {
    let mut slot = Some(result);
    if let Some(value) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Value>>() {
        return Ok(value.take().unwrap_or(Value::Null));
    }
    let Some(result) = slot else {
        return Ok(Value::Null);
    };
    to_value(&result).map_err(|e| CallError::new(format!("result could not be encoded: {e}")))
}

/// `(i64, alloc::string::String)` → `(i64, String)`.
fn short_type_name<T>() -> String {
    let full = std::any::type_name::<T>();
    let mut out = String::with_capacity(full.len());
    let mut segment = String::new();
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            segment.push(c);
        } else {
            out.push_str(segment.rsplit("::").next().unwrap_or(""));
            segment.clear();
            out.push(c);
        }
    }
    out.push_str(segment.rsplit("::").next().unwrap_or(""));
    out
}

/// A handler for an [`Operation::Extension`](netproc_wire::Operation::Extension):
/// an operation a higher layer adds without changing the protocol.
pub trait ExtensionHandler: Send + Sync + 'static {
    /// Handles one request; the answer is sent as `Value::Bytes`.
    fn handle(
        &self,
        ctx: CallContext,
        payload: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, CallError>>;
}

pub(crate) struct Extension {
    pub(crate) privilege: Privilege,
    pub(crate) handler: Arc<dyn ExtensionHandler>,
}

/// A function's own limits: a bucket shared by all its callers and a cap
/// on concurrent calls.
pub(crate) struct FunctionGuard {
    bucket: Option<std::sync::Mutex<TokenBucket>>,
    gate: Option<Gate>,
}

impl FunctionGuard {
    pub(crate) fn new(limits: &FunctionLimits, now: Instant) -> FunctionGuard {
        FunctionGuard {
            bucket: limits.rate.as_ref().map(|r| {
                std::sync::Mutex::new(TokenBucket::new(
                    r.tokens_per_interval,
                    std::time::Duration::from_millis(r.interval_ms.into()),
                    r.burst_tokens,
                    now,
                ))
            }),
            gate: limits.max_concurrency.map(|n| Gate::new(n as usize)),
        }
    }

    /// Takes a token and a concurrency slot, or names the limit that refused.
    pub(crate) fn admit(
        &self,
        now: Instant,
    ) -> Result<Option<GatePermit>, (&'static str, std::time::Duration)> {
        let permit = match &self.gate {
            Some(gate) => Some(
                gate.try_enter()
                    .ok_or(("function_concurrency", std::time::Duration::from_millis(50)))?,
            ),
            None => None,
        };
        if let Some(bucket) = &self.bucket {
            bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .try_acquire(now)
                .map_err(|retry| ("per_function", retry))?;
        }
        Ok(permit)
    }
}

/// FNV-1a over a name. The native tables are fixed when the server is
/// built (no peer can add to them), so a keyed hash (SipHash, ~10× the
/// work for a short name) buys nothing there; looked up on every call.
#[derive(Default)]
pub(crate) struct NameHasher(u64);

impl std::hash::Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// A table keyed by a name fixed at build time.
pub(crate) type NameMap<V> = HashMap<String, V, std::hash::BuildHasherDefault<NameHasher>>;

/// The functions, constants and extensions a server offers. Read on every
/// call without locking (an `ArcSwap` snapshot); changed by copy and swap.
pub(crate) struct Registry {
    pub(crate) functions: NameMap<Arc<dyn NativeFunction>>,
    pub(crate) guards: NameMap<FunctionGuard>,
    pub(crate) extensions: NameMap<Extension>,
    constants: ArcSwap<BTreeMap<String, Value>>,
}

impl Registry {
    pub(crate) fn new(
        functions: HashMap<String, Arc<dyn NativeFunction>>,
        guards: HashMap<String, FunctionGuard>,
        extensions: HashMap<String, Extension>,
        constants: BTreeMap<String, Value>,
    ) -> Self {
        Registry {
            functions: functions.into_iter().collect(),
            guards: guards.into_iter().collect(),
            extensions: extensions.into_iter().collect(),
            constants: ArcSwap::from_pointee(constants),
        }
    }

    pub(crate) fn constants(&self) -> Arc<BTreeMap<String, Value>> {
        self.constants.load_full()
    }

    pub(crate) fn define_constant(&self, name: String, value: Value) {
        self.constants.rcu(|current| {
            let mut next = (**current).clone();
            next.insert(name.clone(), value.clone());
            next
        });
    }

    /// Removes a constant; removing an unknown one succeeds.
    pub(crate) fn undefine_constant(&self, name: &str) {
        self.constants.rcu(|current| {
            let mut next = (**current).clone();
            next.remove(name);
            next
        });
    }
}

/// Names of constants and functions: an identifier of at most 128 bytes.
pub(crate) fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_shortened() {
        assert_eq!(short_type_name::<(i64, String)>(), "(i64, String)");
        assert_eq!(
            short_type_name::<Vec<Option<String>>>(),
            "Vec<Option<String>>"
        );
    }

    #[test]
    fn names_are_identifiers() {
        for ok in ["a", "_x", "add_2", "A"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "2a", "a-b", "a b", &"x".repeat(129)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
