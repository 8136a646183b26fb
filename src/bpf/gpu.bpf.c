// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* CUDA driver activity of target servers from uprobes on libcuda: kernel and graph launches,
 * async memcpy bytes, synchronisation count and wait. Aggregated here into per-cgroup counters
 * (atomic adds; the L7 programs read them at each request's syscalls): a server's cgroup holds
 * the processes that really drive the GPU (vLLM V1's engine core, SGLang's scheduler and TP
 * workers, Triton's Python backends), which are not the process that serves HTTP. Nothing goes
 * through the ring buffer, so a launch costs a uprobe, two lookups and an atomic add.
 * The loader attaches these programs per libcuda file found in the mappings of the processes of
 * targets' cgroups (pid-filtered: other processes mapping the file never trap). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "llmslo.h"
/* Shared with the L7 object (the loader reuses its fds). */
#include "stats.h"
#include "gpu_counts.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct llmslo_gpu_counts _gpu_counts = {};

/* Entry time of a synchronisation call in flight, per thread. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} gpu_sync_start SEC(".maps");

/* The cgroup v2 ids of target servers (each one's own cgroup), filled by userspace: the calls of
 * every process in them count, under that id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} gpu_cgroups SEC(".maps");

static __always_inline bool target_cgroup(__u64 cg)
{
	return bpf_map_lookup_elem(&gpu_cgroups, &cg) != NULL;
}

/* The calling process's cgroup's counters when it is a target's, else NULL. The target check
 * comes first. */
static __always_inline struct llmslo_gpu_counts *target_counts(void)
{
	__u64 cg = bpf_get_current_cgroup_id();
	if (!target_cgroup(cg))
		return NULL;
	struct llmslo_gpu_counts *c = bpf_map_lookup_elem(&gpu_counts, &cg);
	if (c)
		return c;
	struct llmslo_gpu_counts zero = {};
	bpf_map_update_elem(&gpu_counts, &cg, &zero, BPF_NOEXIST);
	c = bpf_map_lookup_elem(&gpu_counts, &cg);
	if (!c)
		bump(LLMSLO_ST_GPU_MAP_FULL);
	return c;
}

/* cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra) and
 * cuLaunchKernelEx(config, f, params, extra), and their _ptsz forms (per-thread default
 * stream) as every probe here. */
SEC("uprobe")
int BPF_UPROBE(cu_launch)
{
	struct llmslo_gpu_counts *c = target_counts();
	if (c)
		__sync_fetch_and_add(&c->launches, 1);
	return 0;
}

/* cuGraphLaunch(graph_exec, stream). */
SEC("uprobe")
int BPF_UPROBE(cu_graph_launch)
{
	struct llmslo_gpu_counts *c = target_counts();
	if (c)
		__sync_fetch_and_add(&c->graph_launches, 1);
	return 0;
}

/* cuMemcpyHtoDAsync_v2(dst, src, bytes, stream), cuMemcpyDtoHAsync_v2(dst, src, bytes, stream),
 * cuMemcpyAsync(dst, src, bytes, stream): the size is the third argument of all three. */
SEC("uprobe")
int BPF_UPROBE(cu_memcpy_async, __u64 dst, __u64 src, __u64 bytes)
{
	struct llmslo_gpu_counts *c = target_counts();
	if (c)
		__sync_fetch_and_add(&c->memcpy_bytes, bytes);
	return 0;
}

/* cuStreamSynchronize(stream), cuCtxSynchronize(): entry. */
SEC("uprobe")
int BPF_UPROBE(cu_sync_enter)
{
	if (!target_cgroup(bpf_get_current_cgroup_id()))
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	__u64 now = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&gpu_sync_start, &id, &now, BPF_ANY))
		bump(LLMSLO_ST_GPU_MAP_FULL);
	return 0;
}

/* ... and return: wait = return - entry. */
SEC("uretprobe")
int BPF_URETPROBE(cu_sync_exit)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 *start = bpf_map_lookup_elem(&gpu_sync_start, &id);
	if (!start)
		return 0;
	__u64 wait = bpf_ktime_get_ns() - *start;
	bpf_map_delete_elem(&gpu_sync_start, &id);
	/* The cgroup now, not at entry: a process moved out meanwhile is no target's any more. */
	struct llmslo_gpu_counts *c = target_counts();
	if (c) {
		__sync_fetch_and_add(&c->syncs, 1);
		__sync_fetch_and_add(&c->sync_wait_ns, wait);
	}
	return 0;
}
