// The queue side's channel engine through a real channel in /dev/shm, with
// the handler side scripted step by step in the test (no thread, so every
// interleaving is exact): exactly once across set-ups, fencing after the
// channel was reclaimed, forged completions, failing during a payload,
// quarantine of extents an older backend instance may still touch, and a
// clean backend stop.
#include <doctest/doctest.h>

#include <cerrno>
#include <map>
#include <thread>
#include <vector>

#include "client/channel_engine.hpp"
#include "common/channel.hpp"
#include "common/shared_atomic.hpp"
#include "shm_fixture.hpp"

using namespace cbd;
using namespace cbd::proxy;

namespace {

// The handler side of channel 0, driven by the test.
class ScriptedHandler {
 public:
  ScriptedHandler(const Transport& transport, std::uint64_t epoch, std::uint32_t channel = 0)
      : channel_(transport, channel), epoch_(epoch), sq_(channel_.submission_consumer()),
        cq_(channel_.completion_producer()) {}

  // Step 2 of the attach protocol for whatever generation the queue published.
  std::uint64_t attach() {
    const std::uint64_t generation = load_acquire(channel_.control().generation);
    sq_.reset();
    cq_.reset();
    channel_.handler_attach(generation, epoch_);
    return generation;
  }
  std::vector<SubmissionEntry> take_all() {
    std::vector<SubmissionEntry> taken;
    SubmissionEntry entry;
    while (sq_.pop(entry) == PopStatus::Ok) taken.push_back(entry);
    sq_.release();
    return taken;
  }
  void complete(std::uint64_t tag, std::uint32_t generation, int status = 0, std::uint32_t result_length = 0) {
    CompletionEntry completion{};
    completion.tag = tag;
    completion.status = status;
    completion.result_length = result_length;
    completion.generation = generation;
    REQUIRE(cq_.push(completion));
  }

 private:
  Channel channel_;
  std::uint64_t epoch_;
  RingConsumer<SubmissionEntry> sq_;
  RingProducer<CompletionEntry> cq_;
};

struct EngineFixture {
  test::ShmFile file{"engine"};
  Transport transport{test::make_transport(file, test::small_options(), 16 << 20)};
  std::uint64_t claimed_word = 0;
  std::unique_ptr<ChannelEngine> engine;

  EngineFixture() {
    auto word = try_claim(transport.channel_control(0).header, kNoSlot);
    REQUIRE(word);
    claimed_word = *word;
    engine = std::make_unique<ChannelEngine>(transport, SlotClaim(&transport.channel_control(0).header, 0, *word));
  }
  // Set-up plus attach; returns the generation.
  std::uint64_t set_up(ScriptedHandler& handler, std::uint64_t epoch = 1) {
    REQUIRE(engine->begin_setup(Binding{0, 0, epoch}));
    CHECK_FALSE(engine->poll_attached());
    const std::uint64_t generation = handler.attach();
    REQUIRE(engine->poll_attached());
    return generation;
  }
  std::uint32_t reserve(Op op, std::uint64_t offset, std::uint32_t length, std::uint64_t owner) {
    const bool data = op == Op::Read || op == Op::Write;
    auto slot = engine->reserve(data ? length : 0, data, owner);
    REQUIRE(slot);
    SubmissionEntry& se = engine->submission(*slot);
    se.op = static_cast<std::uint16_t>(op);
    se.offset = offset;
    se.length = length;
    return *slot;
  }
  // An entry reserved, submitted and published: in the ring for a handler.
  std::uint32_t publish_one(Op op, std::uint64_t offset, std::uint32_t length, std::uint64_t owner) {
    const std::uint32_t slot = reserve(op, offset, length, owner);
    engine->submit(slot);
    engine->publish();
    return slot;
  }
  std::vector<EngineCompletion> reap() {
    std::vector<EngineCompletion> done;
    engine->reap([&](const EngineCompletion& c) { done.push_back(c); });
    return done;
  }
};

std::map<std::uint64_t, int> count_tags(const std::vector<SubmissionEntry>& entries) {
  std::map<std::uint64_t, int> counts;
  for (const auto& e : entries) ++counts[e.tag];
  return counts;
}

}  // namespace

