// The compute node's attachment to one backend: a host slot, a blkdev slot
// bound to the backend, one channel (ChannelQueue) per queue, heartbeats for
// all of them, and the watch on the backend that drives recovery
// (design §3.11): a new backend epoch re-drives outstanding entries; a
// backend that stays away past the timeout fails them with EIO.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "client/channel_queue.hpp"
#include "common/liveness.hpp"
#include "common/periodic_thread.hpp"
#include "common/transport.hpp"

namespace cbd::proxy {

struct BlkdevOptions {
  std::uint32_t backend_id = 0;
  std::uint32_t queues = 2;                                  // channels to claim
  std::string export_name;                                   // "" = the backend's
  bool readonly = false;                                     // refuse writes even if the backend allows them
  std::string hostname;                                      // "" = gethostname()
  std::chrono::milliseconds backend_timeout{30000};          // hold requests this long for a backend to return
  std::chrono::milliseconds attach_timeout{10000};           // wait this long for handlers to attach
  PollTunables poll;
};

class Blkdev {
 public:
  // Claims everything and binds the channels; throws cbd::Error with a clear
  // message when the backend is not live or no slot/channel is free.
  Blkdev(const Transport& transport, const BlkdevOptions& options);
  ~Blkdev();
  Blkdev(const Blkdev&) = delete;
  Blkdev& operator=(const Blkdev&) = delete;

  const ExportInfo& info() const { return info_; }
  std::uint32_t index() const { return blkdev_.index(); }
  // The queue for a new connection (round-robin over the channels).
  std::shared_ptr<RequestTarget> next_target();
  // The channels claimed (at most BlkdevOptions::queues).
  std::uint32_t queue_count() const { return static_cast<std::uint32_t>(queues_.size()); }
  // Records in the blkdev slot which kernel device it serves (1 + N for
  // /dev/nbdN, 0 for none), for `cbd-proxy list`; fenced: nothing is
  // written once the slot is no longer ours (docs/design.md §4).
  void set_kernel_device(std::uint32_t value);

 private:
  void beat();
  void watch_backend();

  const Transport& transport_;
  BlkdevOptions options_;
  SlotClaim host_;
  SlotClaim blkdev_;
  ExportInfo info_;
  std::vector<std::shared_ptr<ChannelQueue>> queues_;
  std::atomic<std::size_t> next_queue_{0};

  // Backend watch state (watcher thread only).
  LivenessObserver backend_observer_;
  std::uint64_t bound_epoch_ = 0;
  std::optional<std::chrono::steady_clock::time_point> backend_gone_since_;
  bool failed_ = false;
  bool lost_ = false;  // our slots were reclaimed: serve nothing any more

  // What the heartbeat thread beats for the channels: their headers and the
  // words we claimed them with, not the queues themselves, which the
  // constructor creates and the destructor destroys while it runs.
  struct ChannelBeat {
    SlotHeader* header;
    std::uint64_t word;
    std::uint64_t last;  // heartbeat value we wrote last (fenced beat)
  };
  std::mutex beats_mutex_;
  std::vector<ChannelBeat> channel_beats_;  // guarded by beats_mutex_

  // Last: they call into the members above, so they stop first.
  std::unique_ptr<PeriodicThread> heartbeat_;
  std::unique_ptr<PeriodicThread> watcher_;
};

// Backend info as published in its slot, or nullopt unless it is live and
// has finished publishing.
std::optional<ExportInfo> read_backend_export(const Transport& transport, std::uint32_t backend_id,
                                              std::uint64_t* epoch = nullptr);

}  // namespace cbd::proxy
