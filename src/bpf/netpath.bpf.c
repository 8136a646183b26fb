// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Packet timing along the node's network path: tc programs at the node's ingress device and at
 * pods' host-side veths, and netfilter programs just before and after DNAT. Each stamps the
 * first request packet (and the latest response packet) per flow into the shared flow map,
 * where the syscall programs pick the stamps up: the join happens in the kernel.
 * Every program passes every packet on unchanged (TC_ACT_UNSPEC / TCX_NEXT, NF_ACCEPT). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define TC_PASS -1 /* TC_ACT_UNSPEC for clsact, TCX_NEXT for tcx: the next program decides */
#define NF_ACCEPT 1
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_UDP 17
#define VXLAN_PORT 4789
#define VXLAN_PORT_LINUX 8472 /* flannel's and the Linux default */
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

struct pkt {
	struct llmslo_flow_key key; /* packet's own direction: saddr = sender */
	__u32 seq;
	__u32 payload;
	__u8 flags;
	__u8 encap; /* parsed through a VXLAN header: the outer packet on the underlay */
};


/* Parses IPv4/IPv6 + TCP at `off`, through at most one VXLAN encapsulation. LOAD(off, dst, n)
 * returns 0 on success. */
#define PARSE_BODY(LOAD)                                                                         \
	for (int depth = 0; depth < 2; depth++) {                                                \
		__u8 b0;                                                                         \
		if (LOAD(off, &b0, 1))                                                           \
			return -1;                                                               \
		__u32 l4 = 0, ip_payload = 0;                                                    \
		__u8 proto = 0;                                                                  \
		if ((b0 >> 4) == 4) {                                                            \
			struct iphdr ip;                                                         \
			if (LOAD(off, &ip, sizeof(ip)))                                          \
				return -1;                                                       \
			if (ip.frag_off & bpf_htons(0x1fff))                                     \
				return -1;                                                       \
			__builtin_memset(&p->key, 0, sizeof(p->key));                            \
			p->key.family = AF_INET;                                                 \
			__builtin_memcpy(p->key.saddr, &ip.saddr, 4);                            \
			__builtin_memcpy(p->key.daddr, &ip.daddr, 4);                            \
			l4 = off + ip.ihl * 4;                                                   \
			__u32 tot = bpf_ntohs(ip.tot_len);                                       \
			ip_payload = tot > ip.ihl * 4 ? tot - ip.ihl * 4 : 0;                    \
			proto = ip.protocol;                                                     \
		} else if ((b0 >> 4) == 6) {                                                     \
			struct ipv6hdr ip6;                                                      \
			if (LOAD(off, &ip6, sizeof(ip6)))                                        \
				return -1;                                                       \
			__builtin_memset(&p->key, 0, sizeof(p->key));                            \
			p->key.family = AF_INET6;                                                \
			__builtin_memcpy(p->key.saddr, &ip6.saddr, 16);                          \
			__builtin_memcpy(p->key.daddr, &ip6.daddr, 16);                          \
			l4 = off + sizeof(ip6);                                                  \
			ip_payload = bpf_ntohs(ip6.payload_len);                                 \
			proto = ip6.nexthdr;                                                     \
		} else {                                                                         \
			return -1;                                                               \
		}                                                                                \
		if (proto == IPPROTO_UDP && depth == 0) {                                        \
			struct udphdr udp;                                                       \
			if (LOAD(l4, &udp, sizeof(udp)))                                         \
				return -1;                                                       \
			__u16 dp = bpf_ntohs(udp.dest);                                          \
			if (dp != VXLAN_PORT && dp != VXLAN_PORT_LINUX)                          \
				return -1;                                                       \
			/* udp(8) + vxlan(8) + inner ethernet(14) */                             \
			off = l4 + 8 + 8 + 14;                                                   \
			p->encap = 1;                                                            \
			continue;                                                                \
		}                                                                                \
		if (proto != IPPROTO_TCP)                                                        \
			return -1;                                                               \
		struct tcphdr th;                                                                \
		if (LOAD(l4, &th, sizeof(th)))                                                   \
			return -1;                                                               \
		p->key.sport = bpf_ntohs(th.source);                                             \
		p->key.dport = bpf_ntohs(th.dest);                                               \
		p->seq = bpf_ntohl(th.seq);                                                      \
		p->flags = ((__u8 *)&th)[13];                                                    \
		__u32 thl = th.doff * 4;                                                         \
		/* GSO/GRO super-packets and BIG TCP: trust the skb length over tot_len. */     \
		__u32 from_len = total_len > l4 + thl ? total_len - l4 - thl : 0;                \
		__u32 from_hdr = ip_payload > thl ? ip_payload - thl : 0;                        \
		p->payload = from_hdr > from_len ? from_hdr : from_len;                          \
		if (depth == 0 && from_len && from_len < from_hdr)                               \
			p->payload = from_len;                                                   \
		return 0;                                                                        \
	}                                                                                        \
	return -1;

