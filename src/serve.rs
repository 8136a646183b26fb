//! The listener of `/metrics` and the JSON API: plain TCP or TLS (rustls), and the optional
//! bearer token the JSON API (and, if asked, `/metrics`) requires. `/healthz` and `/readyz`
//! stay open for the kubelet's probes. Nothing on the API changes the agent's state.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{rustls, TlsAcceptor};

/// `api` in the config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiCfg {
    /// A file holding the bearer token that `/api/v1/*` requires (trailing whitespace cut).
    pub token_file: Option<PathBuf>,
    /// Require the token on `/metrics` too (Prometheus: `authorization.credentials_file`).
    pub protect_metrics: bool,
    /// PEM certificate chain and private key: serve HTTPS instead of HTTP.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

/// What a request must carry.
#[derive(Clone, Default)]
pub struct Auth {
    token: Option<Arc<[u8]>>,
    protect_metrics: bool,
}

impl Auth {
    pub fn from_cfg(cfg: &ApiCfg) -> Result<Auth> {
        let token = match &cfg.token_file {
            None => None,
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .with_context(|| format!("reading api.token_file {}", p.display()))?;
                let t = t.trim_end();
                if t.len() < 16 {
                    bail!(
                        "api.token_file {}: a token of at least 16 characters",
                        p.display()
                    );
                }
                Some(Arc::from(t.as_bytes()))
            }
        };
        if cfg.protect_metrics && token.is_none() {
            bail!("api.protect_metrics needs api.token_file");
        }
        Ok(Auth {
            token,
            protect_metrics: cfg.protect_metrics,
        })
    }

    fn needs_token(&self, path: &str) -> bool {
        self.token.is_some()
            && (path.starts_with("/api/") || (self.protect_metrics && path == "/metrics"))
    }

    fn accepts(&self, header: Option<&[u8]>) -> bool {
        let (Some(want), Some(h)) = (self.token.as_deref(), header) else {
            return false;
        };
        let Some(got) = h.strip_prefix(b"Bearer ") else {
            return false;
        };
        // Constant time in the token's content: no early exit on the first wrong byte.
        got.len() == want.len() && got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Middleware: 401 for a protected path without the right `Authorization: Bearer` header.
pub async fn require_token(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    if auth.needs_token(req.uri().path())
        && !auth.accepts(
            req.headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
    {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required (api.token_file)\n",
        )
            .into_response();
    }
    next.run(req).await
}

/// The TLS configuration from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading api.tls_cert_file {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing api.tls_cert_file {}", cert.display()))?;
    if certs.is_empty() {
        bail!("api.tls_cert_file {}: no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading api.tls_key_file {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("api.tls_cert_file and api.tls_key_file do not make a certificate and key")?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Handshakes in flight at once, and how long one may take: a client that connects and says
/// nothing neither blocks others nor holds a slot for long.
const HANDSHAKES: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP accept + TLS handshake, each handshake in its own task; finished ones are handed to
/// axum in completion order.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(HANDSHAKES);
        let slots = Arc::new(Semaphore::new(HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp_stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, out) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp_stream)).await
                    {
                        Ok(Ok(s)) => {
                            let _ = out.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (the runtime is going down): wait to be dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(token: &str, metrics: bool) -> Auth {
        Auth {
            token: Some(Arc::from(token.as_bytes())),
            protect_metrics: metrics,
        }
    }

    #[test]
    fn the_token_guards_the_api_and_optionally_metrics_never_the_probes() {
        let a = auth("0123456789abcdef", false);
        assert!(a.needs_token("/api/v1/requests"));
        assert!(!a.needs_token("/metrics"));
        assert!(!a.needs_token("/healthz"));
        assert!(!a.needs_token("/readyz"));
        assert!(auth("0123456789abcdef", true).needs_token("/metrics"));
        assert!(!Auth::default().needs_token("/api/v1/requests"));
    }

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let a = auth("0123456789abcdef", false);
        assert!(a.accepts(Some(b"Bearer 0123456789abcdef")));
        for bad in [
            &b"Bearer 0123456789abcdeg"[..],
            b"Bearer 0123456789abcde",
            b"Bearer 0123456789abcdef0",
            b"bearer 0123456789abcdef",
            b"Basic 0123456789abcdef",
            b"0123456789abcdef",
            b"",
        ] {
            assert!(!a.accepts(Some(bad)), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(!a.accepts(None));
    }

    #[test]
    fn a_short_token_or_metrics_protection_without_a_token_is_refused() {
        let dir = std::env::temp_dir().join(format!("llmslo-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let cfg = ApiCfg {
            token_file: Some(short),
            ..Default::default()
        };
        assert!(format!("{:#}", Auth::from_cfg(&cfg).err().unwrap()).contains("16 characters"));
        let cfg = ApiCfg {
            protect_metrics: true,
            ..Default::default()
        };
        assert!(Auth::from_cfg(&cfg).is_err());
        let good = dir.join("good");
        std::fs::write(&good, "0123456789abcdef\n").unwrap();
        let cfg = ApiCfg {
            token_file: Some(good),
            ..Default::default()
        };
        assert!(Auth::from_cfg(&cfg)
            .unwrap()
            .accepts(Some(b"Bearer 0123456789abcdef")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
