//! The connection parameters of the core's connections: libpq's keywords, with libpq's
//! values, as libpq itself resolved them.
//!
//! The Python layer resolves a DSN, a connector's settings, the `PG*` variables and the
//! service file through libpq (the one parser of record) and hands the core these
//! keywords; no connection string is parsed twice. The passfile is read by the core, per
//! host, as libpq reads it (see [`crate::passfile`]). Every keyword here is honoured with
//! libpq's meaning, or its value is refused with a [`CoreError::Config`] that names it; a
//! keyword the core does not know is refused (`deny_unknown_fields`).
//!
//! For the Rust API and its tests, [`ConnectionParams::from_key_values`] reads libpq's
//! `key=value` form with libpq's rules (URLs are refused: resolve them through libpq).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::errors::{CoreError, CoreResult};
use crate::passfile::Passfile;

/// libpq keywords, each a string as libpq gives it (`PQconninfo`); `None`: not set.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionParams {
    pub host: Option<String>,
    pub hostaddr: Option<String>,
    pub port: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub dbname: Option<String>,
    pub options: Option<String>,
    pub application_name: Option<String>,
    pub fallback_application_name: Option<String>,
    pub client_encoding: Option<String>,
    pub connect_timeout: Option<String>,
    pub keepalives: Option<String>,
    pub keepalives_idle: Option<String>,
    pub keepalives_interval: Option<String>,
    pub keepalives_count: Option<String>,
    pub tcp_user_timeout: Option<String>,
    pub target_session_attrs: Option<String>,
    pub load_balance_hosts: Option<String>,
    pub channel_binding: Option<String>,
    pub gssencmode: Option<String>,
    pub krbsrvname: Option<String>,
    pub sslmode: Option<String>,
    pub sslcompression: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
    pub sslcertmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcrl: Option<String>,
    pub sslcrldir: Option<String>,
    pub sslsni: Option<String>,
    pub ssl_min_protocol_version: Option<String>,
    pub ssl_max_protocol_version: Option<String>,
    /// libpq's password file: each host's own entry when no `password` is given (see
    /// [`crate::passfile`]).
    pub passfile: Option<String>,
    /// Not a libpq keyword: the default socket directory of the libpq that resolved these
    /// parameters (a build setting of libpq's), which its passfile lookup calls
    /// `localhost`. The Python layer sets it; `None`: no socket directory is.
    pub default_socket_directory: Option<String>,
}

/// The keywords above, for the Python layer: a libpq keyword outside this list that has a
/// value other than libpq's default is refused there, by name.
pub const CONNECTION_KEYWORDS: [&str; 33] = [
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "fallback_application_name",
    "client_encoding",
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "target_session_attrs",
    "load_balance_hosts",
    "channel_binding",
    "gssencmode",
    "krbsrvname",
    "sslmode",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "passfile",
];

impl std::fmt::Debug for ConnectionParams {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionParams")
            .field("host", &self.host)
            .field("hostaddr", &self.hostaddr)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("passfile", &self.passfile)
            .finish_non_exhaustive()
    }
}

/// Where one connection attempt goes (libpq tries a host list in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `host` (the name TLS checks, and for libpq the passfile's) and the address to
    /// connect to: `hostaddr` if given, else the name resolved.
    Tcp {
        host: Option<String>,
        hostaddr: Option<IpAddr>,
        port: u16,
    },
    /// A Unix-domain socket directory (libpq never uses TLS on these).
    Unix { directory: PathBuf, port: u16 },
}