/* `n` (a constant) bytes at `off` of the packet: straight from its linear part, where they lie
 * (the headers of what a veth or a NIC's driver hands over), else through the helper (a call,
 * and a copy through skb_header_pointer, for each of the parse's four reads). */
static __always_inline int tc_load(struct __sk_buff *skb, __u32 off, void *dst, __u32 n)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (off <= 128 && data + off + n <= end) {
		__builtin_memcpy(dst, data + off, n);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, dst, n);
}

#define TC_LOAD(o, d, n) tc_load(skb, (o), (d), (n))

static __always_inline int parse_tc(struct __sk_buff *skb, struct pkt *p)
{
	__u16 ethertype = 0;
	__u32 off = 0;
	__u32 total_len = skb->len;
	p->encap = 0;
	/* L2 devices (veth, NIC, vxlan) show the Ethernet header; L3 ones (ipip) do not. */
	if (!tc_load(skb, 12, &ethertype, 2) && ethertype == skb->protocol)
		off = 14;
	PARSE_BODY(TC_LOAD)
}

static __always_inline void reverse(struct llmslo_flow_key *k)
{
	struct llmslo_flow_key r = *k;
	__builtin_memcpy(k->saddr, r.daddr, 16);
	__builtin_memcpy(k->daddr, r.saddr, 16);
	k->sport = r.dport;
	k->dport = r.sport;
}

/* Pre-DNAT key → the key the server's socket has, when a DNAT was seen for this flow. */
static __always_inline void translate(struct llmslo_flow_key *k)
{
	struct llmslo_flow_key *post = bpf_map_lookup_elem(&pre2post, k);
	if (post)
		*k = *post;
}

static __always_inline struct llmslo_flow *flow_get(struct llmslo_flow_key *k)
{
	struct llmslo_flow *f = bpf_map_lookup_elem(&flows, k);
	if (f)
		return f;
	struct llmslo_flow fresh = {};
	if (bpf_map_update_elem(&flows, k, &fresh, BPF_NOEXIST) && !bpf_map_lookup_elem(&flows, k)) {
		bump(LLMSLO_ST_FLOW_FULL);
		return NULL;
	}
	return bpf_map_lookup_elem(&flows, k);
}


/* A request packet at `hop`: stamp `slot` with the first new payload since the last read. */
static __always_inline void stamp_request(struct pkt *p, __u32 hop, __u32 slot, bool syn_too)
{
	bool syn = syn_too && (p->flags & TCP_FLAG_SYN) && !(p->flags & TCP_FLAG_ACK);
	/* The client's bare ACKs, one for every response segment, leave before the flow's
	 * lookup (a cache miss or two on a busy node: half of tc_pod_in's time) and the clock. */
	if (!syn && !p->payload)
		return;
	struct llmslo_flow *f = flow_get(&p->key);
	if (!f)
		return;
	__u64 now = bpf_ktime_get_ns();
	if (syn) {
		if (!f->ts[LLMSLO_NET_SYN])
			f->ts[LLMSLO_NET_SYN] = now;
		return;
	}
	if (hop >= LLMSLO_HOP_MAX || slot >= LLMSLO_NET_MAX)
		return;
	__u32 end = p->seq + p->payload;
	__u32 last = f->seq_end[hop];
	/* A segment that ends at or before what this hop saw is a retransmit: the request did not
	 * start again, so it must not restart the stage. */
	if (last && (__s32)(end - last) <= 0) {
		/* Counted once per segment: where it enters the pod (every hop sees it). */
		if (hop == LLMSLO_HOP_POD)
			bump(LLMSLO_ST_RETRANSMIT);
		return;
	}
	f->seq_end[hop] = end;
	if (!f->ts[slot])
		f->ts[slot] = now;
}

static __always_inline void stamp_response(struct pkt *p, __u32 slot)
{
	if (!p->payload || slot >= LLMSLO_NET_MAX)
		return;
	struct llmslo_flow *f = bpf_map_lookup_elem(&flows, &p->key);
	if (f)
		f->ts[slot] = bpf_ktime_get_ns();
}

