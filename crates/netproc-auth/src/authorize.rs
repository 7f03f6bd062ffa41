//! Authorisation: one check, applied to every operation.

use netproc_wire::{Operation, Privilege};

use crate::Principal;

/// The operation needs a privilege the principal lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InsufficientPrivileges {
    /// The operation's privilege is missing.
    #[error("operation \"{operation}\" requires privilege \"{required}\"")]
    Missing {
        /// The operation's name.
        operation: &'static str,
        /// The privilege it needs.
        required: Privilege,
    },
    /// The principal's function allow-list does not name the function.
    #[error("the credential may not call function \"{function}\"")]
    FunctionNotAllowed {
        /// The function (length-capped).
        function: String,
    },
}

/// The privilege an operation needs; `None` for operations any
/// authenticated caller may run (listings, whose results are filtered).
///
/// Extensions declare their own privilege when registered; for them this
/// returns `None` and the server checks the registered privilege with
/// [`authorize_privilege`].
pub fn required_privilege(op: &Operation) -> Option<Privilege> {
    Some(match op {
        Operation::Invoke { .. } => Privilege::InvokeFunctions,
        Operation::DefineFunction(_) => Privilege::DefineFunctions,
        Operation::UndefineFunction { .. } => Privilege::UndefineFunctions,
        Operation::DefineConstant { .. } => Privilege::DefineConstants,
        Operation::UndefineConstant { .. } => Privilege::UndefineConstants,
        Operation::DefineDependency { .. } => Privilege::DefineDependencies,
        Operation::UndefineDependency { .. } => Privilege::UndefineDependencies,
        Operation::ServerInfo
        | Operation::AbuseMetrics
        | Operation::ListSessions
        | Operation::DisconnectSession { .. }
        | Operation::DisconnectPrincipal { .. }
        | Operation::ListBlocked
        | Operation::Unblock { .. }
        | Operation::GetLimits
        | Operation::SetLimits { .. }
        | Operation::Reload => Privilege::AdminPrivileges,
        Operation::ListFunctions
        | Operation::ListConstants
        | Operation::ListDependencies
        | Operation::WhoAmI
        | Operation::Extension { .. } => return None,
        // A future operation this version does not know is admin-only.
        _ => Privilege::AdminPrivileges,
    })
}

/// Whether `principal` may run `op`: the operation's privilege (see
/// [`required_privilege`]), and for an invoke, the function allow-list.
///
/// ```
/// use netproc_auth::{authorize, Principal, PrivilegeSet};
/// use netproc_wire::Operation;
///
/// let p = Principal::new("k1", "invoke_functions".parse().unwrap()).with_functions(["add"]);
/// let call = |f: &str| Operation::Invoke { function: f.into(), args: vec![] };
/// assert!(authorize(&p, &call("add")).is_ok());
/// assert!(authorize(&p, &call("drop_tables")).is_err());
/// let err = authorize(&p, &Operation::DefineConstant { name: "x".into(), value: Default::default() }).unwrap_err();
/// assert_eq!(err.to_string(), "operation \"define_constant\" requires privilege \"define_constants\"");
/// ```
pub fn authorize(principal: &Principal, op: &Operation) -> Result<(), InsufficientPrivileges> {
    if let Some(required) = required_privilege(op) {
        authorize_privilege(principal, required, op.name())?;
    }
    if let Operation::Invoke { function, .. } = op {
        // An allow-list is an explicit restriction: it binds every key,
        // whatever its privileges.
        if !principal.may_call(function) {
            return Err(InsufficientPrivileges::FunctionNotAllowed {
                function: function.chars().take(128).collect(),
            });
        }
    }
    Ok(())
}

/// Whether `principal` holds `required` (or admin / all privileges).
pub fn authorize_privilege(
    principal: &Principal,
    required: Privilege,
    operation: &'static str,
) -> Result<(), InsufficientPrivileges> {
    if principal.privileges.satisfies(required) {
        Ok(())
    } else {
        Err(InsufficientPrivileges::Missing {
            operation,
            required,
        })
    }
}
