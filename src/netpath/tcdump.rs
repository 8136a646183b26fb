//! Lists the classic tc filters on one clsact hook over rtnetlink (RTM_GETTFILTER dump), so the
//! agent can tell its own filters from everyone else's before it removes anything. libbpf can
//! query a filter whose handle and priority it already knows, but cannot list.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// clsact's ingress and egress parents (TC_H_CLSACT major, TC_H_MIN_INGRESS/EGRESS minor).
pub const PARENT_INGRESS: u32 = 0xFFFF_FFF2;
pub const PARENT_EGRESS: u32 = 0xFFFF_FFF3;

const NLMSG_HDRLEN: usize = 16;
const TCMSG_LEN: usize = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
/// A dump of one hook fits in a few messages; this bounds the loop on a confused socket.
const MAX_READS: usize = 4096;

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
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + TCMSG_LEN);
    req.extend_from_slice(&((NLMSG_HDRLEN + TCMSG_LEN) as u32).to_ne_bytes());
    req.extend_from_slice(&libc::RTM_GETTFILTER.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    req.extend_from_slice(&ifindex.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // handle
    req.extend_from_slice(&parent.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // info: any priority, any protocol
                                                // SAFETY: req is a valid buffer of req.len() bytes.
    let n = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    for _ in 0..MAX_READS {
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if parse(&buf[..n as usize], &mut out)? {
            return Ok(out);
        }
    }
    Err(io::Error::other("rtnetlink filter dump did not end"))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses one datagram of the dump into `out`; true when the dump is over.
fn parse(mut b: &[u8], out: &mut Vec<Filter>) -> io::Result<bool> {
    while b.len() >= NLMSG_HDRLEN {
        let len = u32_at(b, 0) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(io::Error::other("truncated rtnetlink message"));
        }
        let (msg, body) = (u16_at(b, 4), &b[NLMSG_HDRLEN..len]);
        match msg {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = if body.len() >= 4 {
                    -(u32_at(body, 0) as i32)
                } else {
                    libc::EPROTO
                };
                return match errno {
                    0 => Ok(true),
                    // No clsact qdisc on the device: nothing attached there.
                    libc::EINVAL | libc::ENOENT => Ok(true),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
            libc::RTM_NEWTFILTER if body.len() >= TCMSG_LEN => out.push(filter(body)),
            _ => {}
        }
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    Ok(false)
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

/// (type, payload) of each rtattr; the nested flag is masked off the type.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16_at(b, 0) as usize;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((u16_at(b, 2) & 0x3fff, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, val: &[u8]) -> Vec<u8> {
        let mut a = ((4 + val.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(val);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn msg(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut m = ((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn parses_a_bpf_filter_and_the_end_of_the_dump() {
        let mut body = vec![0u8; TCMSG_LEN];
        body[8..12].copy_from_slice(&0x11c5u32.to_ne_bytes());
        body[16..20].copy_from_slice(&((1u32 << 16) | 0x0300).to_ne_bytes());
        body.extend(attr(TCA_KIND, b"bpf\0"));
        let mut opts = attr(TCA_BPF_NAME, b"tc_pod_in:[42]\0");
        opts.extend(attr(TCA_BPF_ID, &42u32.to_ne_bytes()));
        body.extend(attr(TCA_OPTIONS | 0x8000, &opts));
        let mut dgram = msg(libc::RTM_NEWTFILTER, &body);
        let mut out = Vec::new();
        assert!(!parse(&dgram, &mut out).unwrap());
        dgram.extend(msg(NLMSG_DONE, &[0; 4]));
        out.clear();
        assert!(parse(&dgram, &mut out).unwrap());
        assert_eq!(
            out,
            vec![Filter {
                priority: 1,
                handle: 0x11c5,
                kind: "bpf".into(),
                bpf_name: Some("tc_pod_in:[42]".into()),
                bpf_prog_id: Some(42),
            }]
        );
        let no_qdisc = msg(NLMSG_ERROR, &(-libc::EINVAL).to_ne_bytes());
        assert!(parse(&no_qdisc, &mut Vec::new()).unwrap());
        let denied = msg(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        assert!(parse(&denied, &mut Vec::new()).is_err());
    }
}
