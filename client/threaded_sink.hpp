// TEMPORARY adapter until the queue event loop lands: a ConnectionSink that
// serves every adopted connection with NbdConnection in a thread of its own,
// as NbdServer does after its handshake.  The queue loop replaces it; the
// kernel device attachment only depends on the ConnectionSink interface.
#pragma once

#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <thread>

#include "client/connection_handoff.hpp"

namespace cbd::proxy {

class ThreadedSink final : public ConnectionSink {
 public:
  using TargetFactory = std::function<std::shared_ptr<RequestTarget>()>;
  ThreadedSink(ExportInfo info, TargetFactory factory);
  // Shuts every remaining connection down and joins its thread.
  ~ThreadedSink() override;
  ThreadedSink(const ThreadedSink&) = delete;
  ThreadedSink& operator=(const ThreadedSink&) = delete;

  ExportInfo info() const override { return info_; }
  void adopt(AdoptedConnection connection) override;
  // Ends every connection now: the peers see their sockets shut; requests in
  // flight still finish before the threads return.
  void shutdown_all();

 private:
  struct Served {
    std::thread thread;
    int socket = -1;  // owned by the thread's AdoptedConnection
  };
  const ExportInfo info_;
  const TargetFactory factory_;
  std::mutex mutex_;
  std::list<Served> served_;
};

}  // namespace cbd::proxy
