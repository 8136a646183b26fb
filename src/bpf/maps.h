/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Maps and helpers shared by l7, tcp and netpath objects. Each object declares them; the loader
 * makes tcp and netpath reuse l7's map fds, so all programs see one copy. */
#ifndef LLMSLO_MAPS_H
#define LLMSLO_MAPS_H

#include "llmslo.h"
#include "stats.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

/* A connection's addresses as its server socket has them (IPv4 in the first 4 bytes). */
struct conn_tuple {
	__u16 family; /* AF_INET or AF_INET6; 0: not read yet */
	__u16 lport;  /* host order */
	__u16 rport;
	__u16 stale;  /* the socket reached TCP_CLOSE: a socket allocated at the same address later
		       * is another connection, whose tuple is read again */
	__u8 laddr[16];
	__u8 raddr[16];
};

struct conn_info {
	__u64 queued_ts;      /* first sk_data_ready since the last read, 0 when consumed */
	__u64 queued_last_ts; /* latest sk_data_ready (the request's last bytes, at its last read) */
	/* Read from the socket once, at the connection's first traced syscall: every later event
	 * copies it instead of a dozen reads through the socket. */
	struct conn_tuple tuple;
	__u32 tokens_pending; /* an llmslo_tokens entry holds counted writes not yet sent */
	__u32 pad;
};

/* Server sockets we have seen (accepted or used by a target), keyed by struct sock address. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct conn_info);
} conns SEC(".maps");

struct listen_key {
	__u32 netns;
	__u32 port;
};

/* (netns, local port) pairs on which targets listen. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct listen_key);
	__type(value, __u8);
} listen_ports SEC(".maps");

/* Server ports of targets, any netns: packet hooks keep state only for these flows. An array
 * indexed by port (its entries 8 bytes apart: 512 KiB): the verifier inlines the lookup, so the
 * packets of everything else on the node pay a load and a test. The L7 object's socket
 * programs ask the same of target_port_bits, a bitmap in its .bss (l7.bpf.c). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} target_ports SEC(".maps");

static __always_inline bool is_target_port(__u16 port)
{
	__u32 k = port;
	__u8 *v = bpf_map_lookup_elem(&target_ports, &k);
	return v && *v;
}

/* Packet-path stamps per flow (server-side view), consumed by the syscall programs. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct llmslo_flow_key);
	__type(value, struct llmslo_flow);
} flows SEC(".maps");

/* Flows stamped on their way into a pod, keyed by the flow with dport 0 → dport. A socket that
 * a REDIRECT inside the pod moved to another port (a sidecar's inbound capture: Istio, Linkerd)
 * finds its flow through it: a client's address and port name one connection. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct llmslo_flow_key);
	__type(value, __u16);
} flow_by_client SEC(".maps");

/* DNAT: the flow as it arrived (service address) → the flow as the server sees it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct llmslo_flow_key);
	__type(value, struct llmslo_flow_key);
} pre2post SEC(".maps");

/* The send this CPU's thread began (l7.bpf.c's tcp_send_begin, under the socket-layer hooks):
 * tcp_sendmsg_locked fires once per segment-sized piece of a send, the first sets it,
 * sock_send_length takes it. A thread that slept in the send (socket buffer full) and woke on
 * another CPU finds no match there and is stamped when it ends. The packets a send puts on a
 * pod's veth pass tc_pod_out on the same CPU before the send returns (the veth hands them to
 * this CPU's backlog, run when the sender re-enables softirqs): tc_pod_out stamps those here,
 * a per-CPU slot, not in the flow map (a hash lookup of a 40-byte key, half of its time). */
struct send_begin {
	__u64 sk;
	__u64 ts;
	__u64 pod_out; /* the send's last packet through tc_pod_out, 0: none yet */
	__u32 tid;
	__u16 lport;    /* the socket's ports (host order) and the low word of its peer's */
	__u16 rport;    /* address: what tc_pod_out matches a packet's flow against */
	__u32 raddr_lo;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct send_begin);
} send_begins SEC(".maps");

/* IPv4-mapped IPv6 (::ffff:a.b.c.d) → plain IPv4, so packets and dual-stack sockets agree. */
static __always_inline void normalize_key(struct llmslo_flow_key *k)
{
	if (k->family != AF_INET6)
		return;
	__u32 *w = (__u32 *)k->saddr;
	__u32 *v = (__u32 *)k->daddr;
	if (w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff) && v[0] == 0 && v[1] == 0 &&
	    v[2] == bpf_htonl(0xffff)) {
		w[0] = w[3];
		v[0] = v[3];
		w[1] = w[2] = w[3] = 0;
		v[1] = v[2] = v[3] = 0;
		k->family = AF_INET;
	}
}

/* The flow key of a connection from its tuple: client = remote end. */
static __always_inline void tuple_flow_key(const struct conn_tuple *t, struct llmslo_flow_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->family = t->family;
	k->dport = t->lport;
	k->sport = t->rport;
	if (t->family == AF_INET) {
		__builtin_memcpy(k->daddr, t->laddr, 4);
		__builtin_memcpy(k->saddr, t->raddr, 4);
	} else {
		__builtin_memcpy(k->daddr, t->laddr, 16);
		__builtin_memcpy(k->saddr, t->raddr, 16);
		normalize_key(k);
	}
}

/* The socket's addresses and ports. */
static __always_inline void read_tuple(struct sock *sk, struct conn_tuple *t)
{
	__builtin_memset(t, 0, sizeof(*t));
	t->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	t->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	t->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (t->family == AF_INET) {
		__u32 l = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__u32 r = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(t->laddr, &l, 4);
		__builtin_memcpy(t->raddr, &r, 4);
	} else {
		BPF_CORE_READ_INTO(&t->laddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&t->raddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
}

/* The flow key of a server-side socket: client = remote end. */
static __always_inline void sock_flow_key(struct sock *sk, struct llmslo_flow_key *k)
{
	struct conn_tuple t;
	read_tuple(sk, &t);
	tuple_flow_key(&t, k);
}

#endif
