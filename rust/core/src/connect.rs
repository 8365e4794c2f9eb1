//! Connection settings and connecting. Every connection of the core comes from here, so
//! they all get the same session settings and the same redacted description in errors.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use tokio_postgres::config::{ChannelBinding, SslMode as ProtocolSslMode, TargetSessionAttrs};
use tokio_postgres::{Client, Config};

use crate::db::Db;
use crate::errors::{is_connectivity_error, is_passing_error, CoreError, CoreResult};
use crate::params::{invalid, unsupported, ConnectionParams, Endpoint};
use crate::passfile::Passfile;
use crate::sql;
use crate::timing::{Backoff, FIRST_BACKOFF};
use crate::tls::{self, TlsSettings};

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

/// The core's connections say who they are (`pg_stat_activity`) unless the connection
/// parameters name the application. A startup parameter, which a pooler passes on (a
/// `SET` it would not).
const APPLICATION_NAME: &str = "fastworker";

/// `lock_timeout`: no statement of the core waits long for a row that another session
/// keeps locked (a DBA, another worker's recovery); it fails, and is tried again later,
/// rather than holding back the connection's other duties (a heartbeat, a claim). Well
/// below the response timeout, so that such a wait is never taken for a dead connection.
fn lock_timeout_for(response_timeout: Duration) -> Duration {
    (response_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2))
}

/// `idle_in_transaction_session_timeout`: a transaction of the core never waits on the
/// worker between its statements (they are pipelined, or each sent as soon as the previous
/// one is answered). One left idle for as long as the worker waits for an answer belongs
/// to a client that is gone, most likely a half-open connection: by then the worker has
/// given up on that connection too. Without this bound its server process would keep the
/// transaction, and the row locks of the jobs it claimed, until TCP keepalive notices
/// (about 2 hours by default; behind a transaction pooler the server process is the
/// pooler's, so the worker cannot end it itself). The server ends such a session, which
/// rolls the transaction back. At least a second, so that a busy client is not taken for a
/// gone one.
fn idle_in_transaction_timeout_for(response_timeout: Duration) -> Duration {
    response_timeout.max(Duration::from_secs(1))
}

/// `connect_timeout` unless the connection parameters give one (libpq waits for ever): a
/// connect is one step of a reconnect, which the reconnect budget bounds as a whole.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP settings unless the connection string has its own (libpq's `keepalives_*`,
/// `tcp_user_timeout`): a peer that vanished (a dead host, a dropped route) fails a waiting
/// connection within about 30 s, idle (keepalives: 10 + 4 x 5 s) or sending
/// (`tcp_user_timeout`), instead of the system's default of about 15 minutes.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVES_RETRIES: u32 = 4;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest wait between two connects of [`ConnectionTarget::connect_with_backoff`].
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct ConnectionTarget {
    /// One configuration per host of libpq's list, tried in order (shuffled per attempt
    /// with `load_balance_hosts=random`), as libpq does.
    attempts: Vec<Config>,
    load_balance: bool,
    /// See [`lock_timeout_for`].
    lock_timeout: Duration,
    /// See [`idle_in_transaction_timeout_for`].
    idle_in_transaction_timeout: Duration,
    /// libpq's TLS keywords over rustls, and its `allow` / `prefer` fallbacks (see
    /// [`crate::tls`]); Unix sockets never use TLS.
    tls: tls::Negotiator,
    description: String,
    /// Through a transaction pooler (fastworker's `pooler` option, see [`crate::db`]).
    pooled: bool,
    /// No password given: each attempt's own passfile entry, read at each connection.
    passfile: Option<Passfile>,
}

impl std::fmt::Debug for ConnectionTarget {
    // Never print the Config: it holds the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnectionTarget({})", self.description)
    }
}

