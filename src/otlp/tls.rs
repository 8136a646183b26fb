//! TLS to the OTLP collector (`otlp.tls`): one rustls client configuration from PEM files,
//! used by the HTTPS connector of both protocols (HTTP/1.1 for OTLP/HTTP, h2 for gRPC).
//! Every file is read and checked when the exporter starts; a bad one refuses the start and
//! the message names it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Deserialize;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// `otlp.tls`. Its presence turns TLS on (an empty endpoint then defaults to `https://`);
/// an `https://` endpoint without it uses the system's CA certificates.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsCfg {
    /// PEM CA certificates that sign the collector's certificate; none: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and its private key, for collectors that require mTLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the collector's certificate must carry, instead of the endpoint's host (for
    /// an endpoint given by IP address, or a collector behind a differently named address).
    pub server_name: Option<String>,
    /// Accept any certificate: encrypted, but open to whoever sits on the path. Tests only.
    pub insecure_skip_verify: bool,
}

impl TlsCfg {
    /// Checks what can be checked without reading the files.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.cert_file.is_some() == self.key_file.is_some(),
            "otlp.tls.cert_file and otlp.tls.key_file go together (the client certificate for mTLS)"
        );
        if let Some(n) = &self.server_name {
            ServerName::try_from(n.as_str()).map_err(|_| {
                anyhow::anyhow!("otlp.tls.server_name {n:?}: not a DNS name or IP address")
            })?;
        }
        Ok(())
    }

    /// The client configuration: roots, verifier and client certificate, from the files.
    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        self.validate()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = if self.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        } else {
            builder.with_root_certificates(self.roots()?)
        };
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "otlp.tls.cert_file")?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    anyhow::anyhow!(
                        "otlp.tls.key_file {}: no PEM private key ({e})",
                        key.display()
                    )
                })?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    anyhow::anyhow!(
                        "otlp.tls.cert_file {} and otlp.tls.key_file {} do not make a certificate and its key: {e}",
                        cert.display(),
                        key.display()
                    )
                })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }

    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(ca) => {
                for c in read_certs(ca, "otlp.tls.ca_file")? {
                    roots.add(c).map_err(|e| {
                        anyhow::anyhow!(
                            "otlp.tls.ca_file {}: not a CA certificate: {e}",
                            ca.display()
                        )
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    bail!(
                        "an https:// OTLP endpoint without otlp.tls.ca_file needs the system's CA \
                         certificates, and none were found ({} errors): set otlp.tls.ca_file",
                        found.errors.len()
                    );
                }
            }
        }
        Ok(roots)
    }

    /// The connector for one protocol: `h2` only for gRPC, HTTP/1.1 for OTLP/HTTP. `http://`
    /// URIs pass through in clear text; without `https` no file is read and nothing trusted.
    pub fn connector(&self, h2: bool, https: bool) -> Result<HttpsConnector<HttpConnector>> {
        let cfg = if https {
            self.client_config()?
        } else {
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth()
        };
        if https && self.insecure_skip_verify {
            tracing::warn!(
                "otlp.tls.insecure_skip_verify is on: the collector's certificate is NOT checked; \
                 anyone on the network path can read and change the exported traces"
            );
        }
        let b = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(cfg)
            .https_or_http();
        let b = match &self.server_name {
            Some(n) => {
                let name = ServerName::try_from(n.clone()).map_err(|_| {
                    anyhow::anyhow!("otlp.tls.server_name {n:?}: not a DNS name or IP address")
                })?;
                b.with_server_name_resolver(FixedServerNameResolver::new(name))
            }
            None => b,
        };
        Ok(if h2 {
            b.enable_http2().build()
        } else {
            b.enable_http1().build()
        })
    }
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>> {
    // Read first: a missing file says so, rather than "no certificate".
    let pem = std::fs::read(path).with_context(|| format!("reading {key} {}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{key} {}: not PEM ({e})", path.display()))?;
    if certs.is_empty() {
        bail!("{key} {}: no PEM certificate in it", path.display());
    }
    Ok(certs)
}

/// `insecure_skip_verify`: any certificate is accepted, but the handshake's signatures are
/// still checked (the peer holds the key of the certificate it sent).
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
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
        verify_tls12_signature(
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
        verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_and_key_go_together_and_names_are_checked() {
        let c = TlsCfg {
            cert_file: Some("/c.pem".into()),
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("go together"));
        let c = TlsCfg {
            server_name: Some("bad name!".into()),
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("server_name"));
        let c = TlsCfg {
            server_name: Some("collector.example".into()),
            ..Default::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = std::env::temp_dir().join(format!("llmslo-otlp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        for (c, says) in [
            (
                TlsCfg {
                    ca_file: Some(missing.clone()),
                    ..Default::default()
                },
                format!("otlp.tls.ca_file {}", missing.display()),
            ),
            (
                TlsCfg {
                    ca_file: Some(not_pem.clone()),
                    ..Default::default()
                },
                format!("otlp.tls.ca_file {}: no PEM certificate", not_pem.display()),
            ),
        ] {
            let e = format!("{:#}", c.client_config().unwrap_err());
            assert!(e.contains(&says), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