TEST_CASE("engine (a): a WRITE whose payload arrives during a set-up is pushed exactly once; others re-driven once") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  const std::uint64_t first = f.set_up(handler);

  f.publish_one(Op::Read, 0, 4096, 1);
  const std::uint32_t write = f.reserve(Op::Write, 8192, 4096, 2);  // payload still arriving
  auto in_first = handler.take_all();
  REQUIRE(in_first.size() == 1);
  CHECK(in_first[0].generation == static_cast<std::uint32_t>(first));

  // The channel is set up again (backend restart, stall, broken ring) while
  // the payload is being received.
  const std::uint64_t second = f.set_up(handler, 2);
  REQUIRE(second != first);
  std::memset(f.engine->extent(write), 0x5a, 4096);
  f.engine->payload_received(write, 0, 4096);
  f.engine->submit(write);
  f.engine->publish();

  auto in_second = handler.take_all();
  auto counts = count_tags(in_second);
  CHECK(in_second.size() == 2);
  CHECK(counts.size() == 2);
  for (const auto& [tag, count] : counts) CHECK(count == 1);
  for (const auto& e : in_second) CHECK(e.generation == static_cast<std::uint32_t>(second));
  for (const auto& e : in_second) handler.complete(e.tag, e.generation);

  auto done = f.reap();
  REQUIRE(done.size() == 2);
  std::map<std::uint64_t, int> owners;
  for (const auto& c : done) ++owners[c.owner];
  CHECK(owners[1] == 1);
  CHECK(owners[2] == 1);
  CHECK(f.engine->in_flight() == 0);
  CHECK(f.engine->outstanding() == 0);
  // A late completion for the first generation's copy changes nothing.
  handler.complete(in_first[0].tag, in_first[0].generation);
  CHECK(f.reap().empty());
}

TEST_CASE("engine (b): after the channel was reclaimed and claimed by another owner, nothing of it is written") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  f.set_up(handler);
  f.publish_one(Op::Read, 0, 4096, 1);

  // Judged dead while paused: reclaimed, then claimed and set up by someone else.
  ChannelControl& control = f.transport.channel_control(0);
  REQUIRE(reclaim(control.header, f.claimed_word));
  auto other = try_claim(control.header, 3);
  REQUIRE(other);
  Channel theirs(f.transport, 0);
  const std::uint64_t their_generation = theirs.queue_setup(0, 1, 7);
  const auto snapshot = [&] {
    return std::vector<std::uint64_t>{load_acquire(control.generation), load_acquire(control.sq_head.value),
                                      load_acquire(control.cq_head.value), load_acquire(control.in_flight),
                                      load_acquire(control.backend_epoch), load_acquire(control.requests)};
  };
  const auto before = snapshot();

  // The former owner wakes up and keeps working.
  f.publish_one(Op::Write, 4096, 4096, 2);
  f.reap();
  CHECK_FALSE(f.engine->begin_setup(Binding{0, 0, 2}));
  CHECK_FALSE(f.engine->poll_attached());
  f.engine->fail_outstanding(EIO);
  f.reap();
  CHECK(f.engine->lost());
  CHECK(snapshot() == before);
  CHECK(load_acquire(control.generation) == their_generation);
  CHECK(load_acquire(control.header.state) == *other);
}

TEST_CASE("engine (c): a forged completion for a tag not in the ring is ignored; the real one completes") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  const std::uint64_t generation = f.set_up(handler);
  f.publish_one(Op::Read, 0, 4096, 1);
  auto taken = handler.take_all();
  REQUIRE(taken.size() == 1);
  const std::uint64_t first_tag = taken[0].tag;
  // The next entry's tag follows the first's: serial + 1, its slot.
  const std::uint32_t second = f.reserve(Op::Write, 4096, 4096, 2);
  const std::uint64_t forged = (((first_tag >> 20) + 1) << 20) | second;
  handler.complete(forged, static_cast<std::uint32_t>(generation));
  handler.complete(first_tag, static_cast<std::uint32_t>(generation) + 1);  // wrong generation
  CHECK(f.reap().empty());
  CHECK(f.engine->in_flight() == 1);
  CHECK(f.engine->outstanding() == 2);

  f.engine->payload_received(second, 0, 4096);
  f.engine->submit(second);
  f.engine->publish();
  taken = handler.take_all();
  REQUIRE(taken.size() == 1);
  CHECK(taken[0].tag == forged);  // the forger guessed right; it still had to wait for the push
  handler.complete(first_tag, static_cast<std::uint32_t>(generation), 0, 4096);
  handler.complete(taken[0].tag, static_cast<std::uint32_t>(generation));
  auto done = f.reap();
  REQUIRE(done.size() == 2);
  CHECK(done[0].owner == 1);
  CHECK(done[1].owner == 2);
  CHECK(done[1].status == 0);
  CHECK(f.engine->in_flight() == 0);
  CHECK(f.engine->outstanding() == 0);
}

