// CRC32C (Castagnoli), the checksum of the optional checksum mode and of the
// superblock, and of WRITE payloads on the proxy (a paused proxy's payloads
// are checked before they are sent again).  Uses carry-less multiplication
// (AVX-512 VPCLMULQDQ) or the SSE4.2 instruction when the CPU has them.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cbd {

// Continues `crc` (start with 0) over `length` bytes.
std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t length);

// The implementations crc32c() picks from, in the order it prefers the
// later ones; for tests, which run each one this CPU has.  crc32c_with()
// runs the best one there is instead of one the CPU lacks.
enum class Crc32cMethod { Portable, Sse42, Vpclmul };
bool crc32c_available(Crc32cMethod method);
std::uint32_t crc32c_with(Crc32cMethod method, std::uint32_t crc, const void* data, std::size_t length);

}  // namespace cbd
