//! libpq's password file (`passfile`, `PGPASSFILE`, `~/.pgpass`): the password each host of
//! a host list gets when no password is given.
//!
//! libpq looks up every host's own line (`host:port:dbname:user:password`) and reads the
//! file again at each connection; so does the core. Sending one host's entry to the others
//! would hand a secret to a server that was never meant to have it. libpq's rules, from
//! `passwordFromFile` in its `fe-connect.c`:
//! - the host field matches the `host` keyword, else `hostaddr`; `localhost` stands for no
//!   host and for a Unix socket in libpq's default socket directory (another socket
//!   directory matches as written); the port is the port as written, `5432` if none;
//! - a field `*` matches anything; `\` escapes the next character (`\:`, `\\`);
//! - lines starting with `#` are comments; the first matching line wins;
//! - a file that is not a plain file, or that its group or others may access, is ignored
//!   (libpq warns on its standard error when the Python layer resolves the parameters).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// libpq's name for "no host" and for its default socket directory in the passfile.
const DEFAULT_HOST: &str = "localhost";
const DEFAULT_PORT: &str = "5432";

/// The passfile lookup of a connection target: one key per host of the list, in the
/// list's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Passfile {
    path: PathBuf,
    dbname: String,
    user: String,
    /// `(host, port)` as libpq matches them, one per attempt.
    keys: Vec<(String, String)>,
}

impl Passfile {
    /// `hosts`: each attempt's `host` text (empty: none), `hostaddr` text and port text.
    /// `default_socket_directory`: the directory libpq calls `localhost`.
    pub fn new(
        path: PathBuf,
        dbname: &str,
        user: &str,
        hosts: &[(&str, &str, &str)],
        default_socket_directory: Option<&str>,
    ) -> Self {
        let keys = hosts
            .iter()
            .map(|(host, hostaddr, port)| {
                let name = if host.is_empty() { *hostaddr } else { *host };
                let name = if name.is_empty()
                    || (is_socket_path(name) && Some(name) == default_socket_directory)
                {
                    DEFAULT_HOST
                } else {
                    name
                };
                let port = if port.is_empty() { DEFAULT_PORT } else { port };
                (name.to_string(), port.to_string())
            })
            .collect();
        Passfile {
            path,
            dbname: dbname.to_string(),
            user: user.to_string(),
            keys,
        }
    }

    /// The password of the `index`th attempt's host, read from the file now (libpq reads it
    /// at each connection); `None` when no line matches or the file is ignored.
    pub fn password_for(&self, index: usize) -> Option<String> {
        let (host, port) = self.keys.get(index)?;
        lookup(&self.path, host, port, &self.dbname, &self.user)
    }
}

fn is_socket_path(host: &str) -> bool {
    host.starts_with('/') || host.starts_with('@')
}

/// The first matching line's password, as libpq reads it.
pub fn lookup(path: &Path, host: &str, port: &str, dbname: &str, user: &str) -> Option<String> {
    if dbname.is_empty() || user.is_empty() {
        return None;
    }
    let mut file = std::fs::File::open(path).ok()?;
    let metadata = file.metadata().ok()?;
    // libpq ignores anything but a plain file that only its owner may access.
    if !metadata.is_file() || metadata.permissions().mode() & 0o077 != 0 {
        return None;
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    text.split('\n')
        .map(|line| line.trim_end_matches(['\r', '\n']))
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .find_map(|line| {
            let rest = field_matches(line, host)?;
            let rest = field_matches(rest, port)?;
            let rest = field_matches(rest, dbname)?;
            let rest = field_matches(rest, user)?;
            Some(unescape_password(rest))
        })
}

/// libpq's `pwdfMatchesString`: the rest of the line after a field that is `*` or equals
/// `token` (with `\` escapes), else `None`.
fn field_matches<'a>(line: &'a str, token: &str) -> Option<&'a str> {
    if let Some(rest) = line.strip_prefix("*:") {
        return Some(rest);
    }
    let mut expected = token.chars().peekable();
    let mut chars = line.char_indices();
    while let Some((at, c)) = chars.next() {
        let (at, c, escaped) = if c == '\\' {
            match chars.next() {
                Some((at, next)) => (at, next, true),
                None => return None,
            }
        } else {
            (at, c, false)
        };
        if c == ':' && !escaped && expected.peek().is_none() {
            return line.get(at + 1..);
        }
        // libpq compares byte for byte: an unescaped `:` may match one of the token's.
        if expected.next() != Some(c) {
            return None;
        }
    }
    None
}

