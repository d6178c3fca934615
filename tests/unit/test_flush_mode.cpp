// Flush mode covers slot headers, slot fields and names (docs/design.md §2,
// "Flush mode"): every claim, heartbeat, release, reclaim and liveness check
// on a flush-mode transport invalidates the header's line before reading it
// and writes it back after writing it; on a coherent transport none does.
// clflush leaves no trace, so the calls are recorded (LineRecorder).
#include <doctest/doctest.h>

#include <chrono>

#include "common/cache_lines.hpp"
#include "common/flush_ranges.hpp"
#include "common/liveness.hpp"
#include "common/slot.hpp"
#include "common/transport.hpp"
#include "shm_fixture.hpp"

using namespace cbd;

namespace {

Transport transport_in(const test::ShmFile& file, bool flush) {
  FormatOptions options = test::small_options();
  options.flush = flush;
  return test::make_transport(file, options);
}

}  // namespace

TEST_CASE("flush mode: claims, heartbeats, releases and reclaims write back and invalidate the slot header") {
  test::ShmFile file("flush");
  Transport transport = transport_in(file, true);
  REQUIRE(transport.mode().flush);
  SlotHeader& header = transport.backend(1).header;
  CHECK(in_flush_mode(&header));
  CHECK(in_flush_mode(&transport.channel_control(0)));
  LineRecorder lines;

  auto claimed = try_claim(header, 0);
  REQUIRE(claimed);
  CHECK(lines.invalidated(&header, sizeof header));
  CHECK(lines.wrote_back(&header, sizeof header));

  lines.clear();
  std::uint64_t last = initial_heartbeat(*claimed);
  REQUIRE(beat(header, *claimed, last));
  CHECK(lines.invalidated(&header, sizeof header));
  CHECK(lines.wrote_back(&header, sizeof header));

  lines.clear();
  CHECK(still_owned(header, *claimed));
  CHECK(lines.invalidated(&header, sizeof header));

  lines.clear();
  LivenessObserver observer(std::chrono::milliseconds(1000));
  CHECK(observer.observe(1, header) == Liveness::Alive);
  CHECK(lines.invalidated(&header, sizeof header));

  lines.clear();
  std::uint64_t word = *claimed;
  REQUIRE(mark_stopping(header, word));
  CHECK(lines.wrote_back(&header, sizeof header));

  lines.clear();
  REQUIRE(release(header, word));
  CHECK(lines.wrote_back(&header, sizeof header));

  // A take-over (backend-id=) and a reclaim of a dead owner.
  auto again = try_claim(header, 0);
  REQUIRE(again);
  lines.clear();
  auto taken = try_take_over(header, *again, 1);
  REQUIRE(taken);
  CHECK(lines.wrote_back(&header, sizeof header));
  lines.clear();
  REQUIRE(reclaim(header, *taken));
  CHECK(lines.invalidated(&header, sizeof header));
  CHECK(lines.wrote_back(&header, sizeof header));

  // The SlotClaim wrapper goes through the same functions.
  auto third = try_claim(header, 0);
  REQUIRE(third);
  {
    SlotClaim claim(&header, 1, *third);
    lines.clear();
    REQUIRE(claim.beat());
    CHECK(lines.wrote_back(&header, sizeof header));
    lines.clear();
  }
  CHECK(lines.wrote_back(&header, sizeof header));  // released by the destructor
}

TEST_CASE("flush mode: names are written back and re-read from memory") {
  test::ShmFile file("flush");
  Transport transport = transport_in(file, true);
  HostSlot& host = transport.host(0);
  LineRecorder lines;
  write_name(host.hostname, "storage-1");
  CHECK(lines.wrote_back(host.hostname, kNameSize));
  CHECK(read_name(host.hostname) == "storage-1");
  CHECK(lines.invalidated(host.hostname, kNameSize));
}

TEST_CASE("coherent mode: slot operations never flush a line") {
  test::ShmFile file("coherent");
  Transport transport = transport_in(file, false);
  REQUIRE_FALSE(transport.mode().flush);
  SlotHeader& header = transport.backend(1).header;
  CHECK_FALSE(in_flush_mode(&header));
  LineRecorder lines;
  auto claimed = try_claim(header, 0);
  REQUIRE(claimed);
  std::uint64_t last = initial_heartbeat(*claimed);
  REQUIRE(beat(header, *claimed, last));
  CHECK(still_owned(header, *claimed));
  write_name(transport.host(0).hostname, "compute");
  CHECK(read_name(transport.host(0).hostname) == "compute");
  REQUIRE(release(header, *claimed));
  CHECK_FALSE(lines.wrote_back(&header, 1));
  CHECK_FALSE(lines.invalidated(&header, 1));
  CHECK_FALSE(lines.wrote_back(transport.host(0).hostname, 1));
}

TEST_CASE("flush mode: a transport's range is unregistered when it goes away") {
  test::ShmFile file("flush");
  const void* address = nullptr;
  {
    Transport transport = transport_in(file, true);
    address = &transport.backend(0).header;
    CHECK(in_flush_mode(address));
    Transport moved = std::move(transport);  // the registration moves with it
    CHECK(in_flush_mode(address));
  }
  CHECK_FALSE(in_flush_mode(address));
}
