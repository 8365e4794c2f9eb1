//! TLS for the core's connections, with libpq's meanings, over rustls.
//!
//! tokio-postgres itself only knows `disable` / `prefer` / `require` and no certificate
//! settings, so libpq's TLS keywords are honoured here:
//!
//! - `sslmode`: `disable`: plaintext only. `allow`, `prefer` (libpq's default), `require`:
//!   TLS when the server offers it (required for `require`), the certificate not checked,
//!   unless a root certificate is at hand (`sslrootcert`, or `~/.postgresql/root.crt` as
//!   libpq), which makes it `verify-ca`. `verify-ca`: the server's chain must lead to a
//!   root of `sslrootcert`. `verify-full`: that, and the certificate must name the host.
//! - `sslrootcert=system`: the platform's trust store (libpq 16), `verify-full` only.
//! - `sslcrl`, `sslcrldir` (or `~/.postgresql/root.crl`): revocation lists, checked for the
//!   whole chain as libpq's OpenSSL setting does.
//! - `sslcert` + `sslkey` (or `~/.postgresql/postgresql.crt` / `.key`): a client
//!   certificate, unless `sslcertmode=disable`.
//! - `sslsni`, `ssl_min_protocol_version`, `ssl_max_protocol_version` (TLS 1.2 and 1.3).
//!
//! Unix-domain sockets never use TLS, as in libpq. The crypto provider is `ring`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode as ProtocolSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

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

    /// What tokio-postgres is told: whether to ask for TLS and whether it is required.
    pub fn protocol(self) -> ProtocolSslMode {
        match self {
            SslMode::Disable => ProtocolSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => ProtocolSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => ProtocolSslMode::Require,
        }
    }
}

/// The TLS settings of the connection parameters, with libpq's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<RootCerts>,
    /// Certificate revocation lists (`sslcrl`, every file of `sslcrldir`).
    pub crls: Vec<PathBuf>,
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
            crls: Vec::new(),
            client_cert: None,
            client_key: None,
            sni: true,
            min_version: TlsVersion::Tls12,
            max_version: TlsVersion::Tls13,
        }
    }
}

impl TlsSettings {
    /// libpq's TLS keywords, with libpq's defaults for what is not given: the root
    /// certificate, the revocation list and the client certificate and key in
    /// `~/.postgresql/` when those files exist.
    pub fn from_params(params: &ConnectionParams) -> CoreResult<TlsSettings> {
        let mode = match params.sslmode.as_deref() {
            None | Some("") => SslMode::Prefer,
            Some(mode) => SslMode::parse(mode)?,
        };
        let root_cert = match params.sslrootcert.as_deref() {
            Some("system") => Some(RootCerts::System),
            Some(path) if !path.is_empty() => Some(RootCerts::File(PathBuf::from(path))),
            _ => default_file("root.crt").map(RootCerts::File),
        };
        if root_cert == Some(RootCerts::System) && mode != SslMode::VerifyFull {
            return Err(CoreError::Config(format!(
                "weak sslmode {:?} may not be used with sslrootcert=system (use \"verify-full\")",
                params.sslmode.as_deref().unwrap_or("prefer")
            )));
        }
        let mut crls = Vec::new();
        match params.sslcrl.as_deref() {
            Some(path) if !path.is_empty() => crls.push(PathBuf::from(path)),
            _ => crls.extend(default_file("root.crl")),
        }
        if let Some(directory) = params.sslcrldir.as_deref().filter(|d| !d.is_empty()) {
            let entries = std::fs::read_dir(directory)
                .map_err(|error| tls_file_error(Path::new(directory), error))?;
            for entry in entries {
                let path = entry
                    .map_err(|error| tls_file_error(Path::new(directory), error))?
                    .path();
                if path.is_file() {
                    crls.push(path);
                }
            }
        }
        let (client_cert, client_key) = if params.sslcertmode.as_deref() == Some("disable") {
            (None, None)
        } else {
            let cert = match params.sslcert.as_deref() {
                Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
                _ => default_file("postgresql.crt"),
            };
            let key = match params.sslkey.as_deref() {
                Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
                _ => default_file("postgresql.key"),
            };
            // libpq sends a certificate only with its key; a lone default file is ignored.
            match (cert, key) {
                (Some(cert), Some(key)) => (Some(cert), Some(key)),
                (Some(cert), None) if params.sslcert.is_some() => {
                    return Err(tls_file_error(&cert, "sslcert needs its key (sslkey)"))
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
            crls,
            client_cert,
            client_key,
            sni,
            min_version,
            max_version,
        })
    }
}

fn default_file(name: &str) -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(|home| Path::new(&home).join(".postgresql").join(name))
        .filter(|path| path.is_file())
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
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider))),
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
            let mut crls = Vec::new();
            for path in &settings.crls {
                for crl in CertificateRevocationListDer::pem_file_iter(path)
                    .map_err(|error| tls_file_error(path, error))?
                {
                    crls.push(crl.map_err(|error| tls_file_error(path, error))?);
                }
            }
            let mut webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider);
            if !crls.is_empty() {
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
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|error| tls_file_error(key_path, error))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| tls_file_error(cert_path, error))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.enable_sni = settings.sni;
    Ok(MakeRustlsConnect::new(config))
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

    fn settings(conninfo: &str) -> CoreResult<TlsSettings> {
        TlsSettings::from_params(&ConnectionParams::from_key_values(conninfo)?)
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
        assert_eq!(tls.crls, vec![PathBuf::from("/c.crl")]);
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
            "sslcrldir=/nonexistent/dir",
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
}
