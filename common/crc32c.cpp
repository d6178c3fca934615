#include "common/crc32c.hpp"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// x^n modulo the polynomial (reflected, bit 31 is x^0).
constexpr std::uint32_t x_to_n(std::size_t n) {
  std::uint32_t result = 1u << 31;  // x^0
  std::uint32_t square = 1u << 30;  // x^1
  for (; n != 0; n >>= 1) {
    if (n & 1) result = multiply_modulo(square, result);
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
  const std::uint32_t factor = x_to_n(8 * bytes);
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

// Carry-less multiplication folds many bytes per instruction where crc32
// takes eight: the register of the message so far, a polynomial of degree
// below 128 (a 16-byte block), is multiplied forward over the bytes that
// follow and added to them, which leaves the CRC unchanged modulo the
// polynomial.  At the end one 16-byte block is left, and two crc32
// instructions over it from a zero register give its remainder.  On a
// 1 MiB WRITE payload the three crc32 lanes were a sixth of cbd-proxy's CPU
// (docs/performance.md).
//
// Order of bits: in a register loaded from memory, bit i of the lowest
// quadword is the coefficient of x^(127 - i) of its block; so the lowest
// quadword holds the high-degree half.  A carry-less product of two such
// quadwords, read the same way, is the product times x, which the
// constants below take back.


// Multipliers that move a 16-byte block `bits` further along the message:
// its high-degree half (x^64 H) becomes H x^(bits + 64), so H is multiplied
// by x^(bits + 63) (the product brings one more x), its low half L by
// x^(bits - 1).  A reflected 32-bit remainder sits in the upper half of the
// quadword the multiply reads.
struct FoldMultipliers {
  std::uint64_t high_half;
  std::uint64_t low_half;
};
constexpr FoldMultipliers fold_over(std::size_t bits) {
  return {std::uint64_t{x_to_n(bits + 63)} << 32, std::uint64_t{x_to_n(bits - 1)} << 32};
}

// Four 64-byte registers, each folded over the four that follow.
constexpr std::size_t kFoldBlockBytes = 256;
constexpr FoldMultipliers kFoldOverBlock = fold_over(8 * kFoldBlockBytes);
constexpr FoldMultipliers kFoldOverRegister = fold_over(8 * 64);
constexpr FoldMultipliers kFoldOver3Lanes = fold_over(3 * 128);
constexpr FoldMultipliers kFoldOver2Lanes = fold_over(2 * 128);
constexpr FoldMultipliers kFoldOverLane = fold_over(128);

#define CBD_VPCLMUL_TARGET __attribute__((target("avx512f,avx512vl,vpclmulqdq,sse4.2")))

// Intrinsics that leave lanes undefined (broadcasts, plain extracts and
// casts) make GCC 12 warn inside its own headers; those below do not.
CBD_VPCLMUL_TARGET inline __m512i broadcast(FoldMultipliers m) {
  const auto high = static_cast<long long>(m.high_half);
  const auto low = static_cast<long long>(m.low_half);
  return _mm512_setr_epi64(high, low, high, low, high, low, high, low);
}

template <int index>
CBD_VPCLMUL_TARGET inline __m128i lane(__m512i x) {
  return _mm512_maskz_extracti32x4_epi32(0xf, x, index);
}

// Each 16-byte lane of `x` multiplied forward by `m`; the next bytes added.
CBD_VPCLMUL_TARGET inline __m512i fold_into(__m512i x, __m512i m, __m512i next) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, m, 0x00), _mm512_clmulepi64_epi128(x, m, 0x11), next,
                                   0x96);  // a ^ b ^ c
}

