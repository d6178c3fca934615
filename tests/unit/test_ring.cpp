// SPSC rings (common/ring.hpp): order, full/empty, batching, 32-bit index
// wrap, impossible peer indices, and checksum-mode verification.
#include <doctest/doctest.h>

#include <cstring>
#include <deque>
#include <random>
#include <vector>

#include "common/crc32c.hpp"
#include "common/ring.hpp"

using namespace cbd;

namespace {

// A ring in ordinary memory with the same shape as one in a channel.
template <typename Entry>
struct TestRing {
  explicit TestRing(std::uint32_t count, MemoryMode mode = {}, std::uint32_t start = 0)
      : entries(count), producer(&head, &tail, entries.data(), count, mode),
        consumer(&head, &tail, entries.data(), count, mode) {
    head.value = start;
    tail.value = start;
    producer.reset(start);
    consumer.reset(start);
  }
  RingIndex head{};
  RingIndex tail{};
  std::vector<Entry> entries;
  RingProducer<Entry> producer;
  RingConsumer<Entry> consumer;
};

SubmissionEntry submission(std::uint64_t tag) {
  SubmissionEntry e{};
  e.op = static_cast<std::uint16_t>(Op::Write);
  e.tag = tag;
  e.offset = tag * 512;
  e.length = static_cast<std::uint32_t>(tag % 4096);
  return e;
}

}  // namespace

TEST_CASE("ring: push and pop keep order; full and empty are reported") {
  for (MemoryMode mode : {MemoryMode{false, false}, MemoryMode{true, false}, MemoryMode{true, true}}) {
    CAPTURE(mode.checksum);
    CAPTURE(mode.flush);
    TestRing<SubmissionEntry> ring(8, mode);
    SubmissionEntry out{};
    CHECK(ring.producer.capacity() == 8);
    CHECK(ring.consumer.capacity() == 8);
    CHECK(ring.consumer.pop(out) == PopStatus::Empty);
    CHECK(ring.consumer.available() == 0);
    CHECK(ring.producer.free_slots() == 8);
    for (std::uint64_t i = 0; i < 8; ++i) REQUIRE(ring.producer.push(submission(i)));
    CHECK(ring.producer.free_slots() == 0);
    CHECK_FALSE(ring.producer.push(submission(99)));  // full
    CHECK(ring.head.value == 8);
    CHECK(ring.consumer.available() == 8);
    for (std::uint64_t i = 0; i < 3; ++i) {
      REQUIRE(ring.consumer.pop(out) == PopStatus::Ok);
      CHECK(out.tag == i);
      CHECK(out.seq == i);  // the producer stamps its index
      CHECK(out.offset == i * 512);
    }
    // Not handed back yet: still full for the producer.
    CHECK(ring.producer.free_slots() == 0);
    ring.consumer.release();
    CHECK(ring.tail.value == 3);
    CHECK(ring.producer.free_slots() == 3);
    for (std::uint64_t i = 8; i < 11; ++i) REQUIRE(ring.producer.push(submission(i)));
    CHECK_FALSE(ring.producer.push(submission(99)));
    for (std::uint64_t i = 3; i < 11; ++i) {
      REQUIRE(ring.consumer.pop(out) == PopStatus::Ok);
      CHECK(out.tag == i);
    }
    CHECK(ring.consumer.pop(out) == PopStatus::Empty);
    ring.consumer.release();
    CHECK(ring.producer.in_ring() == 0);
    CHECK(ring.producer.free_slots() == 8);
  }
}

TEST_CASE("ring: staged entries are invisible until publish") {
  TestRing<CompletionEntry> ring(16);
  CompletionEntry out{};
  for (std::uint32_t i = 0; i < 5; ++i) {
    CompletionEntry c{};
    c.tag = 100 + i;
    REQUIRE(ring.producer.stage(c));
  }
  CHECK(ring.head.value == 0);
  CHECK(ring.consumer.pop(out) == PopStatus::Empty);
  ring.producer.publish();
  CHECK(ring.head.value == 5);  // one store for the batch
  ring.producer.publish();      // idempotent
  CHECK(ring.head.value == 5);
  CHECK(ring.consumer.available() == 5);
  for (std::uint32_t i = 0; i < 5; ++i) {
    REQUIRE(ring.consumer.pop(out) == PopStatus::Ok);
    CHECK(out.tag == 100 + i);
  }
  // Staging stops at capacity even before publishing.
  ring.consumer.release();
  for (int i = 0; i < 16; ++i) REQUIRE(ring.producer.stage(CompletionEntry{}));
  CHECK_FALSE(ring.producer.stage(CompletionEntry{}));
  ring.producer.publish();
  CHECK(ring.head.value == 21);
}

