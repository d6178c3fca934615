// Shared by the NBD unit tests: an in-memory RequestTarget and a few helpers
// to play the client side of a socketpair.
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
#include "client/request_target.hpp"
#include "client/socket_io.hpp"

namespace cbd::proxy::test {

using Bytes = std::vector<std::uint8_t>;

// A disk in a vector.  Knobs let a test shape how replies arrive.
class MemoryTarget : public RequestTarget {
 public:
  explicit MemoryTarget(ExportInfo info) : info_(std::move(info)), disk_(info_.size) {
    for (std::size_t i = 0; i < disk_.size(); ++i) disk_[i] = static_cast<std::uint8_t>(i * 7 + 3);
  }
  ~MemoryTarget() override {
    for (std::thread& worker : workers_) worker.join();
  }

  std::uint32_t read_piece_size = 0;  // READ data in pieces of this size (0: one piece)
  int fail_with = 0;                  // finish every request with this errno
  bool fail_after_data = false;       // READ: send all data, then finish(fail_with)
  std::uint32_t fail_after_bytes = 0; // with fail_after_data: send only this much READ data first
  std::vector<ExtentDescriptor> extents{{4096, 0}, {4096, kExtentHole | kExtentZero}};
  std::chrono::milliseconds delay{0}; // > 0: complete from another thread after this

  ExportInfo info() const override { return info_; }
  const Bytes& disk() const { return disk_; }
  std::size_t submitted() const {
    std::lock_guard lock(mutex_);
    return submitted_.size();
  }
  std::vector<IoRequest> requests() const {
    std::lock_guard lock(mutex_);
    return submitted_;
  }

  bool submit(const IoRequest& request, int payload_fd, Replier& replier) override {
    Bytes payload;
    if (request.type == nbd::kCmdWrite) {
      payload.resize(request.length);
      if (recv_exact(payload_fd, payload.data(), payload.size()) != RecvStatus::Ok) return false;
    }
    {
      std::lock_guard lock(mutex_);
      submitted_.push_back(request);
    }
    if (delay.count() == 0) {
      execute(request, payload, replier);
    } else {
      std::lock_guard lock(mutex_);
      workers_.emplace_back([this, request, payload, &replier] {
        std::this_thread::sleep_for(delay);
        execute(request, payload, replier);
      });
    }
    return true;
  }

 private:
  void execute(const IoRequest& request, const Bytes& payload, Replier& replier) {
    if (fail_with != 0 && !(request.type == nbd::kCmdRead && fail_after_data)) {
      replier.finish(request, fail_with);
      return;
    }
    switch (request.type) {
      case nbd::kCmdRead: {
        const std::uint32_t piece = read_piece_size ? read_piece_size : request.length;
        const std::uint32_t limit =
            fail_after_data && fail_after_bytes ? std::min(fail_after_bytes, request.length) : request.length;
        for (std::uint32_t at = 0; at < limit; at += piece) {
          const std::uint32_t length = std::min(piece, request.length - at);
          if (!replier.read_data(request, at, disk_.data() + request.offset + at, length)) break;
        }
        break;
      }
      case nbd::kCmdWrite:
        std::memcpy(disk_.data() + request.offset, payload.data(), payload.size());
        break;
      case nbd::kCmdTrim:
      case nbd::kCmdWriteZeroes:
        std::memset(disk_.data() + request.offset, 0, request.length);
        break;
      case nbd::kCmdBlockStatus:
        replier.block_status(request, extents);
        break;
      default:
        break;
    }
    replier.finish(request, fail_after_data ? fail_with : 0);
  }

  ExportInfo info_;
  Bytes disk_;
  mutable std::mutex mutex_;
  std::vector<IoRequest> submitted_;
  std::vector<std::thread> workers_;
};

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
