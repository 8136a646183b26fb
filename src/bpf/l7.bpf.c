// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Request/response bytes and timing of target servers' TCP sockets: reads and writes from the
 * socket layer (sock/sock_send_length, sock/sock_recv_length, tcp/tcp_sendmsg_locked) or, on
 * kernels without those, from the read/write family's syscall tracepoints (per syscall, or the
 * raw sys_enter/sys_exit); accept and close from their syscall tracepoints; socket readiness
 * from sock/sk_data_ready. Userspace loads one set (loader.rs, SyscallHooks). Untargeted
 * processes pay a load and a mask (a cgroup walk where cgroups are targeted) and leave. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>
#include "maps.h"
#include "targets.h"
#include "gpu_counts.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define EPIPE 32
#define ECONNRESET 104
#define ETIMEDOUT 110
/* recv flags whose bytes are not the stream's next: a peek leaves them for the read that
 * follows; the error queue is not the stream. */
#define MSG_PEEK 2
#define MSG_ERRQUEUE 0x2000
#define NOT_STREAM_READ (MSG_PEEK | MSG_ERRQUEUE)

/* Set by userspace before attach: skip the cgroup lookup while no cgroup is targeted. */
__u32 n_cgroup_targets = 0;

/* Set by userspace once a libcuda has been probed: until then no GPU counters exist and the
 * reads and writes skip their lookup. */
__u32 gpu_probed = 0;

/* Target tgids, one bit each over the whole pid space (PID_MAX_LIMIT: 4M on 64-bit), in the
 * .bss that userspace writes through its mapping. Every read, write, accept and close of every
 * process on the node asks whether its process is a target: this way the answer is a load and
 * a mask, without a helper call or a hash (`target_tgids` stays the list that the GPU object
 * and userspace use). 512 KiB. */
#define TGID_BITS (4 * 1024 * 1024)
__u8 target_tgid_bits[TGID_BITS / 8] = {};

/* Bit `idx` (< TGID_BITS, checked by the caller) of a TGID_BITS-bit array of the .bss. */
static __always_inline bool bit_is_set(const __u8 *bits, __u64 idx)
{
	/* The mask, on the very register used, is what the verifier bounds the load by. */
	__u64 byte = idx >> 3;
	asm volatile("%0 &= 0x7ffff" : "+r"(byte)); /* TGID_BITS / 8 - 1 */
	return bits[byte] & (1 << (idx & 7));
}

static __always_inline bool tgid_is_target(__u32 tgid)
{
	return tgid < TGID_BITS && bit_is_set(target_tgid_bits, tgid);
}

/* The calling task, for field loads. The pointer bpf_get_current_task_btf() returns is trusted,
 * and for every pointer loaded from a trusted pointer the verifier asks whether the field's type
 * is marked RCU- or trusted-safe by looking names like "task_struct__safe_trusted" up in the
 * kernel's BTF: linear scans of its ~100k types, repeated for each such load on each path it
 * walks. That was most of the L7 object's load time (perf: btf_find_by_name_kind under
 * check_ptr_to_btf_access). A copy cast with bpf_core_cast (the verifier turns bpf_rdonly_cast into
 * a register move) is an untrusted BTF pointer, walked like any other: the loads are the same
 * guarded loads. The task-storage calls, which need the trusted pointer, keep it. */
static __always_inline struct task_struct *current_task(void)
{
	return bpf_core_cast(bpf_get_current_task_btf(), struct task_struct);
}

/* The calling process's tgid (the root namespace's pid, as bpf_get_current_pid_tgid() gives
 * it) through the task pointer, which recent x86-64 JITs inline into a per-CPU load, where
 * bpf_get_current_pid_tgid() stays a helper call. Measured here (scripts/syscall-cost.sh,
 * bpf_stats): a target's enter_write 224 -> 210 ns, raw sys_enter 257 -> 239; an untargeted
 * call's 66 ns unchanged (the run-time accounting's own clock reads dominate it). */
static __always_inline __u32 current_tgid(void)
{
	return current_task()->tgid;
}

/* Set by userspace before load (`cpu_runqueue`): reads and writes carry their thread's
 * run-queue wait, the scheduler's sched_info.run_delay (without it the verifier drops that
 * read). */
const volatile __u32 runq_on = 0;

/* Keep the shared types in BTF so the skeleton's `types` module exports them to Rust. */
struct llmslo_event _event = {};
enum llmslo_stat _stat = LLMSLO_ST_EVENTS;
enum llmslo_event_kind _kind = LLMSLO_EV_ACCEPT;
enum llmslo_net_ts _net = LLMSLO_NET_SYN;
enum llmslo_inside _inside = LLMSLO_INSIDE_RUNQ;
struct llmslo_flow _flow = {};
struct llmslo_flow_key _flow_key = {};
struct llmslo_stream_arm _arm = {};
struct llmslo_tokens_event _tokens_event = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} target_cgroups SEC(".maps");

/* Target cgroups again, one bit per cgroup id of a window of ids, in the .bss (written by
 * userspace like target_tgid_bits). On Kubernetes a server is targeted by its container's
 * cgroup too, so n_cgroup_targets is set on every node and every untargeted syscall asks:
 * the answer is then a chain of loads and a mask, not a helper call and a hash lookup.
 * Cgroup ids are kernfs ids, allocated in increasing order and shared with every file of every
 * cgroup (~50 a cgroup): a node that has run for a while is past any fixed range (this test VM
 * after 8 hours of testbeds: 5.6M). So the bitmap covers [target_cgroup_base, + window) where
 * userspace puts the base at its oldest target when the window holds none (at start, or once
 * its targets are gone), and later pods' ids fall in the window for the next ~80k cgroups
 * made. The bitmap only ever says yes: a target outside the window (or whose bit is not set
 * yet while the window moves) is found in target_cgroups, asked only while
 * n_cgroup_outside says there may be one. 512 KiB. */
#define CGROUP_BITS TGID_BITS
__u8 target_cgroup_bits[CGROUP_BITS / 8] = {};
__u64 target_cgroup_base = 0;
__u32 n_cgroup_outside = 0;
/* The window's width, set before load (at most CGROUP_BITS): narrowed only by tests
 * (LLMSLO_CGROUP_WINDOW), which need targets outside it without making millions of cgroups. */
const volatile __u32 cgroup_window = CGROUP_BITS;

static __always_inline bool cgroup_is_target(__u64 cg)
{
	__u64 rel = cg - *(volatile __u64 *)&target_cgroup_base;
	if (rel < cgroup_window && bit_is_set(target_cgroup_bits, rel))
		return true;
	if (!*(volatile __u32 *)&n_cgroup_outside)
		return false;
	return bpf_map_lookup_elem(&target_cgroups, &cg) != NULL;
}

/* The task's cgroup v2 id (what bpf_get_current_cgroup_id() returns for current), by plain
 * loads through BTF pointers. */
static __always_inline __u64 task_cgroup_id(struct task_struct *p)
{
	return p->cgroups->dfl_cgrp->kn->id;
}

enum io_kind { IO_FLAT = 0, IO_IOV = 1 };

struct active_io {
	__u64 ts_enter;
	__u64 sk;
	__u64 buf; /* flat buffer or struct iovec array */
	__u64 pod_out; /* a write's last packet left the pod during it (the socket-layer set) */
	__u32 fd;
	__u32 iovcnt;
	__u16 kind;    /* LLMSLO_EV_* */
	__u16 io;      /* enum io_kind */
};

/* One in-flight traced syscall per thread, in the thread's own storage: no hash, no lock, no
 * capacity to run out of, and freed with the thread. Every syscall exit on the node asks for
 * it, and for a thread that was never traced the answer is one pointer load. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct active_io);
} active SEC(".maps");

/* Is the calling process traced: its tgid's bit, else (with cgroup targets) its cgroup's. */
static __always_inline bool is_target(void)
{
	__u32 tgid = current_tgid();
	if (tgid_is_target(tgid))
		return true;
	if (!n_cgroup_targets)
		return false;
	return cgroup_is_target(task_cgroup_id(current_task()));
}

/* Records the traced syscall now entering; false when the storage cannot be had. */
static __always_inline bool active_put(const struct active_io *a)
{
	struct active_io *slot = bpf_task_storage_get(&active, bpf_get_current_task_btf(), 0,
						      BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!slot)
		return false;
	*slot = *a;
	return true;
}

/* Can the calling thread hold an active slot? Without cgroup targets a process that is not a
 * target leaves here, before the storage lookup (the tgid bit); with them the storage answers,
 * so a syscall whose process stops being a target while it blocks (a read waiting for a
 * request) still completes its event. */
static __always_inline bool may_have_active(void)
{
	return n_cgroup_targets || tgid_is_target(current_tgid());
}

/* Takes the traced syscall now exiting, if this thread entered one. A slot left by a process
 * untargeted mid-syscall stays until its next traced enter overwrites or clears it
 * (active_clear). */
static __always_inline bool active_take(struct active_io *out)
{
	if (!may_have_active())
		return false;
	struct active_io *slot = bpf_task_storage_get(&active, bpf_get_current_task_btf(), 0, 0);
	if (!slot || !slot->kind)
		return false;
	*out = *slot;
	slot->kind = 0;
	return true;
}

/* A target's read/write on something other than a TCP socket: no slot may stay from an
 * earlier syscall for its exit to take. */
static __always_inline void active_clear(void)
{
	struct active_io *slot = bpf_task_storage_get(&active, bpf_get_current_task_btf(), 0, 0);
	if (slot)
		slot->kind = 0;
}

