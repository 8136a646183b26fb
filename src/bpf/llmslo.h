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

/* Packet-path and TCP-lifecycle timestamps that reach userspace on a read (request side) or a
 * write (response side) event: indices into llmslo_event_hdr.net_ts. 0 means not seen. */
enum llmslo_net_ts {
	LLMSLO_NET_SYN = 0,         /* first SYN of the connection at the node ingress hook */
	LLMSLO_NET_ESTABLISHED = 1, /* server-side socket reached ESTABLISHED */
	LLMSLO_NET_NODE_IN = 2,     /* first request packet since the previous read, node ingress */
	LLMSLO_NET_NAT_DONE = 3,    /* the same packet after DNAT (netfilter, after the nat hook) */
	LLMSLO_NET_POD_IN = 4,      /* the same packet entering the pod (host side of its veth) */
	LLMSLO_NET_POD_OUT = 5,     /* latest response packet leaving the pod (writes) */
	LLMSLO_NET_NODE_OUT = 6,    /* latest response packet leaving the node (writes) */
	LLMSLO_NET_QUEUED_LAST = 7, /* reads: latest sk_data_ready on the socket before the read returned */
	LLMSLO_NET_MAX = 8,
};

enum llmslo_event_kind {
	LLMSLO_EV_ACCEPT = 1, /* accept/accept4 returned a TCP socket fd */
	LLMSLO_EV_READ = 2,   /* read/readv/recvfrom/recvmsg returned bytes (or a hard error) */
	LLMSLO_EV_WRITE = 3,  /* write/writev/sendto/sendmsg returned bytes (or a hard error) */
	LLMSLO_EV_CLOSE = 4,  /* close() on a traced TCP socket fd */
	LLMSLO_EV_TOKENS = 5, /* token writes of an armed stream, counted in the kernel (llmslo_tokens) */
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
	LLMSLO_ST_FLOW_FULL = 8,     /* packet-path flow map insert failed */
	LLMSLO_ST_PKT_PARSE = 9,     /* a packet at a hook could not be parsed (counted, passed) */
	LLMSLO_ST_RETRANSMIT = 10,   /* retransmitted request segments ignored for timestamps */
	LLMSLO_ST_GPU_MAP_FULL = 11, /* GPU per-cgroup counter or in-flight sync map full: call not counted */
	LLMSLO_ST_CONN_INSERT = 12,  /* connection map: new entries (with deletes and the live count,
				      * userspace derives the LRU's evictions) */
	LLMSLO_ST_CONN_DELETE = 13,  /* connection map: entries removed at close() */
	LLMSLO_ST_TOKEN_WRITES = 14, /* token writes counted in the kernel instead of sent as events */
	LLMSLO_ST_TOKEN_RECORDS = 15, /* LLMSLO_EV_TOKENS records sent (each also counted in EVENTS) */
	LLMSLO_ST_STREAM_BUSY = 16,  /* an arm not taken: both of its connection's slots in `streams` held by
				      * others (its token writes go out as events; tried again at each) */
	LLMSLO_ST_MAX = 17,
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
	__u64 net_ts[LLMSLO_NET_MAX]; /* enum llmslo_net_ts */
	/* Reads and writes: cumulative counters as the syscall returned, so that userspace can take
	 * the difference between two events of a request (what happened inside the server between
	 * them). Valid when the matching bit of `inside` is set (enum llmslo_inside). */
	__u64 runq_total_ns;      /* run-queue wait of the calling thread so far */
	__u64 gpu_launches;       /* its cgroup's llmslo_gpu_counts.launches so far */
	__u64 gpu_graph_launches; /* ... graph_launches */
	__u64 gpu_sync_wait_ns;   /* ... sync_wait_ns */
	__u32 inside;             /* enum llmslo_inside bits */
	__u32 pad;
};

/* Which cumulative counters an event carries. */
enum llmslo_inside {
	LLMSLO_INSIDE_RUNQ = 1, /* the run-queue programs are loaded: runq_total_ns is valid */
	LLMSLO_INSIDE_GPU = 2,  /* its cgroup has GPU counters (libcuda probed): gpu_* are valid */
};

/* A TCP flow as the server's socket sees it: saddr/sport the client, daddr/dport the server.
 * Packet hooks store stamps under this key (after undoing DNAT); syscalls consume them. */
struct llmslo_flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; /* host order */
	__u16 dport;
	__u16 family;
	__u16 pad;
};

/* Request-direction hops that filter retransmits by sequence number. */
enum llmslo_hop {
	LLMSLO_HOP_NODE = 0,
	LLMSLO_HOP_NAT = 1,
	LLMSLO_HOP_POD = 2,
	LLMSLO_HOP_UNDERLAY = 3, /* overlay traffic seen encapsulated on the NIC */
	LLMSLO_HOP_MAX = 4
};

struct llmslo_flow {
	__u64 ts[LLMSLO_NET_MAX];
	__u32 seq_end[LLMSLO_HOP_MAX]; /* highest request sequence end seen per hop (0: none) */
	__u32 retransmits;             /* tcp_retransmit_skb on the server's socket */
	__u32 pad;
};

/* CUDA driver activity of one target cgroup (gpu.bpf.c): one entry per cgroup, added to
 * atomically by all its processes, so that the L7 programs can read its totals at the moment of
 * a syscall. */
