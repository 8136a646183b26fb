/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* CUDA activity per target cgroup (the cgroup v2 id of a target server, as
 * bpf_get_current_cgroup_id returns it there): written by the GPU object's uprobes in every
 * process of that cgroup (an inference server's engine and worker processes as well as the one
 * that serves HTTP), read by the L7 object's syscall programs (a request's events carry its
 * server cgroup's totals). Declared by the L7 object, reused by the GPU object. One entry per
 * cgroup, not per CPU, so a syscall reads it with one lookup; the uprobes add atomically. No
 * preallocation: nodes without GPU pay nothing. */
#ifndef LLMSLO_GPU_COUNTS_H
#define LLMSLO_GPU_COUNTS_H

#include "llmslo.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct llmslo_gpu_counts);
} gpu_counts SEC(".maps");

#endif
