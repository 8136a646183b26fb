//! An Istio-style sidecar for a testbed pod: iptables REDIRECT in the pod's netns sends the
//! app port's inbound traffic to a real proxy (nginx or haproxy from Debian) in a second
//! container cgroup of the pod, which forwards to the app on loopback over keep-alive
//! upstream connections, streaming (no response buffering) so SSE passes through.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{Pod, PodCgroup, PodProcess};

/// Port the proxy listens on (Istio's inbound capture port).
pub const SIDECAR_PORT: u16 = 15006;

pub enum Proxy {
    /// nginx with an upstream keep-alive pool.
    Nginx,
    /// haproxy, holding each request `delay_in` before forwarding it and each response
    /// `delay_out` before relaying it (Lua actions): a known sidecar overhead.
    Haproxy {
        delay_in: Duration,
        delay_out: Duration,
    },
}

/// A running sidecar; it stops and its REDIRECT rule goes on Drop (the netns goes with the pod).
pub struct Sidecar {
    // Field order is drop order: the proxy dies before its cgroup.
    proc: PodProcess,
    pub cg: PodCgroup,
    dir: PathBuf,
    pub log: PathBuf,
}

impl Sidecar {
    /// Starts `proxy` in a new container cgroup of the pod of `app_cg`, forwarding to the app
    /// on `127.0.0.1:app_port`, and redirects the pod's inbound `app_port` traffic to it.
    pub fn start(pod: &Pod, app_cg: &PodCgroup, app_port: u16, proxy: Proxy) -> Result<Sidecar> {
        let cg = app_cg.add_container()?;
        let dir = std::env::temp_dir().join(format!(
            "llmslo-sidecar-{}-{}",
            std::process::id(),
            pod.netns_name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("proxy.log");
        let cmd = match proxy {
            Proxy::Nginx => nginx(&dir, &log, app_port)?,
            Proxy::Haproxy {
                delay_in,
                delay_out,
            } => haproxy(&dir, app_port, delay_in, delay_out)?,
        };
        let mut proc = pod.spawn(cmd, Some(&cg))?;
        if let Err(e) = pod.wait_for_port(SIDECAR_PORT, Duration::from_secs(10)) {
            let _ = proc.kill();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("the sidecar did not listen on {SIDECAR_PORT}: {e:#}\n{text}");
        }
        pod.exec(&[
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            &app_port.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            &SIDECAR_PORT.to_string(),
        ])
        .context("iptables REDIRECT in the pod (the iptables package)")?;
        Ok(Sidecar { proc, cg, dir, log })
    }

    /// The proxy's processes (master and workers).
    pub fn pids(&self) -> Vec<i32> {
        self.cg.procs().unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.proc.terminate(Duration::from_secs(5));
        // Workers left behind go with the cgroup (its Drop kills what is in it).
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx(dir: &Path, log: &Path, app_port: u16) -> Result<Command> {
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes 2;
user root;
pid {d}/nginx.pid;
error_log {log} warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  upstream app {{
    server 127.0.0.1:{app_port};
    keepalive 16;
  }}
  server {{
    listen {SIDECAR_PORT};
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 60s;
    }}
  }}
}}
"#,
        log = log.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let mut c = Command::new("nginx");
    c.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(log)
        .arg("-c")
        .arg(&path)
        .stdout(std::process::Stdio::null());
    Ok(c)
}

fn haproxy(dir: &Path, app_port: u16, delay_in: Duration, delay_out: Duration) -> Result<Command> {
    let lua = dir.join("delay.lua");
    std::fs::write(
        &lua,
        format!(
            "core.register_action(\"delay_in\", {{ \"http-req\" }}, function(txn) core.msleep({}) end)\n\
             core.register_action(\"delay_out\", {{ \"http-res\" }}, function(txn) core.msleep({}) end)\n",
            delay_in.as_millis(),
            delay_out.as_millis()
        ),
    )?;
    let conf = format!(
        r#"global
  lua-load {lua}
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend inbound
  bind :{SIDECAR_PORT}
  http-request lua.delay_in
  http-response lua.delay_out
  default_backend app
backend app
  http-reuse always
  server app 127.0.0.1:{app_port}
"#,
        lua = lua.display()
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf)?;
    let mut c = Command::new("haproxy");
    c.arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(std::process::Stdio::null());
    Ok(c)
}
