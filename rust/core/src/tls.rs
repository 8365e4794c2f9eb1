//! TLS for the core's connections, with libpq's meanings, over rustls.
//!
//! tokio-postgres itself only knows `disable` / `prefer` / `require` and no certificate
//! settings, so libpq's TLS keywords are honoured here:
//!
//! - `sslmode`: `disable`: plaintext only. `allow`: plaintext first, TLS if the server
//!   refuses it. `prefer` (libpq's default): TLS when the server offers it, plaintext again
//!   if the TLS handshake fails or the server refuses the encrypted session. `require`: TLS
//!   only. In these modes the certificate is not checked, unless a root certificate is at
//!   hand (`sslrootcert`, or `~/.postgresql/root.crt` as libpq), which makes it
//!   `verify-ca`; a root certificate file that does not exist is ignored, as libpq does.
//!   `verify-ca`: the server's chain must lead to a root of `sslrootcert`. `verify-full`:
//!   that, and the certificate must name the host.
//! - `sslrootcert=system`: the platform's trust store (libpq 16), `verify-full` only.
//! - `sslcrl`, `sslcrldir` (or `~/.postgresql/root.crl`): revocation lists, checked for the
//!   whole chain as libpq's OpenSSL setting does; a list file that does not exist is
//!   ignored, as libpq does.
//! - `sslcert` + `sslkey` (or `~/.postgresql/postgresql.crt` / `.key`): a client
//!   certificate, unless `sslcertmode=disable`. The key file must not be open to others
//!   (libpq's rule); an encrypted key is refused with how to decrypt
//!   it (`sslpassword` is not supported). X.509 v1 certificates are sent as libpq sends them.
//! - `sslsni`, `ssl_min_protocol_version`, `ssl_max_protocol_version` (TLS 1.2 and 1.3).
//!
//! `~` is libpq's home directory: `$HOME`, or the user database's entry for the effective
//! user when `HOME` is unset or empty (as under many service managers).
//!
//! Unix-domain sockets never use TLS, as in libpq. The crypto provider is `ring`.

use std::ffi::OsString;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, InconsistentKeys, RootCertStore,
    SignatureScheme,
};
use tokio_postgres::config::SslMode as ProtocolSslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::connect::error_chain;
use crate::errors::{CoreError, CoreResult};
use crate::params::{invalid, unsupported, ConnectionParams};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> CoreResult<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(CoreError::Config(format!(
                    "invalid sslmode {other:?} (disable, allow, prefer, require, verify-ca or verify-full)"
                )))
            }
        })
    }

    /// What tokio-postgres is told for a TCP attempt: whether to ask for TLS and whether
    /// it is required (`allow` starts without, see [`Negotiator::connect`]).
    pub fn protocol(self) -> ProtocolSslMode {
        match self {
            SslMode::Disable => ProtocolSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => ProtocolSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => ProtocolSslMode::Require,
        }
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// The TLS settings of the connection parameters, with libpq's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<RootCerts>,
    /// libpq's revocation list file: `sslcrl`, else `~/.postgresql/root.crl` unless
    /// `sslcrldir` is set. Read only with a root certificate.
    pub crl_file: Option<PathBuf>,
    /// `sslcrldir`: every file in it is a revocation list.
    pub crl_dir: Option<PathBuf>,
    /// The client certificate, and its key, when the certificate file exists.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// `sslsni`: send the host name in the handshake (never for an IP address).
    pub sni: bool,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
}

/// Where the trusted roots come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCerts {
    File(PathBuf),
    /// `sslrootcert=system` (libpq 16): the platform's trust store.
    System,
}

/// The TLS versions rustls speaks (libpq's `TLSv1` and `TLSv1.1` are below them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            mode: SslMode::Prefer,
            root_cert: None,
            crl_file: None,
            crl_dir: None,
            client_cert: None,
            client_key: None,
            sni: true,
            min_version: TlsVersion::Tls12,
            max_version: TlsVersion::Tls13,
        }
    }
}

/// libpq's home directory (`pqGetHomeDirectory`): `$HOME` if set and not empty, else the
/// home of the effective user's entry in the user database.
pub fn home_directory() -> Option<PathBuf> {
    home_from(std::env::var_os("HOME"), passwd_home)
}

fn home_from(home: Option<OsString>, passwd: impl FnOnce() -> Option<PathBuf>) -> Option<PathBuf> {
    match home {
        Some(home) if !home.is_empty() => Some(PathBuf::from(home)),
        _ => passwd(),
    }
}