/// The password field: up to the first unescaped `:`, `\` escaping the next character.
fn unescape_password(field: &str) -> String {
    let mut password = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ':' => break,
            '\\' if chars.peek().is_some() => password.extend(chars.next()),
            other => password.push(other),
        }
    }
    password
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn passfile(content: &str, mode: u32) -> (tempfile_dir::Dir, PathBuf) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.path.join("pgpass");
        let mut file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}"));
        file.write_all(content.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("{e}"));
        (dir, path)
    }

    /// A directory removed on drop (no crate needed for one test module).
    mod tempfile_dir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Self {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_nanos())
                    .unwrap_or(0);
                let path = std::env::temp_dir().join(format!(
                    "fastworker-passfile-{}-{nanos}",
                    std::process::id()
                ));
                std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{e}"));
                Dir { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    #[test]
    fn each_host_gets_its_own_line_as_in_libpq() {
        let (_dir, path) = passfile(
            "# comment: a:1:*:*:commented\n\
             a:1:db:u:pw-a\n\
             b:2:db:u:pw-b\r\n\
             *:3:*:u:wild\\:card\\\\x:ignored\n\
             localhost:5432:db:u:local\n\
             /other/dir:5432:db:u:other-socket\n\
             10.0.0.9:2:db:u:by-address\n\
             h\\:x:4:db:u:escaped-host\n",
            0o600,
        );
        let keys = [
            ("a", "", "1"),
            ("b", "", "2"),
            ("anything", "", "3"),
            ("/run/default", "", ""),
            ("/other/dir", "", ""),
            ("", "10.0.0.9", "2"),
            ("h:x", "", "4"),
            ("a", "", "2"),
            ("", "", ""),
        ];
        let lookup = Passfile::new(path, "db", "u", &keys, Some("/run/default"));
        let found: Vec<Option<String>> = (0..keys.len()).map(|i| lookup.password_for(i)).collect();
        assert_eq!(
            found,
            [
                Some("pw-a"),
                Some("pw-b"),
                Some("wild:card\\x"),
                Some("local"),
                Some("other-socket"),
                Some("by-address"),
                Some("escaped-host"),
                None,
                Some("local"),
            ]
            .map(|p| p.map(str::to_string))
        );
    }

    #[test]
    fn user_and_dbname_must_match_and_the_first_match_wins() {
        let (_dir, path) = passfile("h:5432:db:u:first\nh:5432:db:u:second\n", 0o600);
        assert_eq!(
            lookup(&path, "h", "5432", "db", "u").as_deref(),
            Some("first")
        );
        assert_eq!(lookup(&path, "h", "5432", "db", "other"), None);
        assert_eq!(lookup(&path, "h", "5432", "other", "u"), None);
        assert_eq!(lookup(&path, "h", "5432", "", "u"), None);
    }

    #[test]
    fn a_file_others_may_read_or_not_a_plain_file_is_ignored() {
        let (dir, path) = passfile("*:*:*:*:pw\n", 0o644);
        assert_eq!(lookup(&path, "h", "5432", "db", "u"), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(lookup(&path, "h", "5432", "db", "u").as_deref(), Some("pw"));
        assert_eq!(lookup(&dir.path, "h", "5432", "db", "u"), None);
        assert_eq!(
            lookup(&dir.path.join("missing"), "h", "5432", "db", "u"),
            None
        );
    }
}
