// CRC32C (common/crc32c.hpp): published check values, incremental use, any
// alignment and length, against a bit-at-a-time reference written here.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "common/crc32c.hpp"

using cbd::crc32c;

namespace {

// Bit-at-a-time reflected CRC32C (polynomial 0x1EDC6F41, reflected 0x82F63B78),
// initial value and final xor 0xFFFFFFFF: the definition, slow on purpose.
std::uint32_t reference_crc32c(const void* data, std::size_t length) {
  auto* p = static_cast<const unsigned char*>(data);
  std::uint32_t crc = 0xffffffffu;
  for (std::size_t i = 0; i < length; ++i) {
    crc ^= p[i];
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0x82f63b78u & (0u - (crc & 1u)));
  }
  return ~crc;
}

}  // namespace

TEST_CASE("crc32c: published check values") {
  CHECK(crc32c(0, "123456789", 9) == 0xE3069283u);
  CHECK(crc32c(0, "", 0) == 0u);
  CHECK(crc32c(0, nullptr, 0) == 0u);

  // RFC 3720 (iSCSI), appendix B.4.
  unsigned char buffer[32];
  std::memset(buffer, 0, sizeof buffer);
  CHECK(crc32c(0, buffer, sizeof buffer) == 0x8A9136AAu);
  std::memset(buffer, 0xff, sizeof buffer);
  CHECK(crc32c(0, buffer, sizeof buffer) == 0x62A8AB43u);
  for (int i = 0; i < 32; ++i) buffer[i] = static_cast<unsigned char>(i);
  CHECK(crc32c(0, buffer, sizeof buffer) == 0x46DD794Eu);
  for (int i = 0; i < 32; ++i) buffer[i] = static_cast<unsigned char>(31 - i);
  CHECK(crc32c(0, buffer, sizeof buffer) == 0x113FDB5Cu);

  CHECK(reference_crc32c("123456789", 9) == 0xE3069283u);
}

TEST_CASE("crc32c: incremental equals one-shot at every split point") {
  std::mt19937_64 random(12345);
  std::vector<unsigned char> data(300);
  for (auto& b : data) b = static_cast<unsigned char>(random());
  const std::uint32_t whole = crc32c(0, data.data(), data.size());
  CHECK(whole == reference_crc32c(data.data(), data.size()));
  for (std::size_t split = 0; split <= data.size(); ++split) {
    CAPTURE(split);
    std::uint32_t crc = crc32c(0, data.data(), split);
    crc = crc32c(crc, data.data() + split, data.size() - split);
    REQUIRE(crc == whole);
  }
  // Many small pieces (exercises the byte tail of the 8-byte loop each time).
  std::uint32_t crc = 0;
  std::size_t at = 0;
  while (at < data.size()) {
    std::size_t piece = std::min<std::size_t>(1 + random() % 13, data.size() - at);
    crc = crc32c(crc, data.data() + at, piece);
    at += piece;
  }
  CHECK(crc == whole);
}

TEST_CASE("crc32c: unaligned buffers and every short length match the reference") {
  std::mt19937_64 random(777);
  // Extra room so every start offset 0..15 has `length` bytes after it.
  std::vector<unsigned char> storage(4096 + 64);
  for (auto& b : storage) b = static_cast<unsigned char>(random());
  for (std::size_t offset = 0; offset < 16; ++offset) {
    for (std::size_t length = 0; length <= 80; ++length) {
      CAPTURE(offset);
      CAPTURE(length);
      const unsigned char* p = storage.data() + offset;
      REQUIRE(crc32c(0, p, length) == reference_crc32c(p, length));
    }
  }
  // The same bytes give the same checksum wherever they sit in memory.
  std::vector<unsigned char> aligned(1000), shifted(1000 + 7);
  for (auto& b : aligned) b = static_cast<unsigned char>(random());
  std::memcpy(shifted.data() + 7, aligned.data(), aligned.size());
  CHECK(crc32c(0, aligned.data(), aligned.size()) == crc32c(0, shifted.data() + 7, aligned.size()));
  // Random long buffers at random alignments.
  for (int round = 0; round < 50; ++round) {
    std::size_t offset = random() % 64;
    std::size_t length = random() % 4096;
    const unsigned char* p = storage.data() + offset;
    CAPTURE(offset);
    CAPTURE(length);
    REQUIRE(crc32c(0, p, length) == reference_crc32c(p, length));
  }
}