/// `getpwuid_r(geteuid())->pw_dir`, as libpq looks it up (libc: the standard library has
/// no user database look-up).
fn passwd_home() -> Option<PathBuf> {
    use std::ffi::{CStr, OsStr};
    use std::os::unix::ffi::OsStrExt;
    let mut buffer: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: `passwd` is plain data that getpwuid_r fills in; all-zero is a valid value.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, and `buffer.len()` is its size; the
        // strings of `entry` point into `buffer`, which outlives their use below.
        let code = unsafe {
            libc::getpwuid_r(
                libc::geteuid(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        if code == libc::ERANGE && buffer.len() < (1 << 20) {
            buffer.resize(buffer.len() * 2, 0);
            continue;
        }
        if code != 0 || found.is_null() || entry.pw_dir.is_null() {
            return None;
        }
        // SAFETY: getpwuid_r succeeded: `pw_dir` is a NUL-terminated string in `buffer`.
        let directory = unsafe { CStr::from_ptr(entry.pw_dir) };
        return Some(PathBuf::from(OsStr::from_bytes(directory.to_bytes())));
    }
}

/// libpq's test for a file it may use (`stat() == 0`): a directory counts, and is then
/// refused when read.
fn exists(path: &Path) -> bool {
    std::fs::metadata(path).is_ok()
}

fn given(value: Option<&str>) -> Option<&str> {
    value.filter(|value| !value.is_empty())
}

impl TlsSettings {
    /// libpq's TLS keywords, with libpq's defaults for what is not given: the root
    /// certificate, the revocation list and the client certificate and key in
    /// `~/.postgresql/` (libpq's home directory, see [`home_directory`]).
    pub fn from_params(params: &ConnectionParams) -> CoreResult<TlsSettings> {
        Self::with_home(params, home_directory())
    }

    /// [`TlsSettings::from_params`] with the home directory given.
    pub fn with_home(params: &ConnectionParams, home: Option<PathBuf>) -> CoreResult<TlsSettings> {
        let mode = match params.sslmode.as_deref() {
            None | Some("") => SslMode::Prefer,
            Some(mode) => SslMode::parse(mode)?,
        };
        let in_home = |name: &str| {
            home.as_ref()
                .map(|home| home.join(".postgresql").join(name))
        };
        let root_cert = match given(params.sslrootcert.as_deref()) {
            Some("system") => Some(RootCerts::System),
            // libpq: a missing root certificate is an error only where it is required.
            Some(path) if mode.verifies() || exists(Path::new(path)) => {
                Some(RootCerts::File(PathBuf::from(path)))
            }
            Some(_) => None,
            None => in_home("root.crt")
                .filter(|path| exists(path))
                .map(RootCerts::File),
        };
        if root_cert == Some(RootCerts::System) && mode != SslMode::VerifyFull {
            return Err(CoreError::Config(format!(
                "weak sslmode {:?} may not be used with sslrootcert=system (use \"verify-full\")",
                params.sslmode.as_deref().unwrap_or("prefer")
            )));
        }
        let crl_dir = given(params.sslcrldir.as_deref()).map(PathBuf::from);
        let crl_file = match given(params.sslcrl.as_deref()) {
            Some(path) => Some(PathBuf::from(path)),
            None if crl_dir.is_none() => in_home("root.crl"),
            None => None,
        };
        let (client_cert, client_key) = if params.sslcertmode.as_deref() == Some("disable") {
            (None, None)
        } else {
            let cert = given(params.sslcert.as_deref())
                .map(PathBuf::from)
                .or_else(|| in_home("postgresql.crt"));
            match cert.map(|cert| (std::fs::metadata(&cert), cert)) {
                Some((Ok(_), cert)) => {
                    let key = given(params.sslkey.as_deref())
                        .map(PathBuf::from)
                        .or_else(|| in_home("postgresql.key"));
                    (Some(cert), key)
                }
                // libpq: no certificate file, no client certificate (the key is not read);
                // any other failure to look at it is an error.
                Some((Err(error), cert))
                    if error.kind() != std::io::ErrorKind::NotFound
                        && error.raw_os_error() != Some(libc::ENOTDIR) =>
                {
                    return Err(CoreError::Config(format!(
                        "could not open certificate file \"{}\": {error}",
                        cert.display()
                    )));
                }
                _ => (None, None),
            }
        };
        let sni = match params.sslsni.as_deref() {
            None | Some("") | Some("1") => true,
            Some("0") => false,
            Some(other) => return Err(invalid("sslsni", other)),
        };
        let min_version = match params.ssl_min_protocol_version.as_deref() {
            None | Some("") | Some("TLSv1") | Some("TLSv1.1") | Some("TLSv1.2") => {
                TlsVersion::Tls12
            }
            Some("TLSv1.3") => TlsVersion::Tls13,
            Some(other) => return Err(invalid("ssl_min_protocol_version", other)),
        };
        let max_version = match params.ssl_max_protocol_version.as_deref() {
            None | Some("") | Some("TLSv1.3") => TlsVersion::Tls13,
            Some("TLSv1.2") => TlsVersion::Tls12,
            Some(version @ ("TLSv1" | "TLSv1.1")) => {
                return Err(unsupported(
                    "ssl_max_protocol_version",
                    version,
                    "the core speaks TLS 1.2 and 1.3 only",
                ))
            }
            Some(other) => return Err(invalid("ssl_max_protocol_version", other)),
        };
        if min_version > max_version {
            return Err(CoreError::Config(
                "invalid SSL protocol version range: ssl_min_protocol_version is above \
                 ssl_max_protocol_version"
                    .into(),
            ));
        }
        Ok(TlsSettings {
            mode,
            root_cert,
            crl_file,
            crl_dir,
            client_cert,
            client_key,
            sni,
            min_version,
            max_version,
        })
    }
}

/// How each TCP attempt negotiates encryption, as libpq does for the `sslmode`.
#[derive(Clone)]
pub struct Negotiator {
    mode: SslMode,
    /// The TLS connector, or why it could not be made. Under `allow` and `prefer` libpq
    /// reads the certificate files only when it tries TLS, and a failure there is one more
    /// reason to go on without (`prefer`) or a refusal (`allow`); in the other modes it is
    /// a configuration error at once.
    tls: Result<MakeRustlsConnect, String>,
    /// For the attempts that never use TLS: a connector that trusts no server.
    plain: MakeRustlsConnect,
}

type TlsStreamOf = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// A connection of the core, with the stream it runs over.
pub type Opened = (Client, Connection<Socket, TlsStreamOf>);

impl Negotiator {
    pub fn new(settings: &TlsSettings) -> CoreResult<Negotiator> {
        let tls = match settings.mode {
            SslMode::Disable => Err("sslmode=disable".to_string()),
            SslMode::Allow | SslMode::Prefer => connector(settings).map_err(|error| match error {
                CoreError::Config(reason) => reason,
                other => other.to_string(),
            }),
            _ => Ok(connector(settings)?),
        };
        Ok(Negotiator {
            mode: settings.mode,
            tls,
            plain: plain_connector()?,
        })
    }

    /// One attempt at `config`'s host, with libpq's fallbacks: `allow` tries plaintext
    /// first and TLS if the server refuses; `prefer` tries TLS first and plaintext if the
    /// TLS set-up or handshake fails or the server refuses the encrypted session. A server
    /// that says it cannot accept connections now (57P03) is not tried again (libpq moves
    /// on to the next host).
    pub async fn connect(&self, config: &Config) -> Result<Opened, Refusal> {
        if config.get_ssl_mode() == ProtocolSslMode::Disable {
            // A Unix socket, or sslmode=disable.
            return Ok(config.connect(self.plain.clone()).await?);
        }
        match (self.mode, &self.tls) {
            (SslMode::Allow, tls) => {
                let first = match self.plaintext(config).await {
                    Ok(opened) => return Ok(opened),
                    Err(error) if refused_by_server(&error) => error,
                    Err(error) => return Err(error.into()),
                };
                let second = match tls {
                    Ok(tls) => {
                        match Observed::attempt(config, tls, ProtocolSslMode::Prefer).await {
                            (Ok(opened), _) => return Ok(opened),
                            (Err(error), _) => error_chain(&error),
                        }
                    }
                    Err(setup) => setup.clone(),
                };
                Err(Refusal::twice(error_chain(&first), "then with TLS", second))
            }
            (SslMode::Prefer, Err(setup)) => match self.plaintext(config).await {
                Ok(opened) => Ok(opened),
                Err(error) => Err(Refusal::twice(
                    setup.clone(),
                    "then without TLS",
                    error_chain(&error),
                )),
            },
            (SslMode::Prefer, Ok(tls)) => {
                let (first, handshake) =
                    Observed::attempt(config, tls, ProtocolSslMode::Prefer).await;
                let error = match first {
                    Ok(opened) => return Ok(opened),
                    Err(error) => error,
                };
                let again = match handshake {
                    Handshake::Failed => true,
                    Handshake::Done => refused_by_server(&error),
                    Handshake::NotTried => false,
                };
                if !again {
                    return Err(error.into());
                }
                match self.plaintext(config).await {
                    Ok(opened) => Ok(opened),
                    Err(plain) => Err(Refusal::twice(
                        error_chain(&error),
                        "then without TLS",
                        error_chain(&plain),
                    )),
                }
            }
            (_, Ok(tls)) => Ok(config.connect(tls.clone()).await?),
            (_, Err(setup)) => Err(Refusal::Setup(setup.clone())),
        }
    }

    async fn plaintext(&self, config: &Config) -> Result<Opened, tokio_postgres::Error> {
        let mut config = config.clone();
        config.ssl_mode(ProtocolSslMode::Disable);
        config.connect(self.plain.clone()).await
    }
}

/// An error the server sent during the start-up (authentication, `pg_hba.conf`), other
/// than "cannot connect now": libpq then tries the other encryption of `allow` / `prefer`.
fn refused_by_server(error: &tokio_postgres::Error) -> bool {
    error
        .as_db_error()
        .is_some_and(|db_error| db_error.code() != &SqlState::CANNOT_CONNECT_NOW)
}

/// Why an attempt at one host failed: one error, or the two of `allow` / `prefer`.
#[derive(Debug)]
pub enum Refusal {
    Once(tokio_postgres::Error),
    Twice {
        first: String,
        then: &'static str,
        second: String,
    },
    /// The TLS set-up failed and the mode needs TLS (not reached: such settings are
    /// refused when the connection target is made).
    Setup(String),
}

impl Refusal {
    fn twice(first: String, then: &'static str, second: String) -> Refusal {
        Refusal::Twice {
            first,
            then,
            second,
        }
    }
}

impl From<tokio_postgres::Error> for Refusal {
    fn from(error: tokio_postgres::Error) -> Self {
        Refusal::Once(error)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Once(error) => write!(f, "{error}"),
            Refusal::Twice {
                first,
                then,
                second,
            } => write!(f, "{first}; {then}: {second}"),
            Refusal::Setup(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // The causes of the one error, as if it were returned itself.
            Refusal::Once(error) => error.source(),
            _ => None,
        }
    }
}

/// How far the TLS handshake of an attempt went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handshake {
    /// The server declined TLS, or the attempt failed before asking.
    NotTried,
    Done,
    Failed,
}

/// The rustls connector, noting how far the handshake went (libpq's `prefer` goes on
/// without TLS after a failed handshake, or after a refusal of an encrypted session).
#[derive(Clone)]
struct Observed {
    inner: MakeRustlsConnect,
    handshake: Arc<AtomicU8>,
}

impl Observed {
    async fn attempt(
        config: &Config,
        tls: &MakeRustlsConnect,
        mode: ProtocolSslMode,
    ) -> (Result<Opened, tokio_postgres::Error>, Handshake) {
        let observed = Observed {
            inner: tls.clone(),
            handshake: Arc::new(AtomicU8::new(Handshake::NotTried as u8)),
        };
        let handshake = observed.handshake.clone();
        let mut config = config.clone();
        config.ssl_mode(mode);
        let result = config.connect(observed).await;
        let handshake = match handshake.load(Ordering::Acquire) {
            value if value == Handshake::Done as u8 => Handshake::Done,
            value if value == Handshake::Failed as u8 => Handshake::Failed,
            _ => Handshake::NotTried,
        };
        (result, handshake)
    }
}

impl MakeTlsConnect<Socket> for Observed {
    type Stream = TlsStreamOf;
    type TlsConnect = ObservedConnect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> Result<ObservedConnect, Self::Error> {
        let inner = <MakeRustlsConnect as MakeTlsConnect<Socket>>::make_tls_connect(
            &mut self.inner,
            domain,
        )?;
        Ok(ObservedConnect {
            inner,
            handshake: self.handshake.clone(),
        })
    }
}

struct ObservedConnect {
    inner: <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect,
    handshake: Arc<AtomicU8>,
}

impl TlsConnect<Socket> for ObservedConnect {
    type Stream = TlsStreamOf;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TlsStreamOf>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let handshake = self.handshake;
        let connecting = self.inner.connect(stream);
        Box::pin(async move {
            let result = connecting.await;
            let outcome = if result.is_ok() {
                Handshake::Done
            } else {
                Handshake::Failed
            };
            handshake.store(outcome as u8, Ordering::Release);
            result
        })
    }
}