TEST_CASE("ring: indices wrap past 2^32 without a hiccup") {
  for (MemoryMode mode : {MemoryMode{false, false}, MemoryMode{true, false}}) {
    CAPTURE(mode.checksum);
    const std::uint32_t start = 0xffffff00u;
    TestRing<SubmissionEntry> ring(64, mode, start);
    std::mt19937 random(42);
    std::deque<std::uint64_t> expected;
    std::uint64_t next_tag = 0, popped = 0;
    std::uint32_t expected_seq = start;
    bool crossed = false;
    SubmissionEntry out{};
    while (popped < 20000) {
      // Random bursts on each side, so the ring goes through full, empty and
      // everything between while crossing the wrap.
      unsigned burst = random() % 80;
      for (unsigned i = 0; i < burst; ++i) {
        if (!ring.producer.stage(submission(next_tag))) {
          CHECK(expected.size() == 64);  // refused only when really full
          break;
        }
        expected.push_back(next_tag++);
      }
      ring.producer.publish();
      unsigned take = random() % 80;
      for (unsigned i = 0; i < take; ++i) {
        PopStatus status = ring.consumer.pop(out);
        if (status == PopStatus::Empty) {
          CHECK(expected.empty());
          break;
        }
        REQUIRE(status == PopStatus::Ok);
        REQUIRE(!expected.empty());
        REQUIRE(out.tag == expected.front());
        REQUIRE(out.seq == expected_seq);
        expected.pop_front();
        ++expected_seq;
        ++popped;
      }
      ring.consumer.release();
      if (ring.tail.value < start) crossed = true;
    }
    CHECK(crossed);
    CHECK(ring.head.value == static_cast<std::uint32_t>(start + next_tag));
    CHECK(ring.tail.value == static_cast<std::uint32_t>(start + popped));
    CHECK(ring.head.value < start);  // really past 2^32
  }
}

TEST_CASE("ring: an impossible producer index is Broken, never a read out of the ring") {
  SubmissionEntry out{};
  // A corrupt peer claims more entries than the ring holds, or fewer than
  // were already consumed.  Each lie seen fresh and each seen after another.
  TestRing<SubmissionEntry> ring(8);
  REQUIRE(ring.producer.push(submission(1)));
  REQUIRE(ring.consumer.pop(out) == PopStatus::Ok);  // consumer at 1
  for (std::uint32_t lie : {1u + 9u, 1u + 1000u, 0u, 0x80000000u, 1u + 9u}) {
    CAPTURE(lie);
    TestRing<SubmissionEntry> fresh(8);
    fresh.head.value = lie;  // consumer at 0
    if (lie != 0) {
      CHECK(fresh.consumer.pop(out) == PopStatus::Broken);
      CHECK(fresh.consumer.available() == 0);
    }
    ring.head.value = lie;
    CHECK(ring.consumer.pop(out) == PopStatus::Broken);
    CHECK(ring.consumer.available() == 0);
  }
  CHECK(ring.tail.value == 0);  // nothing released...
  ring.consumer.release();
  CHECK(ring.tail.value == 1);  // ...and nothing consumed beyond the good entry
  // Nothing was consumed: once the index is honest again, the ring is served
  // normally (the caller keeps polling while it waits for a fix).
  ring.head.value = 1;
  CHECK(ring.consumer.pop(out) == PopStatus::Empty);
  ring.entries[1] = submission(2);
  ring.entries[1].seq = 1;
  ring.head.value = 2;
  REQUIRE(ring.consumer.pop(out) == PopStatus::Ok);
  CHECK(out.tag == 2);
  // A full ring (head - tail == capacity) is fine; one more is not.
  TestRing<SubmissionEntry> full(8);
  for (int i = 0; i < 8; ++i) REQUIRE(full.producer.push(submission(i)));
  CHECK(full.consumer.available() == 8);
  for (int i = 0; i < 8; ++i) REQUIRE(full.consumer.pop(out) == PopStatus::Ok);
  TestRing<SubmissionEntry> over(8);
  over.head.value = 9;
  CHECK(over.consumer.pop(out) == PopStatus::Broken);
}

