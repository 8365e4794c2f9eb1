//! Connection settings and connecting. Every connection of the core comes from here, so
//! they all get the same session settings and the same redacted description in errors.

use std::time::{Duration, Instant};

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::db::Db;
use crate::errors::{is_connectivity_error, CoreError, CoreResult};
use crate::tls;

/// Session settings for the core's own connections.
/// - `force_generic_plan`: every statement of the core is planned once per connection, not
///   on each call. Custom plans cost more to make than to run (about 0.3 ms of planning per
///   claim and per completion, half the server's CPU at concurrency 1). The claim's generic
///   plan walks procrastinate's `priority DESC, id ASC` partial index whatever the
///   parameters, even when planned on an empty table (the core's tests check the plans).
/// - `jit = off`: a generic plan's cost is estimated without the `LIMIT` value, which puts
///   the claim over `jit_above_cost`; compiling it took 250-300 ms per call. JIT never pays
///   off for statements that touch a few rows by index.
///
///
/// - `enable_seqscan = off`: every statement of the core finds its rows by an index (by
///   id, by worker, by priority); a generic plan made on a small table (or with statistics
///   gone stale) would rather read the whole table, and keep doing so as it grows. A test
///   (`rust/core/tests/plans.rs`) checks every statement's plan from 0 to 1,000,000 rows.
///
/// The job connection adds `enable_sort = off` for the claim (see [`crate::fetcher`]).
/// Behind a transaction pooler these are set in each transaction instead (see
/// [`crate::db`]).
const SESSION_SETTINGS: [(&str, &str); 3] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("jit", "off"),
    ("enable_seqscan", "off"),
];

/// The core's connections say who they are (`pg_stat_activity`), whatever the connection
/// string says.
const APPLICATION_NAME: &str = "fastworker";

/// `lock_timeout`: no statement of the core waits long for a row that another session
/// keeps locked (a DBA, another worker's recovery); it fails, and is tried again later,
/// rather than holding back the connection's other duties (a heartbeat, a claim). Well
/// below the response timeout, so that such a wait is never taken for a dead connection.
fn lock_timeout_for(response_timeout: Duration) -> Duration {
    (response_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2))
}

/// TCP settings unless the connection string has its own (libpq's `keepalives_*`,
/// `tcp_user_timeout`): a peer that vanished (a dead host, a dropped route) fails a waiting
/// connection within about 30 s, idle (keepalives: 10 + 4 x 5 s) or sending
/// (`tcp_user_timeout`), instead of the system's default of about 15 minutes.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVES_RETRIES: u32 = 4;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// tokio-postgres' own default idle time, i.e. none given.
const UNSET_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

#[derive(Clone)]
pub struct ConnectionTarget {
    config: Config,
    /// See [`lock_timeout_for`].
    lock_timeout: Duration,
    /// libpq's sslmode over rustls (see [`crate::tls`]); unused on Unix sockets.
    tls: MakeRustlsConnect,
    description: String,
    /// Through a transaction pooler (fastworker's `pooler` option, see [`crate::db`]).
    pooled: bool,
}

impl std::fmt::Debug for ConnectionTarget {
    // Never print the Config: it holds the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnectionTarget({})", self.description)
    }
}

