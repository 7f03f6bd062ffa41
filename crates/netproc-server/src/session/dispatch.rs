//! The request gate (id, privilege, in-flight cap, buckets, function
//! limits, the refusal budget) and running calls.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use netproc_auth::{BoxFuture, authorize_privilege};
use netproc_wire::{ErrorCode, Operation, Outcome, Request, ServerMessage, Value};

use super::gate::Decision;
use super::{End, Session};
use crate::audit::{self, sanitize};
use crate::function::{CallCancel, CallContext, CallError, SessionFacts};
use crate::refusal::Refused;

impl Session {
    /// Carries out a decision of the gate for a frame that did not run:
    /// audits and answers it. `Some` ends the session.
    pub(super) fn apply(
        &mut self,
        decision: Decision,
        operation: &str,
        function: Option<&str>,
    ) -> Option<End> {
        let (reply, close) = match decision {
            Decision::Run { .. } | Decision::Ignore => return None,
            Decision::Answer(reply) => (reply, false),
            Decision::AnswerAndClose(reply) => (reply, true),
        };
        self.audit_refusal(operation, function, reply.body.code.clone());
        match reply.id {
            Some(id) => self.respond(id, Outcome::Err(reply.body)),
            None => self.outbox.push(&ServerMessage::Error(reply.body)),
        }
        if close {
            audit::session_closed(&self.facts, ErrorCode::RateLimited);
            self.close_with(ErrorCode::RateLimited, "rate limit exceeded");
            return Some(End::Now);
        }
        None
    }

