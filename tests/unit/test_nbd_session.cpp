// NbdSession, the transmission phase of one NBD connection, driven as its
// queue's event loop would drive it: the client end of a socketpair is
// written and read by the test in the NBD wire format, and the session's
// requests go through a real ChannelEngine on a channel in /dev/shm whose
// handler side is played by the test against an in-memory disk.  The loop is
// single-threaded and the handler answers only when told, so the order in
// which pieces complete is exact.
#include <doctest/doctest.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "client/channel_engine.hpp"
#include "client/nbd_handshake.hpp"
#include "client/nbd_session.hpp"
#include "common/channel.hpp"
#include "common/log.hpp"
#include "common/shared_atomic.hpp"
#include "nbd_test_support.hpp"
#include "disk_handler.hpp"
#include "shm_fixture.hpp"

using namespace cbd;
using namespace cbd::proxy;
using cbd::proxy::test::Bytes;
using cbd::test::DiskHandler;
namespace shm = cbd::test;
namespace wire = cbd::proxy::test;

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// One client: its end of the socketpair, what it has received, its session.
struct Client {
  wire::SocketPair pair;
  std::unique_ptr<NbdSession> session;
  Bytes received;
  bool reading = true;  // the test reads replies as they come
  bool eof = false;
  bool on_closed_called = false;

  void request(std::uint16_t type, std::uint64_t cookie, std::uint64_t offset, std::uint32_t length,
               std::uint16_t flags = 0, const Bytes& payload = {}) {
    nbd::Request r{nbd::kRequestMagic, flags, type, cookie, offset, length};
    Bytes bytes(nbd::kRequestSize);
    nbd::encode_request(bytes.data(), r);
    bytes.insert(bytes.end(), payload.begin(), payload.end());
    wire::send_bytes(pair.client, bytes);
  }
  // Reads what is available without blocking.
  void poll() {
    std::uint8_t buffer[65536];
    for (;;) {
      const ssize_t n = ::recv(pair.client, buffer, sizeof buffer, MSG_DONTWAIT);
      if (n > 0) {
        received.insert(received.end(), buffer, buffer + n);
        continue;
      }
      // A reset after the last byte (the session closed with input unread)
      // is an end as well.
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) eof = true;
      return;
    }
  }
  Bytes pop(std::size_t length) {
    REQUIRE(received.size() >= length);
    Bytes out(received.begin(), received.begin() + static_cast<std::ptrdiff_t>(length));
    received.erase(received.begin(), received.begin() + static_cast<std::ptrdiff_t>(length));
    return out;
  }
};

struct SimpleReply {
  std::uint32_t magic, error;
  std::uint64_t cookie;
};
SimpleReply parse_simple(const Bytes& b) {
  REQUIRE(b.size() == nbd::kSimpleReplySize);
  return {nbd::load_be32(b.data()), nbd::load_be32(b.data() + 4), nbd::load_be64(b.data() + 8)};
}
struct Chunk {
  std::uint32_t magic;
  std::uint16_t flags, type;
  std::uint64_t cookie;
  std::uint32_t length;
};
Chunk parse_chunk(const Bytes& b) {
  REQUIRE(b.size() == nbd::kChunkHeaderSize);
  return {nbd::load_be32(b.data()), nbd::load_be16(b.data() + 4), nbd::load_be16(b.data() + 6),
          nbd::load_be64(b.data() + 8), nbd::load_be32(b.data() + 16)};
}

struct Harness {
  shm::ShmFile file{"session"};
  Transport transport;
  std::unique_ptr<ChannelEngine> engine;
  DiskHandler handler;
  bool auto_answer = true;
  std::vector<std::unique_ptr<Client>> clients;

  explicit Harness(std::uint64_t disk_size = 1 << 20)
      : transport(shm::make_transport(file, shm::small_options(), 16 << 20)), handler(transport, 0, disk_size) {
    set_log_sink([](LogLevel, const std::string&) {});
    auto word = try_claim(transport.channel_control(0).header, kNoSlot);
    REQUIRE(word);
    engine = std::make_unique<ChannelEngine>(transport, SlotClaim(&transport.channel_control(0).header, 0, *word));
    REQUIRE(engine->begin_setup(Binding{0, 0, 1}));
    handler.attach();
    REQUIRE(engine->poll_attached());
  }
  ~Harness() {
    clients.clear();  // sessions give their entries back to the engine first
    set_log_sink(nullptr);
  }

  ExportInfo info(std::uint32_t caps = wire::kAllCaps) const {
    return wire::test_export(caps, handler.disk.size());
  }

  Client& connect(const ExportInfo& info, bool structured, const SessionLimits& limits = {},
                  bool block_size_agreed = false) {
    auto client = std::make_unique<Client>();
    Client& c = *client;
    AdoptedConnection connection;
    connection.socket = UniqueFd(c.pair.server);
    connection.in_fd = connection.out_fd = c.pair.server;
    c.pair.server = -1;  // owned by the session now
    connection.negotiated.enter_transmission = true;
    connection.negotiated.structured_replies = structured;
    connection.negotiated.meta_context_id = structured ? 1 : 0;
    connection.negotiated.transmission_flags = transmission_flags_for(info, structured);
    connection.negotiated.block_size_agreed = block_size_agreed;
    connection.on_closed = [&c] { c.on_closed_called = true; };
    c.session = std::make_unique<NbdSession>(std::move(connection), info, engine, limits);
    clients.push_back(std::move(client));
    return c;
  }

  // One turn of the queue's event loop.
  void turn() {
    for (auto& c : clients) {
      NbdSession& s = *c->session;
      if (!s.closed() && (s.wants_read() || s.intake_stalled())) s.pump_input();
    }
    engine->publish();
    handler.take();
    if (auto_answer) handler.answer_all();
    engine->reap(NbdSession::dispatch);
    const auto now = Clock::now();
    for (auto& c : clients) {
      NbdSession& s = *c->session;
      if (!s.closed()) s.flush_output();
      if (!s.closed()) s.tick(now);
      if (s.closed()) s.release_socket();
      if (c->reading) c->poll();
    }
  }
  // Turns until `done` (false after `timeout`).
  bool run_until(const std::function<bool()>& done, std::chrono::milliseconds timeout = 5000ms) {
    const auto deadline = Clock::now() + timeout;
    while (!done()) {
      if (Clock::now() > deadline) return false;
      turn();
      std::this_thread::sleep_for(100us);
    }
    return true;
  }
  void turns(int count) {
    for (int i = 0; i < count; ++i) {
      turn();
      std::this_thread::sleep_for(100us);
    }
  }
  Bytes receive(Client& c, std::size_t length) {
    REQUIRE(run_until([&] { return c.received.size() >= length; }));
    return c.pop(length);
  }
  SimpleReply receive_simple(Client& c) { return parse_simple(receive(c, nbd::kSimpleReplySize)); }
  Chunk receive_chunk(Client& c) { return parse_chunk(receive(c, nbd::kChunkHeaderSize)); }
  Bytes disk(std::uint64_t offset, std::uint32_t length) const {
    return Bytes(handler.disk.begin() + static_cast<std::ptrdiff_t>(offset),
                 handler.disk.begin() + static_cast<std::ptrdiff_t>(offset + length));
  }
  // Every entry back and every extent free.
  bool engine_idle() const { return engine->outstanding() == 0 && engine->free_entries() == engine->capacity(); }
};

