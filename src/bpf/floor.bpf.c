// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Programs that do nothing, one per program type the agent attaches, on the same hooks: what the
 * kernel's run-time accounting (kernel.bpf_stats_enabled) reports for a run that does no work.
 * The overhead benchmark attaches them in a block of its own and sets that floor beside the
 * agent's programs: two clock reads around every run, which no node pays with the accounting
 * off (src/floor.rs). Never loaded by the agent. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tp_btf/sock_send_length")
int BPF_PROG(floor_tracing, struct sock *sk, int ret, int flags)
{
	return 0;
}

SEC("raw_tp/sock_send_length")
int floor_raw_tp(void *ctx)
{
	return 0;
}

SEC("tracepoint/sock/sk_data_ready")
int floor_tracepoint(void *ctx)
{
	return 0;
}

/* TCX_NEXT / TC_ACT_UNSPEC: every packet goes on as it came. */
SEC("tcx/ingress")
int floor_tc_out(struct __sk_buff *skb)
{
	return -1;
}

SEC("tcx/egress")
int floor_tc_in(struct __sk_buff *skb)
{
	return -1;
}

SEC("netfilter")
int floor_nf(void *ctx)
{
	return 1; /* NF_ACCEPT */
}
