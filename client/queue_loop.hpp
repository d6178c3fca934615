// One queue of cbd-proxy: a thread that owns a ChannelEngine and the
// non-blocking sockets of the NbdSessions assigned to it, and joins them in
// an event loop (docs/design.md, "Compute side: cbd-proxy").
//
// Each turn: run the commands posted from other threads (new connections,
// set-ups, a replacement channel, failures, stop), poll the attach, reap
// completions in a batch and dispatch them to their sessions, write
// replies, take requests from readable sockets as far as their shares allow,
// publish the batch of new entries with one index store, write again, and
// check the deadlines.  It spins for `spin_us` after activity, then waits in
// epoll, while entries are in flight (their completions arrive through
// shared memory, which wakes nobody), for 2 us doubling up to
// `max_sleep_us`, and 100 ms otherwise, so an idle queue costs about no CPU.
//
// The engine is single-threaded: nothing but this thread touches it.  The
// blkdev's watcher asks for set-ups, channel replacement and failures
// through the post functions below (a mutex-guarded command list and an
// eventfd: off the hot path) and reads the queue's state through atomics.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "client/channel_engine.hpp"
#include "client/connection_handoff.hpp"
#include "client/nbd_session.hpp"
#include "common/unique_fd.hpp"

namespace cbd::proxy {

struct QueueLoopOptions {
  std::uint32_t spin_us = 50;        // keep polling without sleeping this long after activity
  std::uint32_t max_sleep_us = 1000; // longest wait while entries are in flight
  std::chrono::milliseconds payload_timeout{30000};
  std::chrono::milliseconds reply_timeout{30000};
  // With entries in flight and no completion for this long the channel is
  // set up again and its entries re-driven (the blkdev passes
  // max(5 s, 5 x dead-after), docs/design.md §5).
  std::chrono::milliseconds stall_timeout{10000};
};

// What an NbdSession may hold of a channel with this geometry: half its
// entries and half its data area, WRITE payloads in pieces of a sixteenth.
// Its deadlines are the options'.
SessionLimits session_limits_for(const ChannelEngine& engine, const QueueLoopOptions& options);

class QueueLoop {
 public:
  using Clock = std::chrono::steady_clock;
  // The longest a stop takes, whatever clients and the backend do.
  static constexpr std::chrono::milliseconds kStopLimit{4000};

  QueueLoop(std::unique_ptr<ChannelEngine> engine, ExportInfo info, QueueLoopOptions options);
  ~QueueLoop();  // stop(), then join
  QueueLoop(const QueueLoop&) = delete;
  QueueLoop& operator=(const QueueLoop&) = delete;

  // Any thread.  The connection is served until it ends; its on_closed runs
  // on the loop's thread (or here, if the loop is stopping).
  void adopt(AdoptedConnection connection);
  // Any thread: step 1 of the attach protocol for `binding` (a new backend
  // epoch or blkdev); entries outstanding are re-driven once it attaches.
  void set_up(Binding binding);
  // Any thread: our channel was reclaimed.  `fresh` is a newly claimed
  // channel of the same geometry; every outstanding entry moves into it
  // (ChannelEngine::adopt_outstanding) and it is set up for `binding`.
  void replace_channel(std::unique_ptr<ChannelEngine> fresh, Binding binding);
  // Any thread: complete everything outstanding with `error`, and new
  // requests too until the next attach.
  void fail_outstanding(int error);
  // Any thread: sessions stop taking requests, finish what is in flight
  // (bounded by kStopLimit), then the thread ends.
  void stop();
  // Any thread: shut every connection's socket down both ways now (a peer
  // that does not let go at stop).
  void shutdown_connections();

  // State for other threads (updated by the loop every turn).
  // The last set-up asked for has attached and nothing failed it since.
  bool attached() const;
  // The engine found its channel reclaimed; replace_channel() is awaited.
  // False as soon as replace_channel() was called.
  bool lost() const {
    return lost_.load(std::memory_order_acquire) && replacements_done_.load() == replacements_requested_.load();
  }
  std::size_t connections() const { return connections_.load(std::memory_order_relaxed); }
  std::size_t outstanding() const { return outstanding_.load(std::memory_order_relaxed); }

 private:
  struct Served;
  struct Command;

  void run();
  bool turn(Clock::time_point now);
  bool run_commands(Clock::time_point now);
  void start_session(AdoptedConnection connection);
  void watch(Served& served);
  void unwatch(Served& served);
  // True when the wake socket fired.
  bool wait_events(std::uint32_t timeout_us);
  void check_stall(Clock::time_point now);
  void begin_stop(Clock::time_point now);
  bool stop_done(Clock::time_point now);
  void retire_sessions();
  void publish_state();
  void wake();

  std::unique_ptr<ChannelEngine> engine_;  // sessions refer to this pointer: replaced in place
  const ExportInfo info_;
  const QueueLoopOptions options_;
  SessionLimits limits_;
  std::chrono::milliseconds stall_timeout_;
  UniqueFd epoll_;
  UniqueFd wake_fd_;
  // The wake socket pair (docs/design.md, Polling and doorbells): the
  // handler sends to `peer_wake_far_`, handed over at each set-up; the near
  // end is in our epoll set while `peer_wake_watched_`.
  UniqueFd peer_wake_near_;
  UniqueFd peer_wake_far_;
  // Armed one-shot: it ends one wait at most, then stays out of the epoll
  // set until a sleep arms it again, so a flood cannot end every wait.
  bool peer_wake_armed_ = false;
  void arm_peer_wake();

  // Posted by other threads (cold path).
  std::mutex commands_mutex_;
  std::vector<Command> commands_;
  std::vector<AdoptedConnection> adopted_;
  std::atomic<bool> commands_pending_{false};
  bool accepting_ = true;  // under commands_mutex_: false once stop() was called

  // Loop thread only.
  std::vector<std::unique_ptr<Served>> served_;
  bool stopping_ = false;
  Clock::time_point stop_deadline_{};
  Clock::time_point sessions_closed_at_{};
  Clock::time_point progress_at_{};
  Clock::time_point broken_since_{};
  std::uint64_t setup_request_running_ = 0;

  std::atomic<std::uint64_t> setups_requested_{0};
  std::atomic<std::uint64_t> setups_attached_{0};
  std::atomic<bool> engine_attached_{false};
  std::atomic<bool> lost_{false};
  std::atomic<std::uint64_t> replacements_requested_{0};
  std::atomic<std::uint64_t> replacements_done_{0};
  std::atomic<std::size_t> connections_{0};
  std::atomic<std::size_t> outstanding_{0};
  std::thread thread_;
};

}  // namespace cbd::proxy
