#include "client/threaded_sink.hpp"

#include <sys/socket.h>

#include "client/nbd_connection.hpp"
#include "common/log.hpp"

namespace cbd::proxy {

ThreadedSink::ThreadedSink(ExportInfo info, TargetFactory factory)
    : info_(std::move(info)), factory_(std::move(factory)) {}

ThreadedSink::~ThreadedSink() {
  shutdown_all();
  std::list<Served> served;
  {
    std::lock_guard lock(mutex_);
    served.swap(served_);
  }
  for (Served& s : served) s.thread.join();
}

void ThreadedSink::adopt(AdoptedConnection connection) {
  std::shared_ptr<RequestTarget> target = factory_();
  std::lock_guard lock(mutex_);
  Served& served = served_.emplace_back();
  served.socket = connection.socket.get();
  served.thread = std::thread([this, target, connection = std::move(connection)]() mutable {
    if (target) {
      NbdConnection nbd(connection.in_fd, connection.out_fd, info_, connection.negotiated, target);
      const NbdConnection::End end = nbd.run();
      log(LogLevel::Debug, "nbd: adopted connection ended (%d)", static_cast<int>(end));
    } else {
      log(LogLevel::Warning, "nbd: no queue for an adopted connection; closing it");
    }
    {
      // The fd number may be reused once closed: forget it first.
      std::lock_guard lock(mutex_);
      for (Served& s : served_)
        if (s.thread.get_id() == std::this_thread::get_id()) s.socket = -1;
    }
    connection.socket.reset();
    if (connection.on_closed) connection.on_closed();
  });
}

void ThreadedSink::shutdown_all() {
  std::lock_guard lock(mutex_);
  for (Served& s : served_)
    if (s.socket >= 0) ::shutdown(s.socket, SHUT_RDWR);
}

}  // namespace cbd::proxy