/* Node ingress device (NIC or overlay): node_in, and the SYN. */
SEC("tc")
int tc_node_ingress(struct __sk_buff *skb)
{
	struct pkt p;
	if (parse_tc(skb, &p)) {
		return TC_PASS;
	}
	translate(&p.key);
	bool syn = (p.flags & TCP_FLAG_SYN) && !(p.flags & TCP_FLAG_ACK);
	/* Before DNAT the port may be a service port: keep flows that are SYNs (the nat hook
	 * moves them), already translated, or aimed at a target port. */
	if (!syn && !is_target_port(p.key.dport))
		return TC_PASS;
	/* The NIC sees an overlay's segments encapsulated, the overlay device decapsulated: two
	 * sightings of one hop, kept apart so that the second is not taken for a retransmit. */
	stamp_request(&p, p.encap ? LLMSLO_HOP_UNDERLAY : LLMSLO_HOP_NODE, LLMSLO_NET_NODE_IN, true);
	return TC_PASS;
}

/* Node egress device: node_out of responses (after un-DNAT, so translate). */
SEC("tc")
int tc_node_egress(struct __sk_buff *skb)
{
	struct pkt p;
	if (parse_tc(skb, &p))
		return TC_PASS;
	reverse(&p.key);
	translate(&p.key);
	stamp_response(&p, LLMSLO_NET_NODE_OUT);
	return TC_PASS;
}

/* Host side of a pod's veth, egress = into the pod: pod_in. */
SEC("tc")
int tc_pod_in(struct __sk_buff *skb)
{
	struct pkt p;
	if (parse_tc(skb, &p))
		return TC_PASS;
	if (!is_target_port(p.key.dport))
		return TC_PASS;
	stamp_request(&p, LLMSLO_HOP_POD, LLMSLO_NET_POD_IN, false);
	if (p.payload) {
		struct llmslo_flow_key c = p.key;
		c.dport = 0;
		__u16 *dp = bpf_map_lookup_elem(&flow_by_client, &c);
		if (!dp || *dp != p.key.dport)
			bpf_map_update_elem(&flow_by_client, &c, &p.key.dport, BPF_ANY);
	}
	return TC_PASS;
}

/* The low 32 bits of a flow's client address (send_begin's raddr_lo). */
static __always_inline __u32 client_addr_lo(const struct llmslo_flow_key *k)
{
	__u32 w;
	__builtin_memcpy(&w, k->family == AF_INET ? &k->saddr[0] : &k->saddr[12], 4);
	return w;
}

/* Host side of a pod's veth, ingress = out of the pod: pod_out of responses. A packet of the
 * send in progress on this CPU (its ports and client address match) is stamped in that send's
 * slot, which the send takes as it returns; any other (sent later, from a softirq: an ACK
 * opened the window) in the flow map. */
SEC("tc")
int tc_pod_out(struct __sk_buff *skb)
{
	struct pkt p;
	if (parse_tc(skb, &p))
		return TC_PASS;
	if (!p.payload)
		return TC_PASS;
	reverse(&p.key);
	if (!is_target_port(p.key.dport))
		return TC_PASS;
	__u32 zero = 0;
	struct send_begin *b = bpf_map_lookup_elem(&send_begins, &zero);
	if (b && b->sk && b->lport == p.key.dport && b->rport == p.key.sport &&
	    b->raddr_lo == client_addr_lo(&p.key)) {
		b->pod_out = bpf_ktime_get_ns();
		return TC_PASS;
	}
	stamp_response(&p, LLMSLO_NET_POD_OUT);
	return TC_PASS;
}

/* ---- netfilter: the load-balancing (DNAT) hop ---- */

/* Reads at the network header, whose address is looked up once per packet. */
#define NF_LOAD(o, d, n) bpf_probe_read_kernel((d), (n), nh + (o))

static __always_inline int parse_nf(struct sk_buff *skb, struct pkt *p)
{
	__u32 off = 0;
	__u32 total_len = BPF_CORE_READ(skb, len);
	unsigned char *nh = BPF_CORE_READ(skb, head) + BPF_CORE_READ(skb, network_header);
	p->encap = 0;
	PARSE_BODY(NF_LOAD)
}

