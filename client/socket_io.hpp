// Complete, blocking reads and writes on the file descriptors of an NBD
// connection: a socket, or stdin/stdout, which may be pipes.
//
// They retry on EINTR and short transfers, and wait with poll() if a
// descriptor handed to us turns out to be non-blocking, so callers see the
// whole transfer or a failure.  Errors are return values: this is the data
// path.
//
// The overloads taking an IoDeadline never block past it: they wait with
// poll() for the time left before every transfer, so a peer that sends one
// byte at a time cannot stretch the whole exchange (the handshake's
// handshake-timeout= is one deadline for all of it, not a per-read timeout).
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>

namespace cbd::proxy {

enum class RecvStatus {
  Ok,        // every byte arrived
  Eof,       // the peer closed before the first byte: a clean end
  Error,     // I/O error, or EOF part way (errno is EPIPE then)
  TimedOut,  // the deadline passed, or its cancel fd became readable (errno is ETIMEDOUT)
};

// When a transfer gives up: at a point of the monotonic clock, or as soon as
// `cancel_fd` (if >= 0) is readable, which lets a stopping server end every
// handshake at once.  The default never gives up.
struct IoDeadline {
  std::chrono::steady_clock::time_point at = std::chrono::steady_clock::time_point::max();
  int cancel_fd = -1;

  static IoDeadline after(std::chrono::milliseconds timeout, int cancel_fd = -1) {
    return {std::chrono::steady_clock::now() + timeout, cancel_fd};
  }
};

RecvStatus recv_exact(int fd, void* buffer, std::size_t length);
RecvStatus recv_exact(int fd, void* buffer, std::size_t length, const IoDeadline& deadline);

// Reads `length` bytes and drops them, through a small stack buffer.
bool recv_discard(int fd, std::uint64_t length);
bool recv_discard(int fd, std::uint64_t length, const IoDeadline& deadline);

// True when `fd` is a socket (so sendmsg with MSG_NOSIGNAL and shutdown work).
bool fd_is_socket(int fd);

// Writes every byte described by `iov`, consuming it (entries are advanced in
// place).  On a socket it uses sendmsg(MSG_NOSIGNAL) so a vanished peer is an
// EPIPE return, not a signal; on anything else writev (a pipe raises SIGPIPE
// unless the process ignores it).
bool send_all(int fd, bool is_socket, std::span<iovec> iov);
bool send_all(int fd, bool is_socket, const void* data, std::size_t length);
// The same under a deadline; false (errno ETIMEDOUT) once it has passed.
// On a socket each send is non-blocking (MSG_DONTWAIT) so a peer that stops
// reading cannot hold us in the kernel past the deadline.
bool send_all(int fd, bool is_socket, std::span<iovec> iov, const IoDeadline& deadline);

}  // namespace cbd::proxy