/// A connector for attempts that never ask for TLS; should one ever, it trusts no server.
fn plain_connector() -> CoreResult<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| CoreError::Config(format!("TLS setup: {error}")))?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// The rustls connector for these settings. Certificates are read here, once.
pub fn connector(settings: &TlsSettings) -> CoreResult<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verify = match settings.mode {
        SslMode::VerifyCa | SslMode::VerifyFull => Some(settings.mode),
        // libpq: with a root certificate at hand, `require` (and `prefer`) verify the chain.
        _ if settings.root_cert.is_some() => Some(SslMode::VerifyCa),
        _ => None,
    };
    let versions: &[&'static rustls::SupportedProtocolVersion] =
        match (settings.min_version, settings.max_version) {
            (TlsVersion::Tls12, TlsVersion::Tls12) => &[&rustls::version::TLS12],
            (TlsVersion::Tls13, _) => &[&rustls::version::TLS13],
            (TlsVersion::Tls12, TlsVersion::Tls13) => {
                &[&rustls::version::TLS13, &rustls::version::TLS12]
            }
        };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|error| CoreError::Config(format!("TLS setup: {error}")))?;
    let builder = match verify {
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider.clone()))),
        Some(mode) => {
            let Some(root_cert) = &settings.root_cert else {
                return Err(CoreError::Config(format!(
                    "sslmode={} needs a root certificate: set sslrootcert (no {})",
                    if mode == SslMode::VerifyFull {
                        "verify-full"
                    } else {
                        "verify-ca"
                    },
                    "~/.postgresql/root.crt"
                )));
            };
            let mut roots = RootCertStore::empty();
            match root_cert {
                RootCerts::File(path) => {
                    for certificate in read_certificates(path)? {
                        roots
                            .add(certificate)
                            .map_err(|error| tls_file_error(path, error))?;
                    }
                }
                RootCerts::System => {
                    let found = rustls_native_certs::load_native_certs();
                    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
                    if added == 0 {
                        return Err(CoreError::Config(format!(
                            "sslrootcert=system: no trusted root certificate found in the \
                             platform's store ({} errors)",
                            found.errors.len()
                        )));
                    }
                }
            }
            let mut webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if let Some(crls) = revocation_lists(settings)? {
                // As OpenSSL's CRL_CHECK_ALL (libpq's setting): every certificate of the
                // chain needs its issuer's list, and an expired list fails.
                webpki = webpki.with_crls(crls).enforce_revocation_expiration();
            }
            let webpki = webpki
                .build()
                .map_err(|error| CoreError::Config(format!("TLS verifier: {error}")))?;
            if mode == SslMode::VerifyFull {
                builder.with_webpki_verifier(webpki)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            }
        }
    };
    let mut config = match (&settings.client_cert, &settings.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let chain = read_certificates(cert_path)?;
            let key = read_private_key(key_path)?;
            let signing_key = provider
                .key_provider
                .load_private_key(key)
                .map_err(|error| key_error(key_path, "could not load private key file", error))?;
            // Not rustls' `with_client_auth_cert`: it parses the certificate with webpki,
            // which refuses X.509 v1 certificates that libpq sends and servers accept.
            let certified = CertifiedKey::new(chain, signing_key);
            check_key_matches(&certified, key_path)?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
        (Some(_), None) => {
            // A certificate file without a home directory for the default key.
            return Err(CoreError::Config(
                "certificate present, but no private key file (set sslkey)".into(),
            ));
        }
        _ => builder.with_no_client_auth(),
    };
    config.enable_sni = settings.sni;
    Ok(MakeRustlsConnect::new(config))
}

