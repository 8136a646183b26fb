// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* TCP connection lifecycle of target servers: when a server-side socket becomes ESTABLISHED
 * (the handshake's end) and when it retransmits. Stamps go into the shared flow map. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define TCP_ESTABLISHED 1
#define TCP_SYN_RECV 3

static __always_inline bool is_target_listener(struct sock *sk)
{
	struct listen_key lk = {
		.netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum),
		.port = BPF_CORE_READ(sk, __sk_common.skc_num),
	};
	return bpf_map_lookup_elem(&listen_ports, &lk) != NULL;
}

SEC("tracepoint/sock/inet_sock_set_state")
int inet_sock_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP || ctx->newstate != TCP_ESTABLISHED ||
	    ctx->oldstate != TCP_SYN_RECV)
		return 0;
	struct sock *sk = (struct sock *)ctx->skaddr;
	if (!is_target_listener(sk))
		return 0;
	struct llmslo_flow_key k;
	sock_flow_key(sk, &k);
	__u64 now = bpf_ktime_get_ns();
	struct llmslo_flow *f = bpf_map_lookup_elem(&flows, &k);
	if (f) {
		f->ts[LLMSLO_NET_ESTABLISHED] = now;
		return 0;
	}
	struct llmslo_flow fresh = {};
	fresh.ts[LLMSLO_NET_ESTABLISHED] = now;
	if (bpf_map_update_elem(&flows, &k, &fresh, BPF_NOEXIST))
		bump(LLMSLO_ST_FLOW_FULL);
	return 0;
}

/* The tracepoint's struct is named differently across kernels (tcp_event_sk_skb before 6.x,
 * tcp_retransmit_skb after); its first fields have kept their place, so use a fixed layout. */
struct retransmit_ctx {
	__u64 common;
	const void *skbaddr;
	const void *skaddr;
};

SEC("tracepoint/tcp/tcp_retransmit_skb")
int tcp_retransmit_skb(struct retransmit_ctx *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	if (!sk || !is_target_listener(sk))
		return 0;
	struct llmslo_flow_key k;
	sock_flow_key(sk, &k);
	struct llmslo_flow *f = bpf_map_lookup_elem(&flows, &k);
	if (f)
		__sync_fetch_and_add(&f->retransmits, 1);
	return 0;
}
