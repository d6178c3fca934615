// What the backend service shares with its handler threads: the export, our
// slot identity, tunables, and the verdicts of the service's periodic scan
// (which hosts may attach, which channels are dead) and the backend fence.
// Handler threads only read it, except `channel_serving`, which each writes
// for its own channels, and the fence, which any of them may trip.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>

#include "common/kernel_identity.hpp"
#include "common/poller.hpp"
#include "common/transport.hpp"
#include "plugin/backend_fence.hpp"
#include "plugin/handler.hpp"
#include "plugin/store.hpp"
#include "plugin/wake_listener.hpp"

namespace cbd::backend {

struct ServingContext {
  ServingContext(const Transport& transport_, Store& store_)
      : transport(transport_),
        store(store_),
        host_allowed(std::make_unique<std::atomic<bool>[]>(transport_.host_count())),
        channel_condemned(std::make_unique<std::atomic<std::uint64_t>[]>(transport_.channel_count())),
        channel_serving(std::make_unique<std::atomic<bool>[]>(transport_.channel_count())) {}

  const Transport& transport;
  Store& store;
  ExportLimits limits;
  std::uint32_t backend_index = 0;
  // Our kernel: a channel whose owner shares it can wake our handler
  // threads through their doorbells (docs/design.md, Doorbells).
  KernelId kernel_id = local_kernel_id();
  std::uint64_t backend_epoch = 0;
  unsigned queue_depth = 64;          // store requests in flight per handler thread
  PollTunables poll;
  std::chrono::milliseconds heartbeat_interval{200};
  std::chrono::milliseconds shutdown_grace{3000};  // longest wait for the queue side to make room on stop (a stop ends within 5 s)

  // By host slot index: may channels owned by that host be served?
  std::unique_ptr<std::atomic<bool>[]> host_allowed;
  // By channel index: the state word the service judged dead (0: none).  A
  // handler stops serving a channel whose current word equals it.
  std::unique_ptr<std::atomic<std::uint64_t>[]> channel_condemned;
  // By channel index: is a handler serving it (or still finishing its I/O)?
  // The service reclaims a dead channel only when this is false.
  std::unique_ptr<std::atomic<bool>[]> channel_serving;
  // Is our backend slot still ours?  Asked before every entry goes to the
  // store and before every write to a channel; once it fails, nothing of
  // the transport is written again.
  BackendFence fence;
  // Queue loops' wake sockets, handed over at set-up (docs/design.md,
  // Polling and doorbells); null when the backend takes none.
  WakeSocketTable* wake_sockets = nullptr;
};

}  // namespace cbd::backend