impl ConnectionParams {
    /// libpq's `key=value` form, with libpq's rules: values bare or single-quoted, `\`
    /// escapes the next character, a repeated keyword replaces the earlier value. URLs are
    /// refused (their syntax is libpq's to parse: resolve them on the Python side).
    pub fn from_key_values(conninfo: &str) -> CoreResult<Self> {
        let trimmed = conninfo.trim_start();
        if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
            return Err(CoreError::Config(
                "the core takes libpq's key=value form; a URL is resolved by libpq \
                 (fastworker's Python layer) into parameters first"
                    .into(),
            ));
        }
        let mut map = serde_json::Map::new();
        for (key, value) in parse_key_values(conninfo)? {
            map.insert(key, serde_json::Value::String(value));
        }
        serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|error| CoreError::Config(format!("connection parameters: {error}")))
    }

    /// The attempts, in libpq's order (before `load_balance_hosts` shuffles them).
    pub fn endpoints(&self) -> CoreResult<Vec<Endpoint>> {
        let hosts = list(self.host.as_deref());
        let addresses = list(self.hostaddr.as_deref());
        let count = hosts.len().max(addresses.len()).max(1);
        if !hosts.is_empty() && !addresses.is_empty() && hosts.len() != addresses.len() {
            return Err(CoreError::Config(format!(
                "could not match {} host names to {} hostaddr values",
                hosts.len(),
                addresses.len()
            )));
        }
        let ports = list(self.port.as_deref());
        if ports.len() > 1 && ports.len() != count {
            return Err(CoreError::Config(format!(
                "could not match {} port numbers to {count} hosts",
                ports.len()
            )));
        }
        (0..count)
            .map(|index| {
                let port_text = match ports.len() {
                    0 => "",
                    1 => ports[0],
                    _ => ports[index],
                };
                let port = if port_text.is_empty() {
                    5432
                } else {
                    match port_text.parse::<u16>() {
                        Ok(port) if port > 0 => port,
                        _ => return Err(invalid("port", port_text)),
                    }
                };
                let host = hosts.get(index).copied().filter(|h| !h.is_empty());
                let hostaddr = match addresses.get(index).copied().filter(|a| !a.is_empty()) {
                    None => None,
                    Some(text) => Some(
                        text.parse::<IpAddr>()
                            .map_err(|_| invalid("hostaddr", text))?,
                    ),
                };
                match (host, hostaddr) {
                    (Some(host), None) if host.starts_with('/') => Ok(Endpoint::Unix {
                        directory: PathBuf::from(host),
                        port,
                    }),
                    (Some(host), None) if host.starts_with('@') => Err(CoreError::Config(
                        "host: abstract Unix sockets (@...) are not supported by the core".into(),
                    )),
                    (None, None) => Err(CoreError::Config(
                        "no host: the Python layer hands over libpq's default socket directory"
                            .into(),
                    )),
                    (host, hostaddr) => Ok(Endpoint::Tcp {
                        host: host.map(str::to_string),
                        hostaddr,
                        port,
                    }),
                }
            })
            .collect()
    }

    /// Where each host's password comes from when none is given: libpq's passfile, one
    /// lookup key per host of [`Self::endpoints`]' list (`None`: a password is given, or no
    /// passfile). libpq never sends one host's entry to another.
    pub fn passfile_lookup(&self) -> Option<Passfile> {
        if self.password.as_deref().is_some_and(|p| !p.is_empty()) {
            return None;
        }
        let path = self.passfile.as_deref().filter(|p| !p.is_empty())?;
        let hosts = list(self.host.as_deref());
        let addresses = list(self.hostaddr.as_deref());
        let ports = list(self.port.as_deref());
        let count = hosts.len().max(addresses.len()).max(1);
        let keys: Vec<(&str, &str, &str)> = (0..count)
            .map(|index| {
                let port = match ports.len() {
                    0 => "",
                    1 => ports[0],
                    _ => ports.get(index).copied().unwrap_or(""),
                };
                (
                    hosts.get(index).copied().unwrap_or(""),
                    addresses.get(index).copied().unwrap_or(""),
                    port,
                )
            })
            .collect();
        // libpq's defaults when the parameters were not resolved by libpq (the Rust API):
        // the database is named after the user.
        let user = self.user.as_deref().unwrap_or("");
        let dbname = self
            .dbname
            .as_deref()
            .filter(|d| !d.is_empty())
            .unwrap_or(user);
        Some(Passfile::new(
            PathBuf::from(path),
            dbname,
            user,
            &keys,
            self.default_socket_directory.as_deref(),
        ))
    }

    /// libpq's `connect_timeout`: whole seconds; 0 or less waits forever, 1 means 2.
    pub fn connect_timeout(&self) -> CoreResult<Option<Duration>> {
        match integer(self.connect_timeout.as_deref(), "connect_timeout")? {
            None => Ok(None),
            Some(seconds) if seconds <= 0 => Ok(None),
            Some(seconds) => Ok(Some(Duration::from_secs(seconds.max(2) as u64))),
        }
    }

    pub fn keepalives(&self) -> CoreResult<bool> {
        Ok(integer(self.keepalives.as_deref(), "keepalives")?.is_none_or(|on| on != 0))
    }

    pub fn seconds(value: Option<&str>, keyword: &str) -> CoreResult<Option<Duration>> {
        match integer(value, keyword)? {
            None => Ok(None),
            Some(seconds) if seconds < 0 => Err(invalid(keyword, &seconds.to_string())),
            Some(seconds) => Ok(Some(Duration::from_secs(seconds as u64))),
        }
    }

    pub fn keepalives_count(&self) -> CoreResult<Option<u32>> {
        match integer(self.keepalives_count.as_deref(), "keepalives_count")? {
            None => Ok(None),
            Some(count) => u32::try_from(count)
                .map(Some)
                .map_err(|_| invalid("keepalives_count", &count.to_string())),
        }
    }

    /// libpq's `tcp_user_timeout` is in milliseconds (0: the system's default).
    pub fn tcp_user_timeout(&self) -> CoreResult<Option<Duration>> {
        match integer(self.tcp_user_timeout.as_deref(), "tcp_user_timeout")? {
            None | Some(0) => Ok(None),
            Some(ms) if ms < 0 => Err(invalid("tcp_user_timeout", &ms.to_string())),
            Some(ms) => Ok(Some(Duration::from_millis(ms as u64))),
        }
    }

    /// The checks of the values that no connection attempt would make: a value libpq
    /// accepts but the core cannot honour is refused here, by keyword.
    pub fn check_supported(&self) -> CoreResult<()> {
        if let Some(encoding) = self.client_encoding.as_deref() {
            let normal = encoding.to_ascii_uppercase().replace(['-', '_'], "");
            if normal != "UTF8" {
                return Err(unsupported(
                    "client_encoding",
                    encoding,
                    "the core's connections speak UTF8 only",
                ));
            }
        }
        if let Some(mode) = self.gssencmode.as_deref() {
            match mode {
                // GSSAPI encryption is never available to the core: `prefer` falls back.
                "disable" | "prefer" => {}
                "require" => {
                    return Err(unsupported(
                        "gssencmode",
                        mode,
                        "the core has no GSSAPI; use TLS (sslmode)",
                    ))
                }
                other => return Err(invalid("gssencmode", other)),
            }
        }
        if let Some(name) = self.krbsrvname.as_deref() {
            if name != "postgres" {
                return Err(unsupported(
                    "krbsrvname",
                    name,
                    "the core has no Kerberos/GSSAPI authentication",
                ));
            }
        }
        if let Some(mode) = self.sslcertmode.as_deref() {
            match mode {
                "allow" | "disable" => {}
                "require" => {
                    return Err(unsupported(
                        "sslcertmode",
                        mode,
                        "the core cannot tell whether the server asked for the certificate",
                    ))
                }
                other => return Err(invalid("sslcertmode", other)),
            }
        }
        if let Some(value) = self.sslcompression.as_deref() {
            // Ignored by libpq's TLS libraries of today, and by the server since 14.
            if value != "0" && value != "1" {
                return Err(invalid("sslcompression", value));
            }
        }
        Ok(())
    }

    /// `application_name`, else `fallback_application_name`, else `None`.
    pub fn application_name(&self) -> Option<&str> {
        self.application_name
            .as_deref()
            .filter(|name| !name.is_empty())
            .or(self.fallback_application_name.as_deref())
            .filter(|name| !name.is_empty())
    }
}