Bytes pattern(std::size_t length, std::uint8_t seed) {
  Bytes out(length);
  for (std::size_t i = 0; i < length; ++i) out[i] = static_cast<std::uint8_t>(seed + i * 13 + i / 509);
  return out;
}

// How many entries of the handler's history have `op`.
std::size_t count_op(const DiskHandler& handler, Op op) {
  return static_cast<std::size_t>(std::count_if(handler.seen.begin(), handler.seen.end(),
                                                [&](const SubmissionEntry& e) { return e.op == static_cast<std::uint16_t>(op); }));
}

}  // namespace

TEST_CASE("session: simple READ and WRITE round trip through the channel") {
  Harness h;
  Client& c = h.connect(h.info(), false);
  const Bytes data = pattern(8192, 1);
  c.request(nbd::kCmdWrite, 7, 4096, 8192, 0, data);
  auto write_reply = h.receive_simple(c);
  CHECK(write_reply.magic == nbd::kSimpleReplyMagic);
  CHECK(write_reply.error == 0);
  CHECK(write_reply.cookie == 7);
  CHECK(h.disk(4096, 8192) == data);

  c.request(nbd::kCmdRead, 8, 4096, 8192);
  auto read_reply = h.receive_simple(c);
  CHECK(read_reply.error == 0);
  CHECK(read_reply.cookie == 8);
  CHECK(h.receive(c, 8192) == data);
  CHECK(h.run_until([&] { return h.engine_idle(); }));
}

TEST_CASE("session: a READ larger than max_piece is split and its simple reply reassembled in order") {
  Harness h;
  h.auto_answer = false;
  Client& c = h.connect(h.info(), false);
  const std::uint32_t length = 3 * h.engine->max_piece() + 4096;
  c.request(nbd::kCmdRead, 1, 8192, length);
  REQUIRE(h.run_until([&] { h.turn(); return h.handler.pending.size() == 4; }));
  // Complete the pieces last first: the reply must still be in order.
  while (!h.handler.pending.empty()) {
    h.handler.answer_at(h.handler.pending.size() - 1);
    h.turns(3);
  }
  auto reply = h.receive_simple(c);
  CHECK(reply.error == 0);
  CHECK(reply.cookie == 1);
  CHECK(h.receive(c, length) == h.disk(8192, length));
  h.turns(5);
  CHECK(c.received.empty());
  CHECK(h.engine_idle());
}

TEST_CASE("session: a WRITE larger than a piece is received into several entries, also when the share is one piece") {
  Harness h;
  SessionLimits limits;
  SUBCASE("default share") {}
  SUBCASE("share of one piece: the payload waits for each entry") { limits.data_share = h.engine->max_piece(); }
  Client& c = h.connect(h.info(), false, limits);
  const std::uint32_t length = 3 * h.engine->max_piece() + 4096;
  const Bytes data = pattern(length, 17);
  std::thread sender([&] { c.request(nbd::kCmdWrite, 5, 65536, length, nbd::kCmdFlagFua, data); });
  auto reply = h.receive_simple(c);
  sender.join();
  CHECK(reply.cookie == 5);
  CHECK(reply.error == 0);
  CHECK(h.disk(65536, length) == data);
  CHECK(count_op(h.handler, Op::Write) == 4);
  for (const SubmissionEntry& e : h.handler.seen) CHECK((e.flags & kFlagFua) != 0);
  CHECK(h.run_until([&] { return h.engine_idle(); }));
}

TEST_CASE("session: results the backend gets wrong are EIO, never data past what it wrote") {
  Harness h;
  Client& c = h.connect(h.info(), true);
  SUBCASE("READ shorter than asked") {
    h.handler.tamper = [](const SubmissionEntry&, CompletionEntry& done) { done.result_length -= 1; };
    c.request(nbd::kCmdRead, 1, 0, 4096);
  }
  SUBCASE("READ longer than asked") {
    h.handler.tamper = [](const SubmissionEntry&, CompletionEntry& done) { done.result_length += 4096; };
    c.request(nbd::kCmdRead, 1, 0, 4096);
  }
  SUBCASE("BLOCK_STATUS with a partial descriptor") {
    h.handler.tamper = [](const SubmissionEntry&, CompletionEntry& done) { done.result_length = 12; };
    c.request(nbd::kCmdBlockStatus, 1, 0, 4096);
  }
  SUBCASE("BLOCK_STATUS larger than its extent") {
    h.handler.tamper = [](const SubmissionEntry& e, CompletionEntry& done) { done.result_length = e.data_length + 8; };
    c.request(nbd::kCmdBlockStatus, 1, 0, 4096);
  }
  SUBCASE("BLOCK_STATUS whose first extent is empty") {
    h.handler.extents = {{0, 0}, {4096, 0}};
    c.request(nbd::kCmdBlockStatus, 1, 0, 4096);
  }
  SUBCASE("a status that is no errno") {
    h.handler.tamper = [](const SubmissionEntry&, CompletionEntry& done) { done.status = -7; };
    c.request(nbd::kCmdRead, 1, 0, 4096);
  }
  auto chunk = h.receive_chunk(c);
  CHECK(chunk.type == nbd::kReplyTypeError);
  CHECK(chunk.flags == nbd::kReplyFlagDone);
  CHECK(chunk.cookie == 1);
  REQUIRE(chunk.length == 6);
  CHECK(nbd::load_be32(h.receive(c, 6).data()) == nbd::kErrIo);
  h.handler.tamper = nullptr;
  c.request(nbd::kCmdFlush, 2, 0, 0);
  CHECK(h.receive_simple(c).cookie == 2);
  CHECK(h.run_until([&] { return h.engine_idle(); }));
}

