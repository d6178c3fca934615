#include "common/crc32c.hpp"

#include <array>
#include <cstring>

namespace cbd {
namespace {

constexpr std::uint32_t kPolynomial = 0x82f63b78u;  // reflected Castagnoli

constexpr std::array<std::uint32_t, 256> make_table() {
  std::array<std::uint32_t, 256> table{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t value = i;
    for (int bit = 0; bit < 8; ++bit) value = (value & 1) ? (value >> 1) ^ kPolynomial : value >> 1;
    table[i] = value;
  }
  return table;
}
constexpr auto kTable = make_table();

std::uint32_t crc32c_portable(std::uint32_t crc, const unsigned char* p, std::size_t n) {
  while (n--) crc = kTable[(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
// Only the three-lane x86-64 code below joins lanes: elsewhere the shift
// helpers would be unused.

// Shifting a CRC register over n zero bytes is multiplying it by
// x^(8n) modulo the polynomial, a linear map of its 32 bits: so it is the
// XOR of four table lookups, one per byte of the register.  That is what
// lets three lanes run side by side and be joined at the end of a block:
// raw(s, A|B|C) = shift(raw(s, A), |B|+|C|) ^ shift(raw(0, B), |C|) ^ raw(0, C).

// a * b modulo the polynomial, both reflected (bit 31 is x^0).
constexpr std::uint32_t multiply_modulo(std::uint32_t a, std::uint32_t b) {
  std::uint32_t product = 0;
  for (std::uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
    if (a & bit) product ^= b;
    b = (b & 1) ? (b >> 1) ^ kPolynomial : b >> 1;
  }
  return product;
}

// x^(8 * bytes) modulo the polynomial.
constexpr std::uint32_t x_to_8n(std::size_t bytes) {
  std::uint32_t result = 1u << 31;  // x^0
  std::uint32_t square = 1u << 23;  // x^8
  for (; bytes != 0; bytes >>= 1) {
    if (bytes & 1) result = multiply_modulo(square, result);
    square = multiply_modulo(square, square);
  }
  return result;
}

struct ZeroShift {
  std::array<std::array<std::uint32_t, 256>, 4> table{};
  std::uint32_t operator()(std::uint32_t crc) const {
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^ table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
  }
};

constexpr ZeroShift make_zero_shift(std::size_t bytes) {
  ZeroShift shift;
  const std::uint32_t factor = x_to_8n(bytes);
  for (int position = 0; position < 4; ++position)
    for (std::uint32_t value = 0; value < 256; ++value)
      shift.table[position][value] = multiply_modulo(factor, value << (8 * position));
  return shift;
}

// Each lane of a block covers this many bytes (a multiple of 8).
constexpr std::size_t kLaneBytes = 512;
constexpr ZeroShift kShiftOneLane = make_zero_shift(kLaneBytes);
constexpr ZeroShift kShiftTwoLanes = make_zero_shift(2 * kLaneBytes);

// One crc32 instruction takes three cycles but a new one can start every
// cycle: three independent lanes keep it busy, where one would wait.  On a
// 1 MiB WRITE payload the single lane was a third of cbd-proxy's CPU.
__attribute__((target("sse4.2"))) std::uint32_t crc32c_sse42(std::uint32_t crc, const unsigned char* p,
                                                              std::size_t n) {
  std::uint64_t value = crc;
  while (n >= 3 * kLaneBytes) {
    std::uint64_t a = value, b = 0, c = 0;
    for (std::size_t i = 0; i < kLaneBytes; i += 8) {
      std::uint64_t wa, wb, wc;
      std::memcpy(&wa, p + i, 8);
      std::memcpy(&wb, p + kLaneBytes + i, 8);
      std::memcpy(&wc, p + 2 * kLaneBytes + i, 8);
      a = __builtin_ia32_crc32di(a, wa);
      b = __builtin_ia32_crc32di(b, wb);
      c = __builtin_ia32_crc32di(c, wc);
    }
    value = kShiftTwoLanes(static_cast<std::uint32_t>(a)) ^ kShiftOneLane(static_cast<std::uint32_t>(b)) ^
            static_cast<std::uint32_t>(c);
    p += 3 * kLaneBytes;
    n -= 3 * kLaneBytes;
  }
  while (n >= 8) {
    std::uint64_t word;
    std::memcpy(&word, p, 8);
    value = __builtin_ia32_crc32di(value, word);
    p += 8;
    n -= 8;
  }
  auto narrow = static_cast<std::uint32_t>(value);
  while (n--) narrow = __builtin_ia32_crc32qi(narrow, *p++);
  return narrow;
}
#endif

}  // namespace

std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t length) {
  auto* bytes = static_cast<const unsigned char*>(data);
  crc = ~crc;
#if defined(__x86_64__)
  static const bool has_sse42 = __builtin_cpu_supports("sse4.2");
  crc = has_sse42 ? crc32c_sse42(crc, bytes, length) : crc32c_portable(crc, bytes, length);
#else
  crc = crc32c_portable(crc, bytes, length);
#endif
  return ~crc;
}

}  // namespace cbd