TEST_CASE("engine (d): fail_outstanding() during a payload finishes that request with EIO too") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  f.set_up(handler);
  f.publish_one(Op::Read, 0, 4096, 1);
  const std::uint32_t receiving = f.reserve(Op::Write, 4096, 4096, 2);
  REQUIRE(handler.take_all().size() == 1);  // the backend took the first entry
  f.engine->fail_outstanding(EIO);
  auto done = f.reap();
  REQUIRE(done.size() == 1);
  CHECK(done[0].owner == 1);
  CHECK(done[0].status == EIO);
  // The payload ends after the failure pass: it completes, never reaches a ring.
  f.engine->payload_received(receiving, 0, 4096);
  f.engine->submit(receiving);
  f.engine->publish();
  done = f.reap();
  REQUIRE(done.size() == 1);
  CHECK(done[0].owner == 2);
  CHECK(done[0].status == EIO);
  CHECK(handler.take_all().empty());  // only the first entry was ever published
  CHECK(f.engine->outstanding() == 0);
}

TEST_CASE("engine: the extent of an entry re-driven across generations is quarantined after it completes") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  f.set_up(handler);
  f.engine->set_quarantine(std::chrono::milliseconds(200));
  const std::uint32_t whole = static_cast<std::uint32_t>(f.engine->data_size());
  std::uint32_t slot = f.publish_one(Op::Read, 0, 4096, 1);
  handler.take_all();  // the old instance took it and may still execute it
  const std::uint64_t generation = f.set_up(handler, 2);
  auto redriven = handler.take_all();
  REQUIRE(redriven.size() == 1);
  handler.complete(redriven[0].tag, static_cast<std::uint32_t>(generation), 0, 4096);
  auto done = f.reap();
  REQUIRE(done.size() == 1);
  f.engine->release(done[0].slot);
  CHECK_FALSE(f.engine->reserve(whole, true, 2));  // still held
  f.engine->expire_quarantine(ChannelEngine::Clock::now() + std::chrono::milliseconds(250));
  auto all = f.engine->reserve(whole, true, 2);
  CHECK(all);

  // An entry completed in a single generation is reused at once.
  f.engine->release(*all);
  slot = f.reserve(Op::Read, 0, 4096, 3);
  f.engine->submit(slot);
  f.engine->publish();
  auto once = handler.take_all();
  REQUIRE(once.size() == 1);
  handler.complete(once[0].tag, static_cast<std::uint32_t>(generation), 0, 4096);
  done = f.reap();
  REQUIRE(done.size() == 1);
  f.engine->release(done[0].slot);
  CHECK(f.engine->reserve(whole, true, 4));
}

TEST_CASE("engine: ESHUTDOWN from a backend stopping cleanly holds the entry for the next instance") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  std::uint64_t generation = f.set_up(handler);
  f.publish_one(Op::Read, 0, 4096, 1);
  auto taken = handler.take_all();
  REQUIRE(taken.size() == 1);
  handler.complete(taken[0].tag, static_cast<std::uint32_t>(generation), ESHUTDOWN);
  CHECK(f.reap().empty());  // held, not failed
  CHECK(f.engine->outstanding() == 1);
  CHECK(f.engine->parked());  // the stall check sets the channel up again if nothing else does
  generation = f.set_up(handler, 2);  // the backend returns
  taken = handler.take_all();
  REQUIRE(taken.size() == 1);
  handler.complete(taken[0].tag, static_cast<std::uint32_t>(generation), 0, 4096);
  auto done = f.reap();
  REQUIRE(done.size() == 1);
  CHECK(done[0].status == 0);
}

TEST_CASE("engine: fail_outstanding() publishes a new generation, so a backend that was only paused runs none of it") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  const std::uint64_t generation = f.set_up(handler);
  const std::uint32_t slot = f.reserve(Op::Write, 0, 4096, 1);
  f.engine->payload_received(slot, 0, 4096);
  f.engine->submit(slot);
  f.engine->publish();  // in the ring; the backend instance is paused before it pops it
  f.engine->fail_outstanding(EIO);
  auto done = f.reap();
  REQUIRE(done.size() == 1);
  CHECK(done[0].status == EIO);
  // The instance wakes up: its fence check (the channel's generation) no
  // longer matches, so it neither pops nor runs the entry reported failed.
  const std::uint64_t now = load_acquire(f.transport.channel_control(0).generation);
  CHECK(now != generation);
  CHECK(now > generation);
}