TEST_CASE("session: structured READ is OFFSET_DATA chunks with DONE on the last one, no NONE chunk") {
  Harness h;
  h.auto_answer = false;
  Client& c = h.connect(h.info(), true);

  SUBCASE("one piece: one chunk with DONE") {
    c.request(nbd::kCmdRead, 3, 12288, 4096);
    h.turns(3);
    h.handler.answer_all();
    auto chunk = h.receive_chunk(c);
    CHECK(chunk.magic == nbd::kStructuredReplyMagic);
    CHECK(chunk.type == nbd::kReplyTypeOffsetData);
    CHECK(chunk.flags == nbd::kReplyFlagDone);
    CHECK(chunk.cookie == 3);
    CHECK(chunk.length == 8 + 4096);
    CHECK(nbd::load_be64(h.receive(c, 8).data()) == 12288);
    CHECK(h.receive(c, 4096) == h.disk(12288, 4096));
  }
  SUBCASE("several pieces: one chunk each in completion order; DONE rides on the last") {
    const std::uint32_t piece = h.engine->max_piece();
    const std::uint32_t length = 3 * piece;
    c.request(nbd::kCmdRead, 4, 0, length);
    REQUIRE(h.run_until([&] { return h.handler.pending.size() == 3; }));
    const std::uint64_t order[] = {2, 0, 1};  // piece indices in completion order
    h.handler.answer_at(2);
    h.turns(3);
    h.handler.answer_at(0);
    h.turns(3);
    h.handler.answer_at(0);
    for (int i = 0; i < 3; ++i) {
      auto chunk = h.receive_chunk(c);
      CHECK(chunk.type == nbd::kReplyTypeOffsetData);
      CHECK(chunk.cookie == 4);
      CHECK(chunk.length == 8 + piece);
      CHECK(chunk.flags == (i == 2 ? nbd::kReplyFlagDone : 0));
      const std::uint64_t offset = nbd::load_be64(h.receive(c, 8).data());
      CHECK(offset == order[i] * piece);
      CHECK(h.receive(c, piece) == h.disk(offset, piece));
    }
  }
  // Nothing more for that READ: the next bytes are the FLUSH's reply.
  c.request(nbd::kCmdFlush, 99, 0, 0);
  REQUIRE(h.run_until([&] { return !h.handler.pending.empty(); }));
  h.handler.answer_all();
  auto flush = h.receive_simple(c);
  CHECK(flush.magic == nbd::kSimpleReplyMagic);
  CHECK(flush.cookie == 99);
  CHECK(h.run_until([&] { return h.engine_idle(); }));
}

TEST_CASE("session: BLOCK_STATUS is one chunk with DONE, clipped to the request; REQ_ONE gives one extent") {
  Harness h;
  Client& c = h.connect(h.info(), true);
  c.request(nbd::kCmdBlockStatus, 5, 0, 6144);
  auto chunk = h.receive_chunk(c);
  CHECK(chunk.type == nbd::kReplyTypeBlockStatus);
  CHECK(chunk.flags == nbd::kReplyFlagDone);
  CHECK(chunk.cookie == 5);
  REQUIRE(chunk.length == 4 + 2 * 8);
  Bytes payload = h.receive(c, chunk.length);
  CHECK(nbd::load_be32(payload.data()) == 1);  // the meta context id
  CHECK(nbd::load_be32(payload.data() + 4) == 4096);
  CHECK(nbd::load_be32(payload.data() + 8) == 0);
  CHECK(nbd::load_be32(payload.data() + 12) == 2048);
  CHECK(nbd::load_be32(payload.data() + 16) == (nbd::kStateHole | nbd::kStateZero));

  c.request(nbd::kCmdBlockStatus, 6, 0, 65536, nbd::kCmdFlagReqOne);
  chunk = h.receive_chunk(c);
  CHECK(chunk.type == nbd::kReplyTypeBlockStatus);
  CHECK(chunk.flags == nbd::kReplyFlagDone);
  REQUIRE(chunk.length == 4 + 8);
  payload = h.receive(c, chunk.length);
  CHECK(nbd::load_be32(payload.data() + 4) == 4096);
  CHECK(h.run_until([&] { return h.engine_idle(); }));
}

TEST_CASE("session: a simple READ's header and data leave unbroken; replies completed meanwhile are held, then sent") {
  Harness h;
  h.auto_answer = false;
  Client& c = h.connect(h.info(), false);
  const std::uint32_t piece = h.engine->max_piece();
  c.request(nbd::kCmdRead, 1, 0, 2 * piece);  // two pieces: a stream
  c.request(nbd::kCmdFlush, 2, 0, 0);
  c.request(nbd::kCmdRead, 3, 65536 * 3, 4096);  // another stream, complete while the first is open
  c.request(nbd::kCmdWrite, 4, 4096 * 100, 4096, 0, pattern(4096, 9));
  REQUIRE(h.run_until([&] { return h.handler.pending.size() == 5; }));
  h.handler.answer_at(0);  // READ 1, first piece: the header and that piece go out
  h.turns(3);
  REQUIRE(c.received.size() >= nbd::kSimpleReplySize);
  // Everything but the stream's second piece.
  while (h.handler.pending.size() > 1) {
    h.handler.answer_at(1);
    h.turns(3);
  }
  h.turns(5);
  // Nothing but READ 1's header and its first piece is on the wire yet.
  CHECK(c.received.size() == nbd::kSimpleReplySize + piece);
  h.handler.answer_all();

  auto first = h.receive_simple(c);
  CHECK(first.cookie == 1);
  CHECK(first.error == 0);
  CHECK(h.receive(c, 2 * piece) == h.disk(0, 2 * piece));
  bool saw[5] = {};
  for (int i = 0; i < 3; ++i) {
    auto reply = h.receive_simple(c);
    CHECK(reply.magic == nbd::kSimpleReplyMagic);
    CHECK(reply.error == 0);
    REQUIRE(reply.cookie >= 2);
    REQUIRE(reply.cookie <= 4);
    CHECK_FALSE(saw[reply.cookie]);
    saw[reply.cookie] = true;
    if (reply.cookie == 3) CHECK(h.receive(c, 4096) == h.disk(65536 * 3, 4096));
  }
  CHECK(h.disk(4096 * 100, 4096) == pattern(4096, 9));
  CHECK(h.run_until([&] { return h.engine_idle(); }));
}

TEST_CASE("session: a simple READ that fails after its header is out ends the connection") {
  Harness h;
  h.auto_answer = false;
  Client& c = h.connect(h.info(), false);
  const std::uint32_t piece = h.engine->max_piece();

  SUBCASE("the open stream fails") {
    c.request(nbd::kCmdRead, 1, 0, 2 * piece);
    REQUIRE(h.run_until([&] { return h.handler.pending.size() == 2; }));
    h.handler.answer_at(0);
    h.turns(3);
    h.handler.answer_at(0, EIO);
    REQUIRE(h.run_until([&] { return c.eof; }));
    // The header said success; what was queued is all the client gets.
    CHECK(c.received.size() == nbd::kSimpleReplySize + piece);
  }
  SUBCASE("a stream that waited fails when its turn comes") {
    c.request(nbd::kCmdRead, 1, 0, 2 * piece);
    c.request(nbd::kCmdRead, 2, 2 * piece, 2 * piece);
    REQUIRE(h.run_until([&] { return h.handler.pending.size() == 4; }));
    h.handler.answer_at(0);  // READ 1 opens its stream
    h.turns(3);
    h.handler.answer_at(1);  // READ 2's first piece waits, copied out
    h.turns(3);
    h.handler.answer_at(1, EIO);  // and its second fails
    h.turns(3);
    CHECK_FALSE(c.session->closed());
    h.handler.answer_at(0);  // READ 1 ends; READ 2's header goes out, then its failure
    REQUIRE(h.run_until([&] { return c.eof; }));
    // READ 1 is whole: it was queued before READ 2 failed.
    auto first = parse_simple(c.pop(nbd::kSimpleReplySize));
    CHECK(first.cookie == 1);
    CHECK(c.pop(2 * piece) == h.disk(0, 2 * piece));
  }
  CHECK(c.session->closed());
  CHECK(h.run_until([&] { return c.session->finished() && h.engine_idle(); }));
}

