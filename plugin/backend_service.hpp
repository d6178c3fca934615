// The backend of one export (design §1, storage node): registers a host,
// claims and publishes a backend slot, runs the handler threads that serve
// every channel a compute node attaches to it, keeps the heartbeats going,
// reclaims dead channels and blkdevs bound to it, and stops cleanly.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/liveness.hpp"
#include "common/periodic_thread.hpp"
#include "common/poller.hpp"
#include "common/slot.hpp"
#include "common/transport.hpp"
#include "plugin/handler_thread.hpp"
#include "plugin/serving_context.hpp"
#include "plugin/store.hpp"

namespace cbd::backend {

struct BackendConfig {
  std::string export_name;                 // published in the backend slot (at most 64 bytes)
  std::optional<std::uint32_t> backend_id; // take over this slot (restarts); unset: first free slot
  std::string hostname;                    // our host slot's name; empty: gethostname()
  std::vector<std::string> allow_hosts;    // compute hosts whose channels we serve; empty: all
  unsigned handlers = 1;                   // handler threads
  unsigned queue_depth = 64;               // store requests in flight per handler thread
  PollTunables poll;
  std::chrono::milliseconds shutdown_grace{3000};  // longest wait on stop for the queue side to take completions (a stop ends within 5 s)
};

// The capability bits a backend on `info` publishes.
std::uint32_t caps_for(const StoreInfo& info);

class BackendService {
 public:
  // No side effects: start() claims slots and starts threads.
  BackendService(const Transport& transport, Store& store, BackendConfig config);
  BackendService(const BackendService&) = delete;
  BackendService& operator=(const BackendService&) = delete;
  ~BackendService() { stop(); }

  // Claims a host slot and a backend slot, publishes the export, starts the
  // heartbeat and the handler threads.  Throws cbd::Error (nothing stays
  // claimed then).
  void start();
  // Marks the backend slot Stopping, fails entries not yet started with
  // ESHUTDOWN, completes the ones in flight, joins every thread and
  // releases the backend and host slots.  Channels belong to the queue side
  // and are left claimed.  Idempotent.
  void stop();

  bool running() const { return running_; }
  std::uint32_t host_index() const { return host_.index(); }
  std::uint32_t backend_index() const { return backend_.index(); }
  std::uint64_t backend_epoch() const { return backend_.epoch(); }
  const ExportLimits& limits() const { return context_.limits; }
  std::uint32_t caps() const { return caps_; }

 private:
  void claim_host();
  void claim_backend();
  void publish_backend();
  void heartbeat_tick();
  // Our backend slot was taken over: trip the fence, log once, release the
  // host slot.  Called by the heartbeat thread with claims_mutex_ held.
  void lose_backend();
  void refresh_allowed_hosts();
  void sweep_channels();
  void sweep_blkdevs();

  const Transport& transport_;
  Store& store_;
  BackendConfig config_;
  std::uint32_t caps_ = 0;
  ServingContext context_;
  // The heartbeat thread and stop() both use the claims.
  std::mutex claims_mutex_;
  SlotClaim host_;
  SlotClaim backend_;
  std::unique_ptr<PeriodicThread> heartbeat_;
  // Before handlers_: they take from the table until they are joined.
  WakeSocketTable wake_sockets_;
  std::unique_ptr<WakeListener> wake_listener_;
  std::vector<std::unique_ptr<HandlerThread>> handlers_;
  // Used only by the heartbeat thread.
  LivenessObserver liveness_;
  std::vector<std::uint64_t> refused_generation_logged_;
  bool serving_lost_ = false;  // with claims_mutex_
  bool host_lost_logged_ = false;
  // A compute node decides how often its channels are set up again or die:
  // these lines are rate-limited across all channels.
  RateLimit refused_log_{std::chrono::seconds(10)};
  RateLimit channel_reclaim_log_{std::chrono::seconds(10)};
  RateLimit blkdev_reclaim_log_{std::chrono::seconds(10)};
  bool running_ = false;
};

}  // namespace cbd::backend