/// The revocation lists, as libpq's OpenSSL reads them: `None`, no revocation check (no
/// list configured, or the list file does not exist: libpq ignores it silently).
fn revocation_lists(
    settings: &TlsSettings,
) -> CoreResult<Option<Vec<CertificateRevocationListDer<'static>>>> {
    let mut crls = Vec::new();
    match &settings.crl_file {
        Some(path) if !exists(path) => return Ok(None),
        Some(path) => {
            for crl in CertificateRevocationListDer::pem_file_iter(path)
                .map_err(|error| tls_file_error(path, error))?
            {
                crls.push(crl.map_err(|error| tls_file_error(path, error))?);
            }
        }
        None if settings.crl_dir.is_none() => return Ok(None),
        None => {}
    }
    if let Some(directory) = &settings.crl_dir {
        match std::fs::read_dir(directory) {
            Ok(entries) => {
                for entry in entries {
                    let path = entry
                        .map_err(|error| tls_file_error(directory, error))?
                        .path();
                    if path.is_file() {
                        for crl in CertificateRevocationListDer::pem_file_iter(&path)
                            .map_err(|error| tls_file_error(&path, error))?
                        {
                            crls.push(crl.map_err(|error| tls_file_error(&path, error))?);
                        }
                    }
                }
            }
            // libpq's OpenSSL still checks revocation, finds no list, and fails every
            // certificate: say so now.
            Err(error) if crls.is_empty() => {
                return Err(CoreError::Config(format!(
                    "sslcrldir {}: {error}: no revocation list for the server's certificate \
                     (libpq fails its check as well)",
                    directory.display()
                )))
            }
            Err(_) => {}
        }
    }
    Ok(Some(crls))
}