struct scratch {
	struct llmslo_event_hdr hdr;
	/* Twice the head cap so that every bounded copy is provably in range. */
	__u8 data[2 * LLMSLO_HEAD_CAP];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch_buf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 * 1024 * 1024);
} events SEC(".maps");

/* The compiler may drop a bound it can prove redundant, leaving the verifier without it. These
 * force the clamp/mask onto the very register that is then used. */
static __always_inline __u64 clamp_to(__u64 v, __u64 max)
{
	asm volatile("" : "+r"(v));
	if (v > max)
		v = max;
	asm volatile("" : "+r"(v));
	return v;
}

static __always_inline __u64 head_off(__u64 v)
{
	asm volatile("%0 &= 4095" : "+r"(v)); /* LLMSLO_HEAD_CAP - 1 */
	return v;
}

/* The file operations of sockets (the kernel's socket_file_ops, which kallsyms does not always
 * name), learnt from the first socket whose inode says S_IFSOCK: a file whose f_op is these is
 * a socket, told from the file's own cache line. Its inode's line is then not loaded at all
 * (in the overhead bench, the walk's loads that miss the cache are most of enter_write's time). */
__u64 sock_fops = 0;

/* current->files->fdt->fd[fd] → struct sock, for TCP over IPv4/IPv6 only. Every target
 * read/write pays this walk, so it loads through BTF pointers (plain loads the JIT guards with
 * an exception table) instead of a helper call per field: one bpf_probe_read_kernel remains,
 * for the fd array slot, whose variable index a BTF pointer cannot take. */
static __always_inline struct sock *fd_to_sock(__u32 fd)
{
	struct fdtable *fdt = current_task()->files->fdt;
	if (!fdt || fd >= fdt->max_fds)
		return NULL;
	/* A pointer to pointers reads as a plain number: the slot is copied. */
	struct file **fds = fdt->fd;
	struct file *raw = NULL;
	if (bpf_probe_read_kernel(&raw, sizeof(raw), &fds[fd]) || !raw)
		return NULL;
	struct file *f = bpf_core_cast(raw, struct file);
	__u64 fops = (__u64)f->f_op;
	if (fops != sock_fops) {
		if ((f->f_inode->i_mode & S_IFMT) != S_IFSOCK)
			return NULL;
		sock_fops = fops;
	}
	struct socket *sock = bpf_core_cast(f->private_data, struct socket);
	struct sock *sk = sock->sk;
	if (!sk)
		return NULL;
	__u16 family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return NULL;
	if (sk->sk_protocol != IPPROTO_TCP)
		return NULL;
	return sk;
}

/* target_ports again, one bit a port in the .bss (8 KiB; userspace sets bits through its
 * mapping, accept with an atomic or): the socket-layer programs and sk_data_ready ask it for
 * every TCP send, receive and arrival on the node. The map's entries are 8 bytes apart (512 KiB
 * for the 64k ports), so most ports' entries are cache misses on a busy node, and each test
 * was a lookup: here two tests are two loads from 8 KiB. Measured (perf share, an untargeted
 * TCP writer and its reader): the four programs 66 -> ~55 ns a write. The packet programs
 * (netpath.bpf.c, another object) keep the map. */
__u64 target_port_bits[65536 / 64] = {};

static __always_inline bool port_bit(__u16 port)
{
	return (target_port_bits[port >> 6] >> (port & 63)) & 1;
}

/* Is either end of `sk` a server port of a target (target_ports: learnt at accept and from
 * discovery's listeners)? A target's server side is; so is its client side toward one, a
 * sidecar's upstream, the only client side the assembler uses (the sidecar join). Reads and
 * writes on other sockets are not followed, whoever makes them. Asked before the target test
 * by the socket-layer programs: one load from the socket the kernel has just used and two
 * array loads, so that the rest of the node's TCP I/O pays that and not the walk to its
 * cgroup. */
static __always_inline bool sk_port_of_interest(struct sock *sk)
{
	return port_bit(sk->__sk_common.skc_num) || port_bit(bpf_ntohs(sk->__sk_common.skc_dport));
}

static __always_inline struct listen_key listen_key_of(struct sock *sk)
{
	struct listen_key k = {
		.netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum),
		.port = BPF_CORE_READ(sk, __sk_common.skc_num),
	};
	return k;
}

/* The connection's tuple: from its map entry when an earlier event read it, else from the
 * socket (and kept in the entry, when there is one). */
static __always_inline void conn_tuple_of(struct sock *sk, struct conn_info *ci, struct conn_tuple *t)
{
	/* An entry whose socket closed without a close() we saw (killed server, close_range, an fd
	 * closed by a process no longer targeted) may now name a new socket at the same address. */
	if (ci && ci->tuple.family &&
	    (!ci->tuple.stale || BPF_CORE_READ(sk, __sk_common.skc_state) == 7 /* TCP_CLOSE */)) {
		*t = ci->tuple;
		return;
	}
	read_tuple(sk, t);
	if (ci)
		ci->tuple = *t;
}

/* A read or write carries the cumulative counters of what happened inside the server: its
 * thread's run-queue wait and its cgroup's GPU activity (every process of the server's
 * container: vLLM's engine core launches the kernels, not the process that serves HTTP).
 * The run-queue wait is the scheduler's own account (sched_info.run_delay: every wait from
 * becoming runnable, woken or preempted, to getting a CPU, summed per thread; what
 * /proc/<pid>/task/<tid>/schedstat shows), read with a load: no program on the scheduler's
 * paths, which every context switch of the node would pay. One hash lookup for the GPU
 * counters, for target processes' reads and writes only. fill_hdr has zeroed them and set the
 * cgroup id. */
/* No counters in `o` (a header, or a token count's first-write fields: the same names). */
#define CLEAR_INSIDE(o)                                                                        \
	do {                                                                                   \
		(o)->inside = 0;                                                               \
		(o)->pad = 0;                                                                  \
		(o)->runq_total_ns = 0;                                                        \
		(o)->gpu_launches = 0;                                                         \
		(o)->gpu_graph_launches = 0;                                                   \
		(o)->gpu_sync_wait_ns = 0;                                                     \
	} while (0)

/* The counters into `o`, their llmslo_inside bits into its `inside` (cleared before). */
#define FILL_INSIDE(o, cgroup)                                                                 \
	do {                                                                                   \
		if (runq_on) {                                                                 \
			struct task_struct *task_ = current_task();                            \
			if (bpf_core_field_exists(task_->sched_info)) {                        \
				(o)->runq_total_ns = task_->sched_info.run_delay;              \
				(o)->inside |= LLMSLO_INSIDE_RUNQ;                             \
			}                                                                      \
		}                                                                              \
		if (gpu_probed) {                                                              \
			__u64 cg_ = (cgroup);                                                  \
			struct llmslo_gpu_counts *g_ = bpf_map_lookup_elem(&gpu_counts, &cg_); \
			if (g_) {                                                              \
				(o)->gpu_launches = g_->launches;                              \
				(o)->gpu_graph_launches = g_->graph_launches;                  \
				(o)->gpu_sync_wait_ns = g_->sync_wait_ns;                      \
				(o)->inside |= LLMSLO_INSIDE_GPU;                              \
			}                                                                      \
		}                                                                              \
	} while (0)

static __always_inline void fill_inside(struct llmslo_event_hdr *h)
{
	FILL_INSIDE(h, h->cgroup_id);
}

static __always_inline void fill_hdr(struct llmslo_event_hdr *h, struct active_io *a, struct sock *sk,
				     const struct conn_tuple *t, __u64 ts_exit, __s64 ret)
{
	/* Ids and name by plain loads through the task pointer rather than three helper calls
	 * (each a call and a return thunk on this path, which every traced syscall takes). */
	struct task_struct *task = current_task();
	h->ts_enter = a->ts_enter;
	h->ts_exit = ts_exit;
	h->sock_id = (__u64)sk;
	h->queued_ts = 0;
	h->cgroup_id = task_cgroup_id(task);
	h->ret = ret;
	h->tgid = task->tgid;
	h->tid = task->pid;
	h->fd = a->fd;
	h->kind = a->kind;
	h->family = t->family;
	h->lport = t->lport;
	h->rport = t->rport;
	__builtin_memcpy(h->laddr, t->laddr, sizeof(h->laddr));
	__builtin_memcpy(h->raddr, t->raddr, sizeof(h->raddr));
	/* task->comm is NUL-terminated within its 16 bytes, like bpf_get_current_comm's copy. */
	__builtin_memcpy(h->comm, task->comm, sizeof(h->comm));
	__builtin_memset(h->net_ts, 0, sizeof(h->net_ts));
	/* Reads and writes fill these last (fill_inside), accepts and closes carry none. */
	CLEAR_INSIDE(h);
}

/* Moves the packet-path stamps of this socket's flow into the event: request-side stamps are
 * consumed by reads (the next request's first packet sets them again), response-side ones are
 * copied on writes, connection-setup ones on accept. */
/* The flow under the port the packets were addressed to, when a REDIRECT inside the pod moved
 * the connection to another port (a sidecar's capture port); NULL when there is none. */
static __always_inline struct llmslo_flow *redirected_flow(struct llmslo_flow_key *k)
{
	struct llmslo_flow_key c = *k;
	c.dport = 0;
	__u16 *dp = bpf_map_lookup_elem(&flow_by_client, &c);
	if (!dp || *dp == k->dport)
		return NULL;
	c.dport = *dp;
	return bpf_map_lookup_elem(&flows, &c);
}

