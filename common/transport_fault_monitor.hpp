// Watches a transport mapping for the bus error that FaultGuardedMapping
// absorbed (docs/design.md, "Truncated or vanished transport") and tells its
// daemon once, from an ordinary thread, so it can stop using the transport:
// the signal handler itself only swaps in zero pages and records the offset.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "common/periodic_thread.hpp"
#include "common/region.hpp"

namespace cbd {

// "transport PATH: truncated or removed under us (bus error at offset N)".
std::string transport_fault_message(const std::string& path, std::uint64_t offset);

class TransportFaultMonitor {
 public:
  // Calls `on_fault` once, with transport_fault_message(), from the monitor
  // thread, within about `interval` of the first bus error in `region`.
  // The region must outlive the monitor.
  using Callback = std::function<void(const std::string& message)>;
  TransportFaultMonitor(const Region& region, Callback on_fault,
                        std::chrono::milliseconds interval = std::chrono::milliseconds(50));
  TransportFaultMonitor(const TransportFaultMonitor&) = delete;
  TransportFaultMonitor& operator=(const TransportFaultMonitor&) = delete;
  // Joins the monitor thread (waiting for a callback that is running).
  ~TransportFaultMonitor() = default;

  // Has the callback been called (or is it running)?
  bool fired() const { return fired_; }

 private:
  void check();

  const Region& region_;
  Callback on_fault_;
  std::atomic<bool> fired_{false};
  std::unique_ptr<PeriodicThread> thread_;  // last: stops before the members above go
};

}  // namespace cbd
