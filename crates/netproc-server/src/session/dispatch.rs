//! The request gate (id, privilege, in-flight cap, buckets, function
//! limits, the refusal budget) and running calls.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use netproc_auth::{BoxFuture, authorize, authorize_privilege};
use netproc_wire::{ErrorBody, ErrorCode, Operation, Outcome, Request, ServerMessage, Value};
use tokio_util::sync::CancellationToken;

use super::{End, Session};
use crate::abuse::Counter;
use crate::audit::{self, sanitize};
use crate::connection::error_msg;
use crate::function::{CallContext, CallError};

impl Session {
    /// Checks that `id` is at least 1 and above the session's previous ids.
    /// `Err` when it is not: refused with a top-level `Error{invalid_request}`
    /// whose details carry `{id, last_id}` — never a `Response`, so a
    /// response always belongs to the call the client made with that id;
    /// `Err(Some(_))` ends the session.
    pub(super) fn accept_id(&mut self, id: u64) -> Result<(), Option<End>> {
        let last = self.last_id.unwrap_or(0);
        if id <= last {
            let message = if id == 0 {
                "request ids start at 1".to_owned()
            } else {
                format!("request id {id} is not above the previous id {last}")
            };
            self.take_refusal_token(None)?;
            self.shared.abuse.count(Counter::request_refused_count);
            self.audit_refusal("unknown", None, ErrorCode::InvalidRequest);
            let int = |n: u64| Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
            let details = Value::Map(std::collections::BTreeMap::from([
                ("id".to_owned(), int(id)),
                ("last_id".to_owned(), int(last)),
            ]));
            self.outbox.push(&ServerMessage::Error(
                ErrorBody::new(ErrorCode::InvalidRequest, message).with_details(details),
            ));
            return Err(None);
        }
        self.last_id = Some(id);
        Ok(())
    }

    /// A token from the refusal budget for a frame that is refused rather
    /// than served. `Err` when the budget is spent: the frame was answered
    /// `rate_limited` (scope `refusals`) instead, and `Err(Some(_))` ends the
    /// session (`disconnect_on_limit`).
    pub(super) fn take_refusal_token(&mut self, id: Option<u64>) -> Result<(), Option<End>> {
        let options = self.shared.options();
        let Err(refusal) = self
            .shared
            .abuse
            .check_refusal(&options, &mut self.refusals)
        else {
            return Ok(());
        };
        self.audit_refusal("unknown", None, ErrorCode::RateLimited);
        match id {
            Some(id) => self.respond(id, Outcome::Err(refusal.body)),
            None => self.outbox.push(&ServerMessage::Error(refusal.body)),
        }
        if refusal.disconnect {
            audit::session_closed(&self.facts, ErrorCode::RateLimited);
            self.close_with(ErrorCode::RateLimited, "too many refused requests");
            return Err(Some(End::Now));
        }
        Err(None)
    }

    /// Refuses a frame with `code`: a response to `id`, or a top-level
    /// `Error` frame that leaves the session open. Takes a token from the
    /// refusal budget first; `Some` ends the session.
    pub(super) fn refuse(
        &mut self,
        id: Option<u64>,
        operation: &str,
        function: Option<&str>,
        code: ErrorCode,
        message: String,
    ) -> Option<End> {
        if let Err(end) = self.take_refusal_token(id) {
            return end;
        }
        self.shared.abuse.count(Counter::request_refused_count);
        self.audit_refusal(operation, function, code.clone());
        match id {
            Some(id) => self.respond_err(id, code, message),
            None => self.outbox.push(&error_msg(code, message)),
        }
        None
    }

    /// The audit line of a refused request, aggregated per (principal, code).
    fn audit_refusal(&self, operation: &str, function: Option<&str>, code: ErrorCode) {
        let now = self.shared.abuse.clock.now();
        let kind = (self.facts.principal.id.clone(), code.clone());
        if let Some(suppressed) = self.shared.abuse.request_log.check(&kind, now) {
            audit::request_refused(&self.facts, operation, function, code, suppressed);
        }
    }

