// What the proxy advertises for an export: taken from the backend slot
// (never invented), used by the handshake and by every connection.
#pragma once

#include <cstdint>
#include <string>

#include "common/layout.hpp"

namespace cbd::proxy {

struct ExportInfo {
  std::string name;             // export name ("" is also accepted as the default)
  std::string description;
  std::uint64_t size = 0;       // bytes
  std::uint32_t block_min = 1;
  std::uint32_t block_preferred = 4096;
  std::uint32_t block_max = 32u << 20;  // advertised maximum payload
  std::uint32_t caps = 0;       // cbd::kCap* bits
};

}  // namespace cbd::proxy
