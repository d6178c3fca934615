// Complete, blocking reads and writes on the file descriptors of an NBD
// connection: a socket, or stdin/stdout, which may be pipes.
//
// They retry on EINTR and short transfers, and wait with poll() if a
// descriptor handed to us turns out to be non-blocking, so callers see the
// whole transfer or a failure.  Errors are return values: this is the data
// path.  (client/fd_io.hpp serves the RequestTarget's payload reads.)
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <span>

namespace cbd::proxy {

enum class RecvStatus {
  Ok,     // every byte arrived
  Eof,    // the peer closed before the first byte: a clean end
  Error,  // I/O error, or EOF part way (errno is EPIPE then)
};

RecvStatus recv_exact(int fd, void* buffer, std::size_t length);

// Reads `length` bytes and drops them, through a small stack buffer.
bool recv_discard(int fd, std::uint64_t length);

// True when `fd` is a socket (so sendmsg with MSG_NOSIGNAL and shutdown work).
bool fd_is_socket(int fd);

// Writes every byte described by `iov`, consuming it (entries are advanced in
// place).  On a socket it uses sendmsg(MSG_NOSIGNAL) so a vanished peer is an
// EPIPE return, not a signal; on anything else writev (a pipe raises SIGPIPE
// unless the process ignores it).
bool send_all(int fd, bool is_socket, std::span<iovec> iov);
bool send_all(int fd, bool is_socket, const void* data, std::size_t length);

}  // namespace cbd::proxy