impl ConnectionTarget {
    /// The connection that libpq would open for these parameters, or a
    /// [`CoreError::Config`] naming the keyword whose value the core cannot honour.
    pub fn new(params: &ConnectionParams) -> CoreResult<Self> {
        params.check_supported()?;
        let tls_settings = TlsSettings::from_params(params)?;
        let endpoints = params.endpoints()?;
        let unnamed = |endpoint: &Endpoint| matches!(endpoint, Endpoint::Tcp { host: None, .. });
        if tls_settings.mode == tls::SslMode::VerifyFull && endpoints.iter().any(unnamed) {
            // libpq's rule and words.
            return Err(CoreError::Config(
                "host name must be specified for a verified SSL connection \
                 (sslmode=verify-full with hostaddr alone)"
                    .into(),
            ));
        }
        let tls = tls::Negotiator::new(&tls_settings)?;
        let mut base = Config::new();
        if let Some(user) = params.user.as_deref().filter(|user| !user.is_empty()) {
            base.user(user);
        }
        if let Some(password) = params.password.as_deref().filter(|p| !p.is_empty()) {
            base.password(password);
        }
        if let Some(dbname) = params.dbname.as_deref().filter(|d| !d.is_empty()) {
            base.dbname(dbname);
        }
        if let Some(options) = params.options.as_deref().filter(|o| !o.is_empty()) {
            base.options(options);
        }
        base.application_name(params.application_name().unwrap_or(APPLICATION_NAME));
        base.connect_timeout(params.connect_timeout()?.unwrap_or(DEFAULT_CONNECT_TIMEOUT));
        base.keepalives(params.keepalives()?);
        base.keepalives_idle(
            ConnectionParams::seconds(params.keepalives_idle.as_deref(), "keepalives_idle")?
                .unwrap_or(KEEPALIVES_IDLE),
        );
        base.keepalives_interval(
            ConnectionParams::seconds(
                params.keepalives_interval.as_deref(),
                "keepalives_interval",
            )?
            .unwrap_or(KEEPALIVES_INTERVAL),
        );
        base.keepalives_retries(params.keepalives_count()?.unwrap_or(KEEPALIVES_RETRIES));
        base.tcp_user_timeout(params.tcp_user_timeout()?.unwrap_or(TCP_USER_TIMEOUT));
        base.target_session_attrs(match params.target_session_attrs.as_deref() {
            None | Some("") | Some("any") => TargetSessionAttrs::Any,
            Some("read-write") => TargetSessionAttrs::ReadWrite,
            Some(other @ ("read-only" | "primary" | "standby" | "prefer-standby")) => {
                return Err(unsupported(
                    "target_session_attrs",
                    other,
                    "the core claims and writes jobs: it needs a primary (use any or read-write)",
                ))
            }
            Some(other) => return Err(invalid("target_session_attrs", other)),
        });
        let load_balance = match params.load_balance_hosts.as_deref() {
            None | Some("") | Some("disable") => false,
            Some("random") => true,
            Some(other) => return Err(invalid("load_balance_hosts", other)),
        };
        base.channel_binding(match params.channel_binding.as_deref() {
            None | Some("") | Some("prefer") => ChannelBinding::Prefer,
            Some("disable") => ChannelBinding::Disable,
            Some("require") => ChannelBinding::Require,
            Some(other) => return Err(invalid("channel_binding", other)),
        });
        let attempts = endpoints
            .iter()
            .map(|endpoint| -> CoreResult<Config> {
                let mut config = base.clone();
                match endpoint {
                    Endpoint::Unix { directory, port } => {
                        // libpq never asks for TLS on a Unix socket, whatever the sslmode.
                        config
                            .host_path(directory)
                            .port(*port)
                            .ssl_mode(ProtocolSslMode::Disable);
                    }
                    Endpoint::Tcp {
                        host,
                        hostaddr,
                        port,
                    } => {
                        let name = host.clone().or_else(|| hostaddr.map(|a| a.to_string()));
                        config.host(name.as_deref().unwrap_or_default());
                        if let Some(address) = hostaddr {
                            config.hostaddr(*address);
                        }
                        config.port(*port).ssl_mode(tls_settings.mode.protocol());
                    }
                }
                Ok(config)
            })
            .collect::<CoreResult<Vec<_>>>()?;
        let description = describe(&endpoints, params.dbname.as_deref().unwrap_or(""));
        Ok(ConnectionTarget {
            attempts,
            load_balance,
            lock_timeout: lock_timeout_for(Duration::from_secs(30)),
            idle_in_transaction_timeout: idle_in_transaction_timeout_for(Duration::from_secs(30)),
            tls,
            description,
            pooled: false,
            passfile: params.passfile_lookup(),
        })
    }