TEST_CASE("session: a DF READ that fails part-way is padded to its announced length, then an error chunk") {
  Harness h;
  h.auto_answer = false;
  Client& c = h.connect(h.info(), true);
  const std::uint32_t piece = h.engine->max_piece();
  c.request(nbd::kCmdRead, 11, 0, 2 * piece, nbd::kCmdFlagDf);
  REQUIRE(h.run_until([&] { return h.handler.pending.size() == 2; }));
  h.handler.answer_at(0);
  h.turns(3);
  h.handler.answer_at(0, EIO);

  auto chunk = h.receive_chunk(c);
  CHECK(chunk.type == nbd::kReplyTypeOffsetData);
  CHECK(chunk.flags == 0);
  CHECK(chunk.cookie == 11);
  REQUIRE(chunk.length == 8 + 2 * piece);
  CHECK(nbd::load_be64(h.receive(c, 8).data()) == 0);
  CHECK(h.receive(c, piece) == h.disk(0, piece));
  CHECK(h.receive(c, piece) == Bytes(piece, 0));
  auto error = h.receive_chunk(c);
  CHECK(error.type == nbd::kReplyTypeError);
  CHECK(error.flags == nbd::kReplyFlagDone);
  CHECK(error.cookie == 11);
  REQUIRE(error.length == 6);
  Bytes payload = h.receive(c, 6);
  CHECK(nbd::load_be32(payload.data()) == nbd::kErrIo);
  // The connection goes on.
  c.request(nbd::kCmdFlush, 12, 0, 0);
  REQUIRE(h.run_until([&] { return !h.handler.pending.empty(); }));
  h.handler.answer_all();
  CHECK(h.receive_simple(c).cookie == 12);
  CHECK(h.run_until([&] { return h.engine_idle(); }));
}

TEST_CASE("session: a DF READ longer than the advertised maximum gets EOVERFLOW, never one oversized chunk") {
  Harness h;
  ExportInfo info = h.info();
  info.block_max = 65536;
  Client& c = h.connect(info, true);
  c.request(nbd::kCmdRead, 21, 0, 131072, nbd::kCmdFlagDf);
  auto chunk = h.receive_chunk(c);
  CHECK(chunk.type == nbd::kReplyTypeError);
  CHECK(chunk.flags == nbd::kReplyFlagDone);
  CHECK(chunk.cookie == 21);
  REQUIRE(chunk.length == 6);
  CHECK(nbd::load_be32(h.receive(c, 6).data()) == nbd::kErrOverflow);
  CHECK(h.handler.seen.empty());
  // At the maximum it is one chunk.
  c.request(nbd::kCmdRead, 22, 0, 65536, nbd::kCmdFlagDf);
  chunk = h.receive_chunk(c);
  CHECK(chunk.type == nbd::kReplyTypeOffsetData);
  CHECK(chunk.flags == nbd::kReplyFlagDone);
  CHECK(chunk.length == 8 + 65536);
  h.receive(c, 8);
  CHECK(h.receive(c, 65536) == h.disk(0, 65536));
}

TEST_CASE("session: two in-flight requests with the same cookie are both answered") {
  Harness h;
  h.auto_answer = false;
  Client& c = h.connect(h.info(), false);
  c.request(nbd::kCmdRead, 42, 0, 4096);
  c.request(nbd::kCmdRead, 42, 8192, 4096);
  REQUIRE(h.run_until([&] { return h.handler.pending.size() == 2; }));
  h.handler.answer_at(1);
  h.turns(3);
  h.handler.answer_at(0);
  auto a = h.receive_simple(c);
  CHECK(a.cookie == 42);
  CHECK(a.error == 0);
  CHECK(h.receive(c, 4096) == h.disk(8192, 4096));
  auto b = h.receive_simple(c);
  CHECK(b.cookie == 42);
  CHECK(b.error == 0);
  CHECK(h.receive(c, 4096) == h.disk(0, 4096));
  h.turns(3);
  CHECK_FALSE(c.session->closed());
}

TEST_CASE("session isolation: a session at its entry or data share stops taking requests; others go on") {
  Harness h;
  h.auto_answer = false;
  SessionLimits limits;
  std::size_t expected_in_channel = 0;
  SUBCASE("entry share") {
    limits.entry_share = 2;
    expected_in_channel = 2;
  }
  SUBCASE("data share") {
    limits.data_share = 3 * 4096;
    expected_in_channel = 3;
  }
  Client& greedy = h.connect(h.info(), false, limits);
  Client& other = h.connect(h.info(), false, limits);
  for (std::uint64_t i = 0; i < 6; ++i) greedy.request(nbd::kCmdRead, i, i * 4096, 4096);
  h.turns(20);
  CHECK(h.handler.pending.size() == expected_in_channel);
  CHECK(greedy.session->intake_stalled());
  CHECK_FALSE(greedy.session->wants_read());

  other.request(nbd::kCmdRead, 100, 65536, 4096);
  REQUIRE(h.run_until([&] { return h.handler.pending.size() == expected_in_channel + 1; }));
  h.handler.answer_at(expected_in_channel);
  auto reply = h.receive_simple(other);
  CHECK(reply.cookie == 100);
  CHECK(h.receive(other, 4096) == h.disk(65536, 4096));

  // Completions free the share: the rest is taken and answered.
  h.auto_answer = true;
  for (std::uint64_t i = 0; i < 6; ++i) {
    auto r = h.receive_simple(greedy);
    CHECK(r.cookie == i);
    CHECK(h.receive(greedy, 4096) == h.disk(i * 4096, 4096));
  }
  CHECK(h.handler.seen.size() == 7);
  CHECK(h.run_until([&] { return h.engine_idle(); }));
}

