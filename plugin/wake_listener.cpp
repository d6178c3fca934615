#include "plugin/wake_listener.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <cerrno>
#include <utility>

#include "common/error.hpp"
#include "common/thread_signals.hpp"
#include "common/wake_socket.hpp"

namespace cbd::backend {
namespace {

// How long one connection may take to deliver its message (a queue side
// sends it with the connect): a peer that connects and sends nothing delays
// the next hand-over this long at most, and that set-up polls on a timer
// until its socket arrives.
constexpr int kHandoverTimeoutMs = 20;
// Connections taken per wake of the thread: with the timeout above, a
// flood of silent ones keeps it from seeing the stop for 320 ms at most.
constexpr int kAcceptBudget = 16;
// Pause after an accept that failed for want of resources.
constexpr int kErrorPauseMs = 50;

}  // namespace

void WakeSocketTable::deposit(std::uint32_t channel, std::uint64_t generation, UniqueFd socket) {
  if (channel >= entries_.size() || generation == 0) return;
  UniqueFd replaced;  // closed after the lock is released
  std::lock_guard lock(mutex_);
  Entry& entry = entries_[channel];
  // The first for a set-up wins; any other set-up replaces it (a newer one
  // is the usual case; an older or made-up one only until the next).
  if (entry.generation == generation && entry.socket) return;
  entry.generation = generation;
  replaced = std::exchange(entry.socket, std::move(socket));
}

UniqueFd WakeSocketTable::take(std::uint32_t channel, std::uint64_t generation) {
  if (channel >= entries_.size()) return {};
  std::lock_guard lock(mutex_);
  Entry& entry = entries_[channel];
  if (entry.generation != generation) return {};
  return std::exchange(entry.socket, UniqueFd{});
}

WakeListener::WakeListener(const std::string& name, WakeSocketTable& table, std::uint32_t channel_count)
    : table_(table), channel_count_(channel_count), listener_(listen_for_wake_sockets(name)) {
  stop_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop_) throw_errno("eventfd");
  thread_ = std::thread([this] { run(); });
}

WakeListener::~WakeListener() {
  const std::uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(stop_.get(), &one, sizeof one);
  if (thread_.joinable()) thread_.join();
}

void WakeListener::run() {
  block_async_signals();
  for (;;) {
    pollfd fds[2] = {{listener_.get(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0 && errno != EINTR) return;
    if (fds[1].revents) return;
    if (fds[0].revents) accept_all();
  }
}

void WakeListener::accept_all() {
  for (int i = 0; i < kAcceptBudget; ++i) {
    UniqueFd connection(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!connection) {
      if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) return;
      // Out of fds or memory: the connection stays pending and poll()
      // would report it again at once.  Pause (the stop still ends it).
      pollfd stop{stop_.get(), POLLIN, 0};
      ::poll(&stop, 1, kErrorPauseMs);
      return;
    }
    WakeHandover handover{};
    UniqueFd socket = receive_wake_socket(connection.get(), handover, kHandoverTimeoutMs);
    if (socket && handover.channel < channel_count_)
      table_.deposit(handover.channel, handover.generation, std::move(socket));
  }
}

}  // namespace cbd::backend
