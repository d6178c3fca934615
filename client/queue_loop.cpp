#include "client/queue_loop.hpp"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <utility>

#include "common/error.hpp"
#include "common/log.hpp"
#include "common/poller.hpp"
#include "common/spin_yield.hpp"
#include "common/thread_signals.hpp"
#include "common/wake_socket.hpp"

namespace cbd::proxy {

namespace {

constexpr std::size_t kMaxEvents = 64;
constexpr std::uint32_t kIdleWaitUs = 100000;
constexpr std::uint32_t kFirstWaitUs = 2;
// An impossible completion producer index that stays impossible this long is
// a scribbled control block, not a torn read (flush mode).
constexpr std::chrono::milliseconds kBrokenGrace{100};
// After every session closed at stop, entries still in the ring get this
// long to complete before they are abandoned (and failed with ESHUTDOWN).
constexpr std::chrono::milliseconds kInFlightGrace{1000};

// epoll tags: the eventfd (0), the wake socket (kPeerWakeData), or a
// session's input or output side (a Served pointer, which is aligned, with
// a tag in its low bits).
constexpr std::uint64_t kPeerWakeData = 4;
constexpr std::uintptr_t kTagMask = 3;
constexpr std::uintptr_t kTagInput = 1;
constexpr std::uintptr_t kTagOutput = 2;

}  // namespace

SessionLimits session_limits_for(const ChannelEngine& engine, const QueueLoopOptions& options) {
  SessionLimits limits;
  const std::uint64_t data = engine.data_size();
  limits.data_share = std::max<std::uint64_t>(data / 2, 4096);
  limits.entry_share = std::max<std::uint32_t>(engine.capacity() / 2, 1);
  const std::uint64_t piece = std::clamp<std::uint64_t>(data / 16, 4096, 256u << 10);
  limits.write_piece = static_cast<std::uint32_t>(piece & ~std::uint64_t{4095});
  limits.payload_timeout = options.payload_timeout;
  limits.reply_timeout = options.reply_timeout;
  return limits;
}

struct QueueLoop::Command {
  enum class Kind { SetUp, Replace, Fail, Stop, Shutdown };
  explicit Command(Kind what) : kind(what) {}
  Kind kind;
  Binding binding{};
  std::unique_ptr<ChannelEngine> fresh;
  int error = 0;
  std::uint64_t request = 0;      // SetUp/Replace: its number in setups_requested_
  std::uint64_t replacement = 0;  // Replace: its number in replacements_requested_
};

struct QueueLoop::Served {
  std::unique_ptr<NbdSession> session;
  bool readable = true;      // input may be waiting (edge-triggered: until a read finds none)
  bool writable = true;      // the output side took everything so far or signalled room
  bool watched_in = false;   // in epoll
  bool watched_out = false;
  bool released = false;     // socket closed and on_closed called
};

QueueLoop::QueueLoop(std::unique_ptr<ChannelEngine> engine, ExportInfo info, QueueLoopOptions options)
    : engine_(std::move(engine)),
      info_(std::move(info)),
      options_(options),
      limits_(session_limits_for(*engine_, options)),
      stall_timeout_(options.stall_timeout) {
  epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_) throw_errno("epoll_create1");
  wake_fd_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_fd_) throw_errno("eventfd");
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.ptr = nullptr;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, wake_fd_.get(), &event) != 0) throw_errno("epoll_ctl");
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) != 0) throw_errno("socketpair");
  peer_wake_near_.reset(pair[0]);
  peer_wake_far_.reset(pair[1]);
  epoll_event peer{};
  peer.events = 0;  // watched only while a wait relies on it
  peer.data.u64 = kPeerWakeData;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, peer_wake_near_.get(), &peer) != 0) throw_errno("epoll_ctl");
  engine_->set_wake_socket(peer_wake_far_.get());
  outstanding_.store(engine_->outstanding());
  thread_ = std::thread([this] { run(); });
}

