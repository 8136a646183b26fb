//! Lists the classic tc filters on one clsact hook over rtnetlink (RTM_GETTFILTER dump), so the
//! agent can tell its own filters from everyone else's before it removes anything. libbpf can
//! query a filter whose handle and priority it already knows, but cannot list.

use std::io;

use crate::rtnl::{attrs, c_string, u32_at, Rtnl};

/// clsact's ingress and egress parents (TC_H_CLSACT major, TC_H_MIN_INGRESS/EGRESS minor).
pub const PARENT_INGRESS: u32 = 0xFFFF_FFF2;
pub const PARENT_EGRESS: u32 = 0xFFFF_FFF3;

const TCMSG_LEN: usize = 20;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;

/// One filter (or classifier instance) the kernel reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    /// 0 for the entry that stands for a classifier instance itself, not one of its filters.
    pub handle: u32,
    pub kind: String,
    /// For `bpf` filters: the name the loader gave (libbpf: "<prog name>:[<prog id>]", tc(8):
    /// "<object file>:[<section>]").
    pub bpf_name: Option<String>,
    pub bpf_prog_id: Option<u32>,
}

/// The filters on `ifindex` under `parent` ([`PARENT_INGRESS`] or [`PARENT_EGRESS`]). An
/// interface without a clsact qdisc has none (the kernel answers EINVAL or ENOENT).
pub fn filters(ifindex: i32, parent: u32) -> io::Result<Vec<Filter>> {
    let mut req = Vec::with_capacity(TCMSG_LEN);
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    req.extend_from_slice(&ifindex.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // handle
    req.extend_from_slice(&parent.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // info: any priority, any protocol
    let mut out = Vec::new();
    let res = Rtnl::open()?.call(libc::RTM_GETTFILTER, true, &req, |ty, body| {
        if ty == libc::RTM_NEWTFILTER && body.len() >= TCMSG_LEN {
            out.push(filter(body));
        }
    });
    match res {
        Ok(()) => Ok(out),
        // No clsact qdisc on the device: nothing attached there.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn filter(body: &[u8]) -> Filter {
    let mut f = Filter {
        handle: u32_at(body, 8),
        priority: (u32_at(body, 16) >> 16) as u16,
        kind: String::new(),
        bpf_name: None,
        bpf_prog_id: None,
    };
    for (ty, val) in attrs(&body[TCMSG_LEN..]) {
        match ty {
            TCA_KIND => f.kind = c_string(val),
            TCA_OPTIONS => {
                for (ty, val) in attrs(val) {
                    match ty {
                        TCA_BPF_NAME => f.bpf_name = Some(c_string(val)),
                        TCA_BPF_ID if val.len() >= 4 => f.bpf_prog_id = Some(u32_at(val, 0)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtnl::attr;

    #[test]
    fn parses_a_bpf_filter() {
        let mut body = vec![0u8; TCMSG_LEN];
        body[8..12].copy_from_slice(&0x11c5u32.to_ne_bytes());
        body[16..20].copy_from_slice(&((1u32 << 16) | 0x0300).to_ne_bytes());
        body.extend(attr(TCA_KIND, b"bpf\0"));
        let mut opts = attr(TCA_BPF_NAME, b"tc_pod_in:[42]\0");
        opts.extend(attr(TCA_BPF_ID, &42u32.to_ne_bytes()));
        body.extend(attr(TCA_OPTIONS | 0x8000, &opts));
        assert_eq!(
            filter(&body),
            Filter {
                priority: 1,
                handle: 0x11c5,
                kind: "bpf".into(),
                bpf_name: Some("tc_pod_in:[42]".into()),
                bpf_prog_id: Some(42),
            }
        );
    }
}
