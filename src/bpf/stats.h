/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Declarations every object that shares the L7 object's counters needs: the per-CPU stats array
 * and `bump`. The loader makes each object reuse l7's map fd. */
#ifndef LLMSLO_STATS_H
#define LLMSLO_STATS_H

#include "llmslo.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LLMSLO_ST_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void bump(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += 1;
}

#endif