/* Moves `n` stamps from slot `from` on of flow `f` into the event (taking them when `take`),
 * filling only slots still empty. Returns whether any was found. */
static __always_inline bool copy_stamps(struct llmslo_event_hdr *h, struct llmslo_flow *f,
					__u32 from, __u32 n, bool take)
{
	bool any = false;
	for (__u32 i = 0; i < 3; i++) {
		__u32 j = from + i;
		if (i >= n || j >= LLMSLO_NET_MAX)
			break;
		if (!h->net_ts[j] && f->ts[j]) {
			h->net_ts[j] = f->ts[j];
			any = true;
		}
		if (take)
			f->ts[j] = 0;
	}
	return any;
}

/* Moves the packet-path stamps of this socket's flow into the event: request-side stamps are
 * consumed by reads (the next request's first packet sets them again), response-side ones are
 * copied on writes, connection-setup ones on accept. A connection redirected inside the pod
 * also looks at the flow of the port its packets were addressed to. */
static __always_inline void take_flow_stamps(struct llmslo_event_hdr *h, const struct conn_tuple *t,
					    __u16 kind, __u64 pod_out)
{
	struct llmslo_flow_key k;
	tuple_flow_key(t, &k);
	__u32 from, n;
	bool take = false;
	if (kind == LLMSLO_EV_READ) {
		from = LLMSLO_NET_NODE_IN; /* node_in, nat_done, pod_in */
		n = 3;
		take = true;
	} else if (kind == LLMSLO_EV_WRITE) {
		from = LLMSLO_NET_POD_OUT; /* pod_out, node_out */
		n = 2;
	} else if (kind == LLMSLO_EV_ACCEPT) {
		from = LLMSLO_NET_SYN; /* syn, established */
		n = 2;
	} else {
		return;
	}
	struct llmslo_flow *f = bpf_map_lookup_elem(&flows, &k);
	bool any = f && copy_stamps(h, f, from, n, take);
	/* The write's own packets, stamped in its send (tc_pod_out): the later of the two. */
	if (pod_out) {
		if (pod_out > h->net_ts[LLMSLO_NET_POD_OUT])
			h->net_ts[LLMSLO_NET_POD_OUT] = pod_out;
		any = true;
	}
	if (any && kind != LLMSLO_EV_ACCEPT)
		return;
	struct llmslo_flow *r = redirected_flow(&k);
	if (r)
		copy_stamps(h, r, from, n, take);
}

/* Waking the reader for every event costs the traced syscall several microseconds; the reader
 * drains on a short timer instead, and is woken once per WAKEUP_BACKLOG bytes of backlog: by
 * the record that carries the backlog across a multiple of it. (Forcing a wake-up on every
 * record past a mark, as this did before, cost each of them an interrupt raised on its CPU, a
 * VM exit on virtual machines: 40 % of the write exit's time under a fast token stream.) A
 * crossing missed between racing CPUs only leaves the backlog to the timer. */
#define WAKEUP_BACKLOG (256 * 1024)

/* Set by userspace while its reader sleeps long, after a spell without records (its drain
 * timer then runs at the housekeeping pace, not the busy one): the record that finds the ring
 * empty wakes it, once per quiet spell, and the reader clears this when it wakes. */
__u32 reader_idle = 0;

/* The wake-up flag for a record of `size` bytes. */
static __always_inline __u64 wakeup_flag(__u64 size)
{
	__u64 backlog = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	if (backlog == 0 && *(volatile __u32 *)&reader_idle)
		return BPF_RB_FORCE_WAKEUP;
	return (backlog + size) / WAKEUP_BACKLOG != backlog / WAKEUP_BACKLOG ? BPF_RB_FORCE_WAKEUP
									      : BPF_RB_NO_WAKEUP;
}

static __always_inline int submit(struct scratch *s)
{
	__u64 n = clamp_to(s->hdr.head_len + s->hdr.tail_len, LLMSLO_HEAD_CAP + LLMSLO_TAIL_CAP);
	__u64 size = sizeof(s->hdr) + n;
	if (bpf_ringbuf_output(&events, s, size, wakeup_flag(size))) {
		bump(LLMSLO_ST_RB_FULL);
		return 0;
	}
	bump(LLMSLO_ST_EVENTS);
	return 0;
}

/* Copies the first HEAD_CAP and the last TAIL_CAP of `n` bytes of a flat user buffer. */
static __always_inline void copy_flat(struct scratch *s, __u64 buf, __u64 n)
{
	__u64 h = clamp_to(n, LLMSLO_HEAD_CAP);
	if (bpf_probe_read_user(s->data, h, (void *)buf)) {
		bump(LLMSLO_ST_COPY_FAIL);
		return;
	}
	s->hdr.head_len = h;
	if (n > LLMSLO_HEAD_CAP) {
		__u64 rest = n - LLMSLO_HEAD_CAP;
		__u64 t = clamp_to(rest, LLMSLO_TAIL_CAP);
		if (!bpf_probe_read_user(s->data + LLMSLO_HEAD_CAP, t, (void *)(buf + n - t)))
			s->hdr.tail_len = t;
		if (rest > LLMSLO_TAIL_CAP)
			bump(LLMSLO_ST_TRUNCATED);
	}
}

/* Where a walk over an iovec array stands. */
struct iov_walk {
	__u64 n;	 /* payload bytes the syscall moved */
	__u64 pos;	 /* payload bytes covered by the vectors seen so far */
	__u64 last_base; /* the last vector with bytes of the payload */
	__u64 last_len;	 /* how many of them */
	__u64 off;	 /* bytes copied into data[] */
};

/* One vector of the walk: copies what of it fits into the head. Returns 0 to go on, 1 when the
 * walk is over (the payload covered, or a vector that could not be read). A global function:
 * the verifier checks it once, whatever its callers' state, where the loop's body inlined eight
 * times was walked once per path through the vectors before it (~100k instructions a program). */
__noinline int llmslo_iov_step(struct scratch *s, struct iov_walk *w, __u64 uiov)
{
	if (!s || !w || w->pos >= w->n)
		return 1;
	struct iovec iov;
	if (bpf_probe_read_user(&iov, sizeof(iov), (void *)uiov)) {
		bump(LLMSLO_ST_COPY_FAIL);
		return 1;
	}
	__u64 len = iov.iov_len;
	if (len > w->n - w->pos)
		len = w->n - w->pos;
	if (len == 0)
		return 0;
	__u64 off = w->off;
	if (off < LLMSLO_HEAD_CAP) {
		__u64 c = clamp_to(len, LLMSLO_HEAD_CAP - off);
		c = clamp_to(c, LLMSLO_HEAD_CAP);
		if (bpf_probe_read_user(s->data + head_off(off), c, iov.iov_base)) {
			bump(LLMSLO_ST_COPY_FAIL);
			return 1;
		}
		w->off = off + c;
	}
	w->last_base = (__u64)iov.iov_base;
	w->last_len = len;
	w->pos += len;
	return 0;
}

/* The same as copy_flat over an iovec array: head across up to MAX_IOV vectors, tail from the
 * last one, placed right after the head (data[head_len..]) as userspace reads it. */
static __always_inline void copy_iov(struct scratch *s, __u64 iovp, __u32 iovcnt, __u64 n)
{
	struct iov_walk w = { .n = n };
	for (__u32 i = 0; i < LLMSLO_MAX_IOV; i++) {
		if (i >= iovcnt || llmslo_iov_step(s, &w, iovp + i * sizeof(struct iovec)))
			break;
	}
	/* The walk's fields come back as any value: bound them again. */
	__u64 off = clamp_to(w.off, LLMSLO_HEAD_CAP);
	s->hdr.head_len = off;
	if (n <= off)
		return;
	/* Bytes were left uncopied. A tail is only meaningful if the vectors we walked cover all
	 * n bytes, so that the last one ends where the payload ends. */
	if (w.pos != n || w.last_len == 0)
		return;
	__u64 t = n - off;
	if (t > w.last_len)
		t = w.last_len;
	t = clamp_to(t, LLMSLO_TAIL_CAP);
	/* At data[off], off <= HEAD_CAP: a full head (off == HEAD_CAP) puts it at data[HEAD_CAP]. */
	if (!bpf_probe_read_user(s->data + off, t, (void *)(w.last_base + w.last_len - t)))
		s->hdr.tail_len = t;
	if (n - off > t)
		bump(LLMSLO_ST_TRUNCATED);
}

/* A target's read/write-family syscall enters: note it if the fd is a TCP socket. */
static __always_inline int enter_traced(__u32 fd, __u64 buf, __u32 iovcnt, __u16 kind, __u16 io)
{
	struct sock *sk = fd_to_sock(fd);
	if (!sk || !sk_port_of_interest(sk)) {
		active_clear();
		return 0;
	}
	struct active_io a = {
		.ts_enter = bpf_ktime_get_ns(),
		.sk = (__u64)sk,
		.buf = buf,
		.fd = fd,
		.iovcnt = iovcnt,
		.kind = kind,
		.io = io,
	};
	if (!active_put(&a))
		bump(LLMSLO_ST_ACTIVE_FULL);
	return 0;
}

static __always_inline int enter_io(__u32 fd, __u64 buf, __u32 iovcnt, __u16 kind, __u16 io)
{
	if (!is_target())
		return 0;
	return enter_traced(fd, buf, iovcnt, kind, io);
}

