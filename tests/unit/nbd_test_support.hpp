// Shared by the NBD unit tests and the session fuzzer: the export they
// advertise and a few helpers to play the client side of a socketpair.
#pragma once

#include <doctest/doctest.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "client/nbd_protocol.hpp"
#include "client/export_info.hpp"
#include "client/socket_io.hpp"

namespace cbd::proxy::test {

using Bytes = std::vector<std::uint8_t>;

inline ExportInfo test_export(std::uint32_t caps, std::uint64_t size = 1 << 20) {
  ExportInfo info;
  info.name = "disk0";
  info.description = "cbd test disk";
  info.size = size;
  info.caps = caps;
  return info;
}

inline constexpr std::uint32_t kAllCaps = kCapFlush | kCapFua | kCapTrim | kCapZero | kCapFastZero | kCapExtents |
                                          kCapCache | kCapMultiConn | kCapRotational;

// A connected pair; the client end times out instead of hanging a test.
struct SocketPair {
  int client = -1;
  int server = -1;
  SocketPair() {
    int fds[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
    client = fds[0];
    server = fds[1];
    timeval timeout{5, 0};
    ::setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  }
  ~SocketPair() {
    if (client >= 0) ::close(client);
    if (server >= 0) ::close(server);
  }
  SocketPair(const SocketPair&) = delete;
  SocketPair& operator=(const SocketPair&) = delete;
};

inline void send_bytes(int fd, const Bytes& bytes) { REQUIRE(send_all(fd, true, bytes.data(), bytes.size())); }

inline Bytes recv_bytes(int fd, std::size_t length) {
  Bytes bytes(length);
  REQUIRE(recv_exact(fd, bytes.data(), length) == RecvStatus::Ok);
  return bytes;
}

// Everything until EOF (or the 5 s timeout).
inline Bytes recv_all(int fd) {
  Bytes bytes;
  std::uint8_t buffer[4096];
  for (;;) {
    const ssize_t got = ::read(fd, buffer, sizeof buffer);
    if (got <= 0) break;
    bytes.insert(bytes.end(), buffer, buffer + got);
  }
  return bytes;
}

// True when the peer has closed (or shut down) its side.
inline bool peer_closed(int fd) {
  std::uint8_t byte;
  return ::read(fd, &byte, 1) == 0;
}

inline Bytes be16(std::uint16_t value) {
  Bytes out;
  nbd::append_be16(out, value);
  return out;
}
inline Bytes be32(std::uint32_t value) {
  Bytes out;
  nbd::append_be32(out, value);
  return out;
}
inline Bytes be64(std::uint64_t value) {
  Bytes out;
  nbd::append_be64(out, value);
  return out;
}
inline Bytes text(std::string_view value) { return Bytes(value.begin(), value.end()); }
inline Bytes cat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const Bytes& part : parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}

}  // namespace cbd::proxy::test
