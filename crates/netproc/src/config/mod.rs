//! TOML configuration for servers, clients and the propagation authority.
//!
//! Paths in a file are relative to the file's directory. Unknown fields are
//! errors; an error names the file, the line and the field. One module per
//! file format (`server`, `client`, `authority`); `assemble` turns a server
//! file into a running server's builder; `json` bridges JSON and netproc
//! values for command lines.

use std::fmt;
use std::path::{Path, PathBuf};

mod amqp;
mod assemble;
mod authority;
mod ca;
mod client;
pub mod json;
mod server;

pub use amqp::AmqpSettings;
pub use assemble::Assembled;
pub use authority::{AmqpTarget, AuthorityFile};
pub use ca::CaFile;
pub use client::{ClientFile, ClientServer, format_ed25519_credential};
pub use server::{
    LogFormat, PropagationConfig, ScriptsConfig, ServerFile, ServerTls, SharedLimitsConfig,
};

/// A configuration file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid: the message names the line and the field.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, where.
        message: String,
    },
    /// A service the file names (the authority's PostgreSQL) cannot be
    /// reached now: not a mistake in the file; retrying later is safe.
    #[error("{path}: {message}")]
    Unavailable {
        /// The file.
        path: PathBuf,
        /// What could not be reached, and why.
        message: String,
    },
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |e: toml::de::Error, field: Option<String>| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let mut message = String::new();
        if let Some(line) = line {
            message.push_str(&format!("line {line}: "));
        }
        // The field path (`auth_controls.block_duration_ms`); when the
        // message names the field itself (an unknown field), its table.
        if let Some(field) = field.filter(|f| !f.is_empty() && f != ".") {
            let (parent, last) = field.rsplit_once('.').unwrap_or(("", &field));
            let shown = if e.message().contains(&format!("`{last}`")) {
                parent
            } else {
                &field
            };
            if !shown.is_empty() {
                message.push_str(&format!("{shown}: "));
            }
        }
        message.push_str(e.message().trim_end());
        ConfigError::Invalid {
            path: path.to_owned(),
            message,
        }
    };
    let de = toml::Deserializer::parse(&text).map_err(|e| invalid(e, None))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        invalid(e.into_inner(), Some(field))
    })
}
/// `p` as written in a file in `dir`: absolute as is, else relative to `dir`.
fn relative_to(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        dir.join(p)
    }
}

fn invalid(path: &Path, message: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// 64 hex digits (surrounding whitespace ignored) → 32 bytes.
fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out)
        .ok()
        .map(|()| out)
}

/// Appends `bytes` as lowercase hex, with no intermediate strings (the
/// bytes may be a secret seed).
fn push_hex(out: &mut String, bytes: &[u8; 32]) {
    let mut digits = zeroize::Zeroizing::new([0u8; 64]);
    // 64 digits for 32 bytes: the lengths match, so encoding cannot fail.
    if hex::encode_to_slice(bytes, &mut digits[..]).is_ok() {
        out.extend(digits.iter().map(|&d| char::from(d)));
    }
}

/// Reads a reply key (or any Ed25519 key file): 64 hex digits of seed,
/// mode 0600.
pub fn read_reply_key(path: &Path) -> Result<crate::pki::Ed25519Key, String> {
    read_ed25519_seed(path)
}

/// Reads an Ed25519 key from a file of 64 hex digits of seed (mode 0600).
pub(crate) fn read_ed25519_seed(path: &Path) -> Result<crate::pki::Ed25519Key, String> {
    let bytes = crate::pki::read_secret_file(path).map_err(|e| e.to_string())?;
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    let text = std::str::from_utf8(&bytes).unwrap_or("");
    if hex::decode_to_slice(text.trim(), &mut *seed).is_err() {
        return Err(format!("{}: expected 64 hex digits", path.display()));
    }
    crate::pki::Ed25519Key::from_seed(&seed).map_err(|e| e.to_string())
}

/// A password from an environment variable or a file (mode 0600, read
/// relative to `dir`, trimmed), never both; `None` when neither is set.
/// `fields` names the two settings; an error says which one failed (and
/// never holds the secret).
pub(crate) fn password_from(
    dir: &Path,
    env: Option<&String>,
    file: Option<&PathBuf>,
    fields: (&'static str, &'static str),
) -> Result<Option<String>, (&'static str, String)> {
    let (env_field, file_field) = fields;
    match (env, file) {
        (Some(_), Some(_)) => Err((
            env_field,
            format!("give {env_field} or {file_field}, not both"),
        )),
        (Some(var), None) => std::env::var(var)
            .map(Some)
            .map_err(|e| (env_field, format!("{var}: {e}"))),
        (None, Some(path)) => {
            let bytes = crate::pki::read_secret_file(&relative_to(dir, path))
                .map_err(|e| (file_field, e.to_string()))?;
            Ok(Some(String::from_utf8_lossy(&bytes).trim().to_owned()))
        }
        (None, None) => Ok(None),
    }
}

/// Percent-encodes a URL user or password (everything but unreserved
/// characters).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
