//! A minimal rtnetlink client: one request, its replies handed over message by message. Used to
//! list tc filters (`netpath::tcdump`) and to find which network namespace each veth's peer is
//! in (`discovery::podnet`); a socket that hears the kernel's announcements ([`Watch`],
//! `discovery::net`); the framing is shared with the sock_diag client (`discovery::diag`).
//! Nothing here knows what the messages mean.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// A dump of a few thousand interfaces fits in a few hundred datagrams; this bounds the loop
/// on a confused socket.
const MAX_READS: usize = 16_384;

/// A netlink socket of `protocol` (`NETLINK_ROUTE`, `NETLINK_SOCK_DIAG`) in the calling
/// thread's network namespace, with `flags` (`SOCK_NONBLOCK`) besides close-on-exec.
pub fn socket(protocol: i32, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `NETLINK_ROUTE` socket of the agent's network namespace, and the sequence number of its
/// last request (each request gets its own, so a reply left over from a failed call is skipped).
pub struct Rtnl(OwnedFd, std::cell::Cell<u32>);

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        Ok(Rtnl(
            socket(libc::NETLINK_ROUTE, 0)?,
            std::cell::Cell::new(0),
        ))
    }

    /// Sends a request of type `ty` with `body` (the family header and attributes) and hands
    /// each reply message's (type, body) to `each` until the kernel ends the answer: the end
    /// of a dump, or the acknowledgement of a single request (`NLM_F_ACK` is always set). A
    /// negative acknowledgement is returned as the error it carries.
    pub fn call(
        &self,
        ty: u16,
        dump: bool,
        body: &[u8],
        mut each: impl FnMut(u16, &[u8]),
    ) -> io::Result<()> {
        let mut flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK;
        if dump {
            flags |= libc::NLM_F_DUMP;
        }
        let mut req = Vec::with_capacity(NLMSG_HDRLEN + body.len());
        req.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        req.extend_from_slice(&ty.to_ne_bytes());
        req.extend_from_slice(&(flags as u16).to_ne_bytes());
        let seq = self.1.get().wrapping_add(1);
        self.1.set(seq);
        req.extend_from_slice(&seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        req.extend_from_slice(body);
        // SAFETY: req is a valid buffer of req.len() bytes.
        let n = unsafe { libc::send(self.0.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..MAX_READS {
            // SAFETY: buf is a valid writable buffer of buf.len() bytes.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if parse(&buf[..n as usize], seq, &mut each)? {
                return Ok(());
            }
        }
        Err(io::Error::other("rtnetlink answer did not end"))
    }
}

/// A `NETLINK_ROUTE` socket that listens to multicast groups (`RTNLGRP_*`): tells whether
/// the kernel announced anything since it was last asked, without blocking.
#[derive(Debug)]
pub struct Watch(OwnedFd);

impl Watch {
    pub fn open(groups: &[u32]) -> io::Result<Watch> {
        let w = Watch(socket(libc::NETLINK_ROUTE, libc::SOCK_NONBLOCK)?);
        // SAFETY: an all-zero sockaddr_nl is valid; the kernel picks the port id.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sa is a valid sockaddr_nl of the size passed.
        let r = unsafe {
            libc::bind(
                w.0.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        for g in groups {
            // SAFETY: the option value is a u32 of the size passed.
            let r = unsafe {
                libc::setsockopt(
                    w.0.as_raw_fd(),
                    libc::SOL_NETLINK,
                    libc::NETLINK_ADD_MEMBERSHIP,
                    (g as *const u32).cast(),
                    4,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(w)
    }

    /// Whether anything arrived (or was lost: the socket's buffer overflowed) since the last
    /// call; reads everything queued.
    pub fn changed(&self) -> bool {
        let mut buf = [0u8; 8192];
        let mut changed = false;
        for _ in 0..MAX_READS {
            // SAFETY: buf is a valid writable buffer of buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                changed = true;
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => return changed,
                Some(libc::EINTR) => continue,
                // Announcements were dropped; what is still queued is read on.
                Some(libc::ENOBUFS) => changed = true,
                // Cannot tell.
                _ => return true,
            }
        }
        true
    }
}

/// Hands each message of one datagram that answers request `seq` to `each` (others are what
/// is left of an earlier, failed call: skipped); true when the answer is over.
pub fn parse(mut b: &[u8], seq: u32, each: &mut impl FnMut(u16, &[u8])) -> io::Result<bool> {
    while b.len() >= NLMSG_HDRLEN {
        let len = u32_at(b, 0) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(io::Error::other("truncated rtnetlink message"));
        }
        let (msg, body) = (u16_at(b, 4), &b[NLMSG_HDRLEN..len]);
        if u32_at(b, 8) != seq {
            b = &b[len.next_multiple_of(4).min(b.len())..];
            continue;
        }
        match msg {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = if body.len() >= 4 {
                    (u32_at(body, 0) as i32)
                        .checked_neg()
                        .unwrap_or(libc::EPROTO)
                } else {
                    libc::EPROTO
                };
                return match errno {
                    0 => Ok(true),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
            _ => each(msg, body),
        }
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    Ok(false)
}

/// One rtattr (type, payload), padded to 4 bytes.
pub fn attr(ty: u16, val: &[u8]) -> Vec<u8> {
    let mut a = ((4 + val.len()) as u16).to_ne_bytes().to_vec();
    a.extend_from_slice(&ty.to_ne_bytes());
    a.extend_from_slice(val);
    a.resize(a.len().next_multiple_of(4), 0);
    a
}

/// (type, payload) of each rtattr; the nested flag is masked off the type.
pub fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
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

pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// One message of type `ty` around `body`, as the kernel frames it.
    pub fn msg(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut m = ((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    pub const DONE: u16 = NLMSG_DONE;
    pub const ERROR: u16 = NLMSG_ERROR;

    #[test]
    fn messages_until_the_end_or_an_error() {
        let mut d = msg(100, b"abcd");
        d.extend(msg(101, b"ef"));
        let mut seen = Vec::new();
        assert!(!parse(&d, 0, &mut |t, b: &[u8]| seen.push((t, b.to_vec()))).unwrap());
        assert_eq!(seen, vec![(100, b"abcd".to_vec()), (101, b"ef".to_vec())]);
        d.extend(msg(DONE, &[0; 4]));
        assert!(parse(&d, 0, &mut |_, _: &[u8]| {}).unwrap());
        assert!(parse(&msg(ERROR, &0i32.to_ne_bytes()), 0, &mut |_, _: &[u8]| {}).unwrap());
        let e = parse(
            &msg(ERROR, &(-libc::EPERM).to_ne_bytes()),
            0,
            &mut |_, _: &[u8]| {},
        );
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert!(!parse(&d[..10], 0, &mut |_, _: &[u8]| {}).unwrap());
        let mut short = msg(100, b"abcd");
        short.truncate(18);
        assert!(parse(&short, 0, &mut |_, _: &[u8]| {}).is_err());
    }

    #[test]
    fn replies_to_an_earlier_request_are_skipped() {
        // What a failed call left behind (seq 0: a message and its end), then this call's (seq 7).
        let mut d = msg(100, b"old!");
        d.extend(msg(DONE, &[0; 4]));
        let mut mine = msg(101, b"new!");
        mine[8..12].copy_from_slice(&7u32.to_ne_bytes());
        d.extend(&mine);
        let mut end = msg(DONE, &[0; 4]);
        end[8..12].copy_from_slice(&7u32.to_ne_bytes());
        d.extend(&end);
        let mut seen = Vec::new();
        assert!(parse(&d, 7, &mut |t, b: &[u8]| seen.push((t, b.to_vec()))).unwrap());
        assert_eq!(seen, vec![(101, b"new!".to_vec())]);
        // An error code that cannot be negated is a protocol error, not a panic.
        let e = parse(
            &msg(ERROR, &i32::MIN.to_ne_bytes()),
            0,
            &mut |_, _: &[u8]| {},
        );
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EPROTO));
    }

    #[test]
    fn attributes_round_trip() {
        let mut b = attr(3, b"eth0\0");
        b.extend(attr(37 | 0x8000, &7i32.to_ne_bytes()));
        let a = attrs(&b);
        assert_eq!(a, vec![(3, &b"eth0\0"[..]), (37, &7i32.to_ne_bytes()[..])]);
        assert_eq!(c_string(a[0].1), "eth0");
    }
}