/* sendmsg/recvmsg: the iovec array is in the user's msghdr. */
static __always_inline int enter_traced_msg(__u32 fd, __u64 msgp, __u16 kind)
{
	struct user_msghdr msg;
	if (bpf_probe_read_user(&msg, sizeof(msg), (void *)msgp))
		return 0;
	return enter_traced(fd, (__u64)msg.msg_iov, msg.msg_iovlen, kind, IO_IOV);
}

/* ---- token writes counted in the kernel (llmslo.h: llmslo_stream_arm, llmslo_tokens) ---- */

/* Arms written by userspace (one entry per connection to arm), taken by the kernel at the
 * connection's next write event into `streams`; close() and the socket's TCP_CLOSE remove
 * them, and so does an accept at the same address. 1024 entries of 792 bytes: an arm waits
 * here for one write. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct llmslo_stream_arm);
} stream_arms SEC(".maps");

/* The connections whose token writes the kernel counts: the arm and the open batch in one
 * entry, so that a counted write asks one map. Written by the kernel only, so userspace's arm
 * writes never land on a batch being counted. A direct-mapped table, two ways: a connection's
 * entry is one of the two slots its socket's address hashes to, and the slot says whose it is
 * (`owner`). An array's lookup is an address computed in place (the verifier inlines it), so a
 * counted write's first memory access is its slot's first line; a hash map's was its bucket, then
 * the element, two dependent cache misses (37 % of sock_send's time). A connection whose two slots
 * are held by others is not counted (LLMSLO_ST_STREAM_BUSY, at each of its writes that finds its
 * arm waiting: they go out as events); a slot whose owner has counted nothing for STREAM_IDLE_NS
 * and has no batch open may be taken (a connection left open and idle does not hold it for ever;
 * a live one is armed again by its next response). The socket's end frees its slot (close(),
 * TCP_CLOSE, an accept at its address). 4096 slots of 1,128 bytes by
 * default (LLMSLO_STREAM_SLOTS: loader.rs sizes the map and sets the mask). */
struct stream_slot {
	__u64 owner; /* the socket's address; 0: free; address | 1: being claimed by it */
	struct llmslo_stream st;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct stream_slot);
} streams SEC(".maps");

/* The table's size less one (a power of two, at least 2); set by the loader with the map's size. */
const volatile __u32 stream_slots_mask = 4095;

#define STREAM_IDLE_NS (10ULL * 1000000000ULL)

/* The first of the socket `key`'s two slots (the second is its neighbour, `^ 1`). Socket
 * addresses are at least 64-byte aligned: the bits above go through a multiplicative hash. */
static __always_inline __u32 stream_slot_of(__u64 key)
{
	return ((key >> 6) * 0x9E3779B97F4A7C15ULL >> 32) & stream_slots_mask;
}

/* The slot of the socket `key`, if it has one. */
static __always_inline struct stream_slot *stream_slot_find(__u64 key)
{
	__u32 i = stream_slot_of(key);
	struct stream_slot *e = bpf_map_lookup_elem(&streams, &i);
	if (e && e->owner == key)
		return e;
	i ^= 1;
	e = bpf_map_lookup_elem(&streams, &i);
	if (e && e->owner == key)
		return e;
	return NULL;
}

/* The counting state of the socket `key`, if it has a slot. */
static __always_inline struct llmslo_stream *stream_of(__u64 key)
{
	struct stream_slot *e = stream_slot_find(key);
	return e ? &e->st : NULL;
}

/* Whether the slot `e`, held by another socket, may be taken at `now`: its owner has counted
 * nothing for STREAM_IDLE_NS and has no batch open. Signed: a stamp another CPU took just after
 * ours is recent, not centuries old. */
static __always_inline bool stream_slot_idle(const struct stream_slot *e, __u64 now)
{
	return !e->st.acc.n && (__s64)(now - e->st.acc.last_exit) >= (__s64)STREAM_IDLE_NS;
}

/* Takes the slot `i` for the socket `key` if it is free or idle (see `streams`): its batch is
 * then empty. In two steps, so that no other claimer can take a slot being set up nor the
 * owner it replaces count into it: the owner becomes `key | 1` (addresses are aligned: no
 * socket's; the old owner's writes no longer find it), the slot is checked again and set up,
 * then the owner becomes `key`. A write of the old owner that found the slot just before and
 * counts just after the check is the one race left (an owner idle for 10 s that writes in the
 * instant it loses its slot). */
static __always_inline struct stream_slot *stream_claim_at(__u32 i, __u64 key, __u64 now)
{
	struct stream_slot *e = bpf_map_lookup_elem(&streams, &i);
	if (!e)
		return NULL;
	__u64 old = e->owner;
	if ((old & 1) || (old && !stream_slot_idle(e, now)))
		return NULL;
	if (__sync_val_compare_and_swap(&e->owner, old, key | 1) != old)
		return NULL;
	if (old && !stream_slot_idle(e, now)) {
		/* Its owner counted in the meantime: it keeps the slot. */
		__sync_val_compare_and_swap(&e->owner, key | 1, old);
		return NULL;
	}
	e->st.acc.n = 0;
	e->st.acc.last_exit = now;
	__sync_val_compare_and_swap(&e->owner, key | 1, key);
	return e;
}

/* A socket's address as the number the maps' keys and the stream table's hash need: one the
 * verifier knows as a pointer (accept's, close()'s) allows no arithmetic; read through a helper,
 * it is a plain number. For the cold paths only. */
static __always_inline __u64 sock_key(const struct sock *sk)
{
	__u64 p = (__u64)sk, key = 0;
	bpf_probe_read_kernel(&key, sizeof(key), &p);
	return key;
}

/* Frees the slot `i` if the socket `key` holds it: the compare-and-swap frees only a slot `key`
 * still owns, and leaves its batch to the claim that takes it next (which empties it). */
static __always_inline void stream_free_at(__u32 i, __u64 key)
{
	struct stream_slot *e = bpf_map_lookup_elem(&streams, &i);
	if (e && e->owner == key)
		__sync_val_compare_and_swap(&e->owner, key, 0);
}

/* Drops the connection `key`'s arm and frees its slot (its batch already sent), unless another
 * connection took it meanwhile. Both slots are looked at: two threads writing the same socket's
 * first response may each have claimed one. */
static __always_inline void stream_drop(__u64 key)
{
	bpf_map_delete_elem(&stream_arms, &key);
	__u32 i = stream_slot_of(key);
	stream_free_at(i, key);
	stream_free_at(i ^ 1, key);
}

/* Byte `i` of the copied payload; the mask keeps every index provably inside data[]. */
#define DATA_AT(s, i) ((s)->data[(i) & 1023])
/* Eight bytes from `p`, at any alignment, in one load (x86-64 and arm64 allow it, and so does
 * the verifier there): the compiler, which cannot know the alignment, would load them a byte
 * at a time. */
static __always_inline __u64 load64(const void *p)
{
	__u64 v;
	asm volatile("%0 = *(u64 *)(%1 + 0)" : "=r"(v) : "r"(p));
	return v;
}
/* The eight bytes at offset `i` of the payload, of the arm's prefix, of its suffix. */
#define WORD_AT(s, i) load64(&(s)->data[(i) & 1023])
#define PREFIX_WORD(arm, i) load64(&(arm)->prefix[clamp_to(i, LLMSLO_ARM_PREFIX_CAP - 8)])
#define SUFFIX_WORD(arm, i) load64(&(arm)->suffix[clamp_to(i, LLMSLO_ARM_SUFFIX_CAP - 8)])
#define PREFIX_FIXED(arm, i) load64(&(arm)->prefix_fixed[clamp_to(i, LLMSLO_ARM_PREFIX_CAP - 8)])
#define SUFFIX_FIXED(arm, i) load64(&(arm)->suffix_fixed[clamp_to(i, LLMSLO_ARM_SUFFIX_CAP - 8)])

/* Whether the payload word `w` differs from the template word `t` where `fixed` (0xff a byte)
 * says it must not. */
static __always_inline __u64 word_differs(__u64 w, __u64 t, __u64 fixed)
{
	return (w ^ t) & fixed;
}

/* Whether the payload word `w` has, where `fixed` lets bytes vary, one that would change the
 * event's JSON: a quote, a backslash, a control byte (each tested for all eight bytes at once, the
 * fixed ones replaced by 'A'; the zero-byte tests are exact for "some byte is"). No branch. */
static __always_inline __u64 varying_odd(__u64 w, __u64 fixed)
{
	const __u64 ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
	__u64 v = (w & ~fixed) | (0x41 * ones & fixed);
	__u64 q = v ^ (0x22 * ones), b = v ^ (0x5c * ones);
	return (((q - ones) & ~q) | ((b - ones) & ~b) | ((v - 0x20 * ones) & ~v)) & highs;
}

/* Whether one of a template part's `n` listed words with varying bytes (offsets `vary` into the
 * part; the part at `from` in the payload, its masks `fixed`, `last` its last word's offset) holds
 * a byte that would change the event's JSON (varying_odd). */
static __always_inline bool part_varies_oddly(struct scratch *s, __u64 from, const __u8 *vary,
					      __u8 n, const __u8 *fixed, const __u64 last)
{
	for (__u32 i = 0; i < LLMSLO_ARM_VARY_MAX; i++) {
		if (i >= n)
			break;
		__u64 off = vary[i];
		if (varying_odd(WORD_AT(s, from + off), load64(&fixed[clamp_to(off, last)])))
			return true;
	}
	return false;
}

