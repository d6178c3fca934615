// Fuzzes the proxy's NBD server side: the input is everything a client
// sends on a fresh connection (client flags, options, then requests and
// payloads).  The real negotiate_handshake() runs on one end of a
// socketpair and, when it enters transmission, the real NbdConnection
// serves the rest against MemoryTarget (the unit tests' in-memory disk).
// A helper thread feeds the input and drains the replies, so neither side
// blocks on a full socket buffer.
//
// Input layout: [0] picks the export (read-only, capabilities, block size
// constraints, how READ data is split), the rest is the client's byte stream.
#define DOCTEST_CONFIG_DISABLE  // nbd_test_support.hpp's REQUIRE checks are unused here
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <memory>
#include <thread>

#include "client/nbd_connection.hpp"
#include "client/nbd_handshake.hpp"
// With REQUIRE compiled out, some of its helpers have unused parameters.
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wunused-parameter"
#include "nbd_test_support.hpp"
#pragma clang diagnostic pop

namespace {

using namespace cbd;
using namespace cbd::proxy;

// Writes `input` to `fd` and reads (drops) everything the server sends until
// it closes its end.
void play_client(int fd, const std::uint8_t* input, std::size_t size) {
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  std::size_t sent = 0;
  bool write_open = true;
  std::uint8_t sink[65536];
  for (;;) {
    if (write_open && sent == size) {
      ::shutdown(fd, SHUT_WR);  // the server sees EOF after the last byte
      write_open = false;
    }
    pollfd p{fd, static_cast<short>(POLLIN | (write_open ? POLLOUT : 0)), 0};
    if (::poll(&p, 1, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (write_open && (p.revents & POLLOUT)) {
      const ssize_t n = ::send(fd, input + sent, size - sent, MSG_NOSIGNAL);
      if (n > 0) sent += static_cast<std::size_t>(n);
      else if (n < 0 && errno != EAGAIN && errno != EINTR) write_open = false;  // server hung up
    }
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      const ssize_t n = ::recv(fd, sink, sizeof sink, 0);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return;  // server closed its end
    }
  }
}

ExportInfo export_for(std::uint8_t config) {
  std::uint32_t caps = test::kAllCaps;
  if (config & 1) caps |= kCapReadOnly;
  if (config & 2) caps &= ~(kCapExtents | kCapTrim | kCapZero);
  if (config & 4) caps &= ~(kCapFlush | kCapFua | kCapCache);
  ExportInfo info = test::test_export(caps, (config & 8) ? 65536 + 512 : 65536);
  if (config & 16) {
    info.block_min = 512;
    info.block_max = 16384;
  }
  return info;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  set_log_sink([](LogLevel, const std::string&) {});
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* input, std::size_t size) {
  if (size < 1) return 0;
  const std::uint8_t config = input[0];
  const ExportInfo info = export_for(config);
  auto target = std::make_shared<test::MemoryTarget>(info);
  if (config & 32) target->read_piece_size = 4096;

  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
  const int client = fds[0], server = fds[1];
  std::thread peer(play_client, client, input + 1, size - 1);

  const HandshakeResult negotiated = negotiate_handshake(server, server, info, IoDeadline{});
  if (negotiated.enter_transmission) {
    NbdConnection connection(server, server, info, negotiated, target);
    connection.run();
  }
  ::shutdown(server, SHUT_RDWR);
  peer.join();
  ::close(server);
  ::close(client);
  return 0;
}
