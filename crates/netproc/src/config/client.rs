//! The client file (`--config client.toml`) and the Ed25519 credential
//! text its key files may hold.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid, push_hex, read, relative_to};
use crate::client::{Client, ServerEndpoint};
use crate::pki::{Ed25519Key, Identity, TrustAnchors};
use crate::wire::SecretString;

/// One `[servers.<name>]` entry of a client file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientServer {
    /// The server's address: `ip:port`, `[ipv6]:port` or `host:port` (a
    /// host name is resolved at each connect and reconnect).
    #[serde(deserialize_with = "server_addr")]
    pub address: crate::client::ServerAddr,
    /// The name its certificate must be valid for.
    pub server_name: String,
    /// This client's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
    /// The CA that signs the server's certificate.
    pub ca: PathBuf,
    /// A file holding the API key (mode 0600).
    pub api_key_file: Option<PathBuf>,
    /// An environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// The API key inline (allowed, but warned about).
    pub api_key: Option<String>,
    /// Local address to connect from.
    pub bind: Option<IpAddr>,
    /// Default call deadline, ms. Default 30 000.
    pub request_timeout_ms: Option<u64>,
}

/// A client configuration file.
///
/// ```toml
/// [servers.server_1]
/// address = "127.0.0.1:6767"
/// server_name = "localhost"
/// cert = "pki/client.crt"
/// key = "pki/client.key"
/// ca = "pki/ca.crt"
/// api_key_file = "client.key.txt"   # or api_key_env = "NETPROC_API_KEY"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientFile {
    /// The servers, by name (`all_servers` is reserved).
    pub servers: BTreeMap<String, ClientServer>,
    #[serde(skip)]
    pub(super) dir: PathBuf,
}

impl ClientFile {
    /// Reads a client file.
    pub fn load(path: impl AsRef<Path>) -> Result<ClientFile, ConfigError> {
        let path = path.as_ref();
        let mut file: ClientFile = read(path)?;
        file.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(file)
    }
    /// A path from the file, as the client reads it: relative paths are
    /// from the file's directory.
    pub fn path_of(&self, p: &Path) -> PathBuf {
        relative_to(&self.dir, p)
    }

    /// Builds the client: loads identities and CAs, reads the API keys (or
    /// Ed25519 keys).
    pub fn client(&self, config_path: &Path) -> Result<Client, ConfigError> {
        self.client_in(config_path, "servers")
    }

    /// [`client`](Self::client), naming fields under `section` in errors.
    pub(super) fn client_in(
        &self,
        config_path: &Path,
        section: &str,
    ) -> Result<Client, ConfigError> {
        let mut builder = Client::builder();
        for (name, s) in &self.servers {
            let field = |f: &str| format!("{section}.{name}.{f}");
            let err =
                |f: &str, e: &dyn fmt::Display| invalid(config_path, format!("{}: {e}", field(f)));
            let key = match (&s.api_key_file, &s.api_key_env, &s.api_key) {
                (Some(file), None, None) => {
                    let bytes = crate::pki::read_secret_file(&self.path_of(file))
                        .map_err(|e| err("api_key_file", &e))?;
                    String::from_utf8_lossy(&bytes).trim().to_owned()
                }
                (None, Some(var), None) => {
                    std::env::var(var).map_err(|e| err("api_key_env", &format!("{var}: {e}")))?
                }
                (None, None, Some(inline)) => {
                    tracing::warn!(server = %name, "an inline api_key is readable by anyone who can read the config; prefer api_key_file or api_key_env");
                    inline.clone()
                }
                _ => {
                    return Err(invalid(
                        config_path,
                        format!(
                            "{}: give exactly one of api_key_file, api_key_env, api_key",
                            field("api_key")
                        ),
                    ));
                }
            };
            // The error names the file; the field names both halves (a key
            // that does not match is a problem of the pair).
            let identity =
                Identity::load(self.path_of(&s.cert), self.path_of(&s.key)).map_err(|e| {
                    invalid(
                        config_path,
                        format!("{} / {}: {e}", field("cert"), field("key")),
                    )
                })?;
            let roots = TrustAnchors::load(self.path_of(&s.ca)).map_err(|e| err("ca", &e))?;
            // `npe_<id>_<seed hex>` (from `keys create --ed25519`) is an
            // Ed25519 key; anything else is an API key.
            let mut ep = match parse_ed25519_credential(&key) {
                Some(Ok((id, signing))) => ServerEndpoint::with_ed25519(
                    s.address.clone(),
                    s.server_name.clone(),
                    identity,
                    roots,
                    id,
                    Arc::new(signing),
                ),
                Some(Err(e)) => return Err(err("api_key", &e)),
                None => ServerEndpoint::new(
                    s.address.clone(),
                    s.server_name.clone(),
                    identity,
                    roots,
                    SecretString::new(key),
                ),
            };
            if let Some(ip) = s.bind {
                ep = ep.bind(ip);
            }
            if let Some(ms) = s.request_timeout_ms {
                ep = ep.request_timeout(Duration::from_millis(ms));
            }
            builder = builder.server(name.clone(), ep);
        }
        builder.build().map_err(|e| invalid(config_path, e))
    }
}

/// `address`: parsed with [`ServerAddr`](crate::client::ServerAddr)'s rules,
/// the error naming what was expected.
fn server_addr<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<crate::client::ServerAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// Parses an `npe_<key id>_<64 hex digits of seed>` credential; `None` when
/// the text is not one (an API key).
fn parse_ed25519_credential(text: &str) -> Option<Result<(String, Ed25519Key), String>> {
    let rest = text.strip_prefix("npe_")?;
    let parsed = (|| {
        let (id, hex) = rest.split_once('_').ok_or("expected npe_<id>_<seed>")?;
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        if hex::decode_to_slice(hex, &mut *seed).is_err() {
            return Err("the Ed25519 seed must be 64 hex digits");
        }
        let key = Ed25519Key::from_seed(&seed).map_err(|_| "invalid Ed25519 seed")?;
        Ok((id.to_owned(), key))
    })();
    Some(parsed.map_err(str::to_owned))
}

/// Formats an Ed25519 credential for a key file: `npe_<key id>_<seed as 64
/// hex digits>`. A client config's `api_key_file` accepts it in place of an
/// API key. The result is secret; it is zeroized on drop.
pub fn format_ed25519_credential(id: &str, key: &Ed25519Key) -> zeroize::Zeroizing<String> {
    let mut out = zeroize::Zeroizing::new(format!("npe_{id}_"));
    out.reserve(64); // no reallocation, so no stray copy of the seed
    push_hex(&mut out, key.seed());
    out
}

#[cfg(test)]
mod ed25519_tests {
    use super::*;

    #[test]
    fn ed25519_credentials_round_trip_and_api_keys_are_not_taken_for_them() {
        let key = Ed25519Key::generate().unwrap();
        let text = format_ed25519_credential("abc123", &key);
        let (id, back) = parse_ed25519_credential(&text).unwrap().unwrap();
        assert_eq!(id, "abc123");
        assert_eq!(back.public_key(), key.public_key());
        assert!(parse_ed25519_credential("npk_abc_secret").is_none());
        assert!(parse_ed25519_credential("npe_abc_zz").unwrap().is_err());
        assert!(
            parse_ed25519_credential("npe_nounderscore")
                .unwrap()
                .is_err()
        );
    }
}
