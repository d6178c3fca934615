// Data-area allocator (common/data_area.hpp): ring-style extents with
// out-of-order release, checked by hand-worked scenarios and a randomized
// model check.
#include <doctest/doctest.h>

#include <algorithm>
#include <iterator>
#include <map>
#include <optional>
#include <random>
#include <stdexcept>
#include <vector>

#include "common/data_area.hpp"

using cbd::DataAreaAllocator;

namespace {
constexpr std::uint32_t K = 1024;
}

TEST_CASE("data area: allocations are aligned, inside the area, and distinct") {
  DataAreaAllocator a(64 * K, 4096);
  CHECK(a.size() == 64 * K);
  CHECK(a.max_allocation() == 64 * K);
  CHECK(a.outstanding() == 0);
  auto x = a.allocate(1);
  auto y = a.allocate(4096);
  auto z = a.allocate(4097);
  REQUIRE(x);
  REQUIRE(y);
  REQUIRE(z);
  CHECK(*x == 0);
  CHECK(*y == 4096);   // x took a whole 4 KiB unit
  CHECK(*z == 8192);
  CHECK(*z + 4097 <= a.size());
  CHECK(a.outstanding() == 3);
  auto w = a.allocate(4096);
  REQUIRE(w);
  CHECK(*w == 16384);  // z took two units
  for (auto o : {*x, *y, *z, *w}) CHECK(o % 4096 == 0);

  // Releasing unknown offsets or twice is refused.
  CHECK_FALSE(a.release(123));
  CHECK(a.release(*y));
  CHECK_FALSE(a.release(*y));
  CHECK(a.outstanding() == 3);
}

TEST_CASE("data area: a size that is not a multiple of the alignment is trimmed; bad arguments refused") {
  DataAreaAllocator a(10000, 4096);
  CHECK(a.size() == 8192);
  CHECK_FALSE(a.allocate(8193));
  CHECK(a.allocate(8192) == std::optional<std::uint32_t>(0));
  CHECK_THROWS_AS(DataAreaAllocator(4096, 3000), std::invalid_argument);
  CHECK_THROWS_AS(DataAreaAllocator(1ull << 32, 4096), std::invalid_argument);
  DataAreaAllocator big(0xffffffffull, 4096);
  CHECK(big.size() == 0xfffff000ull);
  CHECK_FALSE(big.allocate(0xffffffffu));
  auto whole = big.allocate(0xfffff000u);
  REQUIRE(whole);
  CHECK(*whole == 0);
}

TEST_CASE("data area: zero-length allocations take a unit and need releasing") {
  DataAreaAllocator a(16 * K, 4096);
  auto p = a.allocate(0);
  auto q = a.allocate(0);
  REQUIRE(p);
  REQUIRE(q);
  CHECK(*p != *q);
  CHECK(a.outstanding() == 2);
  CHECK(a.release(*p));
  CHECK(a.release(*q));
  CHECK(a.outstanding() == 0);
  // Byte alignment: zero-length still distinct.
  DataAreaAllocator b(100, 1);
  auto r = b.allocate(0), s = b.allocate(0);
  REQUIRE(r);
  REQUIRE(s);
  CHECK(*r != *s);
}

TEST_CASE("data area: full returns nullopt, and oversize never succeeds") {
  DataAreaAllocator a(16 * K, 4096);
  std::vector<std::uint32_t> offsets;
  while (auto o = a.allocate(4096)) offsets.push_back(*o);
  CHECK(offsets.size() == 4);
  CHECK_FALSE(a.allocate(0));
  CHECK_FALSE(a.allocate(1));
  for (auto o : offsets) CHECK(a.release(o));
  CHECK_FALSE(a.allocate(16 * K + 1));
  CHECK(a.allocate(16 * K));
}

TEST_CASE("data area: a released extent is free at once, whatever older extent is still held") {
  // Isolation: a request that holds its extent for long (a stalled WRITE
  // payload, an unread reply) must pin only its own bytes.
  DataAreaAllocator a(16 * K, 4096);
  auto e0 = *a.allocate(4096), e1 = *a.allocate(4096), e2 = *a.allocate(4096), e3 = *a.allocate(4096);
  CHECK_FALSE(a.allocate(4096));
  CHECK(a.release(e2));  // e0, the oldest, stays held
  auto again = a.allocate(4096);
  REQUIRE(again);
  CHECK(*again == e2);
  CHECK(a.release(e1));
  CHECK(a.release(*again));
  // e1 and e2 coalesce: one 8 KiB extent fits between e0 and e3.
  auto pair = a.allocate(8192);
  REQUIRE(pair);
  CHECK(*pair == e1);
  CHECK_FALSE(a.allocate(4096));
  CHECK(a.release(e0));
  CHECK(a.release(e3));
  CHECK(a.release(*pair));
  CHECK(a.outstanding() == 0);
  CHECK(a.allocate(16 * K) == std::optional<std::uint32_t>(0));  // everything coalesced again
  CHECK_FALSE(a.release(e3));  // twice: refused
}

