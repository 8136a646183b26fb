//! TLS for the tests' peers: a throwaway PKI made with the `openssl` CLI (a CA, a server
//! certificate for `collector.test`/`localhost`/127.0.0.1, a client certificate, and a second
//! CA that signed nothing of these), and a TLS front that terminates TLS (optionally requiring
//! a client certificate) and forwards the bytes to a plain receiver.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub struct Pki {
    pub dir: PathBuf,
}

fn openssl<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(dir: &Path, args: &[S]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI (Debian: apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("llmslo-pki-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        let args = |s: String| -> Vec<String> { s.split(' ').map(str::to_string).collect() };
        for ca in ["ca", "other-ca"] {
            let mut a = args(format!(
                "req -x509 {ec} -keyout {ca}.key -out {ca}.pem -days 2 -subj /CN=llmslo-test-{ca}"
            ));
            a.extend(args(
                "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign".into(),
            ));
            openssl(&dir, &a);
        }
        for (name, ext) in [
            (
                "server",
                "subjectAltName=DNS:collector.test,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(
                dir.join(format!("{name}.ext")),
                format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{ext}"),
            )
            .unwrap();
            openssl(
                &dir,
                &args(format!(
                    "req {ec} -keyout {name}.key -out {name}.csr -subj /CN=llmslo-test-{name}"
                )),
            );
            let serial = if name == "server" { 1001 } else { 1002 };
            openssl(
                &dir,
                &args(format!(
                    "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -set_serial {serial} \
                     -days 2 -extfile {name}.ext -out {name}.pem"
                )),
            );
        }
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// `path` as a string, for YAML.
    pub fn p(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Terminates TLS with the PKI's server certificate and forwards to `backend`.
pub struct TlsFront {
    pub addr: SocketAddr,
    /// Handshakes that failed (wrong CA on the client's side, a missing client certificate).
    pub failed_handshakes: Arc<AtomicU64>,
    pub handshakes: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl TlsFront {
    /// `require_client_cert`: only clients with a certificate the PKI's CA signed get through.
    pub fn start(pki: &Pki, backend: SocketAddr, require_client_cert: bool) -> TlsFront {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(pki.path("server.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
        let b = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let b = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            b.with_client_cert_verifier(v)
        } else {
            b.with_no_client_auth()
        };
        let mut cfg = b.with_single_cert(chain, key).unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let failed = Arc::new(AtomicU64::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let (f2, ok2) = (failed.clone(), ok.clone());
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, failed, ok) = (acceptor.clone(), f2.clone(), ok2.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(t) => t,
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                    ok.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront {
            addr,
            failed_handshakes: failed,
            handshakes: ok,
            _rt: rt,
        }
    }
}
