#include "client/slot_survey.hpp"

#include <map>
#include <thread>

#include "common/shared_atomic.hpp"
#include "common/slot.hpp"

namespace cbd::proxy {

const char* slot_kind_name(SlotKind kind) {
  switch (kind) {
    case SlotKind::Host: return "host";
    case SlotKind::Backend: return "backend";
    case SlotKind::Blkdev: return "blkdev";
    case SlotKind::Channel: return "channel";
  }
  return "?";
}

namespace {

std::vector<SurveyedSlot> all_headers(const Transport& t) {
  std::vector<SurveyedSlot> slots;
  for (std::uint32_t i = 0; i < t.host_count(); ++i) slots.push_back({SlotKind::Host, i, 0, false, &t.host(i).header});
  for (std::uint32_t i = 0; i < t.backend_count(); ++i)
    slots.push_back({SlotKind::Backend, i, 0, false, &t.backend(i).header});
  for (std::uint32_t i = 0; i < t.blkdev_count(); ++i)
    slots.push_back({SlotKind::Blkdev, i, 0, false, &t.blkdev(i).header});
  for (std::uint32_t i = 0; i < t.channel_count(); ++i)
    slots.push_back({SlotKind::Channel, i, 0, false, &t.channel_control(i).header});
  return slots;
}

}  // namespace

std::vector<SurveyedSlot> survey_slots(const Transport& transport, std::chrono::milliseconds watch) {
  std::vector<SurveyedSlot> slots = all_headers(transport);
  std::vector<std::uint64_t> first_beat(slots.size());
  std::vector<std::uint64_t> first_word(slots.size());
  bool any_owned = false;
  for (std::size_t i = 0; i < slots.size(); ++i) {
    first_word[i] = load_acquire(slots[i].header->state);
    first_beat[i] = load_acquire(slots[i].header->heartbeat);
    any_owned = any_owned || state_of(first_word[i]) != SlotState::Free;
  }
  if (any_owned) std::this_thread::sleep_for(watch);
  std::vector<SurveyedSlot> owned;
  for (std::size_t i = 0; i < slots.size(); ++i) {
    SurveyedSlot slot = slots[i];
    slot.word = load_acquire(slot.header->state);
    if (state_of(slot.word) == SlotState::Free) continue;
    // A changed word means a new owner claimed it meanwhile: alive.
    slot.alive = slot.word != first_word[i] || load_acquire(slot.header->heartbeat) != first_beat[i];
    owned.push_back(slot);
  }
  return owned;
}

}  // namespace cbd::proxy
