// A snapshot of every owned slot of a transport with an alive/dead verdict,
// for `list` and `gc`.  Liveness needs two looks at each heartbeat, so a
// survey watches for a while: a slot is alive when its heartbeat moved.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "common/transport.hpp"

namespace cbd::proxy {

enum class SlotKind { Host, Backend, Blkdev, Channel };
const char* slot_kind_name(SlotKind kind);

struct SurveyedSlot {
  SlotKind kind;
  std::uint32_t index;
  std::uint64_t word;      // state word at the last look
  bool alive;              // the heartbeat moved while we watched
  SlotHeader* header;
};

// Watches every non-free slot for `watch` (at least two heartbeat intervals
// for a meaningful verdict) and reports them.
std::vector<SurveyedSlot> survey_slots(const Transport& transport, std::chrono::milliseconds watch);

}  // namespace cbd::proxy