TEST_CASE("engine: a completion without a generation stamp is not accepted") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  const std::uint64_t generation = f.set_up(handler);
  f.publish_one(Op::Read, 0, 4096, 1);
  auto taken = handler.take_all();
  REQUIRE(taken.size() == 1);
  handler.complete(taken[0].tag, 0, 0, 4096);
  CHECK(f.reap().empty());
  CHECK(f.engine->in_flight() == 1);
  handler.complete(taken[0].tag, static_cast<std::uint32_t>(generation), 0, 4096);
  auto done = f.reap();
  REQUIRE(done.size() == 1);
  CHECK(done[0].owner == 1);
}

TEST_CASE("engine: a lost channel's data area is never written; failures not yet reaped move with the entries") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  f.set_up(handler);
  const std::uint32_t receiving = f.reserve(Op::Write, 0, 4096, 1);
  REQUIRE(f.engine->writable_extent(receiving) != nullptr);
  // The backend was gone past timeout=: everything fails, and so does an
  // entry submitted after that.  Its failure is not reaped yet.
  f.engine->fail_outstanding(EIO);
  const std::uint32_t failed = f.reserve(Op::Read, 8192, 4096, 2);
  f.engine->submit(failed);

  // Judged dead while paused: the channel is reclaimed and claimed by another node.
  ChannelControl& control = f.transport.channel_control(0);
  REQUIRE(reclaim(control.header, f.claimed_word));
  REQUIRE(try_claim(control.header, 3));
  CHECK(f.engine->writable_extent(receiving) == nullptr);
  CHECK(f.engine->lost());

  // A fresh channel takes the entries over: the failure is still reported.
  auto word = try_claim(f.transport.channel_control(1).header, kNoSlot);
  REQUIRE(word);
  ChannelEngine replacement(f.transport, SlotClaim(&f.transport.channel_control(1).header, 1, *word));
  replacement.adopt_outstanding(*f.engine);
  std::vector<EngineCompletion> done;
  replacement.reap([&](const EngineCompletion& c) { done.push_back(c); });
  REQUIRE(done.size() == 1);
  CHECK(done[0].owner == 2);
  CHECK(done[0].status == EIO);
  CHECK(replacement.writable_extent(receiving) != nullptr);  // its payload goes on here
}

TEST_CASE("engine: a READ result not sent when the channel is lost runs again; its owner gets no second completion") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  const std::uint64_t generation = f.set_up(handler);
  std::vector<std::uint32_t> slots;
  for (std::uint64_t owner = 1; owner <= 3; ++owner) slots.push_back(f.publish_one(Op::Read, owner * 4096, 4096, owner));
  for (const SubmissionEntry& e : handler.take_all()) handler.complete(e.tag, static_cast<std::uint32_t>(generation), 0, 4096);
  REQUIRE(f.reap().size() == 3);
  for (std::uint32_t slot : slots) CHECK(f.engine->data_state(slot) == ChannelEngine::DataState::Ready);

  // Lost: nothing of the old area may be sent any more.
  ChannelControl& control = f.transport.channel_control(0);
  REQUIRE(reclaim(control.header, f.claimed_word));
  REQUIRE(try_claim(control.header, 3));
  for (std::uint32_t slot : slots) CHECK(f.engine->data_state(slot) == ChannelEngine::DataState::Pending);

  auto word = try_claim(f.transport.channel_control(1).header, kNoSlot);
  REQUIRE(word);
  ChannelEngine replacement(f.transport, SlotClaim(&f.transport.channel_control(1).header, 1, *word));
  replacement.adopt_outstanding(*f.engine);
  CHECK(replacement.outstanding() == 3);  // three reads to run again
  // The first owner lets go of its entry meanwhile (its connection closed).
  replacement.release(slots[0]);
  ScriptedHandler second(f.transport, 1, 1);
  REQUIRE(replacement.begin_setup(Binding{0, 0, 1}));
  const std::uint64_t second_generation = second.attach();
  REQUIRE(replacement.poll_attached());
  const auto again = second.take_all();
  REQUIRE(again.size() == 3);
  for (const SubmissionEntry& e : again) {
    CHECK(static_cast<Op>(e.op) == Op::Read);
    // The second read fails: its data can never be delivered.
    const bool fail = (e.tag & 0xfffff) == slots[1];  // the tag's low bits are the slot
    second.complete(e.tag, static_cast<std::uint32_t>(second_generation), fail ? EIO : 0, fail ? 0 : 4096);
  }
  std::vector<EngineCompletion> done;
  replacement.reap([&](const EngineCompletion& c) { done.push_back(c); });
  CHECK(done.empty());  // every owner had its completion already
  CHECK(replacement.outstanding() == 0);
  CHECK(replacement.data_state(slots[1]) == ChannelEngine::DataState::Lost);
  CHECK(replacement.data_state(slots[2]) == ChannelEngine::DataState::Ready);
  replacement.release(slots[1]);
  replacement.release(slots[2]);
  CHECK(replacement.free_entries() == replacement.capacity());  // the first one was freed when its read ended
}

