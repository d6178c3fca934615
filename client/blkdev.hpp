// The compute node's attachment to one backend: a host slot, a blkdev slot
// bound to the backend, one channel and one QueueLoop per queue, heartbeats
// for all of them, and the watch that drives recovery (docs/design.md,
// "Compute side: cbd-proxy" and "Failure model"):
//  - a new backend epoch sets every channel up again, which re-drives what
//    was outstanding; a backend that stays away past `timeout=` fails it
//    with EIO;
//  - slots reclaimed while this process was paused past dead-after are
//    claimed anew (host, blkdev, a free channel per lost one) and the
//    outstanding entries move into the new channels: clients see a delay.
// As a ConnectionSink it hands each connection to the next queue in turn.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "client/connection_handoff.hpp"
#include "client/queue_loop.hpp"
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
  std::chrono::milliseconds payload_timeout{30000};          // a WRITE payload that stops arriving ends its connection
  std::chrono::milliseconds reply_timeout{30000};            // so do replies the client stops taking
  std::uint32_t spin_us = 50;                                // queue loops: poll without sleeping after activity
  std::uint32_t max_sleep_us = 1000;                         // queue loops: longest wait with entries in flight
};

class Blkdev final : public ConnectionSink {
 public:
  // Claims everything and binds the channels; throws cbd::Error with a clear
  // message when the backend is not live or no slot/channel is free.
  Blkdev(const Transport& transport, const BlkdevOptions& options);
  ~Blkdev() override;
  Blkdev(const Blkdev&) = delete;
  Blkdev& operator=(const Blkdev&) = delete;

  ExportInfo info() const override { return info_; }
  // Round-robin over the queues.
  void adopt(AdoptedConnection connection) override;
  // The blkdev slot we hold now (it changes if ours was reclaimed).
  std::uint32_t index() const { return blkdev_index_.load(); }
  // Ends every connection now, whatever its peer does.
  void shutdown_connections();
  // The queues (channels) claimed: at most BlkdevOptions::queues.
  std::uint32_t queue_count() const { return static_cast<std::uint32_t>(loops_.size()); }
  // Records in the blkdev slot which kernel device it serves (1 + N for
  // /dev/nbdN, 0 for none), for `cbd-proxy list`; kept for a slot claimed
  // again after ours was reclaimed.  Fenced: nothing is written to a slot
  // that is no longer ours (docs/design.md §4).
  void set_kernel_device(std::uint32_t value);

 private:
  // What the heartbeat thread beats for a channel: its header and the word
  // we claimed it with, not the engine, which only its loop may touch.
  struct ChannelBeat {
    SlotHeader* header = nullptr;
    std::uint32_t index = 0;
    std::uint64_t word = 0;
    std::uint64_t last = 0;  // heartbeat value we wrote last (fenced beat)
  };

  void beat();
  void watch_backend();
  // Our slots were reclaimed (we were judged dead): claim new ones and move
  // the queues onto them.  False while something could not be claimed yet.
  bool reclaim_lost(const std::vector<bool>& channel_lost, bool host_lost, bool blkdev_lost);
  std::optional<SlotClaim> claim_channel(std::uint32_t owner_host);
  Binding binding() const;
  QueueLoopOptions loop_options() const;

  const Transport& transport_;
  BlkdevOptions options_;
  ExportInfo info_;
  std::vector<std::unique_ptr<QueueLoop>> loops_;
  std::atomic<std::size_t> next_queue_{0};
  std::atomic<std::uint32_t> blkdev_index_{0};
  std::atomic<std::uint32_t> kernel_device_{0};  // what set_kernel_device() recorded

  // Claims: beaten by the heartbeat thread, replaced by the watcher.
  mutable std::mutex claims_mutex_;
  SlotClaim host_;
  SlotClaim blkdev_;
  std::vector<ChannelBeat> channel_beats_;  // one per queue

  // Backend watch state (watcher thread only).
  LivenessObserver backend_observer_;
  std::uint64_t bound_epoch_ = 0;
  std::chrono::steady_clock::time_point set_up_at_{};
  std::optional<std::chrono::steady_clock::time_point> backend_gone_since_;
  std::optional<std::chrono::steady_clock::time_point> lost_since_;
  bool failed_ = false;

  // Last: they call into the members above, so they stop first.
  std::unique_ptr<PeriodicThread> heartbeat_;
  std::unique_ptr<PeriodicThread> watcher_;
};

// Backend info as published in its slot, or nullopt unless it is live and
// has finished publishing.
std::optional<ExportInfo> read_backend_export(const Transport& transport, std::uint32_t backend_id,
                                              std::uint64_t* epoch = nullptr);

}  // namespace cbd::proxy