fn list(value: Option<&str>) -> Vec<&str> {
    match value {
        None | Some("") => Vec::new(),
        Some(value) => value.split(',').map(str::trim).collect(),
    }
}

fn integer(value: Option<&str>, keyword: &str) -> CoreResult<Option<i64>> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse::<i64>()
            .map(Some)
            .map_err(|_| invalid(keyword, text)),
    }
}

pub(crate) fn invalid(keyword: &str, value: &str) -> CoreError {
    CoreError::Config(format!("invalid {keyword} value: {value:?}"))
}

pub(crate) fn unsupported(keyword: &str, value: &str, why: &str) -> CoreError {
    CoreError::Config(format!(
        "{keyword}={value} is not supported by fastworker's core connections: {why}"
    ))
}

/// libpq's `key = value` syntax: values bare or single-quoted, `\` escapes the next char.
fn parse_key_values(conninfo: &str) -> CoreResult<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(CoreError::Config(format!(
                "invalid connection string: missing \"=\" after {key:?}"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(CoreError::Config(format!(
                            "invalid connection string: unterminated quoted value of {key:?}"
                        )))
                    }
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(conninfo: &str) -> ConnectionParams {
        ConnectionParams::from_key_values(conninfo).unwrap_or_else(|error| panic!("{error}"))
    }

    #[test]
    fn key_values_follow_libpq_quoting_and_a_repeated_key_replaces() {
        let params = parse("host=a host = b port=5433 password='it\\'s q' sslrootcert='/a b/c'");
        assert_eq!(params.host.as_deref(), Some("b"));
        assert_eq!(params.password.as_deref(), Some("it's q"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/a b/c"));
        assert_eq!(
            params.endpoints().unwrap_or_default(),
            vec![Endpoint::Tcp {
                host: Some("b".into()),
                hostaddr: None,
                port: 5433
            }]
        );
    }

    #[test]
    fn urls_unknown_keywords_and_bad_syntax_are_refused() {
        for conninfo in [
            "postgresql://u:p?sslmode=require@h/d",
            "host=x require_auth=scram-sha-256",
            "host=x bogus=1",
            "host='x",
            "host",
        ] {
            assert!(
                matches!(
                    ConnectionParams::from_key_values(conninfo),
                    Err(CoreError::Config(_))
                ),
                "{conninfo}"
            );
        }
    }

    #[test]
    fn the_password_is_never_in_debug_output() {
        let params = parse("host=h password=s3cret");
        assert!(!format!("{params:?}").contains("s3cret"));
    }

    #[test]
    fn host_lists_ports_and_addresses_pair_up_like_libpq() {
        let params = parse("host=/run/pg,db.example,h3 port=1,2,3 hostaddr=,10.0.0.2,");
        assert_eq!(
            params.endpoints().unwrap_or_default(),
            vec![
                Endpoint::Unix {
                    directory: "/run/pg".into(),
                    port: 1
                },
                Endpoint::Tcp {
                    host: Some("db.example".into()),
                    hostaddr: Some("10.0.0.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
                    port: 2
                },
                Endpoint::Tcp {
                    host: Some("h3".into()),
                    hostaddr: None,
                    port: 3
                },
            ]
        );
        assert_eq!(
            parse("hostaddr=127.0.0.1").endpoints().unwrap_or_default(),
            vec![Endpoint::Tcp {
                host: None,
                hostaddr: Some(IpAddr::from([127, 0, 0, 1])),
                port: 5432
            }]
        );
        for bad in [
            "host=a,b port=1,2,3",
            "host=a hostaddr=1.2.3.4,5.6.7.8",
            "host=a port=x",
            "hostaddr=not-an-ip",
            "host=@abstract",
        ] {
            assert!(parse(bad).endpoints().is_err(), "{bad}");
        }
    }

    #[test]
    fn values_the_core_cannot_honour_are_refused_by_name() {
        for (conninfo, keyword) in [
            ("client_encoding=LATIN1", "client_encoding"),
            ("gssencmode=require", "gssencmode"),
            ("krbsrvname=other", "krbsrvname"),
            ("sslcertmode=require", "sslcertmode"),
        ] {
            let error = parse(conninfo)
                .check_supported()
                .err()
                .map(|e| e.to_string());
            assert!(
                error.as_deref().is_some_and(|e| e.contains(keyword)),
                "{conninfo}: {error:?}"
            );
        }
        assert!(
            parse("client_encoding=utf-8 gssencmode=prefer krbsrvname=postgres")
                .check_supported()
                .is_ok()
        );
    }

    #[test]
    fn the_passfile_is_looked_up_per_host_and_only_without_a_password() {
        let params = parse(
            "host=a,/sock,,b hostaddr=,,10.0.0.1, port=1,2,3,4 user=u passfile=/f \
             default_socket_directory=/sock",
        );
        let expected = Passfile::new(
            PathBuf::from("/f"),
            "u",
            "u",
            &[
                ("a", "", "1"),
                ("/sock", "", "2"),
                ("", "10.0.0.1", "3"),
                ("b", "", "4"),
            ],
            Some("/sock"),
        );
        assert_eq!(params.passfile_lookup(), Some(expected));
        assert_eq!(
            parse("host=a password=given passfile=/f").passfile_lookup(),
            None
        );
        assert_eq!(parse("host=a").passfile_lookup(), None);
    }

    #[test]
    fn timeouts_have_libpq_units() {
        let params = parse("connect_timeout=1 tcp_user_timeout=1500");
        assert_eq!(
            params.connect_timeout().ok().flatten(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            params.tcp_user_timeout().ok().flatten(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse("connect_timeout=0").connect_timeout().ok(),
            Some(None)
        );
    }
}