TEST_CASE("crc32c: detects every single-bit flip in a short message") {
  unsigned char message[48];
  for (int i = 0; i < 48; ++i) message[i] = static_cast<unsigned char>(i * 37 + 11);
  const std::uint32_t good = crc32c(0, message, sizeof message);
  for (std::size_t bit = 0; bit < sizeof message * 8; ++bit) {
    message[bit / 8] ^= static_cast<unsigned char>(1u << (bit % 8));
    REQUIRE(crc32c(0, message, sizeof message) != good);
    message[bit / 8] ^= static_cast<unsigned char>(1u << (bit % 8));
  }
}

TEST_CASE("crc32c: long buffers (three lanes joined per block) match the reference at every block boundary") {
  std::mt19937_64 random(4242);
  std::vector<unsigned char> storage(3 * 1536 + 64);
  for (auto& b : storage) b = static_cast<unsigned char>(random());
  // Every length within 20 bytes of a block boundary, and a sweep between.
  std::vector<std::size_t> lengths;
  for (std::size_t blocks = 1; blocks <= 3; ++blocks)
    for (std::size_t length = blocks * 1536 - 20; length <= blocks * 1536 + 20; ++length) lengths.push_back(length);
  for (std::size_t length = 1400; length <= 3 * 1536 + 40; length += 97) lengths.push_back(length);
  for (std::size_t offset : {0, 1, 7}) {
    for (std::size_t length : lengths) {
      CAPTURE(offset);
      CAPTURE(length);
      const unsigned char* p = storage.data() + offset;
      REQUIRE(crc32c(0, p, length) == reference_crc32c(p, length));
      // Continuing from a non-zero register across blocks.
      const std::uint32_t head = crc32c(0, p, 5);
      REQUIRE(crc32c(head, p + 5, length - 5) == reference_crc32c(p, length));
    }
  }
  std::vector<unsigned char> mebibyte(1 << 20);
  for (auto& b : mebibyte) b = static_cast<unsigned char>(random());
  CHECK(crc32c(0, mebibyte.data(), mebibyte.size()) == reference_crc32c(mebibyte.data(), mebibyte.size()));
}

TEST_CASE("crc32c: every implementation this CPU has matches the reference, around every fold block and from any register") {
  using cbd::Crc32cMethod;
  std::mt19937_64 random(9001);
  std::vector<unsigned char> storage(8 * 256 + 3 * 1536 + 64);
  for (auto& b : storage) b = static_cast<unsigned char>(random());
  std::vector<std::size_t> lengths;
  for (std::size_t length = 0; length <= 8 * 256 + 40; ++length) lengths.push_back(length);
  for (std::size_t length = 3 * 1536 - 20; length <= 3 * 1536 + 20; ++length) lengths.push_back(length);
  std::vector<unsigned char> mebibyte(1 << 20);
  for (auto& b : mebibyte) b = static_cast<unsigned char>(random());
  const std::uint32_t mebibyte_reference = reference_crc32c(mebibyte.data(), mebibyte.size());
  int methods = 0;
  for (Crc32cMethod method : {Crc32cMethod::Portable, Crc32cMethod::Sse42, Crc32cMethod::Vpclmul}) {
    if (!cbd::crc32c_available(method)) continue;
    ++methods;
    CAPTURE(static_cast<int>(method));
    for (std::size_t offset : {0, 3}) {
      for (std::size_t length : lengths) {
        CAPTURE(offset);
        CAPTURE(length);
        const unsigned char* p = storage.data() + offset;
        const std::uint32_t expected = reference_crc32c(p, length);
        REQUIRE(cbd::crc32c_with(method, 0, p, length) == expected);
        if (length >= 5) {
          const std::uint32_t head = cbd::crc32c_with(method, 0, p, 5);
          REQUIRE(cbd::crc32c_with(method, head, p + 5, length - 5) == expected);
        }
      }
    }
    CHECK(cbd::crc32c_with(method, 0, mebibyte.data(), mebibyte.size()) == mebibyte_reference);
  }
  CHECK(cbd::crc32c_available(Crc32cMethod::Portable));
  MESSAGE(methods << " CRC32C implementations checked on this CPU");
}
