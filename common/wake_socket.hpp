// How a handler wakes a queue loop (docs/design.md, Polling and doorbells).
//
// A queue loop sleeps in epoll, which no futex ends, so it keeps a datagram
// socket pair: one end in its epoll set, the other handed to the backend
// over a unix socket (SCM_RIGHTS) at every set-up, with the channel and the
// generation it is for.  The handler sends one byte with MSG_DONTWAIT to
// wake the loop: it never blocks, whatever the peer did to the socket, and
// it can only ever write to a socket the peer gave it (which the peer could
// have written to itself).  Without the hand-over (another host, another
// network namespace, an older peer) both sides keep their timed polling.
#pragma once

#include <cstdint>
#include <string>

#include "common/transport.hpp"
#include "common/unique_fd.hpp"

namespace cbd {

// The abstract unix socket address a backend instance accepts wake sockets
// on: the transport's format UUID, the backend slot and its epoch, so a
// restarted backend or another transport never receives them.
std::string wake_listener_name(const Transport& transport, std::uint32_t backend, std::uint64_t epoch);

// What a queue side sends with the socket.
struct WakeHandover {
  std::uint32_t magic;       // kWakeHandoverMagic
  std::uint32_t channel;     // channel slot index
  std::uint64_t generation;  // the set-up it is for
};
inline constexpr std::uint32_t kWakeHandoverMagic = 0x6b617743;  // "Cwak"

// Queue side: hands `fd` to the listener `name`; never blocks.  False when
// nobody listens or the message did not go out.
bool hand_over_wake_socket(const std::string& name, std::uint32_t channel, std::uint64_t generation, int fd);

// Backend side: a non-blocking listening socket bound to `name`.
UniqueFd listen_for_wake_sockets(const std::string& name);

// Backend side: takes one connection's hand-over, waiting at most
// `timeout_ms` for its message.  On success fills `handover` and returns
// the socket; an empty UniqueFd otherwise: a peer of another user, a
// malformed message, anything but a unix datagram socket.
UniqueFd receive_wake_socket(int connection, WakeHandover& handover, int timeout_ms);

// Handler side: one byte, MSG_DONTWAIT | MSG_NOSIGNAL (a full or closed
// socket only loses a wake that its timeout covers).
void send_wake(int fd);

// Queue side: reads whatever wakes are queued (at most `limit` of them),
// without blocking.
void drain_wakes(int fd, unsigned limit = 64);

}  // namespace cbd