QueueLoop::~QueueLoop() {
  stop();
  if (thread_.joinable()) thread_.join();
  // Connections handed over after the thread ended.
  std::vector<AdoptedConnection> late;
  {
    std::lock_guard lock(commands_mutex_);
    late.swap(adopted_);
  }
  for (AdoptedConnection& connection : late) {
    connection.socket.reset();
    if (connection.on_closed) connection.on_closed();
  }
}

void QueueLoop::wake() {
  commands_pending_.store(true, std::memory_order_release);
  const std::uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof one);
}

void QueueLoop::adopt(AdoptedConnection connection) {
  {
    std::lock_guard lock(commands_mutex_);
    if (accepting_) {
      adopted_.push_back(std::move(connection));
      connection.on_closed = nullptr;
    }
  }
  if (connection.on_closed) {
    // Stopping: nobody will serve it.
    connection.socket.reset();
    connection.on_closed();
    return;
  }
  wake();
}

void QueueLoop::set_up(Binding binding) {
  {
    std::lock_guard lock(commands_mutex_);
    Command command(Command::Kind::SetUp);
    command.binding = binding;
    command.request = setups_requested_.fetch_add(1) + 1;
    commands_.push_back(std::move(command));
  }
  wake();
}

void QueueLoop::replace_channel(std::unique_ptr<ChannelEngine> fresh, Binding binding) {
  {
    std::lock_guard lock(commands_mutex_);
    Command command(Command::Kind::Replace);
    command.binding = binding;
    command.fresh = std::move(fresh);
    command.request = setups_requested_.fetch_add(1) + 1;
    command.replacement = replacements_requested_.fetch_add(1) + 1;
    commands_.push_back(std::move(command));
  }
  wake();
}

void QueueLoop::fail_outstanding(int error) {
  {
    std::lock_guard lock(commands_mutex_);
    Command command(Command::Kind::Fail);
    command.error = error;
    commands_.push_back(std::move(command));
  }
  wake();
}

void QueueLoop::stop() {
  {
    std::lock_guard lock(commands_mutex_);
    if (!accepting_) return;
    accepting_ = false;
    commands_.emplace_back(Command::Kind::Stop);
  }
  wake();
}

void QueueLoop::shutdown_connections() {
  {
    std::lock_guard lock(commands_mutex_);
    commands_.emplace_back(Command::Kind::Shutdown);
  }
  wake();
}

bool QueueLoop::attached() const {
  return engine_attached_.load() && setups_attached_.load() == setups_requested_.load();
}

// ---------------------------------------------------------------------------
// The loop thread
// ---------------------------------------------------------------------------

