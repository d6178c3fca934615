// A thread that runs a function at a fixed interval until destroyed
// (heartbeats, liveness sweeps).  Joins in its destructor.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

namespace cbd {

class PeriodicThread {
 public:
  PeriodicThread() = default;
  PeriodicThread(std::chrono::milliseconds interval, std::function<void()> tick);
  PeriodicThread(const PeriodicThread&) = delete;
  PeriodicThread& operator=(const PeriodicThread&) = delete;
  ~PeriodicThread() { stop(); }
  void stop();

 private:
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace cbd
