// Which kernel a process runs on: the boot id Linux draws at every boot.
// Two slot owners with the same boot id share a kernel, so a futex wake of
// one reaches the other (docs/design.md, Doorbells).  Each owner writes its
// own into its host slot at claim.  A peer's is a peer's word: a wrong one
// costs only that peer's own latency.
#pragma once

#include <array>
#include <cstdint>

#include "common/layout.hpp"

namespace cbd {

using KernelId = std::array<std::uint8_t, 16>;

// From /proc/sys/kernel/random/boot_id; all zero when it cannot be read.
KernelId local_kernel_id();

void write_kernel_id(HostSlot& slot, const KernelId& id);
// False when either id is all zero (unknown).
bool same_kernel(const HostSlot& peer, const KernelId& ours);

}  // namespace cbd