static __always_inline bool key_eq(struct llmslo_flow_key *a, struct llmslo_flow_key *b)
{
	__u64 *x = (__u64 *)a, *y = (__u64 *)b;
	for (int i = 0; i < sizeof(*a) / 8; i++)
		if (x[i] != y[i])
			return false;
	return true;
}

#define IPS_DST_NAT (1 << 5)
#define IFF_LOOPBACK 0x8

/* The flow key the packet had before DNAT: the original direction of its conntrack entry. */
static __always_inline int pre_nat_key(struct sk_buff *skb, const struct llmslo_flow_key *post,
				       struct llmslo_flow_key *pre)
{
	unsigned long nfct = BPF_CORE_READ(skb, _nfct);
	struct nf_conn *ct = (struct nf_conn *)(nfct & ~7UL);
	if (!ct)
		return -1;
	if (!(BPF_CORE_READ(ct, status) & IPS_DST_NAT))
		return -1;
	struct nf_conntrack_tuple t;
	if (bpf_probe_read_kernel(&t, sizeof(t), &ct->tuplehash[0].tuple))
		return -1;
	__builtin_memset(pre, 0, sizeof(*pre));
	pre->family = post->family;
	if (post->family == AF_INET) {
		__builtin_memcpy(pre->saddr, &t.src.u3.ip, 4);
		__builtin_memcpy(pre->daddr, &t.dst.u3.ip, 4);
	} else {
		__builtin_memcpy(pre->saddr, &t.src.u3.in6, 16);
		__builtin_memcpy(pre->daddr, &t.dst.u3.in6, 16);
	}
	pre->sport = bpf_ntohs(t.src.u.all);
	pre->dport = bpf_ntohs(t.dst.u.all);
	return 0;
}

/* PRE_ROUTING just after the nat table, the one netfilter program: for a packet to a target
 * port that DNAT rewrote (kube-proxy's ClusterIP/NodePort), record the mapping from its
 * conntrack entry, move the stamps taken under the service address, and stamp nat_done.
 * Every other packet leaves after the parse and one port lookup. */
SEC("netfilter")
int nf_post_dnat(struct bpf_nf_ctx *ctx)
{
	struct sk_buff *skb = ctx->skb;
	/* Loopback traffic is the node talking to itself, never a Service's way to a pod. */
	const struct net_device *in = ctx->state->in;
	if (in && (in->flags & IFF_LOOPBACK))
		return NF_ACCEPT;
	/* Only a connection that DNAT rewrote is of interest, and its conntrack entry says so:
	 * a plain load through the hook's own (BTF) skb pointer and one read of the entry's
	 * status, before any parse of the packet. Pod-to-pod and node-to-pod traffic (no
	 * Service in the way) and untracked packets leave here. (bpf_core_cast cannot name
	 * nf_conn: this kernel's BTF has two types of that name.) */
	const struct nf_conn *ct = (const struct nf_conn *)(skb->_nfct & ~7UL);
	if (!ct || !(BPF_CORE_READ(ct, status) & IPS_DST_NAT))
		return NF_ACCEPT;
	struct pkt p;
	if (parse_nf(skb, &p))
		return NF_ACCEPT;
	if (!is_target_port(p.key.dport))
		return NF_ACCEPT;
	struct llmslo_flow_key pre;
	if (pre_nat_key(skb, &p.key, &pre) || key_eq(&pre, &p.key))
		return NF_ACCEPT;
	if (!bpf_map_lookup_elem(&pre2post, &pre))
		bpf_map_update_elem(&pre2post, &pre, &p.key, BPF_ANY);
	struct llmslo_flow *old = bpf_map_lookup_elem(&flows, &pre);
	struct llmslo_flow *f = flow_get(&p.key);
	if (!f)
		return NF_ACCEPT;
	if (old) {
		if (!f->ts[LLMSLO_NET_SYN])
			f->ts[LLMSLO_NET_SYN] = old->ts[LLMSLO_NET_SYN];
		if (!f->ts[LLMSLO_NET_NODE_IN])
			f->ts[LLMSLO_NET_NODE_IN] = old->ts[LLMSLO_NET_NODE_IN];
		if (!f->seq_end[LLMSLO_HOP_NODE])
			f->seq_end[LLMSLO_HOP_NODE] = old->seq_end[LLMSLO_HOP_NODE];
		bpf_map_delete_elem(&flows, &pre);
	}
	stamp_request(&p, LLMSLO_HOP_NAT, LLMSLO_NET_NAT_DONE, false);
	return NF_ACCEPT;
}
