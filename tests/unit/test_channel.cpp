// Channels (common/channel.hpp): bounds-checked data access, the attach
// protocol, rings placed where the geometry says, and data checksums.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "common/channel.hpp"
#include "common/crc32c.hpp"
#include "common/shared_atomic.hpp"
#include "tests/unit/shm_fixture.hpp"

using namespace cbd;
using cbd::test::ShmFile;

TEST_CASE("channel: data() accepts exactly the extents inside the data area") {
  ShmFile file("chdata");
  Transport t = cbd::test::make_transport(file, cbd::test::small_options());
  for (std::uint32_t index = 0; index < t.channel_count(); ++index) {
    CAPTURE(index);
    Channel ch(t, index);
    const std::uint64_t size = ch.data_size();
    REQUIRE(size == t.superblock().channel.data_size);
    std::byte* start = t.channel_base(index) + t.superblock().channel.data_offset;
    constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();

    CHECK(ch.data(0, size) == start);
    CHECK(ch.data(0, 0) == start);
    CHECK(ch.data(size - 1, 1) == start + size - 1);
    CHECK(ch.data(size, 0) == start + size);  // exact end, empty: fine
    CHECK(ch.data(100, size - 100) == start + 100);
    // One past the end, in every way.
    CHECK(ch.data(0, size + 1) == nullptr);
    CHECK(ch.data(size, 1) == nullptr);
    CHECK(ch.data(size + 1, 0) == nullptr);
    CHECK(ch.data(1, size) == nullptr);
    CHECK(ch.data(size - 1, 2) == nullptr);
    // Overflowing offset + length.
    CHECK(ch.data(kMax, 1) == nullptr);
    CHECK(ch.data(1, kMax) == nullptr);
    CHECK(ch.data(kMax, kMax) == nullptr);
    CHECK(ch.data(size / 2, kMax - size / 2 + 1) == nullptr);  // wraps to 0 when added
    CHECK(ch.data(0xffffffffull, 0xffffffffull) == nullptr);
    // The whole area lies inside this channel's slot and inside the mapping.
    CHECK(start + size <= t.channel_base(index) + t.superblock().channels.slot_size);
    CHECK(start + size <= t.region().base() + t.region().size());
    // Writable end to end (tmpfs mapping).
    std::memset(ch.data(0, size), 0xab, size);
  }
  // Channel 0's data never reaches channel 1's control block.
  Channel c0(t, 0);
  CHECK(t.channel_control(1).generation == 0);
  CHECK(c0.data(0, c0.data_size()) + c0.data_size() <= t.channel_base(1));
  CHECK_THROWS_AS(Channel(t, t.channel_count()), std::out_of_range);
}

TEST_CASE("channel: attach protocol") {
  ShmFile file("chattach");
  Transport t = cbd::test::make_transport(file, cbd::test::small_options());
  Channel queue(t, 1);
  Channel handler(t, 1);  // the other side's view (same mapping here)
  ChannelControl& c = queue.control();

  // Indices left over from a previous life of the channel.
  c.sq_head.value = 17;
  c.sq_tail.value = 15;
  c.cq_head.value = 9;
  c.cq_tail.value = 11;
  c.in_flight = 4;

  std::uint64_t g1 = queue.queue_setup(2, 3, 0x1234);
  CHECK(g1 != 0);
  CHECK(c.generation == g1);
  CHECK(c.backend_id == 2);
  CHECK(c.blkdev_id == 3);
  CHECK(c.backend_epoch == 0x1234);
  CHECK(c.sq_head.value == 0);  // queue side resets its own indices only
  CHECK(c.cq_head.value == 0);
  CHECK(c.in_flight == 0);
  CHECK(c.sq_tail.value == 15);  // the handler's, untouched until it attaches
  CHECK(c.cq_tail.value == 11);
  CHECK_FALSE(queue.handler_attached(g1));

  handler.handler_attach(g1, 0x1234);
  CHECK(c.sq_tail.value == 0);
  CHECK(c.cq_tail.value == 0);
  CHECK(c.handler_backend_epoch == 0x1234);
  CHECK(queue.handler_attached(g1));

  // A round trip through the channel's rings once attached.
  auto sq_producer = queue.submission_producer();
  auto sq_consumer = handler.submission_consumer();
  auto cq_producer = handler.completion_producer();
  auto cq_consumer = queue.completion_consumer();
  CHECK(sq_producer.capacity() == t.superblock().channel.sq_entries);
  CHECK(cq_producer.capacity() == t.superblock().channel.cq_entries);
  SubmissionEntry s{};
  s.op = static_cast<std::uint16_t>(Op::Read);
  s.tag = 0xfeed;
  REQUIRE(sq_producer.push(s));
  CHECK(c.sq_head.value == 1);
  // The entry lies where the geometry says.
  auto* sq = reinterpret_cast<SubmissionEntry*>(t.channel_base(1) + t.superblock().channel.sq_offset);
  CHECK(sq[0].tag == 0xfeed);
  SubmissionEntry got{};
  REQUIRE(sq_consumer.pop(got) == PopStatus::Ok);
  sq_consumer.release();
  CompletionEntry done{};
  done.tag = got.tag;
  REQUIRE(cq_producer.push(done));
  auto* cq = reinterpret_cast<CompletionEntry*>(t.channel_base(1) + t.superblock().channel.cq_offset);
  CHECK(cq[0].tag == 0xfeed);
  CompletionEntry reaped{};
  REQUIRE(cq_consumer.pop(reaped) == PopStatus::Ok);
  CHECK(reaped.tag == 0xfeed);
  // The other channel saw none of it.
  CHECK(t.channel_control(0).sq_head.value == 0);
  CHECK(t.channel_control(0).generation == 0);

  // Re-initialisation (backend restart): a new generation, not yet attached.
  std::uint64_t g2 = queue.queue_setup(2, 3, 0x1235);
  CHECK(g2 != g1);
  CHECK_FALSE(queue.handler_attached(g2));
  CHECK_FALSE(queue.handler_attached(g1 + 100));
  handler.handler_attach(g2, 0x1235);
  CHECK(queue.handler_attached(g2));
  CHECK_FALSE(queue.handler_attached(g1));

  // Generation never becomes 0 ("not set up"), even when the counter wraps.
  c.generation = std::numeric_limits<std::uint64_t>::max();
  CHECK(queue.queue_setup(2, 3, 1) != 0);
}