    /// Refuses a frame with `code` (through the gate's refusal budget): a
    /// response to `id`, or a top-level `Error`. `Some` ends the session.
    pub(super) fn refuse(
        &mut self,
        id: Option<u64>,
        operation: &str,
        function: Option<&str>,
        code: ErrorCode,
        message: String,
    ) -> Option<End> {
        let options = self.shared.options();
        let decision = self
            .gate
            .refuse(&self.shared.abuse, &options, id, code, message);
        self.apply(decision, operation, function)
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
        let options = self.shared.options();
        let decision = self.gate.request(
            &self.shared.abuse,
            &options,
            &self.facts.principal,
            self.facts.peer.ip(),
            id,
            &op,
            deadline_ms,
            self.calls.len(),
        );
        let Decision::Run { limit } = decision else {
            return self.apply(decision, op.name(), function_of(&op));
        };
        match op {
            Operation::Invoke { function, args } => self.invoke(id, function, args, limit),
            Operation::DefineFunction(def) => {
                let (ctx, token, deadline) = self.context(limit);
                drop(ctx);
                let fut = crate::scripts::Scripts::define_function(
                    Arc::clone(&self.shared.defs),
                    def,
                    self.facts.principal.clone(),
                );
                self.spawn_call(id, Box::pin(fut), token, deadline, limit, None);
            }
            Operation::DefineConstant { name, value } => {
                let fut = crate::scripts::define_constant(
                    Arc::clone(&self.shared.defs),
                    name,
                    value,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::UndefineConstant { name } => {
                let fut = crate::scripts::undefine_constant(
                    Arc::clone(&self.shared.defs),
                    name,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::UndefineFunction { name } => {
                let fut = crate::scripts::Scripts::undefine_function(
                    Arc::clone(&self.shared.defs),
                    name,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::UndefineDependency { alias, force } => {
                let fut = crate::scripts::Scripts::undefine_dependency(
                    Arc::clone(&self.shared.defs),
                    alias,
                    force,
                    self.facts.principal.clone(),
                );
                self.spawn_definition(id, Box::pin(fut), limit);
            }
            Operation::Reload => {
                let facts = &self.facts;
                let audit = |op: &'static str, target: &str| audit::admin_action(facts, op, target);
                match crate::admin_ops::run(&self.shared, Operation::Reload, &audit) {
                    crate::admin_ops::AdminAnswer::Later(fut) => {
                        self.spawn_definition(id, fut, limit);
                    }
                    crate::admin_ops::AdminAnswer::Now(outcome) => self.respond(id, outcome),
                    crate::admin_ops::AdminAnswer::NotAdmin(_) => {}
                }
            }
            Operation::DefineDependency { alias, source } => {
                let (ctx, token, deadline) = self.context(limit);
                drop(ctx);
                let fut = crate::scripts::Scripts::define_dependency(
                    Arc::clone(&self.shared.defs),
                    alias,
                    source,
                    self.facts.principal.clone(),
                );
                self.spawn_call(id, Box::pin(fut), token, deadline, limit, None);
            }
            Operation::Extension { name, payload } => {
                let Some(ext) = self.shared.defs.registry.extensions.get(&name) else {
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
                let fut: BoxFuture<'static, Result<Value, CallError>> = Box::pin(async move {
                    handler
                        .handle(ctx, payload)
                        .await
                        .map(|b| Value::Bytes(b.into()))
                });
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
        if let Some(f) = self.shared.defs.registry.functions.get(&function) {
            let guards = &self.shared.defs.registry.guards;
            let guard = if guards.is_empty() {
                None
            } else {
                guards.get(&function)
            };
            let Some(permit) = self.admit_function(id, &function, guard) else {
                return;
            };
            let (ctx, token, deadline) = self.context(limit);
            let fut = f.call(ctx, args);
            self.spawn_call(id, fut, token, deadline, limit, permit);
            return;
        }
        let entry = self
            .shared
            .defs
            .scripts
            .as_ref()
            .and_then(|s| s.get(&function));
        let Some(entry) = entry else {
            self.audit_refusal("invoke", Some(&function), ErrorCode::FunctionNotFound);
            let msg = format!("no function named \"{}\"", sanitize(&function));
            self.respond_err(id, ErrorCode::FunctionNotFound, msg);
            return;
        };
        let Some(permit) = self.admit_function(id, &function, entry.guard.as_ref()) else {
            return;
        };
        let (ctx, token, deadline) = self.context(limit);
        drop(ctx);
        let Some(scripts) = self.shared.defs.scripts.as_ref() else {
            return;
        };
        let constants = self.shared.defs.registry.constants();
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
    /// (and answered). The clock is read only for a function with limits.
    fn admit_function(
        &self,
        id: u64,
        function: &str,
        guard: Option<&crate::function::FunctionGuard>,
    ) -> Option<Option<netproc_limits::GatePermit>> {
        match guard.map(|g| g.admit(self.shared.abuse.clock.now())) {
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

    fn context(&self, limit: Duration) -> (CallContext, Arc<CallCancel>, Instant) {
        let cancel = Arc::new(CallCancel::default());
        let deadline = Instant::now() + limit;
        let ctx = CallContext::new(Arc::clone(&self.facts), Arc::clone(&cancel), deadline);
        (ctx, cancel, deadline)
    }

    /// Runs a call. Most functions finish on their first poll: those are
    /// answered here, with no timer, no cancel entry and no task node.
    /// The rest join the session's in-flight set: polled by this session's
    /// task (no task per call), bounded by its deadline, stopped by
    /// `Cancel`. A panic answers `internal` for this request only.
    fn spawn_call(
        &mut self,
        id: u64,
        fut: BoxFuture<'static, Result<Value, CallError>>,
        cancel: Arc<CallCancel>,
        deadline: Instant,
        limit: Duration,
        permit: Option<netproc_limits::GatePermit>,
    ) {
        let mut guarded = AssertUnwindSafe(fut).catch_unwind();
        // A first poll with a waker that does nothing: a future that is not
        // ready is polled again by the in-flight set, which registers the
        // session's waker then.
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        if let Poll::Ready(r) = guarded.poll_unpin(&mut cx) {
            drop(permit);
            let outcome = finished(&self.facts, id, r);
            self.respond(id, outcome);
            return;
        }
        // Not finished at once: now the call needs its token.
        let token = cancel.token().clone();
        self.cancels.insert(id, token.clone());
        let facts = Arc::clone(&self.facts);
        self.calls.push(Box::pin(async move {
            // Released when the call ends, however it ends.
            let _permit = permit;
            let outcome = tokio::select! {
                biased;
                () = token.cancelled() => Outcome::Err(Refused::Cancelled.into_body()),
                r = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), guarded) => match r {
                    Ok(r) => finished(&facts, id, r),
                    Err(_) => {
                        token.cancel();
                        Outcome::Err(Refused::CallTimeout { limit }.into_body())
                    }
                },
            };
            (id, outcome)
        }));
    }
}

/// The outcome of a call that ended, panics included.
fn finished(
    facts: &SessionFacts,
    id: u64,
    r: std::thread::Result<Result<Value, CallError>>,
) -> Outcome {
    match r {
        Ok(Ok(v)) => Outcome::Ok(v),
        Ok(Err(e)) => Outcome::Err(e.into_body()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(session_id = facts.session_id, request_id = id, panic = %what, "a function panicked");
            Outcome::Err(Refused::Internal.into_body())
        }
    }
}

fn function_of(op: &Operation) -> Option<&str> {
    match op {
        Operation::Invoke { function, .. } => Some(function),
        Operation::Extension { name, .. } => Some(name),
        _ => None,
    }
}