TEST_CASE("session isolation: a client that does not read its replies stops its own intake only") {
  Harness h;
  SessionLimits limits;
  limits.output_backlog = 4096;
  Client& stuck = h.connect(h.info(), false, limits);
  Client& other = h.connect(h.info(), false, limits);
  stuck.reading = false;
  // A small socket buffer so the backlog builds in the session.
  int small = 4096;
  REQUIRE(::setsockopt(stuck.session->out_fd(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small) == 0);
  constexpr std::uint64_t kRequests = 2000;
  Bytes burst;
  for (std::uint64_t i = 0; i < kRequests; ++i) {
    nbd::Request r{nbd::kRequestMagic, 0, nbd::kCmdTrim, i, 0, 4096};
    Bytes one(nbd::kRequestSize);
    nbd::encode_request(one.data(), r);
    burst.insert(burst.end(), one.begin(), one.end());
  }
  wire::send_bytes(stuck.pair.client, burst);
  h.turns(200);
  const std::size_t taken = count_op(h.handler, Op::Trim);
  CHECK(taken < kRequests);
  CHECK_FALSE(stuck.session->wants_read());
  h.turns(100);
  CHECK(count_op(h.handler, Op::Trim) == taken);  // it stays stopped

  other.request(nbd::kCmdRead, 7, 0, 4096);
  auto reply = h.receive_simple(other);
  CHECK(reply.cookie == 7);
  CHECK(h.receive(other, 4096) == h.disk(0, 4096));

  // Once the client reads, everything is answered.
  stuck.reading = true;
  REQUIRE(h.run_until([&] { return stuck.received.size() >= kRequests * nbd::kSimpleReplySize; }, 20000ms));
  CHECK(stuck.received.size() == kRequests * nbd::kSimpleReplySize);
  for (std::uint64_t i = 0; i < kRequests; ++i) {
    auto r = parse_simple(stuck.pop(nbd::kSimpleReplySize));
    CHECK(r.error == 0);
    if (r.cookie != i) {
      FAIL_CHECK("reply " << i << " has cookie " << r.cookie);
      break;
    }
  }
}

TEST_CASE("session isolation: replies waiting behind a slow stream count against the output backlog") {
  // Each READ that completes behind an open stream is copied out of the data
  // area and gives its share back; without a bound on those copies a client
  // could make the proxy buffer without limit while one piece is slow.
  Harness h;
  h.auto_answer = false;
  SessionLimits limits;
  limits.output_backlog = 16 << 10;
  limits.entry_share = 8;
  Client& c = h.connect(h.info(), false, limits);
  const std::uint32_t piece = h.engine->max_piece();
  c.request(nbd::kCmdRead, 1, 0, 2 * piece);  // the stream
  constexpr std::uint64_t kReads = 200;
  for (std::uint64_t i = 0; i < kReads; ++i) c.request(nbd::kCmdRead, 10 + i, (i % 64) * 4096, 4096);
  REQUIRE(h.run_until([&] { return h.handler.pending.size() >= 2; }));
  h.handler.answer_at(0);  // the stream opens; its second piece stays with the backend
  h.turns(3);
  const SubmissionEntry slow = h.handler.pending.front();
  h.handler.pending.pop_front();
  for (int round = 0; round < 100; ++round) {
    h.handler.answer_all();
    h.turns(2);
  }
  // What the session took while the stream was open is bounded by the
  // backlog (in 4 KiB replies) and its entry share, not by what was sent.
  const std::size_t taken = count_op(h.handler, Op::Read);
  CHECK(taken <= 2 + (16 << 10) / 4096 + 1 + 8);
  CHECK_FALSE(c.session->wants_read());

  h.handler.answer(slow);
  h.auto_answer = true;
  auto first = h.receive_simple(c);
  CHECK(first.cookie == 1);
  CHECK(h.receive(c, 2 * piece) == h.disk(0, 2 * piece));
  std::vector<bool> seen(kReads, false);
  for (std::uint64_t i = 0; i < kReads; ++i) {
    auto reply = h.receive_simple(c);
    REQUIRE(reply.cookie >= 10);
    REQUIRE(reply.cookie < 10 + kReads);
    CHECK_FALSE(seen[reply.cookie - 10]);
    seen[reply.cookie - 10] = true;
    CHECK(h.receive(c, 4096) == h.disk(((reply.cookie - 10) % 64) * 4096, 4096));
  }
  CHECK(h.run_until([&] { return h.engine_idle(); }));
}

TEST_CASE("session isolation: a WRITE payload already announced is received while replies are held over the backlog") {
  // A slow piece of an open stream holds every other reply; a client that is
  // sending a WRITE payload meanwhile must not be stopped half-way (and then
  // dropped by payload_timeout): the payload goes into its share, not the
  // output backlog, and the client may well read nothing until it is sent.
  Harness h;
  h.auto_answer = false;
  SessionLimits limits;
  limits.output_backlog = 16 << 10;
  limits.payload_timeout = 500ms;
  Client& c = h.connect(h.info(), false, limits);
  const std::uint32_t piece = h.engine->max_piece();
  c.request(nbd::kCmdRead, 1, 0, 2 * piece);  // the stream
  for (std::uint64_t i = 0; i < 10; ++i) c.request(nbd::kCmdRead, 10 + i, i * 4096, 4096);
  const Bytes data = pattern(piece, 21);
  c.request(nbd::kCmdWrite, 2, 8 * piece, piece, 0, Bytes(data.begin(), data.begin() + 1000));
  REQUIRE(h.run_until([&] { return h.handler.pending.size() == 12; }));
  h.handler.answer_at(0);  // the stream opens
  h.turns(3);
  while (h.handler.pending.size() > 1) {  // the small READs: held, over the backlog
    h.handler.answer_at(1);
    h.turns(2);
  }
  wire::send_bytes(c.pair.client, Bytes(data.begin() + 1000, data.end()));
  REQUIRE(h.run_until([&] { return h.handler.pending.size() == 2 || c.session->closed(); }, 2000ms));
  h.turns(20);
  REQUIRE_FALSE(c.session->closed());
  h.handler.answer_all();  // the stream's last piece, then the WRITE
  auto first = h.receive_simple(c);
  CHECK(first.cookie == 1);
  CHECK(h.receive(c, 2 * piece) == h.disk(0, 2 * piece));
  for (int i = 0; i < 11; ++i) {
    auto reply = h.receive_simple(c);
    CHECK(reply.error == 0);
    if (reply.cookie >= 10) h.receive(c, 4096);
  }
  CHECK(h.disk(8 * piece, piece) == data);
  CHECK(h.run_until([&] { return h.engine_idle(); }));
}

TEST_CASE("session isolation: a WRITE payload that stops arriving ends the connection after payload_timeout") {
  Harness h;
  SessionLimits limits;
  limits.payload_timeout = 300ms;
  Client& stalled = h.connect(h.info(), false, limits);
  Client& other = h.connect(h.info(), false, limits);
  // Header and part of a 128 KiB payload, then nothing.
  stalled.request(nbd::kCmdWrite, 1, 0, 131072, 0, pattern(10000, 3));
  h.turns(10);
  CHECK_FALSE(stalled.session->closed());
  CHECK(h.engine->outstanding() > 0);  // its share holds an extent

  // Others are served meanwhile.
  other.request(nbd::kCmdWrite, 2, 65536 * 4, 8192, 0, pattern(8192, 4));
  CHECK(h.receive_simple(other).cookie == 2);

  const auto start = Clock::now();
  REQUIRE(h.run_until([&] { return stalled.session->closed(); }, 10000ms));
  const auto waited = Clock::now() - start;
  CHECK(waited < 5000ms);
  CHECK(h.run_until([&] { return stalled.eof; }));
  CHECK(stalled.received.empty());
  CHECK(stalled.on_closed_called);
  CHECK(stalled.session->finished());
  CHECK(h.engine_idle());  // its extents are released
  CHECK(count_op(h.handler, Op::Write) == 1);  // the partial WRITE never reached the backend
  CHECK(h.disk(0, 10000) != pattern(10000, 3));
}

TEST_CASE("session isolation: a client that takes no reply bytes is dropped after reply_timeout; a slow reader is not") {
  Harness h;
  SessionLimits limits;
  limits.reply_timeout = 300ms;
  Client& slow = h.connect(h.info(), false, limits);
  Client& stopped = h.connect(h.info(), false, limits);
  slow.reading = stopped.reading = false;
  // 1 MiB of replies each: several times what a socket buffer holds.
  constexpr std::uint32_t kReads = 16, kLength = 65536;
  for (std::uint32_t i = 0; i < kReads; ++i) {
    slow.request(nbd::kCmdRead, 100 + i, i * kLength, kLength);
    stopped.request(nbd::kCmdRead, 200 + i, i * kLength, kLength);
  }
  const std::size_t all = kReads * (nbd::kSimpleReplySize + kLength);
  const auto start = Clock::now();
  auto last_read = start;
  Clock::duration stopped_after{};
  // The slow client takes 32 KiB every 100 ms: it takes three seconds over
  // its replies, ten times the deadline, but never stops for as long.
  REQUIRE(h.run_until(
      [&] {
        const auto now = Clock::now();
        if (stopped.session->closed() && stopped_after == Clock::duration{}) stopped_after = now - start;
        if (now - last_read >= 100ms) {
          last_read = now;
          std::uint8_t buffer[32768];
          const ssize_t n = ::recv(slow.pair.client, buffer, sizeof buffer, MSG_DONTWAIT);
          if (n > 0) slow.received.insert(slow.received.end(), buffer, buffer + n);
        }
        return slow.received.size() >= all && stopped.session->closed();
      },
      15000ms));
  CHECK_FALSE(slow.session->closed());
  CHECK(stopped_after > 300ms);
  CHECK(stopped_after < 3000ms);
  CHECK(Clock::now() - start > 1000ms);  // the slow reader really was slow
  for (std::uint32_t i = 0; i < kReads; ++i) {
    auto reply = parse_simple(slow.pop(nbd::kSimpleReplySize));
    CHECK(reply.error == 0);
    CHECK(slow.pop(kLength) == h.disk((reply.cookie - 100) * kLength, kLength));
  }
  CHECK(stopped.on_closed_called);
  CHECK(h.run_until([&] { return h.engine_idle(); }));  // the dropped client's extents are back
}

TEST_CASE("session: a READ completed but not sent when the channel is lost is read again, never sent from the lost area") {
  // This proxy was paused past dead-after with READ replies still queued
  // (the client was slow): the channel was reclaimed and claimed by another
  // compute node, which fills the data area with its own bytes.  When this
  // proxy resumes, no byte of that area may reach its client; the READs
  // run again on the replacement channel and the client gets the disk's data.
  Harness h;
  Client& c = h.connect(h.info(), false);
  c.reading = false;
  // More than the socket buffer and the connection's share of the data
  // area hold: replies wait in the output queue, straight from their extents.
  constexpr std::uint32_t kReads = 32, kLength = 16384;
  for (std::uint32_t i = 0; i < kReads; ++i) c.request(nbd::kCmdRead, 10 + i, i * kLength, kLength);
  REQUIRE(h.run_until([&] { return c.session->wants_write() && h.engine->in_flight() == 0; }));
  h.turns(5);
  REQUIRE(c.session->wants_write());  // replies wait in its output queue

  // Reclaimed and claimed by another node, which writes its own data.
  ChannelControl& control = h.transport.channel_control(0);
  REQUIRE(reclaim(control.header, load_acquire(control.header.state)));
  REQUIRE(try_claim(control.header, 3));
  Channel theirs(h.transport, 0);
  std::memset(theirs.data(0, theirs.data_size()), 0xbb, theirs.data_size());

  // The proxy resumes and the client reads: only what was on the socket
  // before the loss arrives, nothing from the lost area.
  c.poll();
  const std::size_t before_loss = c.received.size();
  for (int i = 0; i < 20; ++i) {
    c.session->flush_output();
    c.poll();
  }
  CHECK(c.received.size() == before_loss);
  CHECK_FALSE(c.session->closed());

  // The watcher moves the entries to a fresh channel with its own handler.
  auto word = try_claim(h.transport.channel_control(1).header, kNoSlot);
  REQUIRE(word);
  auto replacement =
      std::make_unique<ChannelEngine>(h.transport, SlotClaim(&h.transport.channel_control(1).header, 1, *word));
  replacement->adopt_outstanding(*h.engine);
  DiskHandler second(h.transport, 1, h.handler.disk.size());
  second.disk = h.handler.disk;
  REQUIRE(replacement->begin_setup(Binding{0, 0, 1}));
  second.attach();
  REQUIRE(replacement->poll_attached());
  h.engine = std::move(replacement);  // what the queue loop's Replace does

  const std::size_t all = kReads * (nbd::kSimpleReplySize + kLength);
  const auto deadline = Clock::now() + 5000ms;
  while (c.received.size() < all && Clock::now() < deadline) {
    if (c.session->wants_read() || c.session->intake_stalled()) c.session->pump_input();
    h.engine->publish();
    second.take();
    second.answer_all();
    h.engine->reap(NbdSession::dispatch);
    c.session->flush_output();
    c.poll();
  }
  REQUIRE(c.received.size() == all);
  CHECK_FALSE(c.session->closed());
  for (std::uint32_t i = 0; i < kReads; ++i) {
    auto reply = parse_simple(c.pop(nbd::kSimpleReplySize));
    CHECK(reply.error == 0);
    REQUIRE(reply.cookie >= 10);
    CHECK(c.pop(kLength) == h.disk((reply.cookie - 10) * kLength, kLength));
  }
  CHECK(h.engine->outstanding() == 0);
}

TEST_CASE("session: after DISC the replies in flight still go out, then the connection closes") {
  Harness h;
  h.auto_answer = false;
  Client& c = h.connect(h.info(), true);
  c.request(nbd::kCmdRead, 1, 0, 4096);
  c.request(nbd::kCmdWrite, 2, 8192, 4096, 0, pattern(4096, 5));
  c.request(nbd::kCmdDisc, 3, 0, 0);
  c.request(nbd::kCmdFlush, 4, 0, 0);  // after DISC: never taken
  REQUIRE(h.run_until([&] { return h.handler.pending.size() == 2; }));
  h.turns(10);
  CHECK_FALSE(c.session->closed());
  CHECK_FALSE(c.eof);
  h.handler.answer_all();
  REQUIRE(h.run_until([&] { return c.eof; }));
  CHECK(c.session->finished());
  auto chunk = parse_chunk(c.pop(nbd::kChunkHeaderSize));
  CHECK(chunk.cookie == 1);
  CHECK(chunk.flags == nbd::kReplyFlagDone);
  c.pop(8 + 4096);
  auto write = parse_simple(c.pop(nbd::kSimpleReplySize));
  CHECK(write.cookie == 2);
  CHECK(c.received.empty());
  CHECK(h.handler.seen.size() == 2);
  CHECK(h.engine_idle());
}

TEST_CASE("session: the drain timeout bounds how long replies wait after DISC or a stop") {
  Harness h;
  SessionLimits limits;
  limits.drain_timeout = 300ms;

  SUBCASE("a client that disconnects and never reads") {
    Client& c = h.connect(h.info(), false, limits);
    c.reading = false;
    int small = 4096;
    REQUIRE(::setsockopt(c.session->out_fd(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small) == 0);
    // Few enough that DISC is taken behind them (the data area holds them all).
    for (std::uint64_t i = 0; i < 3; ++i) c.request(nbd::kCmdRead, i, i * 65536, 65536);
    c.request(nbd::kCmdDisc, 99, 0, 0);
    const auto start = Clock::now();
    REQUIRE(h.run_until([&] { return c.session->closed(); }, 10000ms));
    CHECK(Clock::now() - start < 5000ms);
    CHECK(h.run_until([&] { return c.session->finished() && h.engine_idle(); }));
  }
  SUBCASE("a stop while the backend holds a request") {
    h.auto_answer = false;
    Client& c = h.connect(h.info(), false, limits);
    c.request(nbd::kCmdRead, 1, 0, 4096);
    REQUIRE(h.run_until([&] { return h.handler.pending.size() == 1; }));
    c.session->begin_drain();
    const auto start = Clock::now();
    REQUIRE(h.run_until([&] { return c.session->closed(); }, 10000ms));
    CHECK(Clock::now() - start >= 250ms);
    CHECK(Clock::now() - start < 5000ms);
    CHECK(h.run_until([&] { return c.eof; }));
    CHECK_FALSE(c.session->finished());  // its entry is still in the channel
    h.handler.answer_all();              // it completes into the void
    CHECK(h.run_until([&] { return c.session->finished() && h.engine_idle(); }));
    CHECK(c.received.empty());
  }
}

TEST_CASE("session: invalid requests are refused in nbdkit's order, without reaching the channel") {
  Harness h(1 << 20);
  const std::uint64_t size = 1 << 20;
  struct Case {
    const char* what;
    std::uint32_t caps;
    bool structured;
    std::uint16_t type;
    std::uint16_t flags;
    std::uint64_t offset;
    std::uint32_t length;
    std::uint32_t error;
  };
  const std::uint32_t all = wire::kAllCaps;
  const Case cases[] = {
      {"read-only before range", all | kCapReadOnly, false, nbd::kCmdWrite, 0, size, 4096, nbd::kErrPerm},
      {"read-only TRIM", all | kCapReadOnly, false, nbd::kCmdTrim, 0, 0, 4096, nbd::kErrPerm},
      {"WRITE past the end", all, false, nbd::kCmdWrite, 0, size - 512, 4096, nbd::kErrNoSpc},
      {"range before flags", all, false, nbd::kCmdWrite, 0x8000, size, 4096, nbd::kErrNoSpc},
      {"WRITE_ZEROES past the end", all, false, nbd::kCmdWriteZeroes, 0, size, 1, nbd::kErrNoSpc},
      {"READ past the end", all, false, nbd::kCmdRead, 0, size, 1, nbd::kErrInval},
      {"offset + length wraps", all, false, nbd::kCmdRead, 0, ~std::uint64_t{0} - 10, 4096, nbd::kErrInval},
      {"unknown flag", all, false, nbd::kCmdRead, 0x8000, 0, 4096, nbd::kErrInval},
      {"NO_HOLE on READ", all, false, nbd::kCmdRead, nbd::kCmdFlagNoHole, 0, 4096, nbd::kErrInval},
      {"DF without structured replies", all, false, nbd::kCmdRead, nbd::kCmdFlagDf, 0, 4096, nbd::kErrInval},
      {"REQ_ONE on READ", all, false, nbd::kCmdRead, nbd::kCmdFlagReqOne, 0, 4096, nbd::kErrInval},
      {"FUA not advertised", all & ~kCapFua, false, nbd::kCmdWrite, nbd::kCmdFlagFua, 0, 4096, nbd::kErrInval},
      {"FAST_ZERO not advertised", all & ~kCapFastZero, false, nbd::kCmdWriteZeroes, nbd::kCmdFlagFastZero, 0, 4096,
       nbd::kErrInval},
      {"TRIM not advertised", all & ~kCapTrim, false, nbd::kCmdTrim, 0, 0, 4096, nbd::kErrInval},
      {"FLUSH with a length", all, false, nbd::kCmdFlush, 0, 0, 1, nbd::kErrInval},
      {"unknown command", all, false, 42, 0, 0, 4096, nbd::kErrInval},
      {"BLOCK_STATUS without structured replies", all, false, nbd::kCmdBlockStatus, 0, 0, 4096, nbd::kErrInval},
      {"zero-length BLOCK_STATUS", all, true, nbd::kCmdBlockStatus, 0, 0, 0, nbd::kErrInval},
  };
  for (const Case& k : cases) {
    const std::string what = k.what;
    CAPTURE(what);
    Client& c = h.connect(h.info(k.caps), k.structured);
    const bool payload = k.type == nbd::kCmdWrite;
    c.request(k.type, 77, k.offset, k.length, k.flags, payload ? Bytes(k.length, 0xee) : Bytes{});
    if (k.structured) {
      auto chunk = h.receive_chunk(c);
      CHECK(chunk.type == nbd::kReplyTypeError);
      CHECK(chunk.cookie == 77);
      REQUIRE(chunk.length == 6);
      CHECK(nbd::load_be32(h.receive(c, 6).data()) == k.error);
    } else {
      auto reply = h.receive_simple(c);
      CHECK(reply.magic == nbd::kSimpleReplyMagic);
      CHECK(reply.cookie == 77);
      CHECK(reply.error == k.error);
    }
    // In step: the next request is served.
    c.request(nbd::kCmdFlush, 78, 0, 0);
    auto next = h.receive_simple(c);
    CHECK(next.cookie == 78);
    CHECK(next.error == 0);
  }
  CHECK(count_op(h.handler, Op::Flush) == std::size(cases));  // only the follow-up FLUSHes
  CHECK(h.handler.seen.size() == std::size(cases));
}

TEST_CASE("session: a request with a bad magic ends the connection") {
  Harness h;
  Client& c = h.connect(h.info(), false);
  Bytes bad(nbd::kRequestSize, 0);
  nbd::encode_request(bad.data(), nbd::Request{0x12345678, 0, nbd::kCmdRead, 1, 0, 4096});
  wire::send_bytes(c.pair.client, bad);
  REQUIRE(h.run_until([&] { return c.eof; }));
  CHECK(c.received.empty());
  CHECK(c.on_closed_called);
  CHECK(h.handler.seen.empty());
}

TEST_CASE("session: a client that sends part of a header and closes is seen to close in one pass") {
  // Readiness is edge-triggered: the event loop calls pump_input() once for
  // the edge that brought both the 8 bytes and the end of file, and no
  // further edge will come.  That one pass must see the end.
  Harness h;
  Client& c = h.connect(h.info(), false);
  Bytes header(nbd::kRequestSize);
  nbd::encode_request(header.data(), nbd::Request{nbd::kRequestMagic, 0, nbd::kCmdRead, 1, 0, 4096});
  header.resize(8);
  wire::send_bytes(c.pair.client, header);
  REQUIRE(::shutdown(c.pair.client, SHUT_WR) == 0);
  c.session->pump_input();
  CHECK(c.session->closed());
  CHECK(h.handler.seen.empty());
}

TEST_CASE("session: misaligned requests are EINVAL once the client agreed to the block size; the tail stays reachable") {
  Harness h((1 << 20) + 512);
  ExportInfo info = h.info();
  info.block_min = 4096;
  Client& c = h.connect(info, false, {}, true);
  c.request(nbd::kCmdRead, 1, 512, 4096);
  CHECK(h.receive_simple(c).error == nbd::kErrInval);
  c.request(nbd::kCmdRead, 2, 0, 1000);
  CHECK(h.receive_simple(c).error == nbd::kErrInval);
  c.request(nbd::kCmdRead, 3, 1 << 20, 512);  // the unaligned tail
  CHECK(h.receive_simple(c).error == 0);
  CHECK(h.receive(c, 512) == h.disk(1 << 20, 512));
  CHECK(h.handler.seen.size() == 1);
}

TEST_CASE("session: zero-length requests succeed at once without an entry") {
  Harness h;
  SUBCASE("simple replies") {
    Client& c = h.connect(h.info(), false);
    c.request(nbd::kCmdRead, 1, 0, 0);
    c.request(nbd::kCmdWrite, 2, 4096, 0);
    c.request(nbd::kCmdTrim, 3, 0, 0);
    c.request(nbd::kCmdWriteZeroes, 4, 0, 0);
    c.request(nbd::kCmdCache, 5, 0, 0);
    c.request(nbd::kCmdRead, 6, 0, 0, nbd::kCmdFlagFua);
    for (std::uint64_t cookie = 1; cookie <= 6; ++cookie) {
      auto reply = h.receive_simple(c);
      CHECK(reply.cookie == cookie);
      CHECK(reply.error == 0);
    }
  }
  SUBCASE("a structured READ of zero bytes is one NONE chunk with DONE") {
    Client& c = h.connect(h.info(), true);
    c.request(nbd::kCmdRead, 9, 0, 0);
    auto chunk = h.receive_chunk(c);
    CHECK(chunk.type == nbd::kReplyTypeNone);
    CHECK(chunk.flags == nbd::kReplyFlagDone);
    CHECK(chunk.cookie == 9);
    CHECK(chunk.length == 0);
  }
  h.turns(5);
  CHECK(h.handler.seen.empty());
}

TEST_CASE("session: a WRITE above the largest payload is EINVAL with its payload dropped; above the skip limit the "
          "connection ends") {
  Harness h(64u << 20);
  SUBCASE("dropped, then the connection goes on") {
    Client& c = h.connect(h.info(), false);
    const std::uint32_t length = nbd::kMaxPayload + 4096;
    std::thread sender([&] { c.request(nbd::kCmdWrite, 1, 0, length, 0, Bytes(length, 0xab)); });
    auto reply = h.receive_simple(c);
    sender.join();
    CHECK(reply.cookie == 1);
    CHECK(reply.error == nbd::kErrInval);
    c.request(nbd::kCmdRead, 2, 0, 4096);
    auto next = h.receive_simple(c);
    CHECK(next.cookie == 2);
    CHECK(next.error == 0);
    CHECK(h.receive(c, 4096) == h.disk(0, 4096));
    CHECK(count_op(h.handler, Op::Write) == 0);
    CHECK(h.disk(0, 4096) != Bytes(4096, 0xab));
  }
  SUBCASE("too large to skip: the connection ends") {
    Client& c = h.connect(h.info(), false);
    c.request(nbd::kCmdWrite, 1, 0, nbd::kMaxDiscardablePayload + 1);
    REQUIRE(h.run_until([&] { return c.eof; }));
    CHECK(c.session->closed());
    CHECK(c.received.empty());
    CHECK(h.handler.seen.empty());
  }
}

// (ESHUTDOWN is not among them: from a stopping backend it means "not run",
// and the entry waits for the next instance; docs/design.md §5.)
TEST_CASE("session: a backend's errno reaches the client as its NBD error value") {
  struct Case {
    const char* what;
    int status;
    std::uint16_t type;
    std::uint16_t flags;
    std::uint32_t wire;
  };
  const Case cases[] = {
      {"EIO", EIO, nbd::kCmdWrite, 0, nbd::kErrIo},
      {"ENOSPC", ENOSPC, nbd::kCmdWrite, 0, nbd::kErrNoSpc},
      {"EPERM", EPERM, nbd::kCmdTrim, 0, nbd::kErrPerm},
      {"ENOMEM", ENOMEM, nbd::kCmdFlush, 0, nbd::kErrNoMem},
      {"EDQUOT", EDQUOT, nbd::kCmdWriteZeroes, 0, nbd::kErrNoSpc},
      {"ENOTSUP for a fast zero", ENOTSUP, nbd::kCmdWriteZeroes, nbd::kCmdFlagFastZero, nbd::kErrNotSup},
      {"ENOTSUP otherwise is EINVAL", ENOTSUP, nbd::kCmdWriteZeroes, 0, nbd::kErrInval},
      {"an errno NBD has no value for is EIO", ENOENT, nbd::kCmdFlush, 0, nbd::kErrIo},
  };
  for (const Case& test : cases) {
    const std::string what = test.what;
    CAPTURE(what);
    Harness h;
    Client& c = h.connect(h.info(), false);
    const int status = test.status;
    h.handler.tamper = [status](const SubmissionEntry&, CompletionEntry& done) {
      done.status = status;
      done.result_length = 0;
    };
    const std::uint32_t length = test.type == nbd::kCmdFlush ? 0 : 4096;
    c.request(test.type, 1, 0, length, test.flags, test.type == nbd::kCmdWrite ? Bytes(length, 1) : Bytes{});
    auto reply = h.receive_simple(c);
    CHECK(reply.cookie == 1);
    CHECK(reply.error == test.wire);
    h.handler.tamper = nullptr;
    CHECK(h.run_until([&] { return h.engine_idle(); }));
  }
}
