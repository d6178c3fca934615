// CRC32C (Castagnoli), the checksum of the optional checksum mode and of the
// superblock.  Uses the SSE4.2 instruction when the CPU has it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cbd {

// Continues `crc` (start with 0) over `length` bytes.
std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t length);

}  // namespace cbd
