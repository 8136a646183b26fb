/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Everything the BPF programs share with userspace: event layout, stat indices, limits.
 * Rust reads these types from the skeleton's `types` module; tests pin sizes and offsets. */
#ifndef LLMSLO_H
#define LLMSLO_H

/* Bytes copied from the start of each payload, and from its end when the syscall moved more.
 * Powers of two: the verifier bounds copies by masking. */
#define LLMSLO_HEAD_CAP 4096
#define LLMSLO_TAIL_CAP 512
#define LLMSLO_MAX_IOV 8

enum llmslo_event_kind {
	LLMSLO_EV_ACCEPT = 1, /* accept/accept4 returned a TCP socket fd */
	LLMSLO_EV_READ = 2,   /* read/readv/recvfrom/recvmsg returned bytes (or a hard error) */
	LLMSLO_EV_WRITE = 3,  /* write/writev/sendto/sendmsg returned bytes (or a hard error) */
	LLMSLO_EV_CLOSE = 4,  /* close() on a traced TCP socket fd */
};

/* Per-CPU counters (array index). Userspace sums the CPUs and exports each one. */
enum llmslo_stat {
	LLMSLO_ST_EVENTS = 0,        /* events submitted to the ring buffer */
	LLMSLO_ST_RB_FULL = 1,       /* ring buffer had no room: event lost */
	LLMSLO_ST_ACTIVE_FULL = 2,   /* in-flight syscall map full: syscall not traced */
	LLMSLO_ST_COPY_FAIL = 3,     /* bpf_probe_read_user of the payload failed (event sent, no bytes) */
	LLMSLO_ST_SOCK_FAIL = 4,     /* fd could not be resolved to a socket */
	LLMSLO_ST_CONN_FULL = 5,     /* connection map insert failed */
	LLMSLO_ST_SYSCALL_ERR = 6,   /* traced syscall returned a hard error (EPIPE, ECONNRESET, ...) */
	LLMSLO_ST_TRUNCATED = 7,     /* payload longer than the copy limits (bytes counted, not copied) */
	LLMSLO_ST_MAX = 8,
};

struct llmslo_event_hdr {
	__u64 ts_enter;  /* bpf_ktime_get_ns at syscall entry (CLOCK_MONOTONIC) */
	__u64 ts_exit;   /* at syscall exit */
	__u64 sock_id;   /* kernel address of struct sock: opaque connection id */
	__u64 queued_ts; /* reads: first sk_data_ready on this socket since the previous read, else 0 */
	__u64 cgroup_id; /* cgroup v2 id of the calling task */
	__s64 ret;       /* syscall return: bytes moved, or -errno */
	__u32 tgid;
	__u32 tid;
	__u32 fd;
	__u32 head_len;  /* bytes of data[] copied from the start of the payload */
	__u32 tail_len;  /* bytes of data[] after head_len, copied from the end of the payload */
	__u16 kind;      /* enum llmslo_event_kind */
	__u16 family;    /* AF_INET or AF_INET6 */
	__u16 lport;     /* local port, host order */
	__u16 rport;     /* remote port, host order */
	__u8 laddr[16];  /* local address; IPv4 uses the first 4 bytes */
	__u8 raddr[16];  /* remote address */
	char comm[16];
};

struct llmslo_event {
	struct llmslo_event_hdr hdr;
	__u8 data[LLMSLO_HEAD_CAP + LLMSLO_TAIL_CAP];
};

#endif