/* A token's text, `len` bytes of s->data from `from`: a non-empty JSON string body. Judged
 * conservatively, so that the loop keeps no state for the verifier to fork on: no control byte,
 * no quote at all (an escaped one sends the write as an event), not ending in a backslash (no
 * escape left open). The judge's parts are global functions, each verified once whatever its
 * caller's state: inlined, every path through the chunk-size digits walked the loops after them
 * again (~290k instructions a program). */
__noinline int llmslo_token_text(struct scratch *s, __u64 from, __u64 len)
{
	if (!s || len == 0 || len > LLMSLO_TOKEN_TEXT_MAX)
		return 0;
	for (__u32 i = 0; i < LLMSLO_TOKEN_TEXT_MAX; i++) {
		if (i >= len)
			break;
		__u8 c = DATA_AT(s, from + i);
		if (c < 0x20 || c == '"')
			return 0;
	}
	return DATA_AT(s, from + len - 1) != '\\';
}

/* The event in s->data[start..end): the arm's prefix, a token's text, the arm's suffix. */
__noinline int llmslo_token_event(struct scratch *s, struct llmslo_stream_arm *arm, __u64 start,
				  __u64 end)
{
	if (!s || !arm || end > LLMSLO_TAKE_MAX)
		return 0;
	__u64 plen = arm->prefix_len, slen = arm->suffix_len;
	if (plen < 8 || plen > LLMSLO_ARM_PREFIX_CAP || slen < 8 || slen > LLMSLO_ARM_SUFFIX_CAP)
		return 0;
	if (end < start + plen + slen + 1)
		return 0;
	/* Eight bytes at a time, then the word that ends where the template ends (it may overlap
	 * the last one). No branch in the loops leaves a state that goes on. */
	for (__u32 i = 0; i < LLMSLO_ARM_PREFIX_CAP / 8; i++) {
		if (i >= plen / 8)
			break;
		if (word_differs(WORD_AT(s, start + i * 8), PREFIX_WORD(arm, i * 8),
			       PREFIX_FIXED(arm, i * 8)))
			return 0;
	}
	if (word_differs(WORD_AT(s, start + plen - 8), PREFIX_WORD(arm, plen - 8),
		       PREFIX_FIXED(arm, plen - 8)))
		return 0;
	__u64 sfrom = end - slen;
	for (__u32 i = 0; i < LLMSLO_ARM_SUFFIX_CAP / 8; i++) {
		if (i >= slen / 8)
			break;
		if (word_differs(WORD_AT(s, sfrom + i * 8), SUFFIX_WORD(arm, i * 8),
			       SUFFIX_FIXED(arm, i * 8)))
			return 0;
	}
	if (word_differs(WORD_AT(s, end - 8), SUFFIX_WORD(arm, slen - 8),
		       SUFFIX_FIXED(arm, slen - 8)))
		return 0;
	/* The few words with bytes that may vary: nothing in them that reshapes the JSON. */
	if (part_varies_oddly(s, start, arm->prefix_vary, arm->prefix_vary_n, arm->prefix_fixed,
			      LLMSLO_ARM_PREFIX_CAP - 8) ||
	    part_varies_oddly(s, sfrom, arm->suffix_vary, arm->suffix_vary_n, arm->suffix_fixed,
			      LLMSLO_ARM_SUFFIX_CAP - 8))
		return 0;
	return llmslo_token_text(s, start + plen, sfrom - start - plen);
}

/* Is the write whose n bytes are in s->data exactly one token event of the armed shape, in a
 * chunk of its own when the body is chunked ("<hex size>\r\n" <event> "\r\n", no extensions)? */
__noinline int llmslo_token_judge(struct scratch *s, struct llmslo_stream_arm *arm, __u64 n)
{
	if (!s || !arm || n > LLMSLO_TAKE_MAX)
		return 0;
	if (!arm->chunked)
		return llmslo_token_event(s, arm, 0, n);
	__u64 size = 0, digits = 0;
	for (__u32 i = 0; i < 4; i++) {
		__u8 c = s->data[i];
		__u64 v;
		if (c >= '0' && c <= '9')
			v = c - '0';
		else if (c >= 'a' && c <= 'f')
			v = c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v = c - 'A' + 10;
		else
			break;
		size = size * 16 + v;
		digits = i + 1;
	}
	if (!digits || DATA_AT(s, digits) != '\r' || DATA_AT(s, digits + 1) != '\n')
		return 0;
	__u64 start = digits + 2;
	if (n < start + 2 || size != n - start - 2)
		return 0;
	if (DATA_AT(s, n - 2) != '\r' || DATA_AT(s, n - 1) != '\n')
		return 0;
	return llmslo_token_event(s, arm, start, n - 2);
}

/* Sends the writes counted for the connection `key` as one LLMSLO_EV_TOKENS record, and closes
 * its batch. */
static __always_inline int tokens_flush(__u64 key, const struct conn_tuple *t, struct conn_info *ci)
{
	ci->tokens_pending = 0;
	struct llmslo_stream *st = stream_of(key);
	if (!st)
		return 0;
	struct llmslo_tokens *acc = &st->acc;
	__u32 n = acc->n;
	if (n > LLMSLO_TOKENS_MAX)
		n = LLMSLO_TOKENS_MAX;
	if (n) {
		__u64 size = sizeof(struct llmslo_tokens_event);
		struct llmslo_tokens_event *e = bpf_ringbuf_reserve(&events, size, 0);
		if (!e) {
			bump(LLMSLO_ST_RB_FULL);
		} else {
			struct active_io a = { .ts_enter = acc->first, .kind = LLMSLO_EV_TOKENS };
			fill_hdr(&e->hdr, &a, (struct sock *)key, t, acc->last_exit, acc->bytes);
			e->hdr.head_len = n * 4;
			e->hdr.tail_len = 0;
			/* The first write's thread and counters, not the flushing task's. */
			e->hdr.tid = acc->tid;
			e->hdr.runq_total_ns = acc->runq_total_ns;
			e->hdr.gpu_launches = acc->gpu_launches;
			e->hdr.gpu_graph_launches = acc->gpu_graph_launches;
			e->hdr.gpu_sync_wait_ns = acc->gpu_sync_wait_ns;
			e->hdr.inside = acc->inside;
			__builtin_memcpy(e->delta, acc->delta, sizeof(e->delta));
			bpf_ringbuf_submit(e, wakeup_flag(size));
			bump(LLMSLO_ST_EVENTS);
			bump(LLMSLO_ST_TOKEN_RECORDS);
		}
	}
	acc->n = 0;
	return 0;
}

/* The same as a global function: exit_traced and token_take then go on from one state (a
 * socket's address known only as a pointer, as close() has it, cannot be passed: close() and
 * sock_closed inline it). */
__noinline int llmslo_tokens_flush(__u64 key, struct conn_tuple *t, struct conn_info *ci)
{
	if (!t || !ci)
		return 0;
	return tokens_flush(key, t, ci);
}

/* Counts the write in s->hdr (sock_id, ret, ts_enter, ts_exit) in the open batch `acc`: its
 * delta from the batch's first write, its bytes, its end. */
static __always_inline void token_count(struct llmslo_tokens *acc, __u32 i, __u64 ret, __u64 enter,
					__u64 now)
{
	if (i >= LLMSLO_TOKENS_MAX)
		return;
	acc->delta[i] = enter > acc->first ? enter - acc->first : 0;
	acc->n = i + 1;
	acc->bytes += ret;
	acc->last_exit = now;
	bump(LLMSLO_ST_TOKEN_WRITES);
}

/* The write just copied into `s` (its socket, size, start and end in s->hdr: sock_id, ret,
 * ts_enter, ts_exit): 0 when it is not one token event of its connection's armed shape (it goes
 * out as an event); 1 when it is and was counted in the connection's open batch; 2 when it is
 * but no batch can take it (none open, or the open one is full or a second old): the caller,
 * which then has the connection's entry, opens one (llmslo_token_take). The common case, a
 * token into an open batch, asks one map, `streams` (the arm and the batch), not the
 * connection's entry (through memory, a socket's address that the verifier knows as a pointer becomes the plain
 * number a global function's scalar argument must be). */
__noinline int llmslo_token_append(struct scratch *s)
{
	if (!s)
		return 0;
	__u64 key = s->hdr.sock_id, ret = s->hdr.ret, enter = s->hdr.ts_enter, now = s->hdr.ts_exit;
	if (ret > LLMSLO_TAKE_MAX || s->hdr.head_len != ret)
		return 0;
	struct llmslo_stream *st = stream_of(key);
	if (!st || !llmslo_token_judge(s, &st->arm, ret))
		return 0;
	struct llmslo_tokens *acc = &st->acc;
	__u32 i = acc->n;
	/* The write that opens a batch and the one that fills it (which sends it) are the
	 * caller's, which has the connection's entry and tuple. */
	if (i == 0 || i + 1 >= LLMSLO_TOKENS_MAX || enter - acc->first >= LLMSLO_TOKENS_SPAN_NS)
		return 2;
	token_count(acc, i, ret, enter, now);
	return 1;
}

/* The token write in `s` that llmslo_token_append could not count (it returned 2), on the
 * connection `ci`: sends the batch it could not join, opens a new one and counts the write in
 * it. 1: counted; 0: send it as an event. */