struct llmslo_gpu_counts {
	__u64 launches;       /* cuLaunchKernel, cuLaunchKernelEx (and their _ptsz forms) */
	__u64 graph_launches; /* cuGraphLaunch(_ptsz) */
	__u64 memcpy_bytes;   /* size argument of cuMemcpyHtoDAsync_v2, cuMemcpyDtoHAsync_v2, cuMemcpyAsync (_ptsz) */
	__u64 syncs;          /* cuStreamSynchronize(_ptsz), cuCtxSynchronize (counted when they return) */
	__u64 sync_wait_ns;   /* their return - entry */
};

struct llmslo_event {
	struct llmslo_event_hdr hdr;
	__u8 data[LLMSLO_HEAD_CAP + LLMSLO_TAIL_CAP];
};

/* ---- token writes counted in the kernel ----
 * Once userspace has seen one whole token event of a streamed response it knows what every
 * token event of that server's responses on the connection looks like: the same bytes before
 * the token's text (id, created, model, the content key) and after it (finish_reason null, the
 * event's blank line). It arms the connection with them (stream_arms, keyed by socket), marking
 * the bytes that differ from one response to the next (the values of "id" and "created") as
 * free to vary. A later write that is exactly one such event, in one chunk (or unchunked), is
 * then counted in the kernel: its start stamp and size go into the connection's llmslo_tokens
 * entry instead of an event with its bytes. The arm stays until the socket closes, so the next
 * responses on a keep-alive connection are counted from their first token. The entry is sent
 * as one LLMSLO_EV_TOKENS record before the connection's next event, when full, when its span
 * reaches LLMSLO_TOKENS_SPAN_NS, or when the socket closes. */
#define LLMSLO_ARM_PREFIX_CAP 256
#define LLMSLO_ARM_SUFFIX_CAP 128
#define LLMSLO_TAKE_MAX 512     /* longest write judged */
#define LLMSLO_TOKEN_TEXT_MAX 128 /* longest token text (as escaped in JSON) */
#define LLMSLO_TOKENS_MAX 64
#define LLMSLO_ARM_VARY_MAX 6 /* template words with bytes that may vary, per part */
#define LLMSLO_TOKENS_SPAN_NS 1000000000ULL

struct llmslo_stream_arm {
	__u16 prefix_len; /* 8..LLMSLO_ARM_PREFIX_CAP */
	__u16 suffix_len; /* 8..LLMSLO_ARM_SUFFIX_CAP */
	__u32 chunked;    /* each event is one chunk of a chunked body */
	/* Where the words the kernel compares hold bytes that may vary (byte offsets into the
	 * prefix / suffix, each the start of a compared word): only those are checked for bytes
	 * that would change the event's JSON. */
	__u8 prefix_vary_n;
	__u8 suffix_vary_n;
	__u8 prefix_vary[LLMSLO_ARM_VARY_MAX];
	__u8 suffix_vary[LLMSLO_ARM_VARY_MAX];
	__u8 pad[2];
	__u8 prefix[LLMSLO_ARM_PREFIX_CAP];
	__u8 suffix[LLMSLO_ARM_SUFFIX_CAP];
	/* 0xff: the byte at the same place must be the template's; 0: it may vary (one that is
	 * not a quote, a backslash or a control byte, so the event's JSON keeps its shape). */
	__u8 prefix_fixed[LLMSLO_ARM_PREFIX_CAP];
	__u8 suffix_fixed[LLMSLO_ARM_SUFFIX_CAP];
};

/* A connection's counted token writes; the payload of its LLMSLO_EV_TOKENS record is delta[0..n]
 * (head_len = 4 n), the header's ts_enter is `first`, ts_exit `last_exit`, ret `bytes`, and its
 * tid and inside counters are those of the first write (what that write's own event would have
 * carried: a response's first token may be among them, and the stages it bounds need them). */
struct llmslo_tokens {
	__u64 first;     /* start stamp of the first write */
	__u64 last_exit; /* when the last one returned */
	__u64 bytes;     /* bytes of all of them */
	__u32 n;
	__u32 tid;       /* the thread of the first write */
	__u64 runq_total_ns;      /* llmslo_event_hdr's counters as the first write returned */
	__u64 gpu_launches;
	__u64 gpu_graph_launches;
	__u64 gpu_sync_wait_ns;
	__u32 inside;
	__u32 pad;
	__u32 delta[LLMSLO_TOKENS_MAX]; /* each write's start - first, ns */
};

/* A connection's token counting in the kernel (l7.bpf.c's `streams`): the open batch (acc.n > 0)
 * and the arm it was adopted with from userspace's `stream_arms`. */
struct llmslo_stream {
	struct llmslo_tokens acc;
	struct llmslo_stream_arm arm;
};

struct llmslo_tokens_event {
	struct llmslo_event_hdr hdr;
	__u32 delta[LLMSLO_TOKENS_MAX];
};

/* exec.bpf.c -> discovery: a process started (exec), ended (its leader exited) or opened a
 * listening TCP socket. */
enum llmslo_proc_kind { PROC_EXEC = 1, PROC_EXIT = 2, PROC_LISTEN = 3 };

struct llmslo_proc_event {
	__u32 tgid;
	__u32 kind; /* enum llmslo_proc_kind */
};

#endif
