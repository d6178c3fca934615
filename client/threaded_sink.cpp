#include "client/threaded_sink.hpp"

#include <sys/socket.h>

#include <exception>

#include "client/nbd_connection.hpp"
#include "common/log.hpp"

namespace cbd::proxy {

namespace {

const char* end_name(NbdConnection::End end) {
  switch (end) {
    case NbdConnection::End::Disconnect: return "client disconnected";
    case NbdConnection::End::Eof: return "connection closed";
    case NbdConnection::End::ProtocolError: return "protocol error";
    case NbdConnection::End::ConnectionError: return "connection error";
  }
  return "?";
}

}  // namespace

ThreadedSink::ThreadedSink(ExportInfo info, TargetFactory next_target)
    : info_(std::move(info)), next_target_(std::move(next_target)) {}

ThreadedSink::~ThreadedSink() {
  std::unique_lock lock(mutex_);
  // Reading stops: each connection finishes what it has in flight, sends
  // those replies and ends.  (A pipe on stdin cannot be shut; that
  // connection ends when its client closes.)
  for (auto& served : served_)
    if (!served->finished && served->connection.socket) ::shutdown(served->connection.socket.get(), SHUT_RD);
  const auto all_finished = [&] {
    for (auto& served : served_)
      if (!served->finished) return false;
    return true;
  };
  if (!ended_.wait_for(lock, kStopGrace, all_finished)) {
    // A client that does not read its replies would hold us forever.
    for (auto& served : served_)
      if (!served->finished && served->connection.socket) ::shutdown(served->connection.socket.get(), SHUT_RDWR);
  }
  std::list<std::unique_ptr<Served>> all;
  all.swap(served_);
  lock.unlock();
  for (auto& served : all) served->thread.join();
}

void ThreadedSink::shutdown_all() {
  std::lock_guard lock(mutex_);
  for (auto& served : served_)
    if (!served->finished && served->connection.socket) ::shutdown(served->connection.socket.get(), SHUT_RDWR);
}

void ThreadedSink::adopt(AdoptedConnection connection) {
  reap_finished();
  std::shared_ptr<RequestTarget> target;
  try {
    target = next_target_();
  } catch (const std::exception& failure) {
    log(LogLevel::Error, "nbd server: cannot serve a new connection: %s", failure.what());
  }
  if (!target) {
    log(LogLevel::Warning, "nbd server: no queue available for a new connection; closing it");
    connection.socket.reset();
    if (connection.on_closed) connection.on_closed();
    return;
  }
  auto served = std::make_unique<Served>();
  served->connection = std::move(connection);
  Served& raw = *served;
  std::lock_guard lock(mutex_);
  try {
    raw.thread = std::thread([this, &raw, target = std::move(target)]() mutable { serve(raw, std::move(target)); });
  } catch (const std::system_error& failure) {
    log(LogLevel::Error, "nbd server: cannot start a connection thread: %s", failure.what());
    raw.connection.socket.reset();
    if (raw.connection.on_closed) raw.connection.on_closed();
    return;
  }
  served_.push_back(std::move(served));
}

void ThreadedSink::serve(Served& served, std::shared_ptr<RequestTarget> target) {
  const AdoptedConnection& connection = served.connection;
  try {
    NbdConnection nbd(connection.in_fd, connection.out_fd, info_, connection.negotiated, target);
    const NbdConnection::End end = nbd.run();
    log(LogLevel::Debug, "nbd: connection ended: %s", end_name(end));
  } catch (const std::exception& failure) {
    log(LogLevel::Error, "nbd server: connection failed: %s", failure.what());
  }
  target.reset();  // hand the queue back before we announce the end
  std::function<void()> on_closed;
  {
    std::lock_guard lock(mutex_);
    served.connection.socket.reset();  // under the lock: the destructor may be shutting it down
    served.finished = true;
    on_closed = std::move(served.connection.on_closed);
  }
  ended_.notify_all();
  if (on_closed) on_closed();
}

void ThreadedSink::reap_finished() {
  std::list<std::unique_ptr<Served>> ended;
  {
    std::lock_guard lock(mutex_);
    for (auto it = served_.begin(); it != served_.end();) {
      if ((*it)->finished) {
        ended.splice(ended.end(), served_, it++);
      } else {
        ++it;
      }
    }
  }
  for (auto& served : ended) served->thread.join();
}

}  // namespace cbd::proxy