TEST_CASE("ring: an impossible consumer index stops the producer") {
  TestRing<SubmissionEntry> ring(8);
  for (int i = 0; i < 8; ++i) REQUIRE(ring.producer.push(submission(i)));
  ring.tail.value = 12;  // "consumed" entries that were never produced
  CHECK(ring.producer.free_slots() == 0);
  CHECK_FALSE(ring.producer.push(submission(8)));
  ring.tail.value = 0xfffffff0u;  // more than a ring behind
  CHECK(ring.producer.free_slots() == 0);
  ring.tail.value = 4;  // honest again
  CHECK(ring.producer.free_slots() == 4);
}

TEST_CASE("ring: checksum mode detects a corrupted entry after retries") {
  for (bool flush : {false, true}) {
    CAPTURE(flush);
    TestRing<SubmissionEntry> ring(8, MemoryMode{true, flush});
    SubmissionEntry out{};
    for (std::uint64_t i = 0; i < 4; ++i) REQUIRE(ring.producer.push(submission(i)));
    CHECK(ring.entries[0].entry_crc == entry_checksum(ring.entries[0]));
    // Corrupt entry 1 (one bit of its export offset) after publication.
    ring.entries[1].offset ^= 1u << 12;
    REQUIRE(ring.consumer.pop(out) == PopStatus::Ok);
    CHECK(out.tag == 0);
    CHECK(ring.consumer.pop(out) == PopStatus::Corrupt);
    // The bad entry is consumed (the caller fails that request) and the ring
    // carries on with the next one.
    REQUIRE(ring.consumer.pop(out) == PopStatus::Ok);
    CHECK(out.tag == 2);
    // Corrupt the checksum itself.
    ring.entries[3].entry_crc ^= 0x100;
    CHECK(ring.consumer.pop(out) == PopStatus::Corrupt);
    CHECK(ring.consumer.pop(out) == PopStatus::Empty);
  }
  // Without checksums the consumer cannot tell; with them it must.
  TestRing<CompletionEntry> completions(4, MemoryMode{true, false});
  CompletionEntry c{};
  c.tag = 5;
  c.status = 0;
  REQUIRE(completions.producer.push(c));
  completions.entries[0].status = 5;  // EIO flipped in
  CompletionEntry out{};
  CHECK(completions.consumer.pop(out) == PopStatus::Corrupt);
}

TEST_CASE("ring: a stale entry (sequence mismatch) is detected in every mode") {
  for (MemoryMode mode : {MemoryMode{false, false}, MemoryMode{true, false}, MemoryMode{true, true}}) {
    CAPTURE(mode.checksum);
    CAPTURE(mode.flush);
    TestRing<SubmissionEntry> ring(4, mode);
    SubmissionEntry out{};
    // Fill and drain once so every slot holds a valid entry of the previous lap.
    for (std::uint64_t i = 0; i < 4; ++i) REQUIRE(ring.producer.push(submission(i)));
    for (int i = 0; i < 4; ++i) REQUIRE(ring.consumer.pop(out) == PopStatus::Ok);
    ring.consumer.release();
    // A producer that bumps its index without writing the entry: slot 0 still
    // holds lap one's entry, whose checksum is valid but whose seq is 0, not 4.
    ring.head.value = 5;
    CHECK(ring.consumer.pop(out) == PopStatus::Corrupt);
    // A well-formed entry with a wrong seq and a correct checksum.
    SubmissionEntry forged = submission(77);
    forged.seq = 1234;
    forged.entry_crc = entry_checksum(forged);
    ring.entries[1] = forged;
    ring.head.value = 6;
    CHECK(ring.consumer.pop(out) == PopStatus::Corrupt);
    CHECK(ring.consumer.pop(out) == PopStatus::Empty);
  }
}
