//! A network namespace's listening TCP sockets from `NETLINK_SOCK_DIAG`, asked for the LISTEN
//! state only. Reading `/proc/<pid>/net/tcp{,6}` walks the kernel's whole established-socket
//! hash, every bucket of every namespace's sockets, for each read (4.6 ms a file on the
//! benchmark VM, whose hash is sized for 24 GiB: the same walk with no connections); a LISTEN-only
//! dump walks the listening hash and stops (`inet_diag_dump_icsk`). A namespace other than the
//! agent's is entered by a short-lived thread (`setns`) that opens the socket there; the
//! socket keeps answering for that namespace.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use crate::rtnl::{parse, socket, u16_at, u32_at, NLMSG_HDRLEN};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then a 48-byte socket id.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`: the socket id (sport at 4, big-endian) ... the inode at 68.
const MSG_LEN: usize = 72;
const TCP_LISTEN: u32 = 10;
/// Bounds the reads of one answer (a dump of tens of thousands of sockets fits).
const MAX_READS: usize = 4096;

/// (socket inode, local port) of the LISTEN sockets, IPv4 and IPv6, of the network namespace
/// `ns` (a `/proc/<pid>/ns/net` path), or of the agent's own when `ns` is `None`.
pub fn listening(ns: Option<&Path>) -> io::Result<Vec<(u64, u16)>> {
    let fd = match ns {
        None => socket(libc::NETLINK_SOCK_DIAG, 0)?,
        Some(ns) => {
            let ns = std::fs::File::open(ns)?;
            // A thread of its own: setns(2) changes the calling thread's namespace.
            std::thread::scope(|s| {
                s.spawn(|| {
                    // SAFETY: setns on this thread with a namespace fd we hold open.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    socket(libc::NETLINK_SOCK_DIAG, 0)
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("sock_diag thread panicked")))
            })?
        }
    };
    let mut out = Vec::new();
    dump(&fd, libc::AF_INET as u8, &mut out)?;
    match dump(&fd, libc::AF_INET6 as u8, &mut out) {
        // A kernel without IPv6 has no handler for its family: no IPv6 listeners.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        r => r?,
    }
    Ok(out)
}

/// The request for one family's TCP sockets in the LISTEN state.
fn request(family: u8, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    m.extend_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    m.resize(NLMSG_HDRLEN + REQ_LEN, 0);
    m
}

/// (inode, port) of one answer message, if it is a LISTEN socket's.
fn listener(body: &[u8]) -> Option<(u64, u16)> {
    let b = body.get(..MSG_LEN)?;
    if u32::from(b[1]) != TCP_LISTEN {
        return None;
    }
    let port = u16::from_be(u16_at(b, 4));
    Some((u64::from(u32_at(b, 68)), port))
}

fn dump(fd: &OwnedFd, family: u8, out: &mut Vec<(u64, u16)>) -> io::Result<()> {
    let seq = u32::from(family);
    let req = request(family, seq);
    // SAFETY: req is a valid buffer of req.len() bytes.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    for _ in 0..MAX_READS {
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut each = |ty: u16, body: &[u8]| {
            if ty == SOCK_DIAG_BY_FAMILY {
                out.extend(listener(body));
            }
        };
        if parse(&buf[..n as usize], seq, &mut each)? {
            return Ok(());
        }
    }
    Err(io::Error::other("sock_diag answer did not end"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_listening_sockets_only() {
        let mut m = vec![0u8; MSG_LEN];
        m[0] = libc::AF_INET as u8;
        m[1] = TCP_LISTEN as u8;
        m[4..6].copy_from_slice(&8000u16.to_be_bytes());
        m[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        assert_eq!(listener(&m), Some((4242, 8000)));
        m[1] = 1; // ESTABLISHED
        assert_eq!(listener(&m), None);
        assert_eq!(listener(&m[..40]), None, "short");
        let r = request(libc::AF_INET6 as u8, 7);
        assert_eq!(r.len(), NLMSG_HDRLEN + REQ_LEN);
        assert_eq!(u32_at(&r, 0) as usize, r.len());
        assert_eq!(u32_at(&r, NLMSG_HDRLEN + 4), 1 << TCP_LISTEN);
    }

    /// The kernel's answer for this process's namespace matches `/proc/net/tcp{,6}`'s LISTEN
    /// rows (both read around a socket this test holds listening).
    #[test]
    fn agrees_with_proc_net_tcp() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l6 = std::net::TcpListener::bind("[::1]:0").ok();
        let mine = l.local_addr().unwrap().port();
        let diag = match listening(None) {
            Ok(d) => d,
            Err(e) => {
                // Only where the kernel has no inet_diag (a module not loaded, not loadable).
                assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
                eprintln!("sock_diag unavailable here ({e}): skipped");
                return;
            }
        };
        assert!(diag.iter().any(|&(_, p)| p == mine), "{diag:?}");
        if let Some(l6) = &l6 {
            let p6 = l6.local_addr().unwrap().port();
            assert!(diag.iter().any(|&(_, p)| p == p6), "{diag:?}");
        }
        let proc: std::collections::BTreeSet<(u64, u16)> = ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|t| super::super::listen_rows(&t))
            .collect();
        let diag: std::collections::BTreeSet<(u64, u16)> = diag.into_iter().collect();
        // Other tests of this process open and close listeners meanwhile: ours agree.
        let ours = |s: &std::collections::BTreeSet<(u64, u16)>| {
            s.iter().filter(|&&(_, p)| p == mine).count()
        };
        assert_eq!(ours(&diag), 1);
        assert_eq!(ours(&proc), 1);
        assert_eq!(
            diag.iter().find(|&&(_, p)| p == mine),
            proc.iter().find(|&&(_, p)| p == mine),
            "same inode"
        );
        // Through a namespace path (what a pod's takes): setns needs CAP_SYS_ADMIN.
        match listening(Some(Path::new("/proc/self/ns/net"))) {
            Ok(via) => assert!(via.iter().any(|&(_, p)| p == mine), "{via:?}"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }
}
