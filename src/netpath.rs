//! Packet-path and TCP-lifecycle programs: loads `tcp.bpf.c` and `netpath.bpf.c` sharing the
//! L7 object's maps, attaches the netfilter DNAT hooks, and attaches/detaches tc programs on
//! the interfaces a hook plan names (tcx links on kernels >= 6.6, clsact filters below).

mod clsact;
mod rcu;
pub use rcu::Expedite;
mod tcdump;

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::ptr::NonNull;

use anyhow::{Context, Result};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::NetfilterOpts;
use libbpf_rs::{AsRawLibbpf, Link, OpenObject, ProgramAttachType};
use serde::Serialize;

use crate::loader::AttachedProg;
use crate::skel::l7::L7Skel;
use crate::skel::netpath::{NetpathSkel, NetpathSkelBuilder};
use crate::skel::tcp::{TcpSkel, TcpSkelBuilder};

/// The netfilter hooks' priority: NF_IP_PRI_NAT_DST and NF_IP6_PRI_NAT_DST are -100, so the
/// DNAT hook's program runs just after the NAT table has rewritten the destination.
pub const NF_PRIORITY: i32 = -99;

/// Attaches `prog` (its attach type tcx ingress or egress) to `ifindex` as a tcx link, first in
/// the chain: it returns TCX_NEXT, so programs already there (Cilium's) still see every packet
/// and decide its fate. Closing the link detaches it.
pub fn attach_tcx(prog: &libbpf_rs::Program<'_>, ifindex: i32, ifname: &str) -> Result<Link> {
    let opts = libbpf_rs::libbpf_sys::bpf_tcx_opts {
        sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_tcx_opts>() as _,
        flags: libbpf_rs::libbpf_sys::BPF_F_BEFORE,
        ..Default::default()
    };
    // SAFETY: a loaded program, a valid opts struct that outlives the call; the returned
    // pointer is checked before use.
    let ptr = unsafe {
        libbpf_rs::libbpf_sys::bpf_program__attach_tcx(
            prog.as_libbpf_object().as_ptr(),
            ifindex,
            &opts,
        )
    };
    let ptr = NonNull::new(ptr)
        .filter(|p| (p.as_ptr() as isize) > 0 || (p.as_ptr() as isize) < -4095)
        .with_context(|| {
            format!(
                "tcx attach on {ifname} failed: {}",
                std::io::Error::last_os_error()
            )
        })?;
    // SAFETY: the pointer came from libbpf and is a valid, owned bpf_link.
    Ok(unsafe { Link::from_ptr(ptr) })
}

/// Where on the path an interface sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The node's ingress device (NIC or overlay): node_in, node_out, SYN.
    Node,
    /// The host side of a pod's veth: pod_in, pod_out.
    PodVeth,
}

/// One interface to hook.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct HookSpec {
    pub ifindex: u32,
    pub ifname: String,
    pub role: Role,
}

/// What is attached on one interface, for `/api/v1/targets`.
#[derive(Debug, Clone, Serialize)]
pub struct AttachedHook {
    pub ifname: String,
    pub ifindex: u32,
    pub role: Role,
    pub mechanism: &'static str,
    pub error: Option<String>,
}

/// Classic clsact handles we own: a fixed handle lets a restarted agent find and remove the
/// filters a crashed one left. Our programs run first and always return TC_ACT_UNSPEC /
/// TCX_NEXT, so the packet goes on to the filters already there (Cilium's return a verdict,
/// which would end the chain before us were we placed after them) and its fate is theirs.
/// Priority 1 with our own handle: a newer filter at an equal priority runs first.
pub const CLSACT_HANDLE: u32 = clsact::HANDLE;
pub const CLSACT_PRIORITY: u32 = clsact::PRIORITY;
pub use clsact::{DEFAULT_STATE_DIR, ENV_STATE_DIR};
/// The packet programs, attached per interface (listed under `interfaces`, not `programs`, in
/// `/api/v1/targets`).
pub use clsact::OUR_PROGS as TC_PROGRAMS;

/// `LLMSLO_TC_ATTACH=clsact` makes the agent use classic clsact filters even where the kernel
/// has tcx (to test the clsact path, or to sit in the same chain as a CNI that uses clsact).
pub const ENV_TC_ATTACH: &str = "LLMSLO_TC_ATTACH";

/// True when [`ENV_TC_ATTACH`] asks for clsact.
pub fn clsact_forced() -> bool {
    std::env::var(ENV_TC_ATTACH).is_ok_and(|v| v.trim().eq_ignore_ascii_case("clsact"))
}

enum Attachment {
    Links(Vec<Link>),
    /// Filters on this ifindex, owned through the ledger.
    Clsact(i32),
}

pub struct NetPath {
    tcp: TcpSkel<'static>,
    net: NetpathSkel<'static>,
    _tcp_links: Vec<Link>,
    _nf_links: Vec<Link>,
    tcx: bool,
    attached: BTreeMap<HookSpec, Attachment>,
    ledger: clsact::Ledger,
    pub progs: Vec<AttachedProg>,
    pub verifier: Vec<crate::loader::VerifierStats>,
    pub hooks: Vec<AttachedHook>,
    churn: ChurnLog,
}

