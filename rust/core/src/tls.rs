//! TLS for the core's connections, with libpq's `sslmode` meanings, over rustls.
//!
//! tokio-postgres itself only knows `disable` / `prefer` / `require` and no certificate
//! settings, so the libpq TLS keys (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) are taken
//! out of the connection string here, before tokio-postgres parses the rest:
//!
//! - `disable`: plaintext only.
//! - `allow`, `prefer` (libpq's default), `require`: TLS when the server offers it (required
//!   for `require`), the certificate not checked, unless a root certificate is given
//!   (`sslrootcert`, or `~/.postgresql/root.crt` as libpq), which makes it `verify-ca`.
//! - `verify-ca`: the server's chain must lead to a root of `sslrootcert`.
//! - `verify-full`: that, and the certificate must name the host connected to.
//!
//! `sslcert` + `sslkey`: a client certificate. The crypto provider is `ring`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode as ProtocolSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::errors::{CoreError, CoreResult};

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

    /// What tokio-postgres is told: whether to ask for TLS and whether it is required.
    pub fn protocol(self) -> ProtocolSslMode {
        match self {
            SslMode::Disable => ProtocolSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => ProtocolSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => ProtocolSslMode::Require,
        }
    }
}

/// The TLS keys of a connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            mode: SslMode::Prefer,
            root_cert: None,
            client_cert: None,
            client_key: None,
        }
    }
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Split a libpq connection string (`key=value ...` or a `postgres://` URL) into the TLS
/// settings and the rest, for tokio-postgres.
pub fn split_tls_settings(conninfo: &str) -> CoreResult<(String, TlsSettings)> {
    let trimmed = conninfo.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        split_url(trimmed)
    } else {
        split_key_values(conninfo)
    }
}

fn apply(settings: &mut TlsSettings, key: &str, value: String) -> CoreResult<()> {
    match key {
        "sslmode" => settings.mode = SslMode::parse(&value)?,
        "sslrootcert" => settings.root_cert = Some(PathBuf::from(value)),
        "sslcert" => settings.client_cert = Some(PathBuf::from(value)),
        "sslkey" => settings.client_key = Some(PathBuf::from(value)),
        _ => {}
    }
    Ok(())
}

fn split_key_values(conninfo: &str) -> CoreResult<(String, TlsSettings)> {
    let mut settings = TlsSettings::default();
    let mut rest = Vec::new();
    for (key, value) in parse_key_values(conninfo)? {
        if TLS_KEYS.contains(&key.as_str()) {
            apply(&mut settings, &key, value)?;
        } else {
            let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
            rest.push(format!("{key}='{escaped}'"));
        }
    }
    Ok((rest.join(" "), settings))
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

fn split_url(url: &str) -> CoreResult<(String, TlsSettings)> {
    let mut settings = TlsSettings::default();
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), settings));
    };
    let mut kept = Vec::new();
    for parameter in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        let key = percent_decode(key)?;
        if TLS_KEYS.contains(&key.as_str()) {
            apply(&mut settings, &key, percent_decode(value)?)?;
        } else {
            kept.push(parameter);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, settings))
}

fn percent_decode(text: &str) -> CoreResult<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' && index + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
            match u8::from_str_radix(hex, 16) {
                Ok(byte) => {
                    out.push(byte);
                    index += 3;
                    continue;
                }
                Err(_) => return Err(CoreError::Config("invalid percent-encoding in URL".into())),
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8(out).map_err(|_| CoreError::Config("invalid UTF-8 in URL".into()))
}

/// The rustls connector for these settings. Certificates are read here, once.
pub fn connector(settings: &TlsSettings) -> CoreResult<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let root_cert = settings.root_cert.clone().or_else(default_root_cert);
    let verify = match settings.mode {
        SslMode::VerifyCa | SslMode::VerifyFull => Some(settings.mode),
        // libpq: with a root certificate at hand, `require` (and `prefer`) verify the chain.
        _ if root_cert.is_some() => Some(SslMode::VerifyCa),
        _ => None,
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| CoreError::Config(format!("TLS setup: {error}")))?;
    let builder = match verify {
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider))),
        Some(mode) => {
            let Some(path) = root_cert else {
                return Err(CoreError::Config(format!(
                    "sslmode={} needs a root certificate: set sslrootcert (no {})",
                    if mode == SslMode::VerifyFull {
                        "verify-full"
                    } else {
                        "verify-ca"
                    },
                    default_root_cert_path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "~/.postgresql/root.crt".into())
                )));
            };
            let mut roots = RootCertStore::empty();
            for certificate in read_certificates(&path)? {
                roots
                    .add(certificate)
                    .map_err(|error| tls_file_error(&path, error))?;
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| tls_file_error(&path, error))?;
            if mode == SslMode::VerifyFull {
                builder.with_webpki_verifier(webpki)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            }
        }
    };
    let config = match (&settings.client_cert, &settings.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let chain = read_certificates(cert_path)?;
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|error| tls_file_error(key_path, error))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| tls_file_error(cert_path, error))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(CoreError::Config(
                "sslcert and sslkey go together (a client certificate needs its key)".into(),
            ))
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

fn default_root_cert_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".postgresql/root.crt"))
}

fn default_root_cert() -> Option<PathBuf> {
    default_root_cert_path().filter(|path| path.is_file())
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

fn tls_file_error(path: &Path, error: impl std::fmt::Display) -> CoreError {
    CoreError::Config(format!("TLS file {}: {error}", path.display()))
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

    #[test]
    fn key_value_strings_lose_their_tls_keys() {
        let (rest, settings) = split_tls_settings(
            "host=db port = 5433 password='it\\'s q' sslmode=verify-full sslrootcert='/a b/ca.pem'",
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(settings.mode, SslMode::VerifyFull);
        assert_eq!(settings.root_cert, Some(PathBuf::from("/a b/ca.pem")));
        assert!(!rest.contains("ssl"));
        let parsed: tokio_postgres::Config = rest.parse().unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(parsed.get_password(), Some(&b"it's q"[..]));
        assert_eq!(parsed.get_ports(), &[5433]);
    }

    #[test]
    fn urls_lose_their_tls_keys() {
        let (rest, settings) = split_tls_settings(
            "postgresql://u:p@h:5/d?sslmode=require&application_name=x&sslrootcert=%2Fca.pem",
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(rest, "postgresql://u:p@h:5/d?application_name=x");
        assert_eq!(settings.mode, SslMode::Require);
        assert_eq!(settings.root_cert, Some(PathBuf::from("/ca.pem")));
        let (rest, settings) =
            split_tls_settings("postgres://h/d").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (rest.as_str(), settings.mode),
            ("postgres://h/d", SslMode::Prefer)
        );
    }

    #[test]
    fn bad_tls_settings_are_config_errors() {
        assert!(matches!(
            split_tls_settings("sslmode=sometimes"),
            Err(CoreError::Config(_))
        ));
        assert!(matches!(
            split_tls_settings("host='x"),
            Err(CoreError::Config(_))
        ));
        let settings = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..TlsSettings::default()
        };
        assert!(matches!(connector(&settings), Err(CoreError::Config(_))));
    }
}