void QueueLoop::run() {
  block_async_signals();
  set_fine_timer_slack();
  const auto spin = std::chrono::microseconds(options_.spin_us);
  Clock::time_point last_activity = Clock::now();
  std::uint32_t backoff_us = 0;
  bool woken_by_peer = false;
  SpinYield spin_yield;
  progress_at_ = last_activity;
  for (;;) {
    const Clock::time_point now = Clock::now();
    const bool active = turn(now);
    publish_state();
    if (stopping_ && stop_done(now)) break;
    if (active) {
      last_activity = now;
      backoff_us = 0;
    }
    // The last wait was ended by the wake socket and the turn after it
    // found nothing: the next wait is a timed one, and the socket (one-shot)
    // stays out of the epoll set until a sleep arms it again, so a handler
    // that sends without completing anything gets the polling rate, not a
    // busy loop.
    const bool woke_for_nothing = woken_by_peer && !active;
    woken_by_peer = false;
    std::uint32_t timeout_us;
    const bool may_sleep = !woke_for_nothing && engine_->in_flight() > 0 && !engine_->setting_up() && !stopping_;
    if (const Clock::time_point at = Clock::now(); at - last_activity < spin && spin_yield.spin_allowed(at)) {
      // Spinning: only look for socket events, and give the CPU to any
      // thread waiting for it.  With more busy threads than cores (the
      // client, the backend's handlers) a pure spin holds the CPU the work
      // we wait for needs: at QD32 on two cores it halved the IOPS
      // (docs/performance.md).  With none waiting this returns at once; a
      // yield that cost a slice (a CPU hog ran) turns spins off for a
      // while, so the loop sleeps and the handler's wake preempts the hog.
      timeout_us = 0;
      spin_yield.yield();
    } else if (const auto sleep = may_sleep ? engine_->begin_sleep() : ChannelEngine::Sleep::CannotSleep;
               sleep != ChannelEngine::Sleep::CannotSleep) {
      // Completions came while we looked: straight back to work (counted
      // like a wake, so a turn that then finds nothing cannot repeat this).
      if (sleep == ChannelEngine::Sleep::WorkWaiting) {
        woken_by_peer = true;
        continue;
      }
      // The handler sends to our wake socket when it publishes while we
      // say we sleep (docs/design.md, Polling and doorbells): one wait
      // instead of a series of short ones.  The timeout still bounds it,
      // for the checks each turn makes.
      arm_peer_wake();
      woken_by_peer = wait_events(options_.max_sleep_us);
      engine_->end_sleep();
      continue;
    } else if (engine_->in_flight() > 0 || engine_->setting_up() || stopping_) {
      // A completion is seen at the latest when the wait ends: the waits
      // grow from 2 us, doubling, up to max-sleep-us, so a slow backend
      // costs few wake-ups and a fast one little latency.
      backoff_us = backoff_us == 0 ? kFirstWaitUs : std::min(backoff_us * 2, options_.max_sleep_us);
      timeout_us = std::min(backoff_us, options_.max_sleep_us);
    } else {
      timeout_us = kIdleWaitUs;
    }
    wait_events(timeout_us);
  }
  // Whatever is left: sessions are closed, the channel is quiet or abandoned.
  for (auto& served : served_) {
    served->session->close("queue stopped");
    unwatch(*served);
    if (!served->released) served->session->release_socket();
  }
  served_.clear();
  publish_state();
}

bool QueueLoop::turn(Clock::time_point now) {
  bool active = run_commands(now);
  ChannelEngine& engine = *engine_;

  if (engine.setting_up() && engine.poll_attached()) {
    setups_attached_.store(setup_request_running_);
    progress_at_ = now;
    active = true;
  }

  // Completions first: they free share and extents for the intake below.
  for (;;) {
    const std::size_t reaped = engine.reap(&NbdSession::dispatch);
    if (reaped == 0) break;
    active = true;
    progress_at_ = now;
    if (reaped < 256) break;
  }

  for (auto& served : served_) {
    NbdSession& session = *served->session;
    if (session.closed()) continue;
    if (served->writable && session.flush_output()) active = true;
    if (session.wants_write()) served->writable = false;
  }
  for (auto& served : served_) {
    NbdSession& session = *served->session;
    if (session.closed()) continue;
    if (!served->readable && !session.intake_stalled()) continue;
    if (session.pump_input()) active = true;
    // pump_input() reads until the socket has nothing more unless it was
    // held back (share used up, output backlog): then the data is still
    // there and no new edge will say so.
    if (session.wants_read()) served->readable = false;
  }
  engine.publish();
  for (auto& served : served_) {
    NbdSession& session = *served->session;
    if (session.closed()) continue;
    if (served->writable && session.flush_output()) active = true;
    if (session.wants_write()) served->writable = false;
    session.tick(now);
  }

  engine.expire_quarantine(now);
  check_stall(now);
  retire_sessions();
  return active;
}