    /// Checks and dispatches one request, in this order: id, privilege,
    /// in-flight cap, request buckets, function limits. `Some` ends the
    /// session (`disconnect_on_limit`).
    pub(super) fn handle_request(&mut self, req: Request) -> Option<End> {
        let Request {
            id,
            op,
            deadline_ms,
        } = req;
        if let Err(end) = self.accept_id(id) {
            return end;
        }
        if let Err(denied) = authorize(&self.facts.principal, &op) {
            return self.refuse(
                Some(id),
                op.name(),
                function_of(&op),
                ErrorCode::InsufficientPrivileges,
                denied.to_string(),
            );
        }
        let refused = |session: &Session, op: &Operation, code: ErrorCode| {
            session.audit_refusal(op.name(), function_of(op), code);
        };
        let options = self.shared.options();
        let rc = &options.request_controls;
        if self.calls.len() >= rc.max_in_flight_requests_per_connection as usize {
            refused(self, &op, ErrorCode::RateLimited);
            let body = self.shared.abuse.in_flight_refusal();
            self.respond(id, Outcome::Err(body));
            return None;
        }
        let principal = &self.facts.principal;
        let key_id = principal.key_id.as_deref().unwrap_or(&principal.id);
        let checked = self.shared.abuse.check_request(
            &options,
            &mut self.conn_bucket,
            key_id,
            self.facts.peer.ip(),
        );
        if let Err(refusal) = checked {
            refused(self, &op, ErrorCode::RateLimited);
            self.respond(id, Outcome::Err(refusal.body));
            if refusal.disconnect {
                audit::session_closed(&self.facts, ErrorCode::RateLimited);
                self.close_with(ErrorCode::RateLimited, "request rate limit exceeded");
                return Some(End::Now);
            }
            return None;
        }
        if deadline_ms == Some(0) {
            // The client gave the call no time at all.
            refused(self, &op, ErrorCode::Timeout);
            self.respond_err(id, ErrorCode::Timeout, "the request's deadline is 0 ms");
            return None;
        }
        let server_limit = Duration::from_millis(rc.request_timeout_ms);
        let limit = deadline_ms.map_or(server_limit, |ms| {
            server_limit.min(Duration::from_millis(ms.into()))
        });
        match op {
            Operation::Invoke { function, args } => self.invoke(id, function, args, limit),
            Operation::DefineFunction(def) => {
                let (ctx, token, deadline) = self.context(limit);
                drop(ctx);
                let fut = crate::scripts::Scripts::define_function(
                    Arc::clone(&self.shared),
                    def,
                    self.facts.principal.clone(),
                );
                self.spawn_call(id, Box::pin(fut), token, deadline, limit, None);
            }
            Operation::DefineConstant { name, value } => {
                let fut = crate::scripts::define_constant(
                    Arc::clone(&self.shared),
                    name,
                    value,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::UndefineConstant { name } => {
                let fut = crate::scripts::undefine_constant(
                    Arc::clone(&self.shared),
                    name,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::UndefineFunction { name } => {
                let fut = crate::scripts::Scripts::undefine_function(
                    Arc::clone(&self.shared),
                    name,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::UndefineDependency { alias, force } => {
                let fut = crate::scripts::Scripts::undefine_dependency(
                    Arc::clone(&self.shared),
                    alias,
                    force,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::Reload => {
                audit::admin_action(&self.facts, "reload", "");
                let shared = Arc::clone(&self.shared);
                let fut = async move {
                    shared
                        .reload()
                        .await
                        .map(|closed| Value::Int(closed as i64))
                        .map_err(|e| {
                            CallError::with_code(ErrorCode::InvalidArgument, e.to_string())
                        })
                };
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::DefineDependency { alias, source } => {
                let (ctx, token, deadline) = self.context(limit);
                drop(ctx);
                let fut = crate::scripts::Scripts::define_dependency(
                    Arc::clone(&self.shared),
                    alias,
                    source,
                    self.facts.principal.clone(),
                );
                self.spawn_call(id, Box::pin(fut), token, deadline, limit, None);
            }
            Operation::Extension { name, payload } => {
                let Some(ext) = self.shared.registry.extensions.get(&name) else {
                    let msg = format!("no extension named \"{}\"", sanitize(&name));
                    return self.refuse(
                        Some(id),
                        "extension",
                        Some(&name),
                        ErrorCode::InvalidOperation,
                        msg,
                    );
                };
                if let Err(denied) =
                    authorize_privilege(&self.facts.principal, ext.privilege, "extension")
                {
                    return self.refuse(
                        Some(id),
                        "extension",
                        Some(&name),
                        ErrorCode::InsufficientPrivileges,
                        denied.to_string(),
                    );
                }
                let (ctx, token, deadline) = self.context(limit);
                let handler = Arc::clone(&ext.handler);
                let fut: BoxFuture<'static, Result<Value, CallError>> =
                    Box::pin(async move { handler.handle(ctx, payload).await.map(Value::Bytes) });
                self.spawn_call(id, fut, token, deadline, limit, None);
            }
            op => {
                let outcome = self.run_inline(op);
                self.respond(id, outcome);
            }
        }
        None
    }
    /// A change to the definitions, run as a call (it may wait for a
    /// compile or a database commit).
    fn spawn_definition(
        &mut self,
        id: u64,
        fut: BoxFuture<'static, Result<Value, CallError>>,
        limit: Duration,
    ) {
        let (ctx, token, deadline) = self.context(limit);
        drop(ctx);
        self.spawn_call(id, fut, token, deadline, limit, None);
    }

    /// An invoke: a native function, else a script function.
    fn invoke(&mut self, id: u64, function: String, args: Vec<Value>, limit: Duration) {
        let now = self.shared.abuse.clock.now();
        if let Some(f) = self.shared.registry.functions.get(&function) {
            let guards = &self.shared.registry.guards;
            let guard = if guards.is_empty() {
                None
            } else {
                guards.get(&function)
            };
            let Some(permit) = self.admit_function(id, &function, guard, now) else {
                return;
            };
            let (ctx, token, deadline) = self.context(limit);
            let fut = f.call(ctx, args);
            self.spawn_call(id, fut, token, deadline, limit, permit);
            return;
        }
        let entry = self.shared.scripts.as_ref().and_then(|s| s.get(&function));
        let Some(entry) = entry else {
            self.audit_refusal("invoke", Some(&function), ErrorCode::FunctionNotFound);
            let msg = format!("no function named \"{}\"", sanitize(&function));
            self.respond_err(id, ErrorCode::FunctionNotFound, msg);
            return;
        };
        let Some(permit) = self.admit_function(id, &function, entry.guard.as_ref(), now) else {
            return;
        };
        let (ctx, token, deadline) = self.context(limit);
        drop(ctx);
        let Some(scripts) = self.shared.scripts.as_ref() else {
            return;
        };
        let constants = self.shared.registry.constants();
        match scripts
            .runtime
            .call(&entry.function, args, constants, deadline)
        {
            Ok(call) => {
                let fut = async move { call.await.map_err(crate::scripts::script_error) };
                self.spawn_call(id, Box::pin(fut), token, deadline, limit, permit);
            }
            Err(e) => {
                self.audit_refusal("invoke", Some(&function), e.code());
                self.respond(
                    id,
                    Outcome::Err(crate::scripts::script_error(e).into_body()),
                );
            }
        }
    }

    /// A function's own limits: `Some(permit)` to go on, `None` when refused
    /// (and answered).
    fn admit_function(
        &self,
        id: u64,
        function: &str,
        guard: Option<&crate::function::FunctionGuard>,
        now: Instant,
    ) -> Option<Option<netproc_limits::GatePermit>> {
        match guard.map(|g| g.admit(now)) {
            None => Some(None),
            Some(Ok(permit)) => Some(permit),
            Some(Err((scope, retry))) => {
                self.audit_refusal("invoke", Some(function), ErrorCode::RateLimited);
                let body = self.shared.abuse.function_refusal(scope, retry);
                self.respond(id, Outcome::Err(body));
                None
            }
        }
    }

    fn context(&self, limit: Duration) -> (CallContext, CancellationToken, Instant) {
        let token = CancellationToken::new();
        let deadline = Instant::now() + limit;
        let ctx = CallContext::new(Arc::clone(&self.facts), token.clone(), deadline);
        (ctx, token, deadline)
    }

    /// Adds a call to the session's in-flight set. It is polled by this
    /// session's task (no task per call), bounded by its deadline, stopped
    /// by `Cancel`, and a panic in it answers `internal` for this request only.
    fn spawn_call(
        &mut self,
        id: u64,
        fut: BoxFuture<'static, Result<Value, CallError>>,
        token: CancellationToken,
        deadline: Instant,
        limit: Duration,
        permit: Option<netproc_limits::GatePermit>,
    ) {
        self.cancels.insert(id, token.clone());
        let facts = Arc::clone(&self.facts);
        self.calls.push(Box::pin(async move {
            // Released when the call ends, however it ends.
            let _permit = permit;
            let finished = |r: std::thread::Result<Result<Value, CallError>>| match r {
                Ok(Ok(v)) => Outcome::Ok(v),
                Ok(Err(e)) => Outcome::Err(e.into_body()),
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(session_id = facts.session_id, request_id = id, panic = %what, "a function panicked");
                    Outcome::Err(ErrorBody::new(ErrorCode::Internal, "internal error"))
                }
            };
            let mut guarded = AssertUnwindSafe(fut).catch_unwind();
            // Most functions finish on their first poll: they need no timer.
            if let Poll::Ready(r) = futures_util::poll!(&mut guarded) {
                return (id, finished(r));
            }
            let outcome = tokio::select! {
                biased;
                () = token.cancelled() => Outcome::Err(ErrorBody::new(ErrorCode::Cancelled, "the call was cancelled")),
                r = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), guarded) => match r {
                    Ok(r) => finished(r),
                    Err(_) => {
                        token.cancel();
                        Outcome::Err(ErrorBody::new(
                            ErrorCode::Timeout,
                            format!("the call did not finish within {} ms", limit.as_millis()),
                        ))
                    }
                },
            };
            (id, outcome)
        }));
    }
}

fn function_of(op: &Operation) -> Option<&str> {
    match op {
        Operation::Invoke { function, .. } => Some(function),
        Operation::Extension { name, .. } => Some(name),
        _ => None,
    }
}
