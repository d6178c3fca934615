// The pieces of `cbd-proxy connect device=` that run without a kernel nbd
// driver: naming the device, and a connection handed over already in the
// transmission phase, as the kernel's socket sees it (no handshake, simple
// replies).  The netlink calls themselves run in the VM tests
// (scripts/vm-test.sh --device, --devdax).
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "client/nbd_handshake.hpp"
#include "client/nbd_netlink.hpp"
#include "client/threaded_sink.hpp"
#include "common/error.hpp"
#include "nbd_test_support.hpp"

using namespace cbd;
using namespace cbd::proxy;
using namespace cbd::proxy::test;

TEST_CASE("nbd device names: /dev/nbdN, nbdN and N; anything else is refused with the expected form") {
  CHECK(parse_nbd_device("/dev/nbd0") == 0);
  CHECK(parse_nbd_device("/dev/nbd15") == 15);
  CHECK(parse_nbd_device("nbd3") == 3);
  CHECK(parse_nbd_device("7") == 7);
  CHECK(nbd_device_path(12) == "/dev/nbd12");
  for (const char* bad : {"", "/dev/nbd", "/dev/sda", "/dev/nbd0p1", "nbd-1", "/dev/nbd1234567", "/dev/nbd 1"}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH_AS(parse_nbd_device(bad), doctest::Contains("/dev/nbd0"), Error);
  }
}

namespace {

void send_request(int fd, std::uint16_t type, std::uint64_t cookie, std::uint64_t offset, std::uint32_t length) {
  Bytes raw(nbd::kRequestSize);
  nbd::encode_request(raw.data(), {nbd::kRequestMagic, 0, type, cookie, offset, length});
  send_bytes(fd, raw);
}

std::uint32_t simple_reply(int fd, std::uint64_t cookie) {
  const Bytes header = recv_bytes(fd, nbd::kSimpleReplySize);
  CHECK(nbd::load_be32(header.data()) == nbd::kSimpleReplyMagic);
  CHECK(nbd::load_be64(header.data() + 8) == cookie);
  return nbd::load_be32(header.data() + 4);
}

}  // namespace

TEST_CASE("threaded sink: an adopted connection is served from its first byte, and on_closed runs once at DISC") {
  const ExportInfo info = test_export(kAllCaps);
  auto target = std::make_shared<MemoryTarget>(info);
  ThreadedSink sink(info, [&]() -> std::shared_ptr<RequestTarget> { return target; });
  SocketPair pair;

  std::atomic<int> closed{0};
  AdoptedConnection connection;
  connection.socket.reset(pair.server);
  pair.server = -1;  // owned by the sink now
  connection.in_fd = connection.out_fd = connection.socket.get();
  connection.negotiated.enter_transmission = true;
  connection.negotiated.transmission_flags = transmission_flags_for(info, false);
  connection.on_closed = [&] { closed.fetch_add(1); };
  sink.adopt(std::move(connection));

  // No greeting: the first thing on the wire is our request's reply.
  Bytes data(4096, 0x5a);
  send_request(pair.client, nbd::kCmdWrite, 1, 8192, 4096);
  send_bytes(pair.client, data);
  CHECK(simple_reply(pair.client, 1) == 0);
  send_request(pair.client, nbd::kCmdRead, 2, 8192, 4096);
  CHECK(simple_reply(pair.client, 2) == 0);
  CHECK(recv_bytes(pair.client, 4096) == data);
  send_request(pair.client, nbd::kCmdFlush, 3, 0, 0);
  CHECK(simple_reply(pair.client, 3) == 0);

  send_request(pair.client, nbd::kCmdDisc, 4, 0, 0);
  for (int i = 0; i < 500 && closed.load() == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(closed.load() == 1);
  CHECK(peer_closed(pair.client));  // the sink closed its end
}

TEST_CASE("threaded sink: shutdown_all ends connections whose peer never leaves") {
  const ExportInfo info = test_export(kAllCaps);
  auto target = std::make_shared<MemoryTarget>(info);
  std::atomic<int> closed{0};
  SocketPair pair;
  {
    ThreadedSink sink(info, [&]() -> std::shared_ptr<RequestTarget> { return target; });
    AdoptedConnection connection;
    connection.socket.reset(pair.server);
    pair.server = -1;
    connection.in_fd = connection.out_fd = connection.socket.get();
    connection.negotiated.enter_transmission = true;
    connection.negotiated.transmission_flags = transmission_flags_for(info, false);
    connection.on_closed = [&] { closed.fetch_add(1); };
    sink.adopt(std::move(connection));
    sink.shutdown_all();
    for (int i = 0; i < 500 && closed.load() == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    CHECK(closed.load() == 1);
  }  // the destructor joins
  CHECK(peer_closed(pair.client));
}