fn read_certificates(path: &Path) -> CoreResult<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| tls_file_error(path, error))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| tls_file_error(path, error))?;
    if certificates.is_empty() {
        return Err(tls_file_error(path, "no PEM certificate in it"));
    }
    Ok(certificates)
}

/// The client's private key, with libpq's checks and words: it must exist, be a regular
/// file, and not be open to others (see [`check_key_file`]).
fn read_private_key(path: &Path) -> CoreResult<PrivateKeyDer<'static>> {
    let metadata = std::fs::metadata(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            CoreError::Config(format!(
                "certificate present, but not private key file \"{}\"",
                path.display()
            ))
        } else {
            key_error(path, "could not stat private key file", error)
        }
    })?;
    check_key_file(path, &metadata)?;
    let pem = std::fs::read(path)
        .map_err(|error| key_error(path, "could not load private key file", error))?;
    if is_encrypted_pem(&pem) {
        return Err(CoreError::Config(format!(
            "private key file \"{0}\" is encrypted: encrypted private keys are not supported \
             (nor is sslpassword); decrypt it with `openssl pkey -in {0} -out <decrypted \
             file>`, keep that file private (chmod 0600) and name it in sslkey",
            path.display()
        )));
    }
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|error| key_error(path, "could not load private key file", error))
}

/// libpq's rule for the private key file: a regular file; owned by root, at most
/// `u=rw,g=r` (0640), so that a group can share a system-wide key; else at most `u=rw`
/// (0600). libpq refuses it otherwise, whatever the sslmode.
fn check_key_file(path: &Path, metadata: &std::fs::Metadata) -> CoreResult<()> {
    if !metadata.is_file() {
        return Err(CoreError::Config(format!(
            "private key file \"{}\" is not a regular file",
            path.display()
        )));
    }
    let open_to_others = if metadata.uid() == 0 {
        // group write or execute, any access by others
        metadata.mode() & 0o037
    } else {
        // any access by the group or others
        metadata.mode() & 0o077
    };
    if open_to_others != 0 {
        return Err(CoreError::Config(format!(
            "private key file \"{}\" has group or world access; file must have permissions \
             u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) \
             or less if owned by root",
            path.display()
        )));
    }
    Ok(())
}