/// Hook changes summed up for the log: a line once the set of interfaces has been quiet for
/// `CHURN_QUIET`, or every `CHURN_LOG_EVERY` while pods keep coming and going.
#[derive(Default)]
struct ChurnLog {
    attached: usize,
    detached: usize,
    failed: usize,
    /// First and latest change not logged yet.
    span: Option<(std::time::Instant, std::time::Instant)>,
}

const CHURN_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
const CHURN_QUIET: std::time::Duration = std::time::Duration::from_secs(1);

/// Makes an object's copies of the maps shared with the L7 object reuse L7's fds, so every
/// program sees one copy (the list matches `src/bpf/maps.h`).
macro_rules! reuse_shared_maps {
    ($open:expr, $l7:expr) => {
        reuse_shared_maps!(@each $open, $l7, conns, listen_ports, target_ports, flows, flow_by_client, pre2post, send_begins, stats)
    };
    (@each $open:expr, $l7:expr, $($m:ident),+) => {
        $( $open.maps.$m.reuse_fd($l7.maps.$m.as_fd()).context(concat!("sharing map ", stringify!($m)))?; )+
    };
}

impl NetPath {
    pub fn load(l7: &L7Skel<'static>, tcx: bool, netfilter: bool) -> Result<NetPath> {
        // Filters a crashed agent left would stamp packets alongside ours: remove them first.
        let state = clsact::state_dir();
        rcu::restore_stale(&state, std::path::Path::new(rcu::KNOB));
        let swept = clsact::sweep_stale(&state);
        if swept > 0 {
            tracing::info!(
                devices = swept,
                "removed the clsact filters of an agent that did not exit cleanly"
            );
        }
        let tcx = if tcx && clsact_forced() {
            tracing::info!("{ENV_TC_ATTACH}=clsact: clsact filters although the kernel has tcx");
            false
        } else {
            tcx
        };
        let obj: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = TcpSkelBuilder::default()
            .open(obj)
            .context("opening tcp.bpf.o")?;
        reuse_shared_maps!(open, l7);
        let tcp = open.load().context("loading tcp.bpf.o")?;
        let (tcp_links, mut progs) =
            crate::loader::attach_all(tcp.object(), "TCP lifecycle", |_| false)?;

        let obj: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = NetpathSkelBuilder::default()
            .open(obj)
            .context("opening netpath.bpf.o")?;
        reuse_shared_maps!(open, l7);
        if tcx {
            open.progs
                .tc_node_ingress
                .set_attach_type(ProgramAttachType::TcxIngress);
            open.progs
                .tc_pod_out
                .set_attach_type(ProgramAttachType::TcxIngress);
            open.progs
                .tc_node_egress
                .set_attach_type(ProgramAttachType::TcxEgress);
            open.progs
                .tc_pod_in
                .set_attach_type(ProgramAttachType::TcxEgress);
        }
        if !netfilter {
            open.progs.nf_post_dnat.set_autoload(false);
        }
        let net = open.load().context("loading netpath.bpf.o")?;
        let mut verifier = crate::loader::verifier_stats(tcp.object(), "tcp");
        verifier.extend(crate::loader::verifier_stats(net.object(), "netpath"));
        let mut nf_links = Vec::new();
        if netfilter {
            // One hook just after DNAT, for IPv4 and IPv6 (kube-proxy DNATs both families the
            // same way); the address before DNAT comes from the packet's conntrack entry.
            let (prog, name) = (&net.progs.nf_post_dnat, "nf_post_dnat");
            for (family, fam) in [(libc::NFPROTO_IPV4, "ipv4"), (libc::NFPROTO_IPV6, "ipv6")] {
                let opts = NetfilterOpts {
                    protocol_family: family,
                    hooknum: 0,
                    priority: NF_PRIORITY,
                    ..Default::default()
                };
                let section = format!("netfilter/{fam}/prerouting/{NF_PRIORITY}");
                let (attached, error) = match prog.attach_netfilter_with_opts(opts) {
                    Ok(l) => {
                        nf_links.push(l);
                        (true, None)
                    }
                    Err(e) => {
                        tracing::warn!(name, family = fam, error = %e, "netfilter hook not attached: no load_balancing stage");
                        (false, Some(e.to_string()))
                    }
                };
                progs.push(AttachedProg {
                    name: name.into(),
                    section,
                    attached,
                    error,
                });
            }
        }
        Ok(NetPath {
            tcp,
            net,
            _tcp_links: tcp_links,
            _nf_links: nf_links,
            tcx,
            attached: BTreeMap::new(),
            ledger: clsact::Ledger::new(&state),
            progs,
            verifier,
            hooks: Vec::new(),
            churn: ChurnLog::default(),
        })
    }