TEST_CASE("channel: publish_data/consume_data verify payloads in checksum mode") {
  for (bool flush : {false, true}) {
    CAPTURE(flush);
    ShmFile file("chcrc");
    FormatOptions o = cbd::test::small_options();
    o.checksum = true;
    o.flush = flush;
    Transport t = cbd::test::make_transport(file, o);
    Channel ch(t, 0);
    REQUIRE(ch.mode().checksum);
    CHECK(ch.mode().flush == flush);
    std::byte* data = ch.data(8192, 5000);
    REQUIRE(data);
    for (int i = 0; i < 5000; ++i) data[i] = static_cast<std::byte>(i * 7 + 3);
    std::uint32_t crc = ch.publish_data(data, 5000);
    CHECK(crc == crc32c(0, data, 5000));
    CHECK(ch.consume_data(data, 5000, crc));
    data[4321] ^= std::byte{0x08};  // corrupted in transit
    CHECK_FALSE(ch.consume_data(data, 5000, crc));
    data[4321] ^= std::byte{0x08};
    CHECK(ch.consume_data(data, 5000, crc));
    CHECK_FALSE(ch.consume_data(data, 5000, crc ^ 1));
    CHECK(ch.consume_data(data, 0, crc32c(0, data, 0)));
  }
  // Plain mode: no checksum is computed or checked.
  ShmFile file("chplain");
  Transport t = cbd::test::make_transport(file, cbd::test::small_options());
  Channel ch(t, 0);
  CHECK_FALSE(ch.mode().checksum);
  std::byte* data = ch.data(0, 64);
  std::memset(data, 1, 64);
  CHECK(ch.publish_data(data, 64) == 0);
  CHECK(ch.consume_data(data, 64, 0xdeadbeef));
}

TEST_CASE("channel: rings in a checksum-mode channel reject corrupted entries") {
  ShmFile file("chring");
  FormatOptions o = cbd::test::small_options();
  o.checksum = true;
  Transport t = cbd::test::make_transport(file, o);
  Channel ch(t, 0);
  std::uint64_t g = ch.queue_setup(0, 0, 1);
  ch.handler_attach(g, 1);
  auto producer = ch.submission_producer();
  auto consumer = ch.submission_consumer();
  SubmissionEntry s{};
  s.op = static_cast<std::uint16_t>(Op::Write);
  s.tag = 1;
  s.data_length = 4096;
  REQUIRE(producer.push(s));
  auto* sq = reinterpret_cast<SubmissionEntry*>(t.channel_base(0) + t.superblock().channel.sq_offset);
  sq[0].data_offset = 0x7fffffff;  // a peer (or a bad link) changes the extent
  SubmissionEntry got{};
  CHECK(consumer.pop(got) == PopStatus::Corrupt);
}

TEST_CASE("channel: a set-up's generation is above the caller's last, even when the control block was scribbled") {
  test::ShmFile file("gen-rewind");
  Transport transport = test::make_transport(file, test::small_options());
  Channel queue(transport, 0);
  const std::uint64_t first = queue.queue_setup(0, 0, 1);
  store_release(transport.channel_control(0).generation, std::uint64_t{0});  // a peer rewinds it
  const std::uint64_t second = queue.queue_setup(0, 0, 1, first);
  CHECK(second > first);
}