bool QueueLoop::run_commands(Clock::time_point now) {
  // One atomic load per turn; the lock only when something was posted.
  if (!commands_pending_.exchange(false, std::memory_order_acq_rel)) return false;
  std::vector<Command> commands;
  std::vector<AdoptedConnection> adopted;
  {
    std::lock_guard lock(commands_mutex_);
    commands.swap(commands_);
    adopted.swap(adopted_);
  }
  for (AdoptedConnection& connection : adopted) start_session(std::move(connection));
  for (Command& command : commands) {
    switch (command.kind) {
      case Command::Kind::SetUp:
        setup_request_running_ = command.request;
        if (!engine_->begin_setup(command.binding)) lost_.store(true);
        progress_at_ = now;
        break;
      case Command::Kind::Replace: {
        // The sessions hold a reference to engine_ itself: swap what it
        // points to, never the pointer they refer to.
        std::unique_ptr<ChannelEngine> old = std::exchange(engine_, std::move(command.fresh));
        engine_->set_wake_socket(peer_wake_far_.get());
        engine_->set_quarantine(old->quarantine());
        engine_->adopt_outstanding(*old);
        old.reset();
        lost_.store(false);
        replacements_done_.store(command.replacement);
        setup_request_running_ = command.request;
        if (!engine_->begin_setup(command.binding)) lost_.store(true);
        progress_at_ = now;
        log(LogLevel::Info, "queue: moved %zu outstanding entries to channel %u", engine_->outstanding(),
            engine_->index());
        break;
      }
      case Command::Kind::Fail:
        engine_->fail_outstanding(command.error);
        break;
      case Command::Kind::Stop:
        begin_stop(now);
        break;
      case Command::Kind::Shutdown:
        for (auto& served : served_)
          if (!served->session->closed()) served->session->close("shut down at stop", false);
        break;
    }
  }
  return true;
}

void QueueLoop::start_session(AdoptedConnection connection) {
  if (stopping_) {
    connection.socket.reset();
    if (connection.on_closed) connection.on_closed();
    return;
  }
  auto served = std::make_unique<Served>();
  try {
    served->session = std::make_unique<NbdSession>(std::move(connection), info_, engine_, limits_);
  } catch (const std::exception& failure) {
    log(LogLevel::Error, "queue: cannot serve a new connection: %s", failure.what());
    return;  // the connection's socket and on_closed went with the failed session
  }
  watch(*served);
  served_.push_back(std::move(served));
}

void QueueLoop::watch(Served& served) {
  NbdSession& session = *served.session;
  const auto base = reinterpret_cast<std::uintptr_t>(&served);
  const bool same = session.in_fd() == session.out_fd();
  epoll_event event{};
  event.events = EPOLLIN | EPOLLRDHUP | EPOLLET | (same ? EPOLLOUT : 0u);
  event.data.u64 = base | kTagInput | (same ? kTagOutput : 0);
  // A regular file cannot be watched (EPERM): it is always ready, and the
  // readable/writable flags simply stay set.
  served.watched_in = ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, session.in_fd(), &event) == 0;
  if (!same) {
    event.events = EPOLLOUT | EPOLLET;
    event.data.u64 = base | kTagOutput;
    served.watched_out = ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, session.out_fd(), &event) == 0;
  }
}

void QueueLoop::unwatch(Served& served) {
  NbdSession& session = *served.session;
  if (served.watched_in) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, session.in_fd(), nullptr);
  if (served.watched_out) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, session.out_fd(), nullptr);
  served.watched_in = served.watched_out = false;
}

bool QueueLoop::wait_events(std::uint32_t timeout_us) {
  bool peer_woke = false;
  epoll_event events[kMaxEvents];
  const timespec timeout{static_cast<time_t>(timeout_us / 1000000), static_cast<long>(timeout_us % 1000000) * 1000};
  int n = ::epoll_pwait2(epoll_.get(), events, kMaxEvents, &timeout, nullptr);
  if (n < 0 && errno == ENOSYS) {
    // Before Linux 5.11: millisecond timeouts, rounded up so that a short
    // wait is never a busy loop.
    n = ::epoll_wait(epoll_.get(), events, kMaxEvents, static_cast<int>((timeout_us + 999) / 1000));
  }
  for (int i = 0; i < n; ++i) {
    const std::uint64_t data = events[i].data.u64;
    if (data == 0) {
      std::uint64_t count;
      [[maybe_unused]] ssize_t r = ::read(wake_fd_.get(), &count, sizeof count);
      continue;
    }
    if (data == kPeerWakeData) {
      peer_wake_armed_ = false;  // one-shot: disarmed by this event
      peer_woke = true;
      drain_wakes(peer_wake_near_.get());
      continue;
    }
    auto* served = reinterpret_cast<Served*>(static_cast<std::uintptr_t>(data) & ~kTagMask);
    const std::uint32_t what = events[i].events;
    const bool trouble = what & (EPOLLERR | EPOLLHUP | EPOLLRDHUP);
    if ((data & kTagInput) && (what & EPOLLIN || trouble)) served->readable = true;
    if ((data & kTagOutput) && (what & EPOLLOUT || trouble)) served->writable = true;
  }
  return peer_woke;
}

