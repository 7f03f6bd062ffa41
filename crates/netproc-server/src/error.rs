//! The server's error type, with typed sources.

use std::net::SocketAddr;
use std::path::PathBuf;

use netproc_pki::PkiError;

use crate::options::InvalidOption;

/// Why a server could not start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A setting is impossible.
    #[error(transparent)]
    Config(#[from] InvalidOption),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] PkiError),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state directory could not be created, opened or read.
    #[error("state directory {}: {source}", path.display())]
    State {
        /// The directory.
        path: PathBuf,
        /// What failed (an I/O or database error).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A function, constant or extension was registered wrongly.
    #[error("invalid registration of {what} \"{name}\": {problem}")]
    Registration {
        /// `function`, `constant` or `extension`.
        what: &'static str,
        /// The name as given.
        name: String,
        /// What is wrong with it.
        problem: RegistrationProblem,
    },
    /// A reload was refused: no reload source is configured, or it could
    /// not read its material. The last good configuration stays in force.
    #[error("reload refused, the last good configuration stays: {0}")]
    Reload(ReloadError),
    /// Shared limits are misconfigured (the Redis URL or the fleet name);
    /// the message never carries a password.
    #[error("{0}")]
    SharedLimits(String),
    /// The local admin socket could not be set up (nothing was created).
    #[cfg(unix)]
    #[error(transparent)]
    AdminSocket(AdminSocketError),
}

/// What is wrong with a registration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistrationProblem {
    /// Not an identifier of 1 to 128 letters, digits and `_`.
    #[error("not a valid name (1 to 128 letters, digits and _, not starting with a digit)")]
    InvalidName,
    /// The name is already taken.
    #[error("registered twice")]
    Duplicate,
    /// Limits name a function that was not registered.
    #[error("limits for a function that is not registered")]
    LimitsWithoutFunction,
    /// A rate limit with a zero field.
    #[error("rate limits must be greater than zero")]
    ZeroRate,
    /// The constant's value cannot be represented as a `Value`.
    #[error("the value cannot be encoded: {0}")]
    Value(String),
}

/// Why a reload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The server was built without a reload source.
    #[error("no reload source is configured")]
    NoSource,
    /// The reload source failed (its message: which file, what was wrong).
    #[error("{0}")]
    Source(String),
}

/// Why the admin socket could not be set up.
#[cfg(unix)]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminSocketError {
    /// The path has no parent directory, or the directory is missing.
    #[error("admin_socket {path}: the directory does not exist")]
    NoDirectory {
        /// The socket's path.
        path: PathBuf,
    },
    /// Group or others can write the directory: they could replace the socket.
    #[error(
        "admin_socket {path}: group or others can write its directory (mode {mode:o}); use a directory only the server's user can write (e.g. chmod 700 {dir})"
    )]
    UnsafeDirectory {
        /// The socket's path.
        path: PathBuf,
        /// The directory.
        dir: PathBuf,
        /// The directory's permission bits.
        mode: u32,
    },
    /// Something other than a socket of the server's user is at the path.
    #[error(
        "admin_socket {path}: exists and is not a socket owned by this user; remove it or choose another path"
    )]
    Occupied {
        /// The socket's path.
        path: PathBuf,
    },
    /// Creating or binding the socket failed.
    #[error("admin_socket {path}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}
