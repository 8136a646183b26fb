// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Minimal programs that `llm-slo-agent probe` loads and attaches one at a time to learn which
 * hook types this kernel really offers (a type can exist yet fail to attach, e.g. no ftrace). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

__u64 hits = 0;

SEC("kprobe/tcp_sendmsg")
int probe_kprobe(void *ctx) { hits++; return 0; }

SEC("fentry/tcp_sendmsg")
int BPF_PROG(probe_fentry) { hits++; return 0; }

SEC("tp_btf/sched_switch")
int BPF_PROG(probe_tp_btf) { hits++; return 0; }

SEC("raw_tp/sched_switch")
int probe_raw_tp(void *ctx) { hits++; return 0; }

SEC("tracepoint/sock/inet_sock_set_state")
int probe_tracepoint(void *ctx) { hits++; return 0; }

SEC("tc")
int probe_tc(struct __sk_buff *skb) { return -1; /* TC_ACT_UNSPEC: never changes a packet's fate */ }

SEC("netfilter")
int probe_netfilter(void *ctx) { return 1; /* NF_ACCEPT */ }
