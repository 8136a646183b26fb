//! The kernel's run-time accounting's own cost, for the overhead benchmark. With
//! `kernel.bpf_stats_enabled` every program run is timed by two clock reads around it, and part
//! of them lands in the run time it reports: a program that does nothing still shows tens of
//! nanoseconds a run. `bpf/floor.bpf.c`'s programs do nothing; [`Floor::attach`] puts one of
//! each program type the agent uses on the hooks where the agent's run, so that a block of
//! load with them (and without the agent) measures that floor on the same machine, under the
//! same traffic. The agent never loads them.

use std::mem::MaybeUninit;
use std::os::fd::AsFd;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, NetfilterOpts, OpenObject};

use crate::skel::floor::{FloorSkel, FloorSkelBuilder};

/// What one floor program has reported so far (run time counts only while the accounting is
/// on: `kernel.bpf_stats_enabled`, or a [`stats_on`] handle held).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runs {
    pub name: &'static str,
    /// The program's type as bpftool names it (the agent's programs are matched to a floor by it).
    pub kind: &'static str,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

pub use crate::selfcost::stats_on;

/// The floor programs, attached; dropping it detaches them (the links go before the object).
pub struct Floor {
    _links: Vec<Link>,
    skel: FloorSkel<'static>,
    /// Names of the programs attached (the others failed: see `errors`).
    pub attached: Vec<String>,
    pub errors: Vec<String>,
}

impl Floor {
    /// Loads the programs and attaches each: the tracing, raw tracepoint and tracepoint ones to
    /// the socket hooks the agent's `sock` set uses, the tc ones both ways on every interface of
    /// `veths` (tcx, as the agent attaches on kernels that have it), the netfilter one at the
    /// agent's DNAT hook (IPv4 pre-routing, `netpath::NF_PRIORITY`). A hook that fails is listed
    /// in `errors`; only a load failure is an error.
    pub fn attach(veths: &[(i32, &str)]) -> Result<Floor> {
        let obj: &'static mut MaybeUninit<OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let skel = FloorSkelBuilder::default()
            .open(obj)
            .context("opening floor.bpf.o")?
            .load()
            .context("loading floor.bpf.o")?;
        let (mut links, mut attached, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        let mut note = |name: &str, r: Result<Link>| match r {
            Ok(l) => {
                links.push(l);
                attached.push(name.to_string());
            }
            Err(e) => errors.push(format!("{name}: {e:#}")),
        };
        let p = &skel.progs;
        for (name, prog) in [
            ("floor_tracing", &p.floor_tracing),
            ("floor_raw_tp", &p.floor_raw_tp),
            ("floor_tracepoint", &p.floor_tracepoint),
        ] {
            note(name, prog.attach().map_err(Into::into));
        }
        for &(ifindex, ifname) in veths {
            note(
                "floor_tc_out",
                crate::netpath::attach_tcx(&p.floor_tc_out, ifindex, ifname),
            );
            note(
                "floor_tc_in",
                crate::netpath::attach_tcx(&p.floor_tc_in, ifindex, ifname),
            );
        }
        let opts = NetfilterOpts {
            protocol_family: libc::NFPROTO_IPV4,
            hooknum: 0,
            priority: crate::netpath::NF_PRIORITY,
            ..Default::default()
        };
        note(
            "floor_nf",
            p.floor_nf.attach_netfilter_with_opts(opts).map_err(Into::into),
        );
        Ok(Floor {
            _links: links,
            skel,
            attached,
            errors,
        })
    }

    /// Every floor program's run time and run count so far (attached or not).
    pub fn runs(&self) -> Result<Vec<Runs>> {
        let p = &self.skel.progs;
        [
            ("floor_tracing", "tracing", &p.floor_tracing),
            ("floor_raw_tp", "raw_tracepoint", &p.floor_raw_tp),
            ("floor_tracepoint", "tracepoint", &p.floor_tracepoint),
            ("floor_tc_out", "sched_cls", &p.floor_tc_out),
            ("floor_tc_in", "sched_cls", &p.floor_tc_in),
            ("floor_nf", "netfilter", &p.floor_nf),
        ]
        .into_iter()
        .map(|(name, kind, prog)| {
            let Some(info) = crate::selfcost::prog_info(prog.as_fd()) else {
                bail!("{name}: BPF_OBJ_GET_INFO_BY_FD failed");
            };
            Ok(Runs {
                name,
                kind,
                run_time_ns: info.run_time_ns,
                run_cnt: info.run_cnt,
            })
        })
        .collect()
    }
}