    /// The Rust API's string form: libpq's `key=value` syntax (see
    /// [`ConnectionParams::from_key_values`]).
    pub fn parse(conninfo: &str) -> CoreResult<Self> {
        Self::new(&ConnectionParams::from_key_values(conninfo)?)
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
    /// well below that (see [`lock_timeout_for`]), and the server ends a transaction left
    /// idle for that long (see [`idle_in_transaction_timeout_for`]).
    pub fn with_response_timeout(mut self, response_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout_for(response_timeout);
        self.idle_in_transaction_timeout = idle_in_transaction_timeout_for(response_timeout);
        self
    }

    /// `host:port/dbname` (or the socket directory), never the password.
    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn database(&self) -> String {
        self.attempts
            .first()
            .and_then(|config| config.get_dbname())
            .unwrap_or_default()
            .to_string()
    }

    /// One attempt. The connection task runs on the current tokio runtime.
    pub async fn connect(&self) -> CoreResult<Db> {
        let (client, deadline) = self.open(None).await?;
        if self.pooled {
            let mut settings: Vec<(&str, String)> = SESSION_SETTINGS
                .iter()
                .map(|(name, value)| (*name, value.to_string()))
                .collect();
            settings.push(("lock_timeout", self.lock_timeout.as_millis().to_string()));
            settings.push((
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_timeout.as_millis().to_string(),
            ));
            return Ok(Db::pooled(client, &settings));
        }
        self.set_up_session(&client, deadline).await?;
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
        let (client, deadline) = self.open(Some(notifications)).await?;
        self.set_up_session(&client, deadline).await?;
        Ok(client)
    }

    /// The session settings, bounded by what is left of the connect's `connect_timeout`
    /// (`deadline`): libpq counts a connection as made only once it can be used.
    async fn set_up_session(&self, client: &Client, deadline: Instant) -> CoreResult<()> {
        // Names and numbers of this module's own, never user input.
        let mut setup: String = SESSION_SETTINGS
            .iter()
            .map(|(name, value)| format!("SET {name} TO {value}; "))
            .collect();
        setup.push_str(&format!(
            "SET lock_timeout TO {}; SET idle_in_transaction_session_timeout TO {}",
            self.lock_timeout.as_millis(),
            self.idle_in_transaction_timeout.as_millis()
        ));
        match tokio::time::timeout_at(deadline.into(), client.batch_execute(&setup)).await {
            Ok(done) => done.map_err(|error| CoreError::database("setting up the session", error)),
            Err(_) => Err(CoreError::Unreachable {
                target: self.description.clone(),
                reason: "no answer to the session settings within connect_timeout".into(),
            }),
        }
    }

    /// A connection to the first host of the list that accepts one, and the deadline its
    /// set-up must keep. As libpq does, `connect_timeout` bounds each host's whole
    /// establishment (TCP, TLS, start-up, authentication), not only the TCP connect that
    /// tokio-postgres bounds: a server that accepts and then never answers (a half-open
    /// path, a stuck pooler) fails that host in time, and the next is tried.
    async fn open(
        &self,
        notifications: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
    ) -> CoreResult<(Client, Instant)> {
        use futures_util::StreamExt;
        let mut order: Vec<usize> = (0..self.attempts.len()).collect();
        if self.load_balance {
            shuffle(&mut order);
        }
        let mut reasons = Vec::new();
        let mut opened = None;
        for index in order {
            let config = self.attempt(index);
            let limit = config
                .get_connect_timeout()
                .copied()
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
            let deadline = Instant::now() + limit;
            let attempt = tokio::time::timeout_at(deadline.into(), self.tls.connect(&config)).await;
            let Ok(attempt) = attempt else {
                reasons.push(format!(
                    "no answer within connect_timeout ({} s)",
                    limit.as_secs()
                ));
                continue;
            };
            match attempt {
                Ok(pair) => {
                    opened = Some((pair, deadline));
                    break;
                }
                Err(error) => {
                    let mut reason = error_chain(&error);
                    if reason.contains("password missing") {
                        // tokio-postgres' words for libpq's "no password supplied".
                        reason = "the server asks for a password and none was given \
                                  (password, PGPASSWORD, or a passfile entry for this host)"
                            .into();
                    }
                    reasons.push(reason);
                }
            }
        }
        let Some(((client, mut connection), deadline)) = opened else {
            return Err(CoreError::Unreachable {
                target: self.description.clone(),
                reason: reasons.join("; "),
            });
        };
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
        Ok((client, deadline))
    }

    /// The `index`th host's configuration, with its own passfile entry when no password
    /// is given (as libpq, which reads the file at each connection).
    fn attempt(&self, index: usize) -> Cow<'_, Config> {
        let config = &self.attempts[index];
        match self
            .passfile
            .as_ref()
            .and_then(|file| file.password_for(index))
        {
            Some(password) => {
                let mut config = config.clone();
                config.password(password);
                Cow::Owned(config)
            }
            None => Cow::Borrowed(config),
        }
    }

