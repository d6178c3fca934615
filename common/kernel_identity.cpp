#include "common/kernel_identity.hpp"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <string>

#include "common/shared_atomic.hpp"

namespace cbd {
namespace {

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool all_zero(const KernelId& id) {
  return std::all_of(id.begin(), id.end(), [](std::uint8_t b) { return b == 0; });
}

}  // namespace

KernelId local_kernel_id() {
  KernelId id{};
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string text;
  if (!std::getline(in, text)) return id;
  std::size_t n = 0;
  int high = -1;
  for (char c : text) {
    if (c == '-') continue;
    const int v = hex_value(c);
    if (v < 0 || n == id.size()) return KernelId{};
    if (high < 0) {
      high = v;
    } else {
      id[n++] = static_cast<std::uint8_t>(high << 4 | v);
      high = -1;
    }
  }
  return n == id.size() ? id : KernelId{};
}

void write_kernel_id(HostSlot& slot, const KernelId& id) {
  for (std::size_t i = 0; i < id.size(); ++i) store_relaxed(slot.boot_id[i], id[i]);
}

bool same_kernel(const HostSlot& peer, const KernelId& ours) {
  if (all_zero(ours)) return false;
  for (std::size_t i = 0; i < ours.size(); ++i)
    if (load_relaxed(peer.boot_id[i]) != ours[i]) return false;
  return true;
}

}  // namespace cbd
