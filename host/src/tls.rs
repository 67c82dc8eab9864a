//! TLS to the broker with rustls and the ring provider: the CA that signs
//! the broker's certificate, an optional client certificate for mutual TLS,
//! and errors that name the file or the host and the fix.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::config::TlsConfig;

/// A TLS file or setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read {path}: {source}")]
    Unreadable {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {expected}")]
    NoPem {
        key: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{path} is not valid PEM: {problem}")]
    Malformed {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("no trusted root certificates: {problem}")]
    NoRoots { problem: String },
    #[error("the client certificate and key do not fit together: {problem}")]
    ClientAuth { problem: String },
}

impl TlsFileError {
    /// Returns the key of `[mqtt.tls]` that the problem belongs to.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Unreadable { key, .. }
            | Self::NoPem { key, .. }
            | Self::Malformed { key, .. } => key,
            Self::NoRoots { .. } => "ca_file",
            Self::ClientAuth { .. } => "client_key_file",
        }
    }

    /// Returns what the operator should do about it.
    pub fn fix(&self) -> &'static str {
        match self {
            Self::Unreadable { .. } => "check the path and that the host's user may read the file",
            Self::NoPem { .. } | Self::Malformed { .. } => {
                "give a PEM file (-----BEGIN ...-----); convert DER with `openssl x509 -inform der` or `openssl pkey -inform der`"
            }
            Self::NoRoots { .. } => "set mqtt.tls.ca_file to the PEM file of the CA that signed the broker's certificate",
            Self::ClientAuth { .. } => {
                "give the private key that belongs to mqtt.tls.client_cert_file, as PKCS#8, PKCS#1 or SEC1 PEM"
            }
        }
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Unreadable {
        key,
        path: path.to_owned(),
        source,
    })
}

fn certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let bytes = read(key, path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError::Malformed {
            key,
            path: path.to_owned(),
            problem: e.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsFileError::NoPem {
            key,
            path: path.to_owned(),
            expected: "certificate (-----BEGIN CERTIFICATE-----)",
        });
    }
    Ok(certificates)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    const KEY: &str = "client_key_file";
    let bytes = read(KEY, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsFileError::NoPem {
            key: KEY,
            path: path.to_owned(),
            expected:
                "private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)",
        },
        other => TlsFileError::Malformed {
            key: KEY,
            path: path.to_owned(),
            problem: other.to_string(),
        },
    })
}

/// Builds the rustls client configuration for `tls`, reading every file it
/// names. File paths must already be resolved.
///
/// # Errors
///
/// Returns the first file that cannot be read or parsed, or a client key
/// that does not fit its certificate.
pub fn client_config(tls: &TlsConfig) -> Result<Arc<ClientConfig>, TlsFileError> {
    // rustls 0.23.48 deprecates its ring provider because ring has no
    // post-quantum key exchange; aws-lc-rs has, but needs cmake and a C
    // toolchain to build. Classical key exchange is what MQTT brokers
    // offer today.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for certificate in certificates("ca_file", path)? {
                roots
                    .add(certificate)
                    .map_err(|e| TlsFileError::Malformed {
                        key: "ca_file",
                        path: path.to_owned(),
                        problem: format!("not a usable CA certificate: {e}"),
                    })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(TlsFileError::NoRoots {
                    problem: format!(
                        "the operating system's certificate store is empty or unreadable ({} errors)",
                        native.errors.len()
                    ),
                });
            }
        }
    }

    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsFileError::NoRoots {
            problem: e.to_string(),
        })?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = match &tls.server_name {
        Some(name) => {
            let name =
                ServerName::try_from(name.clone()).map_err(|e| TlsFileError::ClientAuth {
                    problem: format!("server_name \"{name}\": {e}"),
                })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NameOverride {
                    inner: verifier,
                    name,
                }))
        }
        None => builder.with_webpki_verifier(verifier),
    };
    let config = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certificates("client_cert_file", cert)?, private_key(key)?)
            .map_err(|e| TlsFileError::ClientAuth {
                problem: e.to_string(),
            })?,
        // Validation rejects one without the other.
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Verifies the broker's certificate against a configured name instead of
/// the host that was dialled. Everything else (chain, expiry, signatures)
/// is the standard WebPKI verification.
#[derive(Debug)]
struct NameOverride {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NameOverride {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Finds the rustls error inside an error chain from rumqttc, which wraps
/// it in an I/O error.
pub fn find_rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if let Some(found) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return Some(found);
            }
        }
        current = error.source();
    }
    None
}

/// Explains a failed TLS handshake with `host:port` as a sentence that
/// names the cause and the fix, or `None` when it is not a certificate
/// problem (for example a reset connection, which is worth retrying).
pub fn explain(error: &rustls::Error, host: &str, port: u16, tls: &TlsConfig) -> Option<String> {
    let ca = match &tls.ca_file {
        Some(path) => format!("mqtt.tls.ca_file ({})", path.display()),
        None => "the operating system's trusted roots (mqtt.tls.ca_file is not set)".to_owned(),
    };
    let checked_name = tls.server_name.as_deref().unwrap_or(host);
    let host = format!("{host}:{port}");
    let text = match error {
        rustls::Error::InvalidCertificate(problem) => match problem {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "the certificate of broker {host} is not signed by a CA in {ca}; set mqtt.tls.ca_file to the CA that signed the broker's certificate"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "the certificate of broker {host} has expired ({problem}); renew the broker's certificate, and check the clocks of both machines"
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
                "the certificate of broker {host} is not valid yet ({problem}); check the clocks of both machines"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "the certificate of broker {host} is not valid for the name \"{checked_name}\" ({problem}); connect by a name the certificate holds, or set mqtt.tls.server_name to it"
            ),
            other => format!(
                "the certificate of broker {host} was rejected: {other}; check it against {ca}"
            ),
        },
        rustls::Error::AlertReceived(alert) => format!(
            "broker {host} ended the TLS handshake with the alert {alert:?}; it may require a client certificate (mqtt.tls.client_cert_file and client_key_file) or reject the one given"
        ),
        rustls::Error::InvalidCertRevocationList(_) | rustls::Error::NoCertificatesPresented => format!(
            "broker {host} presented no usable certificate: {error}"
        ),
        _ => return None,
    };
    Some(text)
}