TEST_CASE("data area: first fit takes the lowest range that is large enough") {
  DataAreaAllocator a(64 * K, 4096);
  std::vector<std::uint32_t> e;
  for (int i = 0; i < 8; ++i) e.push_back(*a.allocate(8 * K));  // the whole area
  CHECK(a.release(e[1]));  // hole of 8K at 8K
  CHECK(a.release(e[4]));
  CHECK(a.release(e[5]));  // hole of 16K at 32K
  auto big = a.allocate(16 * K);
  REQUIRE(big);
  CHECK(*big == 32 * K);
  auto small = a.allocate(4 * K);
  REQUIRE(small);
  CHECK(*small == 8 * K);
  CHECK_FALSE(a.allocate(8 * K));  // 4K left at 12K only
  auto last = a.allocate(4 * K);
  REQUIRE(last);
  CHECK(*last == 12 * K);
}

TEST_CASE("data area: randomized model check") {
  for (std::uint32_t alignment : {1u, 64u, 4096u}) {
    for (std::uint64_t size : {std::uint64_t{64 * K}, std::uint64_t{1 << 20}, std::uint64_t{300 * K + 17}}) {
      CAPTURE(alignment);
      CAPTURE(size);
      std::mt19937_64 random(alignment * 1000003ull + size);
      DataAreaAllocator a(size, alignment);
      const std::uint64_t usable = size - size % alignment;
      REQUIRE(a.size() == usable);
      struct Live {
        std::uint64_t length;  // requested
        std::uint64_t span;    // what it may occupy (at least one alignment unit)
      };
      std::map<std::uint64_t, Live> live;  // offset -> extent (the reference)
      std::vector<std::uint64_t> order;    // allocation order of live extents
      std::uint64_t successes = 0, failures = 0;
      for (int step = 0; step < 20000; ++step) {
        bool do_allocate = live.empty() || random() % 100 < 55;
        if (do_allocate) {
          std::uint32_t length;
          switch (random() % 4) {
            case 0: length = 0; break;
            case 1: length = static_cast<std::uint32_t>(random() % 512); break;
            case 2: length = static_cast<std::uint32_t>(random() % (usable / 4 + 1)); break;
            default: length = static_cast<std::uint32_t>(random() % (usable + 2)); break;
          }
          auto offset = a.allocate(length);
          if (length > usable) REQUIRE_FALSE(offset);
          if (!offset) {
            ++failures;
            continue;
          }
          ++successes;
          std::uint64_t span = std::max<std::uint64_t>((std::uint64_t{length} + alignment - 1) / alignment * alignment,
                                                        alignment);
          REQUIRE(*offset % alignment == 0);
          REQUIRE(*offset + span <= usable);  // inside the area
          // No overlap with any live extent.
          auto after = live.lower_bound(*offset);
          if (after != live.end()) REQUIRE(*offset + span <= after->first);
          if (after != live.begin()) {
            auto before = std::prev(after);
            REQUIRE(before->first + before->second.span <= *offset);
          }
          live[*offset] = {length, span};
          order.push_back(*offset);
        } else {
          // Mostly in order, sometimes any extent (out-of-order completion).
          std::size_t pick = random() % 4 == 0 ? random() % order.size() : 0;
          std::uint64_t offset = order[pick];
          order.erase(order.begin() + static_cast<std::ptrdiff_t>(pick));
          live.erase(offset);
          REQUIRE(a.release(static_cast<std::uint32_t>(offset)));
        }
        REQUIRE(a.outstanding() == live.size());
        // Nothing held: the whole area is available again (no leak).
        if (live.empty() && random() % 8 == 0) {
          auto whole = a.allocate(static_cast<std::uint32_t>(usable));
          REQUIRE(whole);
          REQUIRE(*whole == 0);
          REQUIRE(a.release(*whole));
        }
      }
      CHECK(successes > 1000);
      CHECK(failures > 0);  // the area did fill up
      for (auto offset : order) REQUIRE(a.release(static_cast<std::uint32_t>(offset)));
      CHECK(a.outstanding() == 0);
      CHECK(a.allocate(static_cast<std::uint32_t>(usable)));
    }
  }
}
