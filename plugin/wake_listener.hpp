// The backend's end of the queue wake-up (docs/design.md, Polling and
// doorbells; common/wake_socket.hpp): a thread that accepts the sockets
// queue sides hand over at each set-up, and the table the handler threads
// take them from when they attach.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.hpp"

namespace cbd::backend {

// One socket per channel at most, for the newest generation handed over.
class WakeSocketTable {
 public:
  explicit WakeSocketTable(std::uint32_t channels) : entries_(channels) {}

  // Keeps `socket` for (channel, generation) unless one for that
  // generation is already here: the first hand-over of a set-up wins (the
  // queue side hands it over before it publishes the generation).
  void deposit(std::uint32_t channel, std::uint64_t generation, UniqueFd socket);
  // The socket handed over for exactly this set-up, or an empty one.
  UniqueFd take(std::uint32_t channel, std::uint64_t generation);

 private:
  struct Entry {
    std::uint64_t generation = 0;
    UniqueFd socket;
  };
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

class WakeListener {
 public:
  // Listens on `name` (an abstract unix socket).  Throws cbd::Error when
  // it cannot; the caller then does without.
  WakeListener(const std::string& name, WakeSocketTable& table, std::uint32_t channel_count);
  WakeListener(const WakeListener&) = delete;
  WakeListener& operator=(const WakeListener&) = delete;
  ~WakeListener();

 private:
  void run();
  void accept_all();

  WakeSocketTable& table_;
  const std::uint32_t channel_count_;
  UniqueFd listener_;
  UniqueFd stop_;  // eventfd
  std::thread thread_;
};

}  // namespace cbd::backend
