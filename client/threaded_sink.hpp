// A ConnectionSink that serves each adopted connection with the blocking
// NbdConnection in a thread of its own, on the queue the RequestTarget
// factory picks.
//
// This is the bridge that keeps the transmission phase working while the
// per-queue event loop (docs/design.md, "Compute side") is not there yet; it
// has none of that loop's isolation between clients.  It goes once the
// queue loop implements ConnectionSink itself.
//
// Destroying the sink ends every connection: the read sides are shut so
// each connection stops taking requests and finishes those in flight; a
// connection that still has not ended after kStopGrace (its client does not
// read its replies) is shut down completely, which fails its pending sends.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <thread>

#include "client/connection_handoff.hpp"
#include "client/request_target.hpp"

namespace cbd::proxy {

class ThreadedSink final : public ConnectionSink {
 public:
  using TargetFactory = std::function<std::shared_ptr<RequestTarget>()>;
  static constexpr std::chrono::milliseconds kStopGrace{2000};

  ThreadedSink(ExportInfo info, TargetFactory next_target);
  ~ThreadedSink() override;
  ThreadedSink(const ThreadedSink&) = delete;
  ThreadedSink& operator=(const ThreadedSink&) = delete;

  ExportInfo info() const override { return info_; }
  void adopt(AdoptedConnection connection) override;
  // Ends every connection now, whatever its peer does: its socket is shut
  // down both ways, so reads see EOF and pending sends fail; requests in
  // flight still finish before the connection's thread returns.
  void shutdown_all();

 private:
  struct Served {
    AdoptedConnection connection;  // socket closed (under mutex_) when the connection ends
    std::thread thread;
    bool finished = false;         // under mutex_
  };

  void serve(Served& served, std::shared_ptr<RequestTarget> target);
  void reap_finished();

  const ExportInfo info_;
  TargetFactory next_target_;
  std::mutex mutex_;
  std::condition_variable ended_;
  std::list<std::unique_ptr<Served>> served_;
};

}  // namespace cbd::proxy
