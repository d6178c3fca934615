#include "common/wake_socket.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <cstring>

#include "common/error.hpp"

namespace cbd {
namespace {

// An abstract address: sun_path starts with a NUL, the name follows.
socklen_t abstract_address(const std::string& name, sockaddr_un& address) {
  std::memset(&address, 0, sizeof address);
  address.sun_family = AF_UNIX;
  const std::size_t length = std::min(name.size(), sizeof address.sun_path - 1);
  std::memcpy(address.sun_path + 1, name.data(), length);
  return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + length);
}

// One WakeHandover with room for one fd, as sendmsg/recvmsg take it.
struct HandoverMessage {
  explicit HandoverMessage(WakeHandover& handover) : data{&handover, sizeof handover} {
    message.msg_iov = &data;
    message.msg_iovlen = 1;
    message.msg_control = control;
    message.msg_controllen = sizeof control;
  }
  HandoverMessage(const HandoverMessage&) = delete;
  HandoverMessage& operator=(const HandoverMessage&) = delete;

  iovec data;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr message{};
};

}  // namespace

std::string wake_listener_name(const Transport& transport, std::uint32_t backend, std::uint64_t epoch) {
  std::string name = "cbd-wake/";
  char hex[3];
  for (std::uint8_t byte : transport.superblock().uuid) {
    std::snprintf(hex, sizeof hex, "%02x", byte);
    name += hex;
  }
  return name + "/" + std::to_string(backend) + "/" + std::to_string(epoch);
}

bool hand_over_wake_socket(const std::string& name, std::uint32_t channel, std::uint64_t generation, int fd) {
  UniqueFd connection(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!connection) return false;
  sockaddr_un address;
  const socklen_t length = abstract_address(name, address);
  // A unix socket connects at once or fails (no listener, backlog full).
  if (::connect(connection.get(), reinterpret_cast<const sockaddr*>(&address), length) != 0) return false;
  WakeHandover handover{kWakeHandoverMagic, channel, generation};
  HandoverMessage framed(handover);
  msghdr& message = framed.message;
  cmsghdr* header = CMSG_FIRSTHDR(&message);
  header->cmsg_level = SOL_SOCKET;
  header->cmsg_type = SCM_RIGHTS;
  header->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(header), &fd, sizeof fd);
  return ::sendmsg(connection.get(), &message, MSG_DONTWAIT | MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof handover);
}

UniqueFd listen_for_wake_sockets(const std::string& name) {
  UniqueFd listener(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listener) throw_errno("socket");
  sockaddr_un address;
  const socklen_t length = abstract_address(name, address);
  if (::bind(listener.get(), reinterpret_cast<const sockaddr*>(&address), length) != 0) throw_errno("bind " + name);
  if (::listen(listener.get(), 64) != 0) throw_errno("listen");
  return listener;
}

UniqueFd receive_wake_socket(int connection, WakeHandover& handover, int timeout_ms) {
  // Only from our own user (or root): anyone in the network namespace can
  // reach an abstract socket, and a file it passed along could make even
  // our close() of it wait (a FUSE file's flush).
  ucred peer{};
  socklen_t peer_length = sizeof peer;
  if (::getsockopt(connection, SOL_SOCKET, SO_PEERCRED, &peer, &peer_length) != 0 ||
      (peer.uid != ::geteuid() && peer.uid != 0))
    return {};
  pollfd ready{connection, POLLIN, 0};
  if (::poll(&ready, 1, timeout_ms) != 1) return {};
  HandoverMessage framed(handover);
  msghdr& message = framed.message;
  const ssize_t n = ::recvmsg(connection, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  // Any fd that came along is ours to close, whatever else is wrong.
  UniqueFd received;
  for (cmsghdr* header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header))
    if (header->cmsg_level == SOL_SOCKET && header->cmsg_type == SCM_RIGHTS && header->cmsg_len >= CMSG_LEN(sizeof(int))) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(header), sizeof fd);
      received.reset(fd);
      break;  // the control buffer holds one fd: nothing else can follow
    }
  if (n != static_cast<ssize_t>(sizeof handover) || (message.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) ||
      handover.magic != kWakeHandoverMagic || !received)
    return {};
  // Only a unix datagram socket: send_wake() is then a send() with
  // MSG_DONTWAIT, which never blocks whatever flags the peer set on it, and
  // its last close() never waits (no lingering stream data).
  int domain = 0, type = 0;
  socklen_t length = sizeof domain;
  if (::getsockopt(received.get(), SOL_SOCKET, SO_DOMAIN, &domain, &length) != 0 || domain != AF_UNIX) return {};
  length = sizeof type;
  if (::getsockopt(received.get(), SOL_SOCKET, SO_TYPE, &type, &length) != 0 || type != SOCK_DGRAM) return {};
  return received;
}

void send_wake(int fd) {
  const char byte = 0;
  [[maybe_unused]] ssize_t n = ::send(fd, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
}

void drain_wakes(int fd, unsigned limit) {
  char bytes[64];
  for (unsigned i = 0; i < limit; ++i)
    if (::recv(fd, bytes, sizeof bytes, MSG_DONTWAIT) <= 0) break;
}

}  // namespace cbd