/// A PEM key that OpenSSL would ask a password for: PKCS#8 `ENCRYPTED PRIVATE KEY`, or a
/// traditional key with `Proc-Type: 4,ENCRYPTED`.
fn is_encrypted_pem(pem: &[u8]) -> bool {
    let contains = |needle: &[u8]| pem.windows(needle.len()).any(|window| window == needle);
    contains(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || contains(b"Proc-Type: 4,ENCRYPTED")
}

/// libpq checks that the certificate and the key go together; rustls' own check parses
/// the certificate with webpki, which refuses X.509 v1, so that case compares the
/// certificate's public key itself.
fn check_key_matches(certified: &CertifiedKey, key_path: &Path) -> CoreResult<()> {
    let mismatch = || {
        CoreError::Config(format!(
            "certificate does not match private key file \"{}\"",
            key_path.display()
        ))
    };
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(mismatch()),
        Err(_) => {
            let Some(key_spki) = certified.key.public_key() else {
                return Ok(());
            };
            let certificate = certified.cert.first().map(|c| c.as_ref()).unwrap_or(&[]);
            match subject_public_key_info(certificate) {
                Some(spki) if spki == key_spki.as_ref() => Ok(()),
                Some(_) => Err(mismatch()),
                None => Err(CoreError::Config(format!(
                    "could not read the client certificate (key file \"{}\")",
                    key_path.display()
                ))),
            }
        }
    }
}

/// One DER element of a byte string.
struct DerElement<'a> {
    tag: u8,
    /// The element itself, tag and length included.
    whole: &'a [u8],
    contents: &'a [u8],
    /// What follows it.
    after: &'a [u8],
}

fn der_element(input: &[u8]) -> Option<DerElement<'_>> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        let length = bytes
            .iter()
            .fold(0usize, |length, byte| length << 8 | usize::from(*byte));
        (length, rest)
    };
    if rest.len() < length {
        return None;
    }
    let header = input.len() - rest.len();
    let (contents, after) = rest.split_at(length);
    Some(DerElement {
        tag,
        whole: &input[..header + length],
        contents,
        after,
    })
}

/// The `subjectPublicKeyInfo` element of an X.509 certificate of any version.
fn subject_public_key_info(certificate: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const VERSION: u8 = 0xa0; // [0] EXPLICIT, absent in v1
    let certificate = der_element(certificate)?.contents;
    let mut fields = der_element(certificate)?.contents;
    if fields.first() == Some(&VERSION) {
        fields = der_element(fields)?.after;
    }
    // serialNumber, signature, issuer, validity, subject
    for _ in 0..5 {
        fields = der_element(fields)?.after;
    }
    let spki = der_element(fields)?;
    (spki.tag == SEQUENCE).then_some(spki.whole)
}

fn tls_file_error(path: &Path, error: impl std::fmt::Display) -> CoreError {
    CoreError::Config(format!("TLS file {}: {error}", path.display()))
}

fn key_error(path: &Path, what: &str, error: impl std::fmt::Display) -> CoreError {
    CoreError::Config(format!("{what} \"{}\": {error}", path.display()))
}