    /// Connect once, as every connection of the core does, and say where it landed.
    pub async fn probe(&self) -> CoreResult<Landed> {
        // Unnamed (no prepared statement), so that it works through a pooler too.
        let (client, _) = self.open(None).await?;
        let row = client
            .query_typed(sql::WHERE_CONNECTED, &[])
            .await
            .map_err(|error| CoreError::database("probing the connection", error))?
            .into_iter()
            .next()
            .ok_or_else(|| CoreError::Internal("probing the connection: no row".into()))?;
        Ok(Landed {
            user: row.get(0),
            database: row.get(1),
            server_port: row.get(2),
            ssl: row.get(3),
        })
    }

    /// Connect, retrying connectivity failures with exponential backoff until `budget` runs out.
    pub async fn connect_with_backoff(&self, budget: Duration) -> CoreResult<Db> {
        let started = Instant::now();
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_CONNECT_BACKOFF);
        loop {
            let delay = backoff.next_delay();
            match self.connect().await {
                Ok(client) => return Ok(client),
                Err(error) => {
                    // A session `SET` refused for a passing reason (a cancel) too.
                    let retryable = match &error {
                        CoreError::Unreachable { .. } => true,
                        CoreError::Database { source, .. } => {
                            is_connectivity_error(source) || is_passing_error(source)
                        }
                        _ => false,
                    };
                    if !retryable || started.elapsed() + delay > budget {
                        return Err(lost(self, budget, error));
                    }
                }
            }
            tokio::time::sleep(delay).await;
        }
    }
}

/// Where a connection landed (see [`ConnectionTarget::probe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Landed {
    pub user: String,
    pub database: String,
    /// The server's `port` setting (also for a Unix socket).
    pub server_port: i32,
    pub ssl: bool,
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

fn describe(endpoints: &[Endpoint], database: &str) -> String {
    let hosts: Vec<String> = endpoints
        .iter()
        .map(|endpoint| match endpoint {
            Endpoint::Tcp {
                host,
                hostaddr,
                port,
            } => match (host, hostaddr) {
                (Some(host), _) => format!("{host}:{port}"),
                (None, Some(address)) => format!("{address}:{port}"),
                (None, None) => format!(":{port}"),
            },
            Endpoint::Unix { directory, port } => {
                format!("{}:{port} (unix socket)", directory.display())
            }
        })
        .collect();
    format!("{}/{}", hosts.join(","), database)
}

/// `load_balance_hosts=random`: a fresh order per connection (no RNG crate needed for
/// spreading connections: the clock's nanoseconds seed a small xorshift).
fn shuffle(order: &mut [usize]) {
    let mut state = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos() as u64 | 1)
        .unwrap_or(0x9e37_79b9);
    for index in (1..order.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let other = (state % (index as u64 + 1)) as usize;
        order.swap(index, other);
    }
}