__noinline int llmslo_token_take(struct scratch *s, struct conn_info *ci, struct conn_tuple *t)
{
	if (!s || !ci || !t)
		return 0;
	__u64 key = s->hdr.sock_id, ret = s->hdr.ret, enter = s->hdr.ts_enter, now = s->hdr.ts_exit;
	if (ret > LLMSLO_TAKE_MAX)
		return 0;
	struct llmslo_stream *st = stream_of(key);
	if (!st)
		return 0;
	struct llmslo_tokens *acc = &st->acc;
	/* Deltas are 32-bit: a stream that has counted for a second sends what it has. */
	if (acc->n && (acc->n >= LLMSLO_TOKENS_MAX || enter - acc->first >= LLMSLO_TOKENS_SPAN_NS))
		llmslo_tokens_flush(key, t, ci);
	if (!acc->n) {
		struct task_struct *task = current_task();
		acc->first = enter;
		acc->last_exit = now;
		acc->bytes = 0;
		acc->tid = task->pid;
		CLEAR_INSIDE(acc);
		FILL_INSIDE(acc, task_cgroup_id(task));
		ci->tokens_pending = 1;
	}
	__u32 i = acc->n;
	if (i >= LLMSLO_TOKENS_MAX)
		return 0;
	token_count(acc, i, ret, enter, now);
	if (i + 1 == LLMSLO_TOKENS_MAX)
		llmslo_tokens_flush(key, t, ci);
	return 1;
}

/* The arm userspace wrote for the connection `key`, if there is one: moved into its `streams`
 * slot (taken when it has none), whose batch is closed. */
__noinline int llmslo_stream_adopt(__u64 key)
{
	struct llmslo_stream_arm *arm = bpf_map_lookup_elem(&stream_arms, &key);
	if (!arm)
		return 0;
	struct stream_slot *e = stream_slot_find(key);
	if (!e) {
		__u64 now = bpf_ktime_get_ns();
		__u32 i = stream_slot_of(key);
		e = stream_claim_at(i, key, now);
		if (!e)
			e = stream_claim_at(i ^ 1, key, now);
	}
	if (!e) {
		/* Both slots held: the arm stays where it is, and the writes go out as events. */
		bump(LLMSLO_ST_STREAM_BUSY);
		return 0;
	}
	bpf_probe_read_kernel(&e->st.arm, sizeof(e->st.arm), arm);
	bpf_map_delete_elem(&stream_arms, &key);
	return 1;
}

/* Whether a read or write that returned `ret` makes an event. EAGAIN/EINTR are the normal life
 * of non-blocking servers; only hard errors say the peer is gone. A 0-byte read (EOF) is
 * followed by close, which we see. */
static __always_inline bool io_result_wanted(long ret)
{
	if (ret > 0)
		return true;
	if (ret != -EPIPE && ret != -ECONNRESET && ret != -ETIMEDOUT)
		return false;
	bump(LLMSLO_ST_SYSCALL_ERR);
	return true;
}

/* The event of a read or write that returned `ret` (io_result_wanted) at `now`. `io` is a
 * compile-time constant at each call site, so each program carries only the copy routine it
 * needs: the verifier then walks one path, not both (load time, instruction count). */
static __always_inline int exit_traced(struct active_io *ap, long ret, const __u16 io, __u64 now)
{
	struct active_io a = *ap;
	struct sock *sk = (struct sock *)a.sk;
	__u32 zero = 0;
	struct scratch *s = bpf_map_lookup_elem(&scratch_buf, &zero);
	if (!s)
		return 0;
	/* The copy loops come first, with no branch before them whose sides leave different
	 * state: the verifier then walks them once, not once per side. */
	s->hdr.head_len = 0;
	s->hdr.tail_len = 0;
	if (ret > 0) {
		if (io == IO_IOV)
			copy_iov(s, a.buf, a.iovcnt, ret);
		else
			copy_flat(s, a.buf, ret);
	}
	__u64 key = a.sk;
	s->hdr.sock_id = key;
	int token = 0;
	if (a.kind == LLMSLO_EV_WRITE && ret > 0) {
		s->hdr.ret = ret;
		s->hdr.ts_enter = a.ts_enter;
		s->hdr.ts_exit = now;
		token = llmslo_token_append(s);
		if (token == 1)
			return 0;
	}
	struct conn_info *ci = bpf_map_lookup_elem(&conns, &key);
	struct conn_tuple t;
	conn_tuple_of(sk, ci, &t);
	if (ci) {
		if (token == 2 && llmslo_token_take(s, ci, &t))
			return 0;
		/* Counted writes go out before this event, in the order they happened. */
		if (ci->tokens_pending)
			llmslo_tokens_flush(*(volatile __u64 *)&s->hdr.sock_id, &t, ci);
		/* A write that goes out as an event takes the arm userspace left for it, if any:
		 * its batch, if it had one, has just been sent. */
		if (a.kind == LLMSLO_EV_WRITE)
			llmslo_stream_adopt(*(volatile __u64 *)&s->hdr.sock_id);
	}
	fill_hdr(&s->hdr, &a, sk, &t, now, ret);
	__u64 queued_last = 0;
	if (ci) {
		if (a.kind == LLMSLO_EV_READ) {
			s->hdr.queued_ts = ci->queued_ts;
			ci->queued_ts = 0;
			queued_last = ci->queued_last_ts;
		}
	} else {
		/* NOEXIST: sk_data_ready may have stamped this socket on another CPU since the
		 * lookup; its stamp is kept for the next read. */
		struct conn_info fresh = { .tuple = t };
		if (!bpf_map_update_elem(&conns, &key, &fresh, BPF_NOEXIST))
			bump(LLMSLO_ST_CONN_INSERT);
	}
	if (ret > 0) {
		take_flow_stamps(&s->hdr, &t, a.kind, a.pod_out);
		s->hdr.net_ts[LLMSLO_NET_QUEUED_LAST] = queued_last;
	}
	/* Last: its branches then come after the copy loops, which the verifier walks once. */
	fill_inside(&s->hdr);
	return submit(s);
}

static __always_inline int exit_io(long ret, const __u16 io)
{
	struct active_io a;
	if (!active_take(&a) || !io_result_wanted(ret))
		return 0;
	return exit_traced(&a, ret, io, bpf_ktime_get_ns());
}

/* ---- read family ---- */
SEC("tracepoint/syscalls/sys_enter_read")
int enter_read(struct trace_event_raw_sys_enter *ctx)
{
	return enter_io(ctx->args[0], ctx->args[1], 0, LLMSLO_EV_READ, IO_FLAT);
}
SEC("tracepoint/syscalls/sys_enter_recvfrom")
int enter_recvfrom(struct trace_event_raw_sys_enter *ctx)
{
	if (ctx->args[3] & NOT_STREAM_READ)
		return 0;
	return enter_io(ctx->args[0], ctx->args[1], 0, LLMSLO_EV_READ, IO_FLAT);
}
SEC("tracepoint/syscalls/sys_enter_readv")
int enter_readv(struct trace_event_raw_sys_enter *ctx)
{
	return enter_io(ctx->args[0], ctx->args[1], ctx->args[2], LLMSLO_EV_READ, IO_IOV);
}

static __always_inline int enter_msg(struct trace_event_raw_sys_enter *ctx, __u16 kind)
{
	if (!is_target())
		return 0;
	return enter_traced_msg(ctx->args[0], ctx->args[1], kind);
}
SEC("tracepoint/syscalls/sys_enter_recvmsg")
int enter_recvmsg(struct trace_event_raw_sys_enter *ctx)
{
	if (ctx->args[2] & NOT_STREAM_READ)
		return 0;
	return enter_msg(ctx, LLMSLO_EV_READ);
}

/* ---- write family ---- */
SEC("tracepoint/syscalls/sys_enter_write")
int enter_write(struct trace_event_raw_sys_enter *ctx)
{
	return enter_io(ctx->args[0], ctx->args[1], 0, LLMSLO_EV_WRITE, IO_FLAT);
}
SEC("tracepoint/syscalls/sys_enter_sendto")
int enter_sendto(struct trace_event_raw_sys_enter *ctx)
{
	return enter_io(ctx->args[0], ctx->args[1], 0, LLMSLO_EV_WRITE, IO_FLAT);
}
SEC("tracepoint/syscalls/sys_enter_writev")
int enter_writev(struct trace_event_raw_sys_enter *ctx)
{
	return enter_io(ctx->args[0], ctx->args[1], ctx->args[2], LLMSLO_EV_WRITE, IO_IOV);
}
SEC("tracepoint/syscalls/sys_enter_sendmsg")
int enter_sendmsg(struct trace_event_raw_sys_enter *ctx)
{
	return enter_msg(ctx, LLMSLO_EV_WRITE);
}

#define EXIT(name, io)                                               \
	SEC("tracepoint/syscalls/sys_exit_" #name)                   \
	int exit_##name(struct trace_event_raw_sys_exit *ctx)        \
	{                                                            \
		return exit_io(ctx->ret, io);                        \
	}
EXIT(read, IO_FLAT)
EXIT(recvfrom, IO_FLAT)
EXIT(write, IO_FLAT)
EXIT(sendto, IO_FLAT)
EXIT(writev, IO_IOV)

/* The iovec exits share one body: exit_readv, exit_recvmsg and exit_sendmsg jump to
 * exit_writev's program, verified once (~11k instructions processed; the four verified apart
 * made the L7 load ~0.15 s longer on this kind of machine). Their contexts are the same (a
 * sys_exit tracepoint's: only `ret` is read; what the syscall was is in the thread's active
 * slot). A tail call is charged to the program that made it in bpf_stats, so each keeps its own
 * run time. Userspace fills slot 0 before any program is attached and never clears it. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} iov_exit SEC(".maps");

#define EXIT_IOV(name)                                               \
	SEC("tracepoint/syscalls/sys_exit_" #name)                   \
	int exit_##name(struct trace_event_raw_sys_exit *ctx)        \
	{                                                            \
		if (!may_have_active())                              \
			return 0;                                    \
		bpf_tail_call(ctx, &iov_exit, 0);                    \
		/* Only with slot 0 empty, which userspace rules out. */ \
		active_clear();                                      \
		return 0;                                            \
	}
