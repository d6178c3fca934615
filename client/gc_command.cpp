#include <cstdio>

#include "client/commands.hpp"
#include "common/flush_ranges.hpp"
#include "common/liveness.hpp"
#include "common/region.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"
#include "common/transport.hpp"

#include <thread>
#include <vector>

namespace cbd::proxy {

const std::vector<ParameterSpec> kGcParameters = {
    {"transport", kDefaultTransport, "the transport to clean"},
};

// Watches every owned slot for the transport's full dead-after time (on our
// own monotonic clock) and frees those whose heartbeat never moved.  The CAS
// in reclaim() fails if the slot changed hands meanwhile, so a live owner is
// never robbed.
int run_gc(const Parameters& p) {
  Transport transport = Transport::attach(p.text("transport", kDefaultTransport));
  const Superblock& sb = transport.superblock();
  LivenessObserver observer(std::chrono::milliseconds(sb.dead_after_ms));
  struct Watched {
    const char* kind;
    std::uint32_t index;
    SlotHeader* header;
  };
  std::vector<Watched> slots;
  for (std::uint32_t i = 0; i < transport.host_count(); ++i) slots.push_back({"host", i, &transport.host(i).header});
  for (std::uint32_t i = 0; i < transport.backend_count(); ++i)
    slots.push_back({"backend", i, &transport.backend(i).header});
  for (std::uint32_t i = 0; i < transport.blkdev_count(); ++i)
    slots.push_back({"blkdev", i, &transport.blkdev(i).header});
  for (std::uint32_t i = 0; i < transport.channel_count(); ++i)
    slots.push_back({"channel", i, &transport.channel_control(i).header});

  auto start = LivenessObserver::Clock::now();
  auto deadline = start + std::chrono::milliseconds(sb.dead_after_ms + sb.heartbeat_interval_ms);
  std::vector<Liveness> verdict(slots.size(), Liveness::Free);
  for (;;) {
    auto now = LivenessObserver::Clock::now();
    for (std::size_t i = 0; i < slots.size(); ++i) verdict[i] = observer.observe(i, *slots[i].header, now);
    if (now >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(sb.heartbeat_interval_ms / 2 + 1));
  }
  // A dead channel bound to a backend that is alive (the same epoch) is
  // left to that backend: its sweep stops its handlers serving the channel
  // before it reclaims it, which gc cannot (docs/design.md §4).
  const std::size_t first_backend = transport.host_count();
  const std::size_t first_channel = first_backend + transport.backend_count() + transport.blkdev_count();
  const auto left_to_backend = [&](std::size_t i) {
    if (i < first_channel) return false;
    const ChannelControl& control = transport.channel_control(static_cast<std::uint32_t>(i - first_channel));
    // Written by the channel's owner, maybe on another host: in flush mode
    // our cached lines may be stale.
    refresh_lines(&control, 2 * kLineSize);  // the header and binding lines
    const std::uint32_t backend = load_relaxed(control.backend_id);
    if (backend >= transport.backend_count() || verdict[first_backend + backend] != Liveness::Alive) return false;
    const SlotHeader& backend_header = transport.backend(backend).header;
    refresh_lines(&backend_header.state, sizeof backend_header.state);
    return epoch_of(load_acquire(backend_header.state)) == load_relaxed(control.backend_epoch);
  };
  unsigned reclaimed = 0;
  for (std::size_t i = 0; i < slots.size(); ++i) {
    if (verdict[i] != Liveness::Dead) continue;
    if (left_to_backend(i)) {
      std::printf("left dead %s %u to its backend %u, which is alive (its sweep reclaims it)\n", slots[i].kind,
                  slots[i].index, load_relaxed(transport.channel_control(slots[i].index).backend_id));
      continue;
    }
    if (reclaim(*slots[i].header, observer.last_word(i))) {
      std::printf("reclaimed dead %s %u\n", slots[i].kind, slots[i].index);
      ++reclaimed;
    }
  }
  std::printf("%u dead slot%s reclaimed\n", reclaimed, reclaimed == 1 ? "" : "s");
  return 0;
}

}  // namespace cbd::proxy
