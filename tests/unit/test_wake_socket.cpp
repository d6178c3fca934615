// The queue loop's wake socket (common/wake_socket.hpp, plugin/wake_listener.*;
// docs/design.md, Polling and doorbells): a socket handed over reaches the
// table for its channel and generation, only unix datagram sockets are
// taken, the first hand-over of a generation wins, a wake never blocks the
// handler, and a hand-over with nobody listening fails at once.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <thread>

#include "common/wake_socket.hpp"
#include "plugin/wake_listener.hpp"

using namespace cbd;
using namespace cbd::backend;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

std::string unique_name(const char* tag) {
  static int counter = 0;
  return std::string("cbd-unit-wake/") + tag + "/" + std::to_string(::getpid()) + "/" + std::to_string(counter++);
}

struct Pair {
  UniqueFd near, far;
  Pair() {
    int fds[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) == 0);
    near.reset(fds[0]);
    far.reset(fds[1]);
  }
};

// Waits (bounded) until the table holds a socket for (channel, generation).
UniqueFd await_socket(WakeSocketTable& table, std::uint32_t channel, std::uint64_t generation) {
  const auto deadline = Clock::now() + 5s;
  while (Clock::now() < deadline) {
    if (UniqueFd socket = table.take(channel, generation)) return socket;
    std::this_thread::sleep_for(1ms);
  }
  return {};
}

bool readable(int fd) {
  char byte;
  return ::recv(fd, &byte, 1, MSG_DONTWAIT) == 1;
}

}  // namespace

TEST_CASE("wake socket: a handed-over socket reaches the handler, and its wakes reach the loop") {
  const std::string name = unique_name("pass");
  WakeSocketTable table(4);
  WakeListener listener(name, table, 4);
  Pair pair;
  REQUIRE(hand_over_wake_socket(name, 2, 7, pair.far.get()));
  UniqueFd received = await_socket(table, 2, 7);
  REQUIRE(received);
  CHECK_FALSE(table.take(2, 7));  // taken once
  send_wake(received.get());
  CHECK(readable(pair.near.get()));
  CHECK_FALSE(readable(pair.near.get()));
}

TEST_CASE("wake socket: the table keeps one socket per channel, for the generation it was handed over for") {
  WakeSocketTable table(2);
  Pair first, second, stale;
  table.deposit(1, 5, UniqueFd(::dup(first.far.get())));
  table.deposit(1, 5, UniqueFd(::dup(second.far.get())));  // same set-up: the first wins
  table.deposit(9, 5, UniqueFd(::dup(second.far.get())));  // no such channel
  CHECK_FALSE(table.take(1, 4));
  CHECK_FALSE(table.take(1, 6));
  UniqueFd kept = table.take(1, 5);
  REQUIRE(kept);
  send_wake(kept.get());
  CHECK(readable(first.near.get()));
  CHECK_FALSE(readable(second.near.get()));
  table.deposit(1, 6, UniqueFd(::dup(second.far.get())));  // the next set-up replaces it
  CHECK(table.take(1, 6));
  // A made-up generation holds the place only until the real one comes.
  table.deposit(1, 1000, UniqueFd(::dup(stale.far.get())));
  table.deposit(1, 7, UniqueFd(::dup(second.far.get())));
  CHECK_FALSE(table.take(1, 1000));
  CHECK(table.take(1, 7));
}

TEST_CASE("wake socket: only a socket is taken, with a well-formed message for a channel that exists") {
  const std::string name = unique_name("hostile");
  WakeSocketTable table(2);
  WakeListener listener(name, table, 2);
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  UniqueFd read_end(pipe_fds[0]), write_end(pipe_fds[1]);
  CHECK(hand_over_wake_socket(name, 0, 3, write_end.get()));  // a pipe: refused
  int stream_fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, stream_fds) == 0);
  UniqueFd stream_a(stream_fds[0]), stream_b(stream_fds[1]);
  CHECK(hand_over_wake_socket(name, 0, 4, stream_a.get()));  // a stream socket (data could linger): refused
  Pair pair;
  CHECK(hand_over_wake_socket(name, 5, 3, pair.far.get()));  // channel 5 of 2: refused
  CHECK(hand_over_wake_socket(name, 1, 3, pair.far.get()));  // fine: proves the listener ran the two above first
  CHECK(await_socket(table, 1, 3));
  CHECK_FALSE(table.take(0, 3));
  CHECK_FALSE(table.take(0, 4));
}

TEST_CASE("wake socket: a wake never blocks, even when the loop never reads") {
  Pair pair;
  // The peer may make the socket blocking (the handler holds the same file).
  REQUIRE(::fcntl(pair.far.get(), F_SETFL, 0) == 0);
  // Fill the loop's receive queue, then keep waking: each send returns.
  const auto start = Clock::now();
  for (int i = 0; i < 100000; ++i) send_wake(pair.far.get());
  CHECK(Clock::now() - start < 10s);
  drain_wakes(pair.near.get(), 1000000);
  CHECK_FALSE(readable(pair.near.get()));
}

TEST_CASE("wake socket: with nobody listening the hand-over fails at once") {
  Pair pair;
  const auto start = Clock::now();
  CHECK_FALSE(hand_over_wake_socket(unique_name("nobody"), 0, 1, pair.far.get()));
  CHECK(Clock::now() - start < 1s);
}
