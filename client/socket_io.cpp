#include "client/socket_io.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace cbd::proxy {

namespace {

// A descriptor inherited from a parent (stdin, socket activation) may be
// non-blocking; wait until it is ready instead of spinning or failing.
bool wait_ready(int fd, short events) {
  pollfd entry{fd, events, 0};
  for (;;) {
    if (::poll(&entry, 1, -1) >= 0) return true;
    if (errno != EINTR) return false;
  }
}

// Waits until `fd` is ready for `events` or the deadline gives up.  True when
// ready (or in error: the transfer that follows reports it); false with errno
// ETIMEDOUT when the deadline passed or its cancel fd is readable.
bool wait_ready_until(int fd, short events, const IoDeadline& deadline) {
  pollfd entries[2] = {{fd, events, 0}, {deadline.cancel_fd, POLLIN, 0}};
  const nfds_t count = deadline.cancel_fd >= 0 ? 2 : 1;
  for (;;) {
    int timeout_ms = -1;
    if (deadline.at != std::chrono::steady_clock::time_point::max()) {
      const auto left = deadline.at - std::chrono::steady_clock::now();
      if (left <= std::chrono::steady_clock::duration::zero()) {
        errno = ETIMEDOUT;
        return false;
      }
      // Round up: a 0 ms poll for the last fraction would spin.
      timeout_ms = static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(left).count());
    }
    const int ready = ::poll(entries, count, timeout_ms);
    if (ready < 0) {
      if (errno == EINTR) continue;
      return true;  // let the transfer report the error
    }
    if (count == 2 && entries[1].revents != 0) {
      errno = ETIMEDOUT;
      return false;
    }
    if (entries[0].revents != 0) return true;
  }
}

}  // namespace

RecvStatus recv_exact(int fd, void* buffer, std::size_t length, const IoDeadline& deadline) {
  auto* cursor = static_cast<std::uint8_t*>(buffer);
  std::size_t done = 0;
  while (done < length) {
    // Poll first, every time: a blocking descriptor must never be read
    // without knowing that the read returns at once.
    if (!wait_ready_until(fd, POLLIN, deadline)) return RecvStatus::TimedOut;
    const ssize_t got = ::read(fd, cursor + done, length - done);
    if (got > 0) {
      done += static_cast<std::size_t>(got);
      continue;
    }
    if (got == 0) {
      if (done == 0) return RecvStatus::Eof;
      errno = EPIPE;
      return RecvStatus::Error;
    }
    if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
    return RecvStatus::Error;
  }
  return RecvStatus::Ok;
}

bool recv_discard(int fd, std::uint64_t length, const IoDeadline& deadline) {
  std::uint8_t sink[16384];
  while (length > 0) {
    const auto chunk = static_cast<std::size_t>(std::min<std::uint64_t>(length, sizeof sink));
    if (recv_exact(fd, sink, chunk, deadline) != RecvStatus::Ok) return false;
    length -= chunk;
  }
  return true;
}

bool send_all(int fd, bool is_socket, std::span<iovec> iov, const IoDeadline& deadline) {
  std::size_t first = 0;
  while (first < iov.size()) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    if (!wait_ready_until(fd, POLLOUT, deadline)) return false;
    ssize_t sent;
    if (is_socket) {
      msghdr message{};
      message.msg_iov = iov.data() + first;
      message.msg_iovlen = iov.size() - first;
      sent = ::sendmsg(fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
    } else {
      sent = ::writev(fd, iov.data() + first, static_cast<int>(iov.size() - first));
    }
    if (sent < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      return false;
    }
    auto remaining = static_cast<std::size_t>(sent);
    while (remaining > 0 && first < iov.size()) {
      const std::size_t step = std::min(remaining, iov[first].iov_len);
      iov[first].iov_base = static_cast<std::uint8_t*>(iov[first].iov_base) + step;
      iov[first].iov_len -= step;
      remaining -= step;
      if (iov[first].iov_len == 0) ++first;
    }
  }
  return true;
}

RecvStatus recv_exact(int fd, void* buffer, std::size_t length) {
  auto* cursor = static_cast<std::uint8_t*>(buffer);
  std::size_t done = 0;
  while (done < length) {
    const ssize_t got = ::read(fd, cursor + done, length - done);
    if (got > 0) {
      done += static_cast<std::size_t>(got);
      continue;
    }
    if (got == 0) {
      if (done == 0) return RecvStatus::Eof;
      errno = EPIPE;
      return RecvStatus::Error;
    }
    if (errno == EINTR) continue;
    if ((errno == EAGAIN || errno == EWOULDBLOCK) && wait_ready(fd, POLLIN)) continue;
    return RecvStatus::Error;
  }
  return RecvStatus::Ok;
}

bool recv_discard(int fd, std::uint64_t length) {
  std::uint8_t sink[16384];
  while (length > 0) {
    const auto chunk = static_cast<std::size_t>(std::min<std::uint64_t>(length, sizeof sink));
    if (recv_exact(fd, sink, chunk) != RecvStatus::Ok) return false;
    length -= chunk;
  }
  return true;
}

bool fd_is_socket(int fd) {
  struct stat status {};
  return ::fstat(fd, &status) == 0 && S_ISSOCK(status.st_mode);
}

bool send_all(int fd, bool is_socket, std::span<iovec> iov) {
  std::size_t first = 0;
  while (first < iov.size()) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    ssize_t sent;
    if (is_socket) {
      msghdr message{};
      message.msg_iov = iov.data() + first;
      message.msg_iovlen = iov.size() - first;
      sent = ::sendmsg(fd, &message, MSG_NOSIGNAL);
    } else {
      sent = ::writev(fd, iov.data() + first, static_cast<int>(iov.size() - first));
    }
    if (sent < 0) {
      if (errno == EINTR) continue;
      if ((errno == EAGAIN || errno == EWOULDBLOCK) && wait_ready(fd, POLLOUT)) continue;
      return false;
    }
    // Step over what went out; a partial write can stop in the middle of an entry.
    auto remaining = static_cast<std::size_t>(sent);
    while (remaining > 0 && first < iov.size()) {
      const std::size_t step = std::min(remaining, iov[first].iov_len);
      iov[first].iov_base = static_cast<std::uint8_t*>(iov[first].iov_base) + step;
      iov[first].iov_len -= step;
      remaining -= step;
      if (iov[first].iov_len == 0) ++first;
    }
  }
  return true;
}

bool send_all(int fd, bool is_socket, const void* data, std::size_t length) {
  iovec single{const_cast<void*>(data), length};
  return send_all(fd, is_socket, std::span<iovec>(&single, 1));
}

}  // namespace cbd::proxy
