//! The agent's HTTP endpoints locked down (issue: reliability and security): HTTPS with a
//! certificate from its config, a bearer token on the JSON API and on /metrics, the probes
//! left open, and bad token or certificate settings refused at start. Checked with curl.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{kernel_tests_enabled, Agent};

const TOKEN: &str = "s3cr3t-token-0123456789";

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A directory of this test's own: the tests of this file run in parallel in one process, and
/// each removes its directory when done (a shared one vanished under the other's certificate).
fn scratch(test: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("llmslo-apisec-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// A self-signed certificate for 127.0.0.1 (openssl from Debian).
fn cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:P-256")
        .args(["-nodes", "-days", "1", "-subj", "/CN=llm-slo-agent"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&k)
        .arg("-out")
        .arg(&c)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (c, k)
}

/// (HTTP status, body) of `url` by curl; status 0 when no HTTP answer came.
fn curl(url: &str, ca: Option<&Path>, token: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"]);
    if let Some(ca) = ca {
        c.arg("--cacert").arg(ca);
    }
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c.arg(url).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn config(dir: &Path, cert: &Path, key: &Path) -> String {
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    format!(
        "api:\n  token_file: {}\n  protect_metrics: true\n  tls_cert_file: {}\n  tls_key_file: {}\n",
        token.display(),
        cert.display(),
        key.display()
    )
}

#[test]
fn https_and_a_bearer_token_guard_the_endpoints_but_not_the_probes() {
    if !kernel_tests_enabled("https_and_a_bearer_token_guard_the_endpoints_but_not_the_probes") {
        return;
    }
    let dir = scratch("https");
    let (c, k) = cert(&dir.0);
    let mut agent =
        Agent::launch_with_config(&config(&dir.0, &c, &k), &["--no-auto", "--no-network"]);
    let base = format!("https://{}", agent.addr);
    let t0 = Instant::now();
    while curl(&format!("{base}/readyz"), Some(&c), None).0 != 200 {
        if let Ok(Some(st)) = agent.child.try_wait() {
            panic!("agent exited ({st}):\n{}", agent.log_text());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not ready over HTTPS:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(curl(&format!("{base}/healthz"), Some(&c), None).0, 200);
    for path in [
        "/api/v1/requests",
        "/api/v1/targets",
        "/api/v1/slo",
        "/api/v1/crosscheck",
        "/metrics",
    ] {
        let url = format!("{base}{path}");
        assert_eq!(curl(&url, Some(&c), None).0, 401, "{path} without a token");
        assert_eq!(
            curl(&url, Some(&c), Some("s3cr3t-token-0123456788")).0,
            401,
            "{path} with a wrong token"
        );
        let (st, body) = curl(&url, Some(&c), Some(TOKEN));
        assert_eq!(st, 200, "{path} with the token: {body}");
    }
    let (_, metrics) = curl(&format!("{base}/metrics"), Some(&c), Some(TOKEN));
    assert!(metrics.contains("llmslo_agent_ready 1"), "{metrics}");
    // Plain HTTP on the TLS port gets no HTTP answer; an untrusted certificate is refused.
    assert_eq!(
        curl(&format!("http://{}/readyz", agent.addr), None, None).0,
        0
    );
    assert_eq!(curl(&format!("{base}/readyz"), None, None).0, 0);
    // The token never shows in the log.
    assert!(agent.stop(), "clean exit on SIGTERM");
    assert!(!agent.log_text().contains(TOKEN));
}

#[test]
fn bad_token_or_certificate_settings_fail_the_start_with_a_clear_message() {
    if !kernel_tests_enabled(
        "bad_token_or_certificate_settings_fail_the_start_with_a_clear_message",
    ) {
        return;
    }
    let dir = scratch("bad_settings");
    let (c, k) = cert(&dir.0);
    let short = dir.0.join("short");
    std::fs::write(&short, "abc\n").unwrap();
    let garbage = dir.0.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    for (yaml, want) in [
        (
            format!("api:\n  token_file: {}\n", short.display()),
            "at least 16 characters",
        ),
        (
            format!("api:\n  token_file: {}\n", dir.0.join("missing").display()),
            "reading api.token_file",
        ),
        (
            "api:\n  protect_metrics: true\n".to_string(),
            "needs api.token_file",
        ),
        (
            format!("api:\n  tls_cert_file: {}\n", c.display()),
            "go together",
        ),
        (
            format!(
                "api:\n  tls_cert_file: {}\n  tls_key_file: {}\n",
                garbage.display(),
                k.display()
            ),
            "no certificate",
        ),
    ] {
        let mut agent = Agent::launch_with_config(&yaml, &["--no-auto", "--no-network"]);
        let t0 = Instant::now();
        let st = loop {
            if let Some(st) = agent.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the agent kept running with {yaml:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!st.success(), "{yaml:?}");
        let log = agent.log_text();
        assert!(log.contains(want), "{yaml:?}: wanted {want:?} in:\n{log}");
    }
}
