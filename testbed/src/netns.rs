//! A pod as a network namespace wired to the root namespace by a veth pair, the way a
//! simple CNI does it or the way Calico, Cilium or a bridge CNI (Flannel) does it, plus
//! spawning processes that start life inside the pod's netns and cgroup. Everything is torn
//! down on Drop (also on panic unwind), and leftovers of crashed runs are found by the
//! creating pid encoded in their names.

use crate::cgroup::{cleanup_stale_cgroups, PodCgroup};
use crate::rng::SplitMix64;
use crate::{pid_alive, require_root};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Prefix of our netns names and of the owner mark on our cgroups.
pub const PREFIX: &str = "llmslo";
/// Host-side veth names start with this (device names allow 15 characters).
pub const VETH_PREFIX: &str = "lsh";
/// Every prefix our host-side devices carry: `<prefix><pid hex>x<n hex>`. Real CNIs name theirs
/// `<prefix><hex>` with no `x`, so the stale sweep cannot mistake them for ours.
const DEVICE_PREFIXES: [&str; 6] = [VETH_PREFIX, "cali", "lxc", "veth", "cni", "lsvx"];
/// The gateway Calico gives every pod: answered by proxy ARP on the host side, never assigned.
pub const CALICO_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Lock file and subnet reservations shared by all test processes on the machine.
const STATE_DIR: &str = "/run/llmslo-testbed";
/// /30 subnets available in 10.200.0.0/16.
const SUBNETS: u64 = 1 << 14;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_SWEEP: Once = Once::new();

/// How a pod is wired to the node, after the CNI it imitates. Every pod gets `eth0` inside
/// and a reserved 10.200.x.y/30; what differs is the host side and the pod's routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wiring {
    /// Host side `lsh…` with .1/30, pod .2/30 with its default route via .1.
    Subnet,
    /// Calico: host side `cali…` without an address, proxy ARP on it, a /32 route to the pod
    /// through it; the pod has .2/32 and `default via 169.254.1.1 dev eth0 onlink`.
    Calico,
    /// Cilium (endpoint routes): host side `lxc…` without an address, a /32 route to the pod;
    /// the pod's gateway is the router address .1 on-link. Cilium answers the pod's ARP in its
    /// tc program; proxy ARP stands in for it here.
    Cilium,
    /// The bridge plugin under Flannel: host side `veth…` enslaved to `bridge`, the gateway .1/30
    /// on the bridge, pod .2/30 with its default route via .1.
    Bridge(String),
}

impl Wiring {
    fn host_prefix(&self) -> &'static str {
        match self {
            Wiring::Subnet => VETH_PREFIX,
            Wiring::Calico => "cali",
            Wiring::Cilium => "lxc",
            Wiring::Bridge(_) => "veth",
        }
    }
}

/// A network namespace posing as a pod: `eth0` at 10.200.x.y+2 inside, the host side in the
/// root netns wired as [`Wiring`] says (by default `lsh<id>` at .1/30, the pod's gateway).
#[derive(Debug)]
pub struct Pod {
    name: String,
    host_veth: String,
    host_ip: Ipv4Addr,
    ip: Ipv4Addr,
    wiring: Wiring,
    subnet_lock: PathBuf,
}

/// A device name `<prefix><pid hex>x<n hex>` of at most 15 characters: `n` is cut to fit.
pub(crate) fn device_name(prefix: &str, n: u32) -> String {
    let pid = format!("{:x}", std::process::id());
    let room = 15usize.saturating_sub(prefix.len() + pid.len() + 1).min(8);
    let n = u64::from(n) & ((1u64 << (4 * room)) - 1);
    format!("{prefix}{pid}x{n:x}")
}