    /// Logs the summed-up hook changes when due (called on every change and periodically).
    pub fn log_churn(&mut self) {
        let c = &self.churn;
        let Some((first, last)) = c.span else { return };
        if last.elapsed() < CHURN_QUIET && first.elapsed() < CHURN_LOG_EVERY {
            return;
        }
        let first_err = self.hooks.iter().find_map(|h| h.error.clone());
        tracing::info!(
            attached = c.attached,
            detached = c.detached,
            failed = c.failed,
            total = self.attached.len(),
            first_error = first_err.as_deref().unwrap_or(""),
            "tc hooks changed"
        );
        self.churn = ChurnLog::default();
    }

    /// Makes the attached tc programs match `want`: attaches new interfaces, detaches gone ones.
    pub fn apply(&mut self, want: &[HookSpec]) {
        let gone: Vec<HookSpec> = self
            .attached
            .keys()
            .filter(|h| !want.contains(h))
            .cloned()
            .collect();
        // One line per change of the set, not one per interface: pods come and go by hundreds.
        let (n_gone, mut n_new, mut n_failed) = (gone.len(), 0usize, 0usize);
        for h in gone {
            if let Some(a) = self.attached.remove(&h) {
                self.detach(a);
                tracing::debug!(ifname = %h.ifname, "detached tc programs");
            }
        }
        for h in want {
            if self.attached.contains_key(h) {
                continue;
            }
            match self.attach(h) {
                Ok(a) => {
                    tracing::debug!(ifname = %h.ifname, role = ?h.role, "attached tc programs");
                    self.attached.insert(h.clone(), a);
                    n_new += 1;
                }
                Err(e) => {
                    // A veth deleted between the scan and now is normal churn: debug only.
                    n_failed += 1;
                    tracing::debug!(ifname = %h.ifname, error = %e, "could not attach tc programs");
                    self.hooks.retain(|x| x.ifindex != h.ifindex);
                    self.hooks.push(AttachedHook {
                        ifname: h.ifname.clone(),
                        ifindex: h.ifindex,
                        role: h.role,
                        mechanism: "none",
                        error: Some(format!("{e:#}")),
                    });
                }
            }
        }
        if n_gone + n_new + n_failed > 0 {
            let c = &mut self.churn;
            c.attached += n_new;
            c.detached += n_gone;
            c.failed += n_failed;
            let now = std::time::Instant::now();
            c.span = Some((c.span.map_or(now, |(first, _)| first), now));
        }
        self.log_churn();
        let mech = if self.tcx { "tcx" } else { "clsact" };
        let errs: Vec<AttachedHook> = self
            .hooks
            .iter()
            .filter(|h| h.error.is_some() && want.iter().any(|w| w.ifindex == h.ifindex))
            .cloned()
            .collect();
        self.hooks = self
            .attached
            .keys()
            .map(|h| AttachedHook {
                ifname: h.ifname.clone(),
                ifindex: h.ifindex,
                role: h.role,
                mechanism: mech,
                error: None,
            })
            .chain(errs)
            .collect();
    }

    fn attach(&mut self, h: &HookSpec) -> Result<Attachment> {
        let p = &self.net.progs;
        let (ingress, egress) = match h.role {
            Role::Node => (&p.tc_node_ingress, &p.tc_node_egress),
            Role::PodVeth => (&p.tc_pod_out, &p.tc_pod_in),
        };
        let ifindex = h.ifindex as i32;
        if self.tcx {
            let links = [ingress, egress]
                .into_iter()
                .map(|prog| attach_tcx(prog, ifindex, &h.ifname))
                .collect::<Result<Vec<_>>>()?;
            Ok(Attachment::Links(links))
        } else {
            self.ledger
                .attach(ifindex, &h.ifname, ingress.as_fd(), egress.as_fd())?;
            Ok(Attachment::Clsact(ifindex))
        }
    }

    fn detach(&mut self, a: Attachment) {
        match a {
            Attachment::Links(l) => drop(l), // closing a tcx link detaches it
            Attachment::Clsact(ifindex) => self.ledger.detach(ifindex),
        }
    }

    pub fn tcx(&self) -> bool {
        self.tcx
    }

    pub fn tcp_skel(&self) -> &TcpSkel<'static> {
        &self.tcp
    }
}

impl Drop for NetPath {
    fn drop(&mut self) {
        // tcx links detach as they close (concurrently: see `detach_concurrently`); clsact
        // filters go in one pass of the ledger, which rewrites its file once, not once per
        // device. Both wait for an RCU grace period per device under RTNL: expedited ones
        // while we detach (see `rcu`).
        let t0 = std::time::Instant::now();
        let devices = self.attached.len();
        let mut links = std::mem::take(&mut self._tcp_links);
        links.append(&mut self._nf_links);
        for (_, a) in std::mem::take(&mut self.attached) {
            if let Attachment::Links(mut l) = a {
                links.append(&mut l);
            }
        }
        let fast = rcu::Expedite::teardown();
        crate::loader::detach_concurrently(links);
        self.ledger.release_all();
        tracing::info!(
            devices,
            expedited = fast.active() || rcu::Expedite::on(),
            took_ms = t0.elapsed().as_millis() as u64,
            "network hooks detached"
        );
    }
}