TEST_CASE("engine: a refill that the engine fails (backend gone) loses the data without a second completion") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  const std::uint64_t generation = f.set_up(handler);
  const std::uint32_t slot = f.publish_one(Op::Read, 0, 4096, 1);
  for (const SubmissionEntry& e : handler.take_all()) handler.complete(e.tag, static_cast<std::uint32_t>(generation), 0, 4096);
  REQUIRE(f.reap().size() == 1);
  ChannelControl& control = f.transport.channel_control(0);
  REQUIRE(reclaim(control.header, f.claimed_word));
  REQUIRE(try_claim(control.header, 3));
  REQUIRE_FALSE(f.engine->still_ours());
  auto word = try_claim(f.transport.channel_control(1).header, kNoSlot);
  REQUIRE(word);
  ChannelEngine replacement(f.transport, SlotClaim(&f.transport.channel_control(1).header, 1, *word));
  replacement.adopt_outstanding(*f.engine);
  CHECK(replacement.data_state(slot) == ChannelEngine::DataState::Pending);
  replacement.fail_outstanding(EIO);
  std::vector<EngineCompletion> done;
  replacement.reap([&](const EngineCompletion& c) { done.push_back(c); });
  CHECK(done.empty());
  CHECK(replacement.data_state(slot) == ChannelEngine::DataState::Lost);
  CHECK(replacement.outstanding() == 0);
}

TEST_CASE("engine: an entry the ring refuses while attached is parked, tried again at publish, pushed at a set-up") {
  EngineFixture f;
  ScriptedHandler handler(f.transport, 1);
  std::uint64_t generation = f.set_up(handler);
  RingIndex& tail = f.transport.channel_control(0).sq_tail;
  // Once round the ring, so that the next entry makes the producer look at
  // the consumer index again; then a paused former handler instance wakes
  // and stores its stale index.
  const auto go_round_then_lie = [&] {
    const std::uint32_t ring = f.transport.superblock().channel.sq_entries;
    for (std::uint32_t i = 0; i < ring; ++i) {
      f.publish_one(Op::Flush, 0, 0, 100 + i);
      for (const SubmissionEntry& e : handler.take_all()) handler.complete(e.tag, static_cast<std::uint32_t>(generation));
      for (const EngineCompletion& c : f.reap()) f.engine->release(c.slot);
    }
    const std::uint32_t true_tail = load_acquire(tail.value);
    store_release(tail.value, true_tail - 1000u);
    return true_tail;
  };
  const std::uint32_t true_tail = go_round_then_lie();
  CHECK_FALSE(f.engine->parked());
  const std::uint32_t first = f.publish_one(Op::Read, 0, 4096, 1);
  const std::uint32_t second = f.publish_one(Op::Read, 4096, 4096, 2);
  CHECK(f.engine->parked());
  CHECK(f.engine->in_flight() == 0);
  CHECK(f.engine->outstanding() == 2);
  f.engine->publish();  // still refused: both stay parked, neither is lost
  CHECK(f.engine->parked());
  CHECK(handler.take_all().empty());
  // The live handler's next release overwrites the lie: the next publish
  // pushes both, in order, once.
  store_release(tail.value, true_tail);
  f.engine->publish();
  CHECK_FALSE(f.engine->parked());
  auto taken = handler.take_all();
  REQUIRE(taken.size() == 2);
  CHECK((taken[0].tag & 0xfffff) == first);
  CHECK((taken[1].tag & 0xfffff) == second);
  for (const SubmissionEntry& e : taken) handler.complete(e.tag, static_cast<std::uint32_t>(generation), 0, 4096);
  for (const EngineCompletion& c : f.reap()) f.engine->release(c.slot);

  // A lie that lasts: the set-up the queue loop's stall check starts
  // pushes the entry, once.
  generation = f.set_up(handler, 2);  // (indices from 0 again)
  go_round_then_lie();
  const std::uint32_t slot = f.publish_one(Op::Read, 0, 4096, 3);
  REQUIRE(f.engine->parked());
  generation = f.set_up(handler, 3);
  CHECK_FALSE(f.engine->parked());
  taken = handler.take_all();
  REQUIRE(taken.size() == 1);
  CHECK((taken[0].tag & 0xfffff) == slot);
  handler.complete(taken[0].tag, static_cast<std::uint32_t>(generation), 0, 4096);
  const auto done = f.reap();
  REQUIRE(done.size() == 1);
  CHECK(done[0].owner == 3);
}