/// Machine-wide lock (flock) so that concurrent test processes neither pick the same
/// subnet nor race `ip netns add` setting up /var/run/netns.
struct StateLock(#[allow(dead_code)] File);

fn state_lock() -> Result<StateLock> {
    std::fs::create_dir_all(Path::new(STATE_DIR).join("subnets"))?;
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(Path::new(STATE_DIR).join("lock"))?;
    // SAFETY: flock on an fd we own; released when the File closes.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("flock testbed state");
    }
    Ok(StateLock(f))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

impl Pod {
    /// Create a pod wired the simple way ([`Wiring::Subnet`]); `name_hint` (sanitized,
    /// shortened) ends up in the netns name.
    pub fn create(name_hint: &str) -> Result<Pod> {
        Pod::create_wired(name_hint, Wiring::Subnet)
    }

    /// Create a pod wired the way `wiring`'s CNI does it.
    pub fn create_wired(name_hint: &str, wiring: Wiring) -> Result<Pod> {
        require_root()?;
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xF_FFFF;
        let hint: String = name_hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(20)
            .collect();
        let hint = if hint.is_empty() { "pod".into() } else { hint };
        let name = format!("{PREFIX}-{pid}-{n}-{hint}");
        let host_veth = device_name(wiring.host_prefix(), n);

        let _lock = state_lock()?;
        STALE_SWEEP.call_once(|| {
            if let Err(e) = cleanup_stale_locked(PREFIX) {
                eprintln!("testbed: stale cleanup failed: {e:#}");
            }
        });
        let (index, subnet_lock) = reserve_subnet(pid, n, &name)?;
        let base = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + (index as u32) * 4;
        // From here on Drop undoes whatever part of the setup happened.
        let pod = Pod {
            name,
            host_veth,
            host_ip: match wiring {
                Wiring::Calico => CALICO_GATEWAY,
                _ => Ipv4Addr::from(base + 1),
            },
            ip: Ipv4Addr::from(base + 2),
            wiring,
            subnet_lock,
        };
        pod.setup()
            .with_context(|| format!("set up pod {}", pod.name))?;
        Ok(pod)
    }

    fn setup(&self) -> Result<()> {
        let (ns, veth) = (self.name.as_str(), self.host_veth.as_str());
        let gw = self.host_ip.to_string();
        ip(&["netns", "add", ns])?;
        // The peer is created directly inside the pod as eth0: no temporary name in
        // the root netns that parallel pods could collide on.
        ip(&[
            "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        // IPv6 off on both ends keeps router solicitations and DAD out of packet hooks.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{veth}/disable_ipv6"), "1");
        // Loose reverse-path filtering: replies from the pod must never be dropped
        // on hosts that default to strict mode.
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{veth}/rp_filter"), "0");
        let routed = matches!(self.wiring, Wiring::Calico | Wiring::Cilium);
        match &self.wiring {
            Wiring::Subnet => ip(&["addr", "add", &format!("{gw}/30"), "dev", veth])?,
            Wiring::Calico | Wiring::Cilium => {
                // No address on the host side: the host answers ARP for the gateway (which
                // no device holds) by proxy, at once rather than after proxy_delay's jitter,
                // as Calico configures it.
                let conf = format!("/proc/sys/net/ipv4/conf/{veth}/proxy_arp");
                std::fs::write(&conf, "1").with_context(|| format!("writing {conf}"))?;
                let delay = format!("/proc/sys/net/ipv4/neigh/{veth}/proxy_delay");
                let _ = std::fs::write(delay, "0");
            }
            Wiring::Bridge(br) => {
                ip(&["link", "set", veth, "master", br])?;
                ip(&["addr", "add", &format!("{gw}/30"), "dev", br])?;
            }
        }
        ip(&["link", "set", veth, "up"])?;
        if routed {
            ip(&["route", "add", &format!("{}/32", self.ip), "dev", veth])?;
        }
        let pod_len = if routed { 32 } else { 30 };
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/{pod_len}", self.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        if routed {
            ip(&[
                "-n", ns, "route", "add", "default", "via", &gw, "dev", "eth0", "onlink",
            ])?;
        } else {
            ip(&["-n", ns, "route", "add", "default", "via", &gw])?;
        }
        let mut v6off = Command::new("sh");
        v6off.args(["-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"]);
        let _ = self.output(v6off);
        Ok(())
    }

    /// Gives a [`Wiring::Subnet`] pod an IPv6 address beside its IPv4 one:
    /// `fd00:200:0:<subnet>::2/64` inside, `::1` on the host side as its default gateway.
    /// Duplicate address detection and router solicitations stay off, so no stray packets
    /// cross the hooks. The root netns reaches the pod directly (no forwarding needed).
    pub fn enable_ipv6(&self) -> Result<Ipv6Addr> {
        if !matches!(self.wiring, Wiring::Subnet) {
            bail!("IPv6 is wired for subnet pods only");
        }
        let index = (u32::from(self.ip) - u32::from(Ipv4Addr::new(10, 200, 0, 0))) / 4;
        let net = format!("fd00:200:0:{index:x}");
        let (ns, veth) = (self.name.as_str(), self.host_veth.as_str());
        let conf = |dev: &str, key: &str| format!("/proc/sys/net/ipv6/conf/{dev}/{key}");
        for (k, v) in [
            ("accept_dad", "0"),
            ("router_solicitations", "0"),
            ("disable_ipv6", "0"),
        ] {
            std::fs::write(conf(veth, k), v).with_context(|| conf(veth, k))?;
        }
        ip(&["addr", "add", &format!("{net}::1/64"), "dev", veth, "nodad"])?;
        let mut on = Command::new("sh");
        on.args([
            "-c",
            "for d in all default eth0; do echo 0 > /proc/sys/net/ipv6/conf/$d/accept_dad; \
             echo 0 > /proc/sys/net/ipv6/conf/$d/router_solicitations; done; \
             echo 0 > /proc/sys/net/ipv6/conf/all/disable_ipv6; \
             echo 0 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6",
        ]);
        let out = self.output(on)?;
        if !out.status.success() {
            bail!(
                "enabling IPv6 in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{net}::2/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &format!("{net}::1"),
        ])?;
        Ok(format!("{net}::2").parse()?)
    }

    /// Lets the node forward IPv6 packets that enter from this pod (its host-side veth), without
    /// turning on the host's global IPv6 forwarding (`force_forwarding`, Linux 6.17+).
    pub fn force_ipv6_forwarding(&self) -> Result<()> {
        let p = format!(
            "/proc/sys/net/ipv6/conf/{}/force_forwarding",
            self.host_veth
        );
        std::fs::write(&p, "1").with_context(|| format!("{p} (needs Linux 6.17 or later)"))
    }

    /// The pod's address (eth0 inside the pod).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's default gateway: the host side's address ([`Wiring::Subnet`]), the bridge's
    /// ([`Wiring::Bridge`]), or an address no device holds, answered by proxy ARP.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    pub fn wiring(&self) -> &Wiring {
        &self.wiring
    }

    /// Name of the host-side veth in the root netns.
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// Interface index of the host-side veth (for tc attachment).
    pub fn host_ifindex(&self) -> Result<u32> {
        let p = format!("/sys/class/net/{}/ifindex", self.host_veth);
        Ok(std::fs::read_to_string(&p)?.trim().parse()?)
    }

    pub fn netns_name(&self) -> &str {
        &self.name
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip:port` of this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// Start `cmd` inside the pod's netns and, if given, the container cgroup. Both are
    /// entered between fork and exec, so the process is in the pod from its first
    /// instruction. The returned handle kills and reaps it on Drop.
    pub fn spawn(&self, cmd: Command, cgroup: Option<&PodCgroup>) -> Result<PodProcess> {
        let child = self.spawn_child(cmd, cgroup)?;
        Ok(PodProcess { child })
    }

    /// Run `cmd` in the pod's netns to completion and collect its output.
    pub fn output(&self, mut cmd: Command) -> Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(self.spawn_child(cmd, None)?.wait_with_output()?)
    }

    /// Run `argv` in the pod's netns; Err when it cannot start or exits non-zero.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let (prog, args) = argv.split_first().context("empty argv")?;
        let mut cmd = Command::new(prog);
        cmd.args(args);
        let out = self.output(cmd)?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    fn spawn_child(&self, mut cmd: Command, cgroup: Option<&PodCgroup>) -> Result<Child> {
        // Opened before fork: pre_exec may only make async-signal-safe calls.
        let ns = File::open(self.netns_path())
            .with_context(|| format!("open {}", self.netns_path().display()))?;
        let procs = match cgroup {
            Some(cg) => Some(
                File::options()
                    .write(true)
                    .open(cg.path().join("cgroup.procs"))
                    .with_context(|| format!("open cgroup.procs of {}", cg.path().display()))?,
            ),
            None => None,
        };
        let ns_fd = ns.as_raw_fd();
        let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
        let hook = move || -> std::io::Result<()> {
            if let Some(fd) = procs_fd {
                // Our pid in decimal, formatted on the stack (no allocation after fork).
                // SAFETY: getpid has no preconditions.
                let mut pid = unsafe { libc::getpid() } as u32;
                let mut buf = [0u8; 12];
                let mut i = buf.len();
                loop {
                    i -= 1;
                    buf[i] = b'0' + (pid % 10) as u8;
                    pid /= 10;
                    if pid == 0 {
                        break;
                    }
                }
                // SAFETY: fd stays open until after spawn returns; buf[i..] is valid.
                let r = unsafe { libc::write(fd, buf[i..].as_ptr().cast(), buf.len() - i) };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // SAFETY: ns_fd is an open netns file descriptor (kept open by `ns`).
            if unsafe { libc::setns(ns_fd, libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the hook only calls getpid, write and setns (async-signal-safe) and
        // touches no locks or heap memory.
        unsafe { cmd.pre_exec(hook) };
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {cmd:?} in {}", self.name))?;
        drop((ns, procs));
        Ok(child)
    }

    /// Wait until something accepts TCP connections on `port` in the pod.
    pub fn wait_for_port(&self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let addr = self.addr(port);
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("{addr} not accepting after {timeout:?}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Pids of processes whose network namespace is this pod's.
    pub fn pids(&self) -> Vec<i32> {
        pids_in_netns(&self.netns_path())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        kill_netns_procs(&self.netns_path());
        // Deleting the host end removes the pair at once; the netns teardown itself is
        // asynchronous in the kernel and would leave the veth around for a while.
        let _ = ip(&["link", "del", &self.host_veth]);
        if let Wiring::Bridge(br) = &self.wiring {
            let _ = ip(&["addr", "del", &format!("{}/30", self.host_ip), "dev", br]);
        }
        let _ = ip(&["netns", "del", &self.name]);
        let _ = std::fs::remove_file(&self.subnet_lock);
    }
}

/// Reserve a free /30 by creating a lock file named after its index; a reservation of
/// a dead process is taken over. Caller holds the state lock.
fn reserve_subnet(pid: u32, n: u32, name: &str) -> Result<(u64, PathBuf)> {
    let start = SplitMix64::for_item(u64::from(pid), u64::from(n)).below(SUBNETS);
    for k in 0..SUBNETS {
        let idx = (start + k) % SUBNETS;
        let path = Path::new(STATE_DIR).join("subnets").join(idx.to_string());
        if let Ok(text) = std::fs::read_to_string(&path) {
            if owner_pid(&text).is_some_and(pid_alive) {
                continue;
            }
        }
        std::fs::write(&path, format!("{PREFIX} {pid} {name}\n"))?;
        return Ok((idx, path));
    }
    bail!("all {SUBNETS} testbed subnets in 10.200.0.0/16 are taken; run cleanup_stale")
}

/// The pid in a device name of ours, `<prefix><pid hex>x<n hex>` (see [`device_name`]).
fn device_owner(name: &str) -> Option<i32> {
    let (pid, n) = DEVICE_PREFIXES
        .iter()
        .find_map(|p| name.strip_prefix(p))?
        .split_once('x')?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(pid) || !hex(n) {
        return None;
    }
    i32::from_str_radix(pid, 16).ok()
}

fn owner_pid(lock_text: &str) -> Option<i32> {
    lock_text.split_whitespace().nth(1)?.parse().ok()
}

fn pids_in_netns(ns_path: &Path) -> Vec<i32> {
    let Ok(target) = std::fs::metadata(ns_path) else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
        })
        .collect()
}

/// SIGKILL everything in the netns and wait (briefly) for it to go.
fn kill_netns_procs(ns_path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids = pids_in_netns(ns_path);
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            // SAFETY: plain kill(2); no memory involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Remove leftovers of earlier crashed runs: netns named `<prefix>-<pid>-...`, host
/// devices `lsh|cali|lxc|veth|cni|lsvx<pid hex>x...`, testbed VXLAN devices, subnet reservations and owner-marked cgroups, each only
/// when the pid that created it is dead. Returns how many things were removed.
pub fn cleanup_stale(prefix: &str) -> Result<usize> {
    require_root()?;
    let _lock = state_lock()?;
    cleanup_stale_locked(prefix)
}

fn cleanup_stale_locked(prefix: &str) -> Result<usize> {
    let mut removed = 0;
    let dead = |pid: Option<i32>| pid.is_some_and(|p| !pid_alive(p));
    if let Ok(rd) = std::fs::read_dir(NETNS_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
                continue;
            };
            if dead(rest.split('-').next().and_then(|p| p.parse().ok())) {
                kill_netns_procs(&e.path());
                if ip(&["netns", "del", &name]).is_ok() {
                    removed += 1;
                }
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/class/net") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = device_owner(&name).or_else(|| crate::topo::overlay_owner(&name));
            if dead(pid) && ip(&["link", "del", &name]).is_ok() {
                removed += 1;
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(Path::new(STATE_DIR).join("subnets")) {
        for e in rd.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            if dead(owner_pid(&text)) && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed += cleanup_stale_cgroups(prefix)?;
    Ok(removed)
}

/// A process started inside a pod. Drop sends SIGKILL and reaps it.
#[derive(Debug)]
pub struct PodProcess {
    child: Child,
}

impl PodProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The std handle, e.g. to take stdout/stderr pipes.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGTERM, then SIGKILL if it is still alive after `grace`; reaps it.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.child.try_wait()? {
            return Ok(s);
        }
        // SAFETY: plain kill(2) on our own unreaped child, so the pid cannot be reused.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        match self.child.kill() {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::InvalidInput => {} // already reaped
            Err(e) => return Err(e.into()),
        }
        Ok(self.child.wait()?)
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_device_names_fit_and_name_their_creator() {
        let me = std::process::id() as i32;
        for prefix in DEVICE_PREFIXES {
            for n in [0, 7, 0xFFFF, u32::MAX] {
                let name = device_name(prefix, n);
                assert!(name.len() <= 15, "{name}");
                assert_eq!(device_owner(&name), Some(me), "{name}");
            }
        }
    }

    #[test]
    fn real_cni_devices_are_never_taken_for_ours() {
        for name in [
            "cali0123456789a",
            "lxc1a2b3c4d5e6f",
            "lxc_health",
            "veth1a2b3c4",
            "veth0a1b2c3d",
            "cni0",
            "vethx",
            "lshx1",
            "eth0",
        ] {
            assert_eq!(device_owner(name), None, "{name}");
        }
    }
}