CBD_VPCLMUL_TARGET std::uint32_t crc32c_vpclmul(std::uint32_t crc, const unsigned char* p, std::size_t n) {
  if (n < kFoldBlockBytes) return crc32c_sse42(crc, p, n);
  __m512i x0 = _mm512_loadu_si512(p);
  __m512i x1 = _mm512_loadu_si512(p + 64);
  __m512i x2 = _mm512_loadu_si512(p + 128);
  __m512i x3 = _mm512_loadu_si512(p + 192);
  // The register so far goes into the first bytes of the message.
  x0 = _mm512_xor_si512(x0, _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(crc))));
  p += kFoldBlockBytes;
  n -= kFoldBlockBytes;
  const __m512i over_block = broadcast(kFoldOverBlock);
  while (n >= kFoldBlockBytes) {
    x0 = fold_into(x0, over_block, _mm512_loadu_si512(p));
    x1 = fold_into(x1, over_block, _mm512_loadu_si512(p + 64));
    x2 = fold_into(x2, over_block, _mm512_loadu_si512(p + 128));
    x3 = fold_into(x3, over_block, _mm512_loadu_si512(p + 192));
    p += kFoldBlockBytes;
    n -= kFoldBlockBytes;
  }
  // Four registers into the last, then its four lanes into its last.
  const __m512i over_register = broadcast(kFoldOverRegister);
  x1 = fold_into(x0, over_register, x1);
  x2 = fold_into(x1, over_register, x2);
  x3 = fold_into(x2, over_register, x3);
  const __m512i over_lanes = _mm512_setr_epi64(
      static_cast<long long>(kFoldOver3Lanes.high_half), static_cast<long long>(kFoldOver3Lanes.low_half),
      static_cast<long long>(kFoldOver2Lanes.high_half), static_cast<long long>(kFoldOver2Lanes.low_half),
      static_cast<long long>(kFoldOverLane.high_half), static_cast<long long>(kFoldOverLane.low_half), 0, 0);
  const __m512i lanes = fold_into(x3, over_lanes, _mm512_maskz_mov_epi64(0xc0, x3));
  const __m128i last =
      _mm_xor_si128(_mm_xor_si128(lane<0>(lanes), lane<1>(lanes)), _mm_xor_si128(lane<2>(lanes), lane<3>(lanes)));
  std::uint64_t value = __builtin_ia32_crc32di(0, static_cast<std::uint64_t>(_mm_cvtsi128_si64(last)));
  value = __builtin_ia32_crc32di(value, static_cast<std::uint64_t>(_mm_extract_epi64(last, 1)));
  return crc32c_sse42(static_cast<std::uint32_t>(value), p, n);
}
#undef CBD_VPCLMUL_TARGET
#endif

std::uint32_t raw_crc32c(Crc32cMethod method, std::uint32_t crc, const unsigned char* bytes, std::size_t length) {
  switch (method) {
#if defined(__x86_64__)
    case Crc32cMethod::Vpclmul:
      return crc32c_vpclmul(crc, bytes, length);
    case Crc32cMethod::Sse42:
      return crc32c_sse42(crc, bytes, length);
#endif
    default:
      return crc32c_portable(crc, bytes, length);
  }
}

Crc32cMethod best_method() {
#if defined(__x86_64__)
  __builtin_cpu_init();  // crc32c() may run before libgcc's constructor did
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vpclmulqdq") &&
      __builtin_cpu_supports("sse4.2"))
    return Crc32cMethod::Vpclmul;
  if (__builtin_cpu_supports("sse4.2")) return Crc32cMethod::Sse42;
#endif
  return Crc32cMethod::Portable;
}

}  // namespace

bool crc32c_available(Crc32cMethod method) { return method <= best_method(); }

std::uint32_t crc32c_with(Crc32cMethod method, std::uint32_t crc, const void* data, std::size_t length) {
  if (!crc32c_available(method)) method = best_method();  // never an instruction the CPU lacks
  return ~raw_crc32c(method, ~crc, static_cast<const unsigned char*>(data), length);
}

std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t length) {
  static const Crc32cMethod method = best_method();
  return ~raw_crc32c(method, ~crc, static_cast<const unsigned char*>(data), length);
}

}  // namespace cbd