/// `allow` / `prefer` / `require` without a root certificate: encrypted, not authenticated
/// (libpq does the same). The handshake signatures are still checked.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first, the name last: a name error means the chain is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn settings(conninfo: &str) -> CoreResult<TlsSettings> {
        TlsSettings::with_home(&ConnectionParams::from_key_values(conninfo)?, None)
    }

    fn settings_in(conninfo: &str, home: &Path) -> TlsSettings {
        ConnectionParams::from_key_values(conninfo)
            .and_then(|params| TlsSettings::with_home(&params, Some(home.to_path_buf())))
            .unwrap_or_else(|error| panic!("{conninfo}: {error}"))
    }

    /// A directory of the test's own, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let path = std::env::temp_dir().join(format!(
                "fw-tls-{name}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_nanos())
                    .unwrap_or_default()
            ));
            std::fs::create_dir_all(&path).unwrap_or_else(|error| panic!("{error}"));
            Scratch(path)
        }

        fn write(&self, relative: &str, text: &str, mode: u32) -> PathBuf {
            let path = self.0.join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).unwrap_or_else(|error| panic!("{error}"));
            }
            std::fs::write(&path, text).unwrap_or_else(|error| panic!("{error}"));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .unwrap_or_else(|error| panic!("{error}"));
            path
        }

        fn openssl(&self, args: &[&str]) {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(&self.0)
                .output()
                .unwrap_or_else(|error| panic!("openssl (needed by this test): {error}"));
            assert!(output.status.success(), "openssl {args:?}: {output:?}");
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A CA, a key, an X.509 v1 and a v3 certificate for it, another key, and the key
    /// encrypted (PKCS#8 and OpenSSL's traditional form).
    fn client_files(scratch: &Scratch) {
        for args in [
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "ca.key",
            ][..],
            &[
                "req", "-x509", "-new", "-key", "ca.key", "-out", "ca.crt", "-days", "2", "-subj",
                "/CN=ca",
            ],
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "client.key",
            ],
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "other.key",
            ],
            &[
                "req",
                "-new",
                "-key",
                "client.key",
                "-out",
                "client.csr",
                "-subj",
                "/CN=postgres",
            ],
            // No extensions: OpenSSL makes a version 1 certificate.
            &[
                "x509",
                "-req",
                "-in",
                "client.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                "v1.crt",
            ],
            &[
                "x509",
                "-req",
                "-in",
                "client.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "v3.ext",
                "-out",
                "v3.crt",
            ],
            &[
                "pkey",
                "-in",
                "client.key",
                "-aes256",
                "-passout",
                "pass:secret",
                "-out",
                "pkcs8.key",
            ],
            &[
                "ec",
                "-in",
                "client.key",
                "-aes256",
                "-passout",
                "pass:secret",
                "-out",
                "traditional.key",
            ],
        ] {
            if args[0] == "x509" && args.contains(&"v3.ext") {
                scratch.write(
                    "v3.ext",
                    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n",
                    0o644,
                );
            }
            scratch.openssl(args);
        }
        for key in ["client.key", "other.key", "pkcs8.key", "traditional.key"] {
            let path = scratch.0.join(key);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .unwrap_or_else(|error| panic!("{error}"));
        }
    }

    fn client_settings(scratch: &Scratch, cert: &str, key: &str) -> TlsSettings {
        TlsSettings {
            mode: SslMode::Require,
            client_cert: Some(scratch.0.join(cert)),
            client_key: Some(scratch.0.join(key)),
            ..TlsSettings::default()
        }
    }

    fn config_error(result: CoreResult<MakeRustlsConnect>) -> String {
        match result {
            Err(CoreError::Config(message)) => message,
            Err(other) => panic!("not a configuration error: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn libpq_tls_keywords_become_settings() {
        let tls = settings(
            "sslmode=verify-full sslrootcert='/a b/ca.pem' sslcrl=/c.crl sslsni=0 \
             ssl_min_protocol_version=TLSv1.3",
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(RootCerts::File("/a b/ca.pem".into())));
        assert_eq!(tls.crl_file, Some(PathBuf::from("/c.crl")));
        assert!(!tls.sni);
        assert_eq!(tls.min_version, TlsVersion::Tls13);
        let tls = settings("sslmode=verify-full sslrootcert=system").unwrap_or_default();
        assert_eq!(tls.root_cert, Some(RootCerts::System));
    }

    #[test]
    fn bad_tls_settings_are_config_errors() {
        for conninfo in [
            "sslmode=sometimes",
            "sslmode=require sslrootcert=system",
            "ssl_max_protocol_version=TLSv1.1",
            "ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2",
            "sslsni=2",
        ] {
            assert!(
                matches!(settings(conninfo), Err(CoreError::Config(_))),
                "{conninfo}"
            );
        }
        let tls = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some(RootCerts::File(PathBuf::from("/nonexistent/ca.pem"))),
            ..TlsSettings::default()
        };
        assert!(matches!(connector(&tls), Err(CoreError::Config(_))));
    }

    #[test]
    fn the_home_directory_is_home_else_the_user_database_entry() {
        let passwd = || Some(PathBuf::from("/from/passwd"));
        assert_eq!(
            home_from(Some("/from/env".into()), passwd),
            Some(PathBuf::from("/from/env"))
        );
        // Unset or empty: libpq asks the user database.
        assert_eq!(home_from(None, passwd), Some(PathBuf::from("/from/passwd")));
        assert_eq!(
            home_from(Some(OsString::new()), passwd),
            Some(PathBuf::from("/from/passwd"))
        );
        assert_eq!(home_from(None, || None), None);
    }

    #[test]
    fn the_user_database_entry_is_the_effective_users() {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() }.to_string();
        let output = Command::new("getent")
            .args(["passwd", &uid])
            .output()
            .unwrap_or_else(|error| panic!("getent: {error}"));
        let line = String::from_utf8_lossy(&output.stdout);
        let expected = line.trim_end().split(':').nth(5).map(PathBuf::from);
        assert!(
            expected.is_some(),
            "no passwd entry for uid {uid}: {line:?}"
        );
        assert_eq!(passwd_home(), expected);
    }

    #[test]
    fn default_files_come_from_the_home_directory_given() {
        let home = Scratch::new("home");
        let tls = settings_in("sslmode=require", &home.0);
        assert_eq!(tls.root_cert, None);
        assert_eq!(tls.client_cert, None);
        assert_eq!(tls.crl_file, Some(home.0.join(".postgresql/root.crl")));
        let root = home.write(".postgresql/root.crt", "", 0o644);
        let cert = home.write(".postgresql/postgresql.crt", "", 0o644);
        let tls = settings_in("sslmode=require", &home.0);
        assert_eq!(tls.root_cert, Some(RootCerts::File(root)));
        assert_eq!(tls.client_cert, Some(cert));
        assert_eq!(
            tls.client_key,
            Some(home.0.join(".postgresql/postgresql.key"))
        );
        // A certificate path through a regular file (ENOTDIR): no certificate, as libpq.
        let tls = settings_in(
            &format!(
                "sslcert={}/postgresql.crt/x",
                home.0.join(".postgresql").display()
            ),
            &home.0,
        );
        assert_eq!(tls.client_cert, None);
        // sslcrldir replaces the default list file; sslcertmode=disable, the certificate.
        let tls = settings_in("sslcrldir=/d sslcertmode=disable", &home.0);
        assert_eq!((tls.crl_file, tls.client_cert), (None, None));
    }

    #[test]
    fn missing_files_are_ignored_where_libpq_ignores_them() {
        let home = Scratch::new("missing");
        for mode in ["allow", "prefer", "require"] {
            let tls = settings_in(
                &format!("sslmode={mode} sslrootcert=/nonexistent/root.crt sslcert=/nonexistent/c.crt sslkey=/nonexistent/c.key"),
                &home.0,
            );
            assert_eq!((&tls.root_cert, &tls.client_cert), (&None, &None), "{mode}");
        }
        for mode in ["verify-ca", "verify-full"] {
            let tls = settings_in(
                &format!("sslmode={mode} sslrootcert=/nonexistent/root.crt"),
                &home.0,
            );
            assert!(tls.root_cert.is_some(), "{mode}");
            assert!(connector(&tls).is_err(), "{mode}");
        }
        // A revocation list file that does not exist: no revocation check, as libpq.
        let root = Scratch::new("root");
        client_files(&root);
        let tls = TlsSettings {
            mode: SslMode::VerifyCa,
            root_cert: Some(RootCerts::File(root.0.join("ca.crt"))),
            crl_file: Some(PathBuf::from("/nonexistent/root.crl")),
            ..TlsSettings::default()
        };
        assert!(connector(&tls).is_ok());
        // A directory of lists that does not exist: libpq fails every certificate.
        let tls = TlsSettings {
            crl_file: None,
            crl_dir: Some(PathBuf::from("/nonexistent/crls")),
            ..tls
        };
        assert!(config_error(connector(&tls)).contains("no revocation list"));
    }

    #[test]
    fn the_key_file_must_not_be_open_to_others_as_in_libpq() {
        let scratch = Scratch::new("modes");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        for (mode, accepted_as_owner, accepted_as_root) in [
            (0o600, true, true),
            (0o400, true, true),
            (0o640, false, true),
            (0o660, false, false),
            (0o604, false, false),
            (0o644, false, false),
            (0o700, true, true),
            (0o610, false, false),
        ] {
            let path = scratch.write(&format!("{mode:o}.key"), "", mode);
            let metadata = std::fs::metadata(&path).unwrap_or_else(|error| panic!("{error}"));
            let expected = if root {
                accepted_as_root
            } else {
                accepted_as_owner
            };
            let result = check_key_file(&path, &metadata);
            assert_eq!(result.is_ok(), expected, "{mode:o}: {result:?}");
            if let Err(error) = result {
                assert!(
                    error.to_string().contains("has group or world access"),
                    "{error}"
                );
            }
        }
        let directory = std::fs::metadata(&scratch.0).unwrap_or_else(|error| panic!("{error}"));
        assert!(check_key_file(&scratch.0, &directory).is_err());
    }

    #[test]
    fn client_certificates_of_x509_v1_are_accepted_and_must_match_their_key() {
        let scratch = Scratch::new("client");
        client_files(&scratch);
        assert!(connector(&client_settings(&scratch, "v3.crt", "client.key")).is_ok());
        assert!(connector(&client_settings(&scratch, "v1.crt", "client.key")).is_ok());
        for cert in ["v1.crt", "v3.crt"] {
            let message = config_error(connector(&client_settings(&scratch, cert, "other.key")));
            assert!(
                message.contains("certificate does not match private key file"),
                "{message}"
            );
        }
        let message = config_error(connector(&client_settings(
            &scratch,
            "v1.crt",
            "absent.key",
        )));
        assert!(
            message.contains("certificate present, but not private key file"),
            "{message}"
        );
        std::fs::set_permissions(
            scratch.0.join("client.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap_or_else(|error| panic!("{error}"));
        let message = config_error(connector(&client_settings(
            &scratch,
            "v1.crt",
            "client.key",
        )));
        assert!(message.contains("has group or world access"), "{message}");
    }

    #[test]
    fn an_encrypted_key_is_refused_with_how_to_decrypt_it() {
        let scratch = Scratch::new("encrypted");
        client_files(&scratch);
        for key in ["pkcs8.key", "traditional.key"] {
            let message = config_error(connector(&client_settings(&scratch, "v3.crt", key)));
            assert!(
                message.contains("encrypted private keys are not supported")
                    && message.contains("openssl pkey -in"),
                "{key}: {message}"
            );
        }
    }

    #[test]
    fn the_subject_public_key_info_is_found_in_v1_and_v3_certificates() {
        let scratch = Scratch::new("spki");
        client_files(&scratch);
        let key = PrivateKeyDer::from_pem_file(scratch.0.join("client.key"))
            .unwrap_or_else(|error| panic!("{error}"));
        let provider = rustls::crypto::ring::default_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .unwrap_or_else(|error| panic!("{error}"));
        let expected = signing_key
            .public_key()
            .unwrap_or_else(|| panic!("no public key"));
        for cert in ["v1.crt", "v3.crt"] {
            let chain = read_certificates(&scratch.0.join(cert)).unwrap_or_default();
            assert_eq!(
                chain
                    .first()
                    .and_then(|c| subject_public_key_info(c.as_ref())),
                Some(expected.as_ref()),
                "{cert}"
            );
        }
        assert_eq!(subject_public_key_info(&[0x30, 0x05, 0x01]), None);
    }
}