void QueueLoop::arm_peer_wake() {
  if (peer_wake_armed_) return;
  epoll_event event{};
  event.events = EPOLLIN | EPOLLONESHOT;
  event.data.u64 = kPeerWakeData;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, peer_wake_near_.get(), &event) == 0) peer_wake_armed_ = true;
}

void QueueLoop::check_stall(Clock::time_point now) {
  ChannelEngine& engine = *engine_;
  // Completions the engine consumes itself (refills) are progress too.
  progress_at_ = std::max(progress_at_, engine.last_progress());
  if (!engine.attached() || (engine.in_flight() == 0 && !engine.parked())) {
    progress_at_ = now;
    broken_since_ = {};
    return;
  }
  bool broken = false;
  if (engine.ring_broken()) {
    if (broken_since_ == Clock::time_point{}) broken_since_ = now;
    broken = now - broken_since_ > kBrokenGrace;
  } else {
    broken_since_ = {};
  }
  const bool stalled = now - progress_at_ > stall_timeout_;
  if (!broken && !stalled) return;
  static RateLimit stall_log(std::chrono::seconds(10));
  if (stall_log.allow())
    log(LogLevel::Warning,
        "channel %u: %s with %zu entries in flight%s; setting the channel up again and re-driving them",
        engine.index(),
        broken ? "the completion ring's producer index is impossible (corrupt control block)"
               : "no completion for too long",
        engine.in_flight(), engine.parked() ? " and some waiting outside the ring" : "");
  if (!engine.begin_setup()) lost_.store(true);
  progress_at_ = now;
  broken_since_ = {};
}

void QueueLoop::begin_stop(Clock::time_point now) {
  if (stopping_) return;
  stopping_ = true;
  stop_deadline_ = now + kStopLimit;
  for (auto& served : served_) served->session->begin_drain();
}

bool QueueLoop::stop_done(Clock::time_point now) {
  bool all_closed = true;
  for (auto& served : served_)
    if (!served->session->closed()) all_closed = false;
  if (!all_closed && now < stop_deadline_) return false;
  if (all_closed && sessions_closed_at_ == Clock::time_point{}) sessions_closed_at_ = now;
  ChannelEngine& engine = *engine_;
  const bool quiet = engine.in_flight() == 0 || !engine.attached();
  if (!quiet && now < stop_deadline_ && now - sessions_closed_at_ < kInFlightGrace) return false;
  // Abandon what is left: a dead backend must not hold up the stop.
  for (auto& served : served_)
    if (!served->session->closed()) served->session->close("stopping: replies not taken in time");
  engine.fail_outstanding(ESHUTDOWN);
  while (engine.reap(&NbdSession::dispatch) > 0) {
  }
  return true;
}

void QueueLoop::retire_sessions() {
  for (auto& served : served_) {
    if (!served->session->closed() || served->released) continue;
    unwatch(*served);
    served->session->release_socket();
    served->released = true;
  }
  auto done = std::remove_if(served_.begin(), served_.end(),
                             [](const std::unique_ptr<Served>& served) { return served->session->finished(); });
  served_.erase(done, served_.end());
}

void QueueLoop::publish_state() {
  std::size_t open = 0;
  for (auto& served : served_)
    if (!served->released) ++open;
  connections_.store(open, std::memory_order_relaxed);
  outstanding_.store(engine_->outstanding(), std::memory_order_relaxed);
  const bool lost = engine_->lost();
  if (lost) lost_.store(true, std::memory_order_release);
  engine_attached_.store(!lost && engine_->attached() && engine_->failing() == 0, std::memory_order_relaxed);
}

}  // namespace cbd::proxy