EXIT_IOV(readv)
EXIT_IOV(recvmsg)
EXIT_IOV(sendmsg)

/* ---- accept ---- */
static __always_inline int enter_accept_common(void)
{
	if (!is_target())
		return 0;
	struct active_io a = { .ts_enter = bpf_ktime_get_ns(), .kind = LLMSLO_EV_ACCEPT };
	if (!active_put(&a))
		bump(LLMSLO_ST_ACTIVE_FULL);
	return 0;
}

static __always_inline int exit_accept_common(long ret)
{
	struct active_io a;
	if (!active_take(&a))
		return 0;
	if (ret < 0)
		return 0;
	struct sock *sk = fd_to_sock(ret);
	if (!sk)
		return 0;
	a.fd = ret;
	__u32 zero = 0;
	struct scratch *s = bpf_map_lookup_elem(&scratch_buf, &zero);
	if (!s)
		return 0;
	struct conn_tuple t;
	read_tuple(sk, &t);
	s->hdr.head_len = 0;
	s->hdr.tail_len = 0;
	fill_hdr(&s->hdr, &a, sk, &t, bpf_ktime_get_ns(), 0);

	/* Data that arrived before accept was stamped by sk_data_ready through listen_ports; keep it. */
	__u64 key = sock_key(sk);
	struct conn_info fresh = { .tuple = t };
	if (bpf_map_update_elem(&conns, &key, &fresh, BPF_NOEXIST) == 0) {
		bump(LLMSLO_ST_CONN_INSERT); /* nothing was stamped yet */
	} else {
		/* An accepted socket is a new connection, whatever an entry at its address says. */
		struct conn_info *ci = bpf_map_lookup_elem(&conns, &key);
		if (ci) {
			ci->tuple = t;
			/* Counts of the socket that was here (no close seen) are not this
			 * connection's. */
			ci->tokens_pending = 0;
		}
	}
	/* Nor is an arm left at this address (one written after its socket closed). */
	stream_drop(key);
	struct listen_key lk = listen_key_of(sk);
	__u8 one = 1;
	bpf_map_update_elem(&listen_ports, &lk, &one, BPF_ANY);
	__u32 port = lk.port;
	bpf_map_update_elem(&target_ports, &port, &one, BPF_ANY);
	__sync_fetch_and_or(&target_port_bits[(port & 0xffff) >> 6], 1ULL << (port & 63));
	take_flow_stamps(&s->hdr, &t, LLMSLO_EV_ACCEPT, 0);
	return submit(s);
}

SEC("tracepoint/syscalls/sys_enter_accept")
int enter_accept(struct trace_event_raw_sys_enter *ctx)
{
	return enter_accept_common();
}
SEC("tracepoint/syscalls/sys_enter_accept4")
int enter_accept4(struct trace_event_raw_sys_enter *ctx)
{
	return enter_accept_common();
}
SEC("tracepoint/syscalls/sys_exit_accept")
int exit_accept(struct trace_event_raw_sys_exit *ctx)
{
	return exit_accept_common(ctx->ret);
}
SEC("tracepoint/syscalls/sys_exit_accept4")
int exit_accept4(struct trace_event_raw_sys_exit *ctx)
{
	return exit_accept_common(ctx->ret);
}

/* ---- close ---- */
static __always_inline int close_common(__u32 fd)
{
	if (!is_target())
		return 0;
	struct sock *sk = fd_to_sock(fd);
	if (!sk)
		return 0;
	__u64 key = sock_key(sk);
	struct conn_info *ci = bpf_map_lookup_elem(&conns, &key);
	if (!ci)
		return 0; /* not a connection we follow */
	struct conn_tuple t;
	conn_tuple_of(sk, ci, &t);
	if (ci->tokens_pending)
		tokens_flush(key, &t, ci);
	stream_drop(key);
	if (bpf_map_delete_elem(&conns, &key))
		return 0;
	bump(LLMSLO_ST_CONN_DELETE);
	__u32 zero = 0;
	struct scratch *s = bpf_map_lookup_elem(&scratch_buf, &zero);
	if (!s)
		return 0;
	struct active_io a = { .ts_enter = bpf_ktime_get_ns(), .fd = fd, .kind = LLMSLO_EV_CLOSE };
	s->hdr.head_len = 0;
	s->hdr.tail_len = 0;
	fill_hdr(&s->hdr, &a, sk, &t, bpf_ktime_get_ns(), 0);
	return submit(s);
}

SEC("tracepoint/syscalls/sys_enter_close")
int enter_close(struct trace_event_raw_sys_enter *ctx)
{
	return close_common(ctx->args[0]);
}

/* ---- the same from the raw syscall tracepoints (LLMSLO_SYSCALL_HOOKS=raw) ----
 * The per-syscall tracepoints above cost every caller of write()/read() on the node a perf trace
 * record before the program runs. The raw tracepoints hand the program the registers directly:
 * two programs see every syscall and keep the dozen that matter by number. A traced syscall
 * skips the record; every other syscall pays two program runs. Userspace loads one set or the
 * other. */
#if defined(bpf_target_x86)
#define NR_read 0
#define NR_write 1
#define NR_close 3
#define NR_readv 19
#define NR_writev 20
#define NR_accept 43
#define NR_sendto 44
#define NR_recvfrom 45
#define NR_sendmsg 46
#define NR_recvmsg 47
#define NR_accept4 288
#define SYSCALL_NR_FIELD orig_ax
#define SYSCALL_ARG1 di
#define SYSCALL_ARG2 si
#define SYSCALL_ARG3 dx
/* A 32-bit task's syscall numbers are another table's (ia32 read is 3, our close). */
static __always_inline bool compat_syscall(struct pt_regs *regs)
{
	return current_task()->thread_info.status & 0x0002 /* TS_COMPAT */;
}
#elif defined(bpf_target_arm64)
#define NR_close 57
#define NR_read 63
#define NR_write 64
#define NR_readv 65
#define NR_writev 66
#define NR_accept 202
#define NR_sendto 206
#define NR_recvfrom 207
#define NR_sendmsg 211
#define NR_recvmsg 212
#define NR_accept4 242
#define SYSCALL_NR_FIELD syscallno
#define SYSCALL_ARG1 orig_x0
#define SYSCALL_ARG2 regs[1]
#define SYSCALL_ARG3 regs[2]
/* A 32-bit (AArch32) task's syscall numbers are another table's. */
static __always_inline bool compat_syscall(struct pt_regs *regs)
{
	return regs->pstate & 0x10 /* PSR_MODE32_BIT */;
}
#else
#error "syscall numbers for this architecture are missing"
#endif

/* What a read/write-family syscall number is: its direction, a flat buffer or an iovec array,
 * the iovec in a msghdr. False for every other syscall. */
static __always_inline bool rw_syscall(long nr, __u16 *kind, __u16 *io, bool *msg)
{
	*io = IO_FLAT;
	*msg = false;
	switch (nr) {
	case NR_read:
	case NR_recvfrom:
		*kind = LLMSLO_EV_READ;
		return true;
	case NR_readv:
		*kind = LLMSLO_EV_READ;
		*io = IO_IOV;
		return true;
	case NR_recvmsg:
		*kind = LLMSLO_EV_READ;
		*msg = true;
		return true;
	case NR_write:
	case NR_sendto:
		*kind = LLMSLO_EV_WRITE;
		return true;
	case NR_writev:
		*kind = LLMSLO_EV_WRITE;
		*io = IO_IOV;
		return true;
	case NR_sendmsg:
		*kind = LLMSLO_EV_WRITE;
		*msg = true;
		return true;
	default:
		return false;
	}
}

SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter, struct pt_regs *regs, long id)
{
	switch (id) {
	case NR_accept:
	case NR_accept4:
		return compat_syscall(regs) ? 0 : enter_accept_common();
	case NR_close:
		return compat_syscall(regs) ? 0 : close_common(PT_REGS_PARM1_CORE_SYSCALL(regs));
	}
	__u16 kind, io;
	bool msg;
	if (!rw_syscall(id, &kind, &io, &msg) || !is_target() || compat_syscall(regs))
		return 0;
	/* recv flags: recvfrom's fourth argument, recvmsg's third */
	if (id == NR_recvfrom && (PT_REGS_PARM4_CORE_SYSCALL(regs) & NOT_STREAM_READ))
		return 0;
	if (id == NR_recvmsg && (PT_REGS_PARM3_CORE_SYSCALL(regs) & NOT_STREAM_READ))
		return 0;
	__u32 fd = PT_REGS_PARM1_CORE_SYSCALL(regs);
	__u64 arg2 = PT_REGS_PARM2_CORE_SYSCALL(regs);
	if (msg)
		return enter_traced_msg(fd, arg2, kind);
	__u32 iovcnt = io == IO_IOV ? PT_REGS_PARM3_CORE_SYSCALL(regs) : 0;
	return enter_traced(fd, arg2, iovcnt, kind, io);
}

SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit, struct pt_regs *regs, long ret)
{
	switch (regs->SYSCALL_NR_FIELD) {
	case NR_read:
	case NR_recvfrom:
	case NR_readv:
	case NR_recvmsg:
	case NR_write:
	case NR_sendto:
	case NR_writev:
	case NR_sendmsg:
		break;
	case NR_accept:
	case NR_accept4:
		return compat_syscall(regs) ? 0 : exit_accept_common(ret);
	default:
		return 0;
	}
	if (compat_syscall(regs))
		return 0;
	struct active_io a;
	if (!active_take(&a) || !io_result_wanted(ret))
		return 0;
	__u64 now = bpf_ktime_get_ns();
	if (a.io == IO_IOV)
		return exit_traced(&a, ret, IO_IOV, now);
	return exit_traced(&a, ret, IO_FLAT, now);
}

/* ---- the read/write family from the socket layer (LLMSLO_SYSCALL_HOOKS=sock) ----
 * Both sets above take two programs per read or write (its enter and its exit) and, for the
 * per-syscall tracepoints, a perf record built by the kernel before each. The socket layer
 * reports every completed send and receive once, with its socket and result
 * (sock/sock_send_length, sock/sock_recv_length, called by sock_sendmsg and sock_recvmsg for
 * every family): one program, no fd walk, no per-thread slot. The payload is where the
 * syscall's arguments say, read from the task's saved user registers. A write's start, when the
 * server issued it (the stamp every write event carries), is taken where TCP begins to queue
 * it (tcp/tcp_sendmsg_locked, before its packets leave: the egress stamps come after it).
 * accept and close keep their syscall tracepoints. */

SEC("tp_btf/tcp_sendmsg_locked")
int BPF_PROG(tcp_send_begin, const struct sock *sk, const struct msghdr *msg, const struct sk_buff *skb,
	     int size_goal)
{
	if (!sk_port_of_interest(bpf_core_cast(sk, struct sock)) || !is_target())
		return 0;
	__u32 zero = 0;
	struct send_begin *b = bpf_map_lookup_elem(&send_begins, &zero);
	if (!b)
		return 0;
	__u32 tid = current_task()->pid;
	if (b->sk == (__u64)sk && b->tid == tid)
		return 0; /* a later piece of the same send */
	struct sock *s = bpf_core_cast(sk, struct sock);
	b->sk = (__u64)sk;
	b->tid = tid;
	b->lport = s->__sk_common.skc_num;
	b->rport = bpf_ntohs(s->__sk_common.skc_dport);
	b->raddr_lo = s->__sk_common.skc_family == AF_INET
			      ? s->__sk_common.skc_daddr
			      : s->__sk_common.skc_v6_daddr.in6_u.u6_addr32[3];
	b->pod_out = 0;
	b->ts = bpf_ktime_get_ns();
	return 0;
}

/* When the send of `sk` now ending began: the stamp tcp_send_begin left on this CPU (taken),
 * else 0; and when its last packet left the pod meanwhile (tc_pod_out's stamp, else 0). */
static __always_inline __u64 send_take(__u64 sk, __u32 tid, __u64 *pod_out)
{
	__u32 zero = 0;
	struct send_begin *b = bpf_map_lookup_elem(&send_begins, &zero);
	if (!b || b->sk != sk || b->tid != tid)
		return 0;
	b->sk = 0;
	*pod_out = b->pod_out;
	return b->ts;
}

/* A target's send or receive on `sk_arg` completed with `ret`, under the syscall its saved
 * registers name: the event the syscall exit programs send, without an entry program. */
static __always_inline int sock_io(void *sk_arg, long ret, const __u16 kind)
{
	if (!sk_port_of_interest(bpf_core_cast(sk_arg, struct sock)) || !is_target())
		return 0;
	/* Taken first, whatever the syscall and its result (a sendfile, an EAGAIN), so that no
	 * stamp stays to be taken for a later send. */
	__u64 pod_out = 0;
	__u64 began =
		kind == LLMSLO_EV_WRITE ? send_take((__u64)sk_arg, current_task()->pid, &pod_out) : 0;
	struct task_struct *task = bpf_get_current_task_btf();
	struct pt_regs *regs = bpf_core_cast((void *)bpf_task_pt_regs(task), struct pt_regs);
	if (compat_syscall(regs))
		return 0;
	__u16 what, io;
	bool msg;
	/* sendfile, splice, io_uring, sendmmsg, …: not followed (as with the other sets). */
	if (!rw_syscall(regs->SYSCALL_NR_FIELD, &what, &io, &msg) || what != kind)
		return 0;
	if (!io_result_wanted(ret))
		return 0;
	struct sock *sk = bpf_core_cast(sk_arg, struct sock);
	__u16 family = sk->__sk_common.skc_family;
	if ((family != AF_INET && family != AF_INET6) || sk->sk_protocol != IPPROTO_TCP)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	struct active_io a = {
		.ts_enter = began && began <= now ? began : now,
		.sk = (__u64)sk_arg,
		.buf = regs->SYSCALL_ARG2,
		.fd = regs->SYSCALL_ARG1,
		.pod_out = pod_out,
		.kind = kind,
		.io = io,
	};
	if (msg) {
		struct user_msghdr m;
		if (bpf_probe_read_user(&m, sizeof(m), (void *)a.buf))
			return 0;
		a.buf = (__u64)m.msg_iov;
		a.iovcnt = m.msg_iovlen;
		a.io = IO_IOV;
	} else if (io == IO_IOV) {
		a.iovcnt = regs->SYSCALL_ARG3;
	}
	if (a.io == IO_IOV)
		return exit_traced(&a, ret, IO_IOV, now);
	return exit_traced(&a, ret, IO_FLAT, now);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(sock_send, struct sock *sk, int ret, int flags)
{
	return sock_io(sk, ret, LLMSLO_EV_WRITE);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(sock_recv, struct sock *sk, int ret, int flags)
{
	if (flags & NOT_STREAM_READ)
		return 0;
	return sock_io(sk, ret, LLMSLO_EV_READ);
}

/* ---- data readiness: the request's bytes reached the server's socket ---- */
SEC("tracepoint/sock/sk_data_ready")
int sk_data_ready(struct trace_event_raw_sk_data_ready *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	/* Every socket on the node that receives data comes here: a server port of a target, or
	 * leave at once. */
	struct sock *sk = bpf_core_cast(ctx->skaddr, struct sock);
	if (!port_bit(sk->__sk_common.skc_num))
		return 0;
	__u64 key = (__u64)ctx->skaddr;
	struct conn_info *ci = bpf_map_lookup_elem(&conns, &key);
	if (ci) {
		__u64 now = bpf_ktime_get_ns();
		if (!ci->queued_ts)
			ci->queued_ts = now;
		ci->queued_last_ts = now;
		return 0;
	}
	/* A listening socket is woken for new connections, not data: skip it. */
	if (sk->__sk_common.skc_state == 10 /* TCP_LISTEN */)
		return 0;
	struct listen_key lk = listen_key_of(sk);
	if (!bpf_map_lookup_elem(&listen_ports, &lk))
		return 0;
	__u64 now = bpf_ktime_get_ns();
	/* Complete before the insert publishes it: a reader on another CPU never sees half. */
	struct conn_info fresh = { .queued_ts = now, .queued_last_ts = now };
	read_tuple(sk, &fresh.tuple);
	if (!bpf_map_update_elem(&conns, &key, &fresh, BPF_NOEXIST)) {
		bump(LLMSLO_ST_CONN_INSERT);
		return 0;
	}
	/* The server accepted the socket on another CPU between our lookup and the insert (the
	 * request's first bytes and the accept commonly meet): stamp the entry accept made. */
	ci = bpf_map_lookup_elem(&conns, &key);
	if (!ci) {
		bump(LLMSLO_ST_CONN_FULL);
		return 0;
	}
	if (!ci->queued_ts)
		ci->queued_ts = now;
	ci->queued_last_ts = now;
	return 0;
}

/* A socket's stamps end with the socket: a server killed without close() must not leave them
 * to the next socket allocated at the same address. The entry itself stays until close() (a
 * reset socket is still closed by its server, and that close is reported) or LRU eviction. */
/* TCP sockets that started or stopped listening, anywhere on the node: discovery re-reads the
 * namespaces' listener tables (a walk of the kernel's whole established hash, ~6 ms each) only
 * when this moved since its last scan. */
__u64 listen_changes = 0;

SEC("tracepoint/sock/inet_sock_set_state")
int sock_closed(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	if (ctx->newstate == 10 /* TCP_LISTEN */ || ctx->oldstate == 10) {
		__sync_fetch_and_add(&listen_changes, 1);
		return 0;
	}
	if (ctx->newstate != 7 /* TCP_CLOSE */)
		return 0;
	__u64 key = (__u64)ctx->skaddr;
	struct conn_info *ci = bpf_map_lookup_elem(&conns, &key);
	if (ci) {
		/* Writes counted for a socket that closes without a close() we see (a reset, a
		 * killed server) still reach userspace. */
		if (ci->tokens_pending && ci->tuple.family)
			tokens_flush(key, &ci->tuple, ci);
		ci->queued_ts = 0;
		ci->queued_last_ts = 0;
		ci->tuple.stale = 1;
		/* The arm describes this connection's responses, not the next socket's here. */
		stream_drop(key);
	} else if (port_bit(ctx->sport)) {
		/* A target's connection whose entry the LRU evicted: its stream slot, if it holds
		 * one, is freed now rather than when it has been idle for STREAM_IDLE_NS. */
		stream_drop(key);
	}
	return 0;
}