/// Quote a name as a PostgreSQL identifier (`LISTEN` takes no bind parameters).
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(conninfo: &str) -> ConnectionTarget {
        ConnectionTarget::parse(conninfo).unwrap_or_else(|error| panic!("{error}"))
    }

    #[test]
    fn description_never_contains_the_password() {
        let target = target("host=db.example port=6543 user=u password=s3cret dbname=jobs");
        assert_eq!(target.description(), "db.example:6543/jobs");
        assert!(!format!("{target:?}").contains("s3cret"));
    }

    #[test]
    fn urls_are_refused_by_the_rust_api() {
        assert!(matches!(
            ConnectionTarget::parse("postgresql://u:pw@127.0.0.1:5433/x"),
            Err(CoreError::Config(_))
        ));
    }

    #[test]
    fn bad_settings_are_a_config_error_without_the_password() {
        for conninfo in [
            "host=x password=hunter2 bogus_key=1",
            "host=x password=hunter2 target_session_attrs=standby",
            "host=x password=hunter2 channel_binding=sometimes",
        ] {
            let error = ConnectionTarget::parse(conninfo).unwrap_err();
            assert!(matches!(error, CoreError::Config(_)), "{conninfo}");
            assert!(!error.to_string().contains("hunter2"));
        }
    }

    #[test]
    fn unix_sockets_never_ask_for_tls_and_tcp_hosts_keep_the_sslmode() {
        let target = target("host=/run/pg,db.example sslmode=require");
        assert_eq!(target.attempts.len(), 2);
        assert_eq!(target.attempts[0].get_ssl_mode(), ProtocolSslMode::Disable);
        assert_eq!(target.attempts[1].get_ssl_mode(), ProtocolSslMode::Require);
        assert_eq!(
            target.description(),
            "/run/pg:5432 (unix socket),db.example:5432/"
        );
    }

    #[test]
    fn verify_full_needs_a_host_name_as_in_libpq() {
        let error = ConnectionTarget::parse(
            "hostaddr=127.0.0.1 sslmode=verify-full sslrootcert=/nonexistent/ca.pem",
        );
        assert!(matches!(error, Err(CoreError::Config(_))));
        let message = error.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("host name must be specified"), "{message}");
    }

    #[test]
    fn a_dead_peer_fails_within_about_30_s_unless_the_parameters_say_otherwise() {
        let config = target("host=h user=u dbname=d").attempts[0].clone();
        assert_eq!(config.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(config.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(config.get_keepalives_retries(), Some(KEEPALIVES_RETRIES));
        assert_eq!(config.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        let idle_and_probes = KEEPALIVES_IDLE + KEEPALIVES_INTERVAL * KEEPALIVES_RETRIES;
        assert!(
            idle_and_probes <= Duration::from_secs(35)
                && TCP_USER_TIMEOUT <= Duration::from_secs(35)
        );

        let config = target(
            "host=h user=u dbname=d keepalives=0 keepalives_idle=77 keepalives_interval=9 \
             keepalives_count=2 tcp_user_timeout=12000",
        )
        .attempts[0]
            .clone();
        assert!(!config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(77));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(9))
        );
        assert_eq!(config.get_keepalives_retries(), Some(2));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_millis(12000))
        );
    }

    #[tokio::test]
    async fn a_server_that_accepts_and_never_answers_fails_the_connect_in_connect_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts each connection, keeps it open, never answers its start-up packet.
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let target = target(&format!(
            "host=127.0.0.1 port={port} user=u dbname=d sslmode=disable connect_timeout=2"
        ));
        // Bounded only so that a connect that waits for ever fails the test.
        let outcome = tokio::time::timeout(Duration::from_secs(60), target.connect()).await;
        silent.abort();
        let error = outcome
            .expect("the connect waited past its connect_timeout")
            .err();
        assert!(
            matches!(&error, Some(CoreError::Unreachable { reason, .. })
                if reason.contains("connect_timeout")),
            "{error:?}"
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
