#include "common/transport_fault_monitor.hpp"

namespace cbd {

std::string transport_fault_message(const std::string& path, std::uint64_t offset) {
  return "transport " + path + ": truncated or removed under us (bus error at offset " + std::to_string(offset) + ")";
}

TransportFaultMonitor::TransportFaultMonitor(const Region& region, Callback on_fault,
                                             std::chrono::milliseconds interval)
    : region_(region), on_fault_(std::move(on_fault)) {
  thread_ = std::make_unique<PeriodicThread>(interval, [this] { check(); });
}

void TransportFaultMonitor::check() {
  if (fired_) return;
  std::optional<std::uint64_t> offset = region_.fault_offset();
  if (!offset) return;
  fired_ = true;
  on_fault_(transport_fault_message(region_.path(), *offset));
}

}  // namespace cbd