impl ConnectionTarget {
    pub fn parse(conninfo: &str) -> CoreResult<Self> {
        // tokio-postgres knows neither verify-ca / verify-full nor certificate files.
        let (conninfo, tls_settings) = tls::split_tls_settings(conninfo)?;
        let mut config: Config = conninfo.parse().map_err(|error: tokio_postgres::Error| {
            // The parser's message names the bad key, never the password value.
            CoreError::Config(error.to_string())
        })?;
        if config.get_hosts().is_empty() {
            // libpq's default: the local Unix socket directory.
            config.host("/var/run/postgresql");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_keepalives_idle() == UNSET_KEEPALIVES_IDLE {
            config.keepalives_idle(KEEPALIVES_IDLE);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(KEEPALIVES_INTERVAL);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(KEEPALIVES_RETRIES);
        }
        match config.get_tcp_user_timeout().copied() {
            None => {
                config.tcp_user_timeout(TCP_USER_TIMEOUT);
            }
            // libpq's tcp_user_timeout is in milliseconds; tokio-postgres reads seconds.
            Some(given) => {
                config.tcp_user_timeout(Duration::from_millis(given.as_secs()));
            }
        }
        // A startup parameter, which a pooler passes on (a `SET` it would not).
        config.application_name(APPLICATION_NAME);
        config.ssl_mode(tls_settings.mode.protocol());
        let tls = tls::connector(&tls_settings)?;
        let description = describe(&config);
        Ok(ConnectionTarget {
            config,
            lock_timeout: lock_timeout_for(Duration::from_secs(30)),
            tls,
            description,
            pooled: false,
        })
    }

    /// Through a transaction pooler: no named prepared statements, no session settings
    /// (see [`crate::db`]).
    pub fn through_pooler(mut self, pooled: bool) -> Self {
        self.pooled = pooled;
        self
    }

    pub fn is_pooled(&self) -> bool {
        self.pooled
    }

    /// Statements may wait `response_timeout` for an answer: row locks are waited for
    /// well below that (see [`lock_timeout_for`]).
    pub fn with_response_timeout(mut self, response_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout_for(response_timeout);
        self
    }

    /// `host:port/dbname` (or the socket directory), never the password.
    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn database(&self) -> String {
        self.config.get_dbname().unwrap_or_default().to_string()
    }

    /// One attempt. The connection task runs on the current tokio runtime.
    pub async fn connect(&self) -> CoreResult<Db> {
        let client = self.open(None).await?;
        if self.pooled {
            let mut settings: Vec<(&str, String)> = SESSION_SETTINGS
                .iter()
                .map(|(name, value)| (*name, value.to_string()))
                .collect();
            settings.push(("lock_timeout", self.lock_timeout.as_millis().to_string()));
            return Ok(Db::pooled(client, &settings));
        }
        self.set_up_session(&client).await?;
        Ok(Db::direct(client))
    }

    /// A connection whose notifications are forwarded to `notifications`: a session of
    /// its own (LISTEN), so never through a transaction pooler.
    pub async fn connect_listening(
        &self,
        notifications: tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>,
    ) -> CoreResult<Client> {
        if self.pooled {
            return Err(CoreError::Config(
                "LISTEN needs a connection of its own to the server, not through a \
                 transaction pooler"
                    .into(),
            ));
        }
        let client = self.open(Some(notifications)).await?;
        self.set_up_session(&client).await?;
        Ok(client)
    }

    async fn set_up_session(&self, client: &Client) -> CoreResult<()> {
        let mut setup: String = SESSION_SETTINGS
            .iter()
            .map(|(name, value)| format!("SET {name} TO {value}; "))
            .collect();
        setup.push_str(&format!(
            "SET lock_timeout TO {}",
            self.lock_timeout.as_millis()
        ));
        client
            .batch_execute(&setup)
            .await
            .map_err(|error| CoreError::database("setting up the session", error))
    }

    async fn open(
        &self,
        notifications: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
    ) -> CoreResult<Client> {
        use futures_util::StreamExt;
        let (client, mut connection) =
            self.config
                .connect(self.tls.clone())
                .await
                .map_err(|error| CoreError::Unreachable {
                    target: self.description.clone(),
                    reason: error_chain(&error),
                })?;
        tokio::spawn(async move {
            let Some(notifications) = notifications else {
                // Errors surface on the client's next request; nothing to do with them here.
                let _ = connection.await;
                return;
            };
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(notification)) => {
                        if notifications.send(notification).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        Ok(client)
    }

    /// Connect, retrying connectivity failures with exponential backoff until `budget` runs out.
    pub async fn connect_with_backoff(&self, budget: Duration) -> CoreResult<Db> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            match self.connect().await {
                Ok(client) => return Ok(client),
                Err(error) => {
                    let retryable = match &error {
                        CoreError::Unreachable { .. } => true,
                        CoreError::Database { source, .. } => is_connectivity_error(source),
                        _ => false,
                    };
                    if !retryable || started.elapsed() + delay > budget {
                        return Err(lost(self, budget, error));
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

fn lost(target: &ConnectionTarget, budget: Duration, error: CoreError) -> CoreError {
    match error {
        CoreError::Unreachable { reason, .. } => CoreError::ConnectionLost {
            target: target.description.clone(),
            budget,
            reason,
        },
        other => other,
    }
}

/// An error and its causes: tokio-postgres says "error connecting to server" and keeps the
/// useful part ("Connection refused", a TLS failure, ...) in its source.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn describe(config: &Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(index, host)| {
            let port = ports
                .get(index)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                #[cfg(unix)]
                Host::Unix(path) => format!("{}:{port} (unix socket)", path.display()),
            }
        })
        .collect();
    let database = config.get_dbname().unwrap_or("");
    format!("{}/{}", hosts.join(","), database)
}

/// Quote a name as a PostgreSQL identifier (`LISTEN` takes no bind parameters).
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_never_contains_the_password() {
        let target =
            ConnectionTarget::parse("host=db.example port=6543 user=u password=s3cret dbname=jobs")
                .expect("valid conninfo");
        assert_eq!(target.description(), "db.example:6543/jobs");
        assert!(!format!("{target:?}").contains("s3cret"));
    }

    #[test]
    fn url_form_is_accepted() {
        let target = ConnectionTarget::parse("postgresql://u:pw@127.0.0.1:5433/x").expect("url");
        assert_eq!(target.description(), "127.0.0.1:5433/x");
    }

    #[test]
    fn bad_settings_are_a_config_error_without_the_password() {
        let error = ConnectionTarget::parse("host=x password=hunter2 bogus_key=1").unwrap_err();
        assert!(matches!(error, CoreError::Config(_)));
        assert!(!error.to_string().contains("hunter2"));
    }

    #[test]
    fn a_dead_peer_fails_within_about_30_s_unless_the_dsn_says_otherwise() {
        let target = ConnectionTarget::parse("host=h user=u dbname=d").expect("valid");
        assert_eq!(target.config.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(
            target.config.get_keepalives_interval(),
            Some(KEEPALIVES_INTERVAL)
        );
        assert_eq!(
            target.config.get_keepalives_retries(),
            Some(KEEPALIVES_RETRIES)
        );
        assert_eq!(
            target.config.get_tcp_user_timeout(),
            Some(&TCP_USER_TIMEOUT)
        );
        let idle_and_probes = KEEPALIVES_IDLE + KEEPALIVES_INTERVAL * KEEPALIVES_RETRIES;
        assert!(
            idle_and_probes <= Duration::from_secs(35)
                && TCP_USER_TIMEOUT <= Duration::from_secs(35)
        );

        let target = ConnectionTarget::parse(
            "host=h user=u dbname=d keepalives=0 keepalives_idle=77 keepalives_interval=9 \
             keepalives_retries=2 tcp_user_timeout=12000",
        )
        .expect("valid");
        assert!(!target.config.get_keepalives());
        assert_eq!(target.config.get_keepalives_idle(), Duration::from_secs(77));
        assert_eq!(
            target.config.get_keepalives_interval(),
            Some(Duration::from_secs(9))
        );
        assert_eq!(target.config.get_keepalives_retries(), Some(2));
        assert_eq!(
            target.config.get_tcp_user_timeout(),
            Some(&Duration::from_millis(12000))
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            quote_identifier("procrastinate_queue_v1#x; DROP TABLE y"),
            "\"procrastinate_queue_v1#x; DROP TABLE y\""
        );
    }
}
