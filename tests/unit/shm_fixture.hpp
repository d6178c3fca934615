// Helpers shared by the transport unit tests: unique /dev/shm files removed
// on scope exit, a freshly formatted transport, and forked children with a
// deadline.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <thread>

#include "common/region.hpp"
#include "common/transport.hpp"

namespace cbd::test {

// A unique path under /dev/shm (pid + counter), unlinked before use and
// when the object goes out of scope.
class ShmFile {
 public:
  explicit ShmFile(const std::string& tag = "t") {
    static std::atomic<unsigned> counter{0};
    path_ = "/dev/shm/cbd-unit-" + tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
    ::unlink(path_.c_str());
  }
  ~ShmFile() { ::unlink(path_.c_str()); }
  ShmFile(const ShmFile&) = delete;
  ShmFile& operator=(const ShmFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Small geometry that formats quickly on tmpfs.
inline FormatOptions small_options() {
  FormatOptions o;
  o.size = 0;
  o.hosts = 4;
  o.backends = 4;
  o.blkdevs = 4;
  o.channels = 2;
  o.data_size = 256 << 10;
  o.sq_entries = 64;
  o.cq_entries = 64;
  return o;
}

// Creates `file` with `size` bytes, formats it with `options` and attaches.
inline Transport make_transport(const ShmFile& file, const FormatOptions& options, std::uint64_t size = 8 << 20) {
  RegionOptions ro;
  ro.create = true;
  ro.size = size;
  Region region = Region::open(file.path(), ro);
  format(region, options);
  return Transport(std::move(region));
}

// Runs `body` in a forked child; its return value is the exit status.
// Exceptions become status 100.  The child never returns into doctest.
inline pid_t spawn(const std::function<int()>& body) {
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    int status = 100;
    try {
      status = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child %d: exception: %s\n", ::getpid(), e.what());
    } catch (...) {
      std::fprintf(stderr, "child %d: unknown exception\n", ::getpid());
    }
    std::fflush(nullptr);
    ::_exit(status);
  }
  return pid;
}

// Waits for `pid` up to `timeout`; kills it when the deadline passes.
// Returns the exit status, 128+signal when killed by a signal, -1 on timeout.
inline int wait_child(pid_t pid, std::chrono::seconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return -2;
    }
    if (r < 0) return -3;
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

}  // namespace cbd::test
