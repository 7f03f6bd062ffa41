//! The broker settings shared by the authority's `[amqp]` and a server's
//! `[propagation.amqp]`: where RabbitMQ is, and the credentials to reach
//! it (from the environment or a file, never inline, never logged).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// How to reach the broker.
///
/// ```toml
/// url = "amqps://broker.example:5671/%2f"   # no credentials here
/// username = "netproc-authority"
/// password_env = "NETPROC_AMQP_PASSWORD"    # or password_file (0600)
/// ca = "pki/broker-ca.crt"                  # amqps:// only
/// prefix = "netproc"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AmqpSettings {
    /// `amqp://host:5672/vhost` or `amqps://host:5671/vhost` (the vhost
    /// percent-encoded: `%2f` is `/`), without user or password.
    pub url: String,
    /// The broker user.
    pub username: Option<String>,
    /// An environment variable holding the broker password.
    pub password_env: Option<String>,
    /// A file holding the broker password (mode 0600).
    pub password_file: Option<PathBuf>,
    /// The CA that signs the broker's certificate (PEM), for `amqps://`.
    pub ca: Option<PathBuf>,
    /// The queue and exchange names' prefix (default `netproc`); the same
    /// on the authority and its targets.
    pub prefix: Option<String>,
    /// Authority: how long a request may wait unread in a target's queue,
    /// ms (default 240 000, below the targets' freshness window).
    pub message_ttl_ms: Option<u64>,
    /// Authority: the target queues' length limit (default 64).
    pub max_length: Option<u32>,
}

impl AmqpSettings {
    /// The transport's configuration; errors name the field (never the
    /// password).
    pub(crate) fn config(&self, dir: &Path) -> Result<crate::propagation::AmqpConfig, String> {
        let (scheme, rest) = self
            .url
            .split_once("://")
            .filter(|(s, _)| *s == "amqp" || *s == "amqps")
            .ok_or("amqp.url: expected amqp://host:port/vhost or amqps://…")?;
        if rest.split('/').next().unwrap_or("").contains('@') {
            return Err(
                "amqp.url: no credentials in the URL; give username and password_env or password_file"
                    .into(),
            );
        }
        let password = super::password_from(
            dir,
            self.password_env.as_ref(),
            self.password_file.as_ref(),
            ("password_env", "password_file"),
        )
        .map_err(|(field, e)| format!("amqp.{field}: {e}"))?;
        let url = match (&self.username, password) {
            (Some(user), Some(pw)) => {
                format!(
                    "{scheme}://{}:{}@{rest}",
                    super::percent_encode(user),
                    super::percent_encode(&pw)
                )
            }
            (Some(user), None) => format!("{scheme}://{}@{rest}", super::percent_encode(user)),
            (None, Some(_)) => return Err("amqp.username: needed with a password".into()),
            (None, None) => self.url.clone(),
        };
        let mut c = crate::propagation::AmqpConfig::new(url);
        if let Some(p) = &self.prefix {
            c.prefix = p.clone();
        }
        c.target_queue("x")
            .map_err(|e| format!("amqp.prefix: {e}"))?;
        if let Some(ca) = &self.ca {
            let path = super::relative_to(dir, ca);
            c.ca_pem = Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("amqp.ca: {}: {e}", path.display()))?,
            );
        } else if scheme == "amqps" {
            return Err("amqp.ca: needed with amqps:// (the broker's CA, PEM)".into());
        }
        if let Some(ms) = self.message_ttl_ms {
            c.message_ttl = Duration::from_millis(ms.max(1));
        }
        if let Some(n) = self.max_length {
            c.max_length = n.max(1);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> AmqpSettings {
        AmqpSettings {
            url: url.into(),
            username: None,
            password_env: None,
            password_file: None,
            ca: None,
            prefix: None,
            message_ttl_ms: None,
            max_length: None,
        }
    }

    #[test]
    fn credentials_come_from_the_environment_and_never_show() {
        let mut s = settings("amqp://127.0.0.1:5672/%2f");
        s.username = Some("svc".into());
        s.password_env = Some("NETPROC_TEST_AMQP_PW_UNIT".into());
        assert!(
            s.config(Path::new("."))
                .unwrap_err()
                .contains("NETPROC_TEST_AMQP_PW_UNIT")
        );
        let mut inline = settings("amqp://svc:pw@127.0.0.1:5672/%2f");
        inline.prefix = Some("p".into());
        assert!(
            inline
                .config(Path::new("."))
                .unwrap_err()
                .contains("no credentials")
        );
        let plain = settings("amqp://127.0.0.1:5672/%2f")
            .config(Path::new("."))
            .unwrap();
        assert_eq!(plain.prefix, "netproc");
        assert!(settings("http://x").config(Path::new(".")).is_err());
        assert!(
            settings("amqps://x:5671/%2f")
                .config(Path::new("."))
                .unwrap_err()
                .contains("amqp.ca")
        );
        let mut bad = settings("amqp://x/%2f");
        bad.prefix = Some("amq.x".into());
        assert!(
            bad.config(Path::new("."))
                .unwrap_err()
                .contains("amqp.prefix")
        );
        assert_eq!(super::super::percent_encode("p@ss:/w"), "p%40ss%3A%2Fw");
    }
}
