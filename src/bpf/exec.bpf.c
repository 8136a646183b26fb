// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Process starts, exits and listens, so discovery rescans the moment a server exec's (instead
 * of at its next poll), puts its listening sockets in the maps the moment it opens them, and
 * drops a target whose process is gone. Userspace decides what matters: an exec or a listen of
 * a process whose command line matches a signature (or that is in a pod, with port selection),
 * a listen or an exit of a traced pid. Events are 8 bytes. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "llmslo.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} proc_events SEC(".maps");

/* Events the ring buffer had no room for (userspace then rescans at once). */
__u64 proc_events_lost = 0;

struct llmslo_proc_event _proc_event = {0};

static __always_inline void emit(__u32 kind)
{
	struct llmslo_proc_event *e = bpf_ringbuf_reserve(&proc_events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&proc_events_lost, 1);
		return;
	}
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->kind = kind;
	bpf_ringbuf_submit(e, 0);
}

SEC("tracepoint/sched/sched_process_exec")
int proc_exec(void *ctx)
{
	emit(PROC_EXEC);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int proc_exit(void *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	/* Only the thread group leader: a process, not each of its threads. */
	if ((__u32)id != (__u32)(id >> 32))
		return 0;
	emit(PROC_EXIT);
	return 0;
}

/* listen(2) on a TCP socket: inet_csk_listen_start sets TCP_LISTEN in the caller's context.
 * Rare (a server's start-up), so no filter beyond the state. */
SEC("tracepoint/sock/inet_sock_set_state")
int proc_listen(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP || ctx->newstate != TCP_LISTEN)
		return 0;
	emit(PROC_LISTEN);
	return 0;
}
