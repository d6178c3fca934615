// The per-queue event loop with real NBD sockets (socketpairs, simple
// replies) in front and a handler thread behind a real channel in /dev/shm:
// splitting and reassembly, back-pressure, re-drive after a backend change,
// failing and resuming, a scribbled completion ring, moving outstanding
// entries to a new channel after ours was reclaimed, isolation between the
// connections of one queue, and a bounded stop.
#include <doctest/doctest.h>

#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "client/nbd_handshake.hpp"
#include "client/nbd_protocol.hpp"
#include "client/queue_loop.hpp"
#include "client/socket_io.hpp"
#include "common/shared_atomic.hpp"
#include "fake_handler.hpp"
#include "shm_fixture.hpp"

using namespace cbd;
using namespace cbd::proxy;
using cbd::test::FakeHandler;

namespace {

using Clock = std::chrono::steady_clock;

struct Reply {
  std::uint32_t error = 0;
  std::uint64_t cookie = 0;
  std::vector<std::byte> data;
};

// The client end of one connection served by the loop (simple replies).
class Client {
 public:
  Client() {
    int fds[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
    fd_ = fds[0];
    server_ = fds[1];
    timeval timeout{10, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  }
  ~Client() {
    if (fd_ >= 0) ::close(fd_);
    if (server_ >= 0) ::close(server_);
  }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Hands the server end to `loop`.
  void attach(QueueLoop& loop, const ExportInfo& info) {
    AdoptedConnection connection;
    connection.socket.reset(server_);
    connection.in_fd = connection.out_fd = server_;
    server_ = -1;
    connection.negotiated.enter_transmission = true;
    connection.negotiated.transmission_flags = transmission_flags_for(info, false);
    connection.on_closed = [this] { closed_.store(true); };
    loop.adopt(std::move(connection));
  }
  bool closed() const { return closed_.load(); }
  int fd() const { return fd_; }

  void request(std::uint16_t type, std::uint64_t cookie, std::uint64_t offset, std::uint32_t length) {
    std::uint8_t header[nbd::kRequestSize];
    nbd::Request wire{};
    wire.magic = nbd::kRequestMagic;
    wire.type = type;
    wire.cookie = cookie;
    wire.offset = offset;
    wire.length = length;
    nbd::encode_request(header, wire);
    REQUIRE(send_all(fd_, true, header, sizeof header));
  }
  void payload(const std::vector<std::byte>& data) { REQUIRE(send_all(fd_, true, data.data(), data.size())); }
  // One simple reply; `read_lengths` says how much data a READ cookie carries.
  std::optional<Reply> reply(const std::map<std::uint64_t, std::uint32_t>& read_lengths = {}) {
    std::uint8_t header[nbd::kSimpleReplySize];
    if (recv_exact(fd_, header, sizeof header) != RecvStatus::Ok) return std::nullopt;
    Reply reply;
    if (nbd::load_be32(header) != nbd::kSimpleReplyMagic) return std::nullopt;
    reply.error = nbd::load_be32(header + 4);
    reply.cookie = nbd::load_be64(header + 8);
    auto read = read_lengths.find(reply.cookie);
    if (reply.error == 0 && read != read_lengths.end()) {
      reply.data.resize(read->second);
      if (recv_exact(fd_, reply.data.data(), reply.data.size()) != RecvStatus::Ok) return std::nullopt;
    }
    return reply;
  }

 private:
  int fd_ = -1;
  int server_ = -1;
  std::atomic<bool> closed_{false};
};

struct LoopFixture {
  test::ShmFile file{"loop"};
  Transport transport;
  std::vector<std::byte> disk;
  ExportInfo info;
  std::uint64_t claimed_word = 0;
  std::unique_ptr<QueueLoop> loop;

  explicit LoopFixture(std::uint64_t data_size = 256 << 10, QueueLoopOptions options = {})
      : transport(make(file, data_size)), disk(8 << 20) {
    std::mt19937 random(7);
    for (auto& b : disk) b = static_cast<std::byte>(random());
    info.size = disk.size() + (1 << 20);  // beyond the handler's disk: its errors reach clients
    info.caps = kCapFlush | kCapTrim | kCapZero;
    auto word = try_claim(transport.channel_control(0).header, kNoSlot);
    REQUIRE(word);
    claimed_word = *word;
    auto engine =
        std::make_unique<ChannelEngine>(transport, SlotClaim(&transport.channel_control(0).header, 0, *word));
    options.spin_us = 20;
    loop = std::make_unique<QueueLoop>(std::move(engine), info, options);
  }
  static Transport make(const test::ShmFile& file, std::uint64_t data_size) {
    FormatOptions options = test::small_options();
    options.data_size = data_size;
    return test::make_transport(file, options, 32 << 20);
  }
  // Sets up for `epoch` and waits for the attach.
  void set_up(std::uint64_t epoch) {
    loop->set_up(Binding{0, 0, epoch});
    wait_attached();
  }
  void wait_attached() {
    for (int i = 0; i < 2000 && !loop->attached(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    REQUIRE(loop->attached());
  }
  std::vector<std::byte> expected(std::uint64_t offset, std::uint32_t length) const {
    return {disk.begin() + static_cast<std::ptrdiff_t>(offset),
            disk.begin() + static_cast<std::ptrdiff_t>(offset + length)};
  }
};

std::vector<std::byte> random_bytes(std::size_t length, unsigned seed) {
  std::vector<std::byte> bytes(length);
  std::mt19937 random(seed);
  for (auto& b : bytes) b = static_cast<std::byte>(random());
  return bytes;
}

}  // namespace

TEST_CASE("queue loop: a READ larger than the data area arrives whole and in order") {
  LoopFixture f(64 << 10);  // pieces of 16 KiB
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  Client client;
  client.attach(*f.loop, f.info);
  const std::uint32_t length = 3 << 20;
  client.request(nbd::kCmdRead, 1, 4096, length);
  auto reply = client.reply({{1, length}});
  REQUIRE(reply);
  CHECK(reply->error == 0);
  CHECK(reply->data == f.expected(4096, length));
  CHECK(handler.largest_entry <= (64u << 10));
}

TEST_CASE("queue loop: a WRITE payload is received across pieces, then reads back") {
  LoopFixture f(64 << 10);
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  Client client;
  client.attach(*f.loop, f.info);
  const auto payload = random_bytes(1000000 + 3, 11);
  const auto length = static_cast<std::uint32_t>(payload.size());
  std::thread writer([&] {
    client.request(nbd::kCmdWrite, 2, 777, length);
    client.payload(payload);
  });
  auto reply = client.reply();
  writer.join();
  REQUIRE(reply);
  CHECK(reply->cookie == 2);
  CHECK(reply->error == 0);
  client.request(nbd::kCmdRead, 3, 777, length);
  auto back = client.reply({{3, length}});
  REQUIRE(back);
  CHECK(back->data == payload);
}

TEST_CASE("queue loop: many connections through a tiny data area all complete (back-pressure, no error)") {
  LoopFixture f(64 << 10);
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  constexpr int kConnections = 4;
  constexpr int kRequests = 50;
  Client clients[kConnections];
  for (auto& client : clients) client.attach(*f.loop, f.info);
  std::vector<std::thread> threads;
  std::atomic<int> good{0};
  for (int t = 0; t < kConnections; ++t) {
    threads.emplace_back([&, t] {
      std::map<std::uint64_t, std::uint32_t> lengths;
      // Pipelined: every request first, then every reply (in any order).
      for (int i = 0; i < kRequests; ++i) {
        const std::uint32_t length = i % 3 == 0 ? 40000 : 4096;
        lengths[static_cast<std::uint64_t>(i)] = length;
        clients[t].request(nbd::kCmdRead, static_cast<std::uint64_t>(i), static_cast<std::uint64_t>(i) * 4096, length);
      }
      for (int i = 0; i < kRequests; ++i) {
        auto reply = clients[t].reply(lengths);
        if (!reply || reply->error) return;
        if (reply->data != f.expected(reply->cookie * 4096, lengths[reply->cookie])) return;
        ++good;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(good == kConnections * kRequests);
}

TEST_CASE("queue loop: errors from the handler reach the client") {
  LoopFixture f;
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  Client client;
  client.attach(*f.loop, f.info);
  client.request(nbd::kCmdRead, 5, f.disk.size(), 4096);
  auto failed = client.reply({{5, 4096}});
  REQUIRE(failed);
  CHECK(failed->cookie == 5);
  CHECK(failed->error == nbd::kErrInval);
}

TEST_CASE("queue loop: outstanding entries are re-driven when a new backend epoch takes over") {
  LoopFixture f;
  std::optional<FakeHandler> old_backend;
  old_backend.emplace(f.transport, 0, f.disk, 1);
  f.set_up(1);
  old_backend->pause = true;  // hangs: entries sit in the ring
  Client client;
  client.attach(*f.loop, f.info);
  std::map<std::uint64_t, std::uint32_t> lengths;
  for (std::uint64_t cookie = 10; cookie < 20; ++cookie) {
    client.request(nbd::kCmdRead, cookie, cookie * 4096, 8192);
    lengths[cookie] = 8192;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  CHECK(f.loop->outstanding() == 10);
  old_backend.reset();  // dies with the entries unserved
  FakeHandler new_backend(f.transport, 0, f.disk, 2);
  f.loop->set_up(Binding{0, 0, 2});
  for (int i = 0; i < 10; ++i) {
    auto reply = client.reply(lengths);
    REQUIRE(reply);
    CHECK(reply->error == 0);
    CHECK(reply->data == f.expected(reply->cookie * 4096, 8192));
  }
  CHECK(f.loop->attached());
}

TEST_CASE("queue loop: fail_outstanding() answers EIO, new requests too, until the next set-up attaches") {
  LoopFixture f;
  std::optional<FakeHandler> backend;
  backend.emplace(f.transport, 0, f.disk, 1);
  f.set_up(1);
  backend->pause = true;
  Client client;
  client.attach(*f.loop, f.info);
  client.request(nbd::kCmdRead, 30, 0, 4096);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  backend.reset();
  f.loop->fail_outstanding(EIO);
  auto failed = client.reply({{30, 4096}});
  REQUIRE(failed);
  CHECK(failed->error == nbd::kErrIo);
  client.request(nbd::kCmdRead, 31, 0, 4096);
  auto also = client.reply({{31, 4096}});
  REQUIRE(also);
  CHECK(also->error == nbd::kErrIo);
  // A refused WRITE still consumes its payload: the next request is in step.
  client.request(nbd::kCmdWrite, 32, 0, 5000);
  client.payload(std::vector<std::byte>(5000, std::byte{0x5a}));
  auto write = client.reply();
  REQUIRE(write);
  CHECK(write->cookie == 32);
  CHECK(write->error == nbd::kErrIo);
  CHECK_FALSE(f.loop->attached());
  FakeHandler returned(f.transport, 0, f.disk, 3);
  f.set_up(3);
  client.request(nbd::kCmdRead, 33, 0, 4096);
  auto served = client.reply({{33, 4096}});
  REQUIRE(served);
  CHECK(served->error == 0);
  CHECK(served->data == f.expected(0, 4096));
}

TEST_CASE("queue loop: an impossible completion ring index: the channel is set up again and re-driven, no hang") {
  LoopFixture f;
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  handler.pause = true;
  Client client;
  client.attach(*f.loop, f.info);
  std::map<std::uint64_t, std::uint32_t> lengths;
  for (std::uint64_t cookie = 40; cookie < 48; ++cookie) {
    client.request(nbd::kCmdRead, cookie, cookie * 4096, 4096);
    lengths[cookie] = 4096;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const std::uint64_t generation = load_acquire(f.transport.channel_control(0).generation);
  store_release(f.transport.channel_control(0).cq_tail.value, 0x80000000u);  // a hostile peer
  for (int i = 0; i < 500 && load_acquire(f.transport.channel_control(0).generation) == generation; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(load_acquire(f.transport.channel_control(0).generation) != generation);
  handler.pause = false;
  for (int i = 0; i < 8; ++i) {
    auto reply = client.reply(lengths);
    REQUIRE(reply);
    CHECK(reply->error == 0);
    CHECK(reply->data == f.expected(reply->cookie * 4096, 4096));
  }
}

TEST_CASE("queue loop: after our channel was reclaimed and claimed by another owner, outstanding requests move to a "
          "new channel and the other owner's channel is never written") {
  LoopFixture f;
  std::optional<FakeHandler> first;
  first.emplace(f.transport, 0, f.disk, 1);
  f.set_up(1);
  first->pause = true;  // the entries below stay in channel 0's ring
  Client client;
  client.attach(*f.loop, f.info);
  const auto payload = random_bytes(20000, 5);
  client.request(nbd::kCmdWrite, 60, 65536, static_cast<std::uint32_t>(payload.size()));
  client.payload(payload);
  client.request(nbd::kCmdRead, 61, 8192, 4096);
  // The WRITE is two entries (pieces of 16 KiB in a 256 KiB data area).
  for (int i = 0; i < 200 && f.loop->outstanding() < 3; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  REQUIRE(f.loop->outstanding() == 3);
  first.reset();

  // We were judged dead: channel 0 is reclaimed and claimed by someone else.
  ChannelControl& stolen = f.transport.channel_control(0);
  REQUIRE(reclaim(stolen.header, f.claimed_word));
  auto other = try_claim(stolen.header, 2);
  REQUIRE(other);
  store_release(stolen.generation, std::uint64_t{777});
  const std::uint64_t sq_head = load_acquire(stolen.sq_head.value);
  const std::uint64_t cq_head = load_acquire(stolen.cq_head.value);
  // A request that arrives now finds the channel gone: the loop says lost.
  client.request(nbd::kCmdRead, 62, 12288, 4096);
  for (int i = 0; i < 400 && !f.loop->lost(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  REQUIRE(f.loop->lost());

  auto word = try_claim(f.transport.channel_control(1).header, kNoSlot);
  REQUIRE(word);
  FakeHandler second(f.transport, 1, f.disk, 1);
  f.loop->replace_channel(
      std::make_unique<ChannelEngine>(f.transport, SlotClaim(&f.transport.channel_control(1).header, 1, *word)),
      Binding{0, 0, 1});
  std::map<std::uint64_t, std::uint32_t> lengths{{61, 4096}, {62, 4096}};
  for (int i = 0; i < 3; ++i) {
    auto reply = client.reply(lengths);
    REQUIRE(reply);
    CHECK(reply->error == 0);
    if (reply->cookie != 60) CHECK(reply->data == f.expected(reply->cookie == 61 ? 8192 : 12288, 4096));
  }
  CHECK(std::memcmp(f.disk.data() + 65536, payload.data(), payload.size()) == 0);
  CHECK_FALSE(f.loop->lost());
  CHECK(f.loop->attached());
  CHECK(load_acquire(stolen.header.state) == *other);
  CHECK(load_acquire(stolen.generation) == 777);
  CHECK(load_acquire(stolen.sq_head.value) == sq_head);
  CHECK(load_acquire(stolen.cq_head.value) == cq_head);
}

TEST_CASE("queue loop: a client that does not read its replies does not hold up another on the same queue") {
  LoopFixture f(4 << 20);
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  Client hog;
  hog.attach(*f.loop, f.info);
  for (std::uint64_t cookie = 0; cookie < 64; ++cookie) hog.request(nbd::kCmdRead, cookie, 0, 1 << 20);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // its replies back up
  Client other;
  other.attach(*f.loop, f.info);
  auto slowest = std::chrono::milliseconds(0);
  for (std::uint64_t cookie = 100; cookie < 120; ++cookie) {
    const auto start = Clock::now();
    other.request(nbd::kCmdRead, cookie, cookie * 4096, 4096);
    auto reply = other.reply({{cookie, 4096}});
    REQUIRE(reply);
    CHECK(reply->error == 0);
    slowest = std::max(slowest, std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start));
  }
  MESSAGE("slowest 4 KiB READ next to a non-reading client: " << slowest.count() << " ms");
  CHECK(slowest < std::chrono::milliseconds(1000));
}

TEST_CASE("queue loop: a WRITE payload that stops arriving ends only its connection, after payload_timeout") {
  QueueLoopOptions options;
  options.payload_timeout = std::chrono::milliseconds(500);
  LoopFixture f(1 << 20, options);
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  Client stalled;
  stalled.attach(*f.loop, f.info);
  stalled.request(nbd::kCmdWrite, 1, 0, 4 << 20);
  stalled.payload(std::vector<std::byte>(100000, std::byte{1}));  // then nothing
  Client other;
  other.attach(*f.loop, f.info);
  for (std::uint64_t cookie = 0; cookie < 10; ++cookie) {
    other.request(nbd::kCmdRead, cookie, 0, 65536);
    auto reply = other.reply({{cookie, 65536}});
    REQUIRE(reply);
    CHECK(reply->error == 0);
  }
  const auto start = Clock::now();
  while (!stalled.closed() && Clock::now() - start < std::chrono::seconds(10))
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(stalled.closed());
  CHECK_FALSE(other.closed());
}

TEST_CASE("queue loop: stop ends within its limit even with a client that never reads and a backend that hangs") {
  LoopFixture f(1 << 20);
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  Client hog;
  hog.attach(*f.loop, f.info);
  for (std::uint64_t cookie = 0; cookie < 32; ++cookie) hog.request(nbd::kCmdRead, cookie, 0, 1 << 20);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  handler.pause = true;
  hog.request(nbd::kCmdRead, 99, 0, 4096);
  const auto start = Clock::now();
  f.loop.reset();
  const auto took = Clock::now() - start;
  CHECK(took < QueueLoop::kStopLimit + std::chrono::seconds(2));
  CHECK(hog.closed());
}

TEST_CASE("queue loop: an adopted connection is served from its first byte, and on_closed runs once at DISC") {
  LoopFixture f;
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  std::atomic<int> closed{0};
  int fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
  timeval timeout{10, 0};
  ::setsockopt(fds[0], SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  AdoptedConnection connection;
  connection.socket.reset(fds[1]);
  connection.in_fd = connection.out_fd = fds[1];
  connection.negotiated.enter_transmission = true;
  connection.negotiated.transmission_flags = transmission_flags_for(f.info, false);
  connection.on_closed = [&] { closed.fetch_add(1); };
  f.loop->adopt(std::move(connection));
  // No greeting: the first thing on the wire is our request's reply.
  std::uint8_t request[nbd::kRequestSize];
  nbd::encode_request(request, {nbd::kRequestMagic, 0, nbd::kCmdFlush, 3, 0, 0});
  REQUIRE(send_all(fds[0], true, request, sizeof request));
  std::uint8_t reply[nbd::kSimpleReplySize];
  REQUIRE(recv_exact(fds[0], reply, sizeof reply) == RecvStatus::Ok);
  CHECK(nbd::load_be32(reply) == nbd::kSimpleReplyMagic);
  CHECK(nbd::load_be32(reply + 4) == 0);
  CHECK(nbd::load_be64(reply + 8) == 3);
  nbd::encode_request(request, {nbd::kRequestMagic, 0, nbd::kCmdDisc, 4, 0, 0});
  REQUIRE(send_all(fds[0], true, request, sizeof request));
  for (int i = 0; i < 500 && closed.load() == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(closed.load() == 1);
  for (int i = 0; i < 100 && f.loop->connections() != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(f.loop->connections() == 0);
  std::uint8_t byte;
  CHECK(::read(fds[0], &byte, 1) == 0);  // the loop closed its end
  f.loop.reset();
  CHECK(closed.load() == 1);
  ::close(fds[0]);
}

TEST_CASE("queue loop: shutdown_connections() ends connections whose peer never leaves") {
  LoopFixture f;
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  Client client;
  client.attach(*f.loop, f.info);
  f.loop->shutdown_connections();
  for (int i = 0; i < 500 && !client.closed(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(client.closed());
  std::uint8_t byte;
  CHECK(::read(client.fd(), &byte, 1) == 0);
}

TEST_CASE("queue loop: a WRITE_ZEROES larger than the data area travels without a data extent") {
  LoopFixture f;
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  Client client;
  client.attach(*f.loop, f.info);
  client.request(nbd::kCmdWriteZeroes, 3, 8192, 1 << 20);  // four times the data area
  auto zeroed = client.reply();
  REQUIRE(zeroed);
  CHECK(zeroed->error == 0);
  CHECK(std::all_of(f.disk.begin() + 8192, f.disk.begin() + 8192 + (1 << 20), [](std::byte b) { return b == std::byte{0}; }));
}

TEST_CASE("queue loop: fail_outstanding() while a WRITE payload is arriving answers that WRITE with EIO") {
  LoopFixture f;
  FakeHandler handler(f.transport, 0, f.disk, 1);
  f.set_up(1);
  handler.pause = true;  // the backend is gone: nothing it is given completes
  Client client;
  client.attach(*f.loop, f.info);
  client.request(nbd::kCmdWrite, 50, 0, 5000);
  client.payload(std::vector<std::byte>(2000, std::byte{0x33}));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the payload is being received
  f.loop->fail_outstanding(EIO);
  client.payload(std::vector<std::byte>(3000, std::byte{0x33}));
  auto reply = client.reply();
  REQUIRE(reply);
  CHECK(reply->cookie == 50);
  CHECK(reply->error == nbd::kErrIo);
}

TEST_CASE("queue loop: the lost channel claimed again by ourselves (the same data area): outstanding requests still "
          "complete with their data") {
  LoopFixture f;
  std::optional<FakeHandler> first;
  first.emplace(f.transport, 0, f.disk, 1);
  f.set_up(1);
  Client client;
  client.attach(*f.loop, f.info);
  // Two READs released in order leave entry slot 1 on top of the free
  // stack: the WRITEs below then hold slots in another order than their
  // extents' offsets, so a move into the same data area in slot order
  // would overwrite one payload with another before copying it.
  client.request(nbd::kCmdRead, 68, 0, 65536);
  client.request(nbd::kCmdRead, 69, 0, 8192);
  for (int i = 0; i < 2; ++i) REQUIRE(client.reply({{68, 65536}, {69, 8192}}));
  first->pause = true;
  const auto early = random_bytes(8192, 21);
  const auto late = random_bytes(40000, 22);
  client.request(nbd::kCmdWrite, 70, 0, static_cast<std::uint32_t>(early.size()));
  client.payload(early);
  client.request(nbd::kCmdWrite, 71, 1 << 20, static_cast<std::uint32_t>(late.size()));
  client.payload(late);
  for (int i = 0; i < 200 && f.loop->outstanding() < 4; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  REQUIRE(f.loop->outstanding() == 4);  // 1 + 3 pieces of 16 KiB
  first.reset();
  ChannelControl& control = f.transport.channel_control(0);
  REQUIRE(reclaim(control.header, f.claimed_word));
  client.request(nbd::kCmdFlush, 72, 0, 0);  // finds the channel gone
  for (int i = 0; i < 400 && !f.loop->lost(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  REQUIRE(f.loop->lost());
  auto word = try_claim(control.header, kNoSlot);
  REQUIRE(word);
  // Claimed, then the engine at once (as the blkdev does): it empties the
  // stale ring before a handler could attach to the old generation.
  auto engine = std::make_unique<ChannelEngine>(f.transport, SlotClaim(&control.header, 0, *word));
  FakeHandler again(f.transport, 0, f.disk, 1);
  f.loop->replace_channel(std::move(engine), Binding{0, 0, 1});
  for (int i = 0; i < 3; ++i) {
    auto reply = client.reply();
    REQUIRE(reply);
    CHECK(reply->error == 0);
  }
  CHECK(std::memcmp(f.disk.data(), early.data(), early.size()) == 0);
  CHECK(std::memcmp(f.disk.data() + (1 << 20), late.data(), late.size()) == 0);
}
