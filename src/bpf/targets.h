/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The processes userspace targets, by tgid: declared by the L7 object, reused by the GPU object. */
#ifndef LLMSLO_TARGETS_H
#define LLMSLO_TARGETS_H

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} target_tgids SEC(".maps");

#endif
