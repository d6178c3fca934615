// A transport file truncated under a live mapping: the bus error is absorbed
// (zero pages, offset recorded) and reported by the monitor; bus errors
// anywhere else still kill the process.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/mapping_fault.hpp"
#include "common/region.hpp"
#include "common/transport_fault_monitor.hpp"
#include "shm_fixture.hpp"

using namespace cbd;
using namespace cbd::test;

namespace {

constexpr std::uint64_t kSize = 1 << 20;

Region create_file_region(const ShmFile& file) {
  RegionOptions options;
  options.create = true;
  options.size = kSize;
  return Region::open(file.path(), options);
}

std::uint8_t touch(const std::byte* address) { return *reinterpret_cast<const volatile std::uint8_t*>(address); }

// What a bus error outside our ranges ends in: SIGBUS, or, under
// AddressSanitizer (whose handler we chain to), its report and exit.
void check_killed_by_bus_error(int status) {
#if defined(__SANITIZE_ADDRESS__)
  CHECK(status != 0);
  CHECK(status != -1);
#else
  CHECK(status == 128 + SIGBUS);
#endif
}

}  // namespace

TEST_CASE("a truncated transport file reads as zeros, records the offset and does not kill us") {
  ShmFile file("fault");
  pid_t child = spawn([&] {
    Region region = create_file_region(file);
    std::memset(region.base(), 0xab, kSize);
    if (region.fault_offset()) return 1;
    if (::truncate(file.path().c_str(), 4096) != 0) return 2;
    std::byte* probe = region.base() + 512 * 1024 + 8;
    if (touch(probe) != 0) return 3;          // faulted, then read a zero page
    auto offset = region.fault_offset();
    if (!offset || *offset != 512 * 1024 + 8) return 4;
    // The whole mapping was replaced, in place: every pointer stays valid
    // and writable, including below the new end of the file.
    if (touch(region.base()) != 0) return 5;
    region.base()[100] = std::byte{7};
    if (touch(region.base() + 100) != 7) return 6;
    return 0;
  });
  CHECK(wait_child(child, std::chrono::seconds(20)) == 0);
}

TEST_CASE("threads faulting at once in a truncated transport all carry on") {
  ShmFile file("fault-threads");
  pid_t child = spawn([&] {
    Region region = create_file_region(file);
    std::memset(region.base(), 0x5a, kSize);
    if (::truncate(file.path().c_str(), 0) != 0) return 2;
    std::atomic<unsigned> nonzero{0};
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < 4; ++t)
      threads.emplace_back([&, t] {
        for (std::uint64_t page = t; page < kSize / 4096; page += 4)
          if (touch(region.base() + page * 4096) != 0) ++nonzero;
      });
    for (auto& thread : threads) thread.join();
    if (nonzero != 0) return 3;
    return region.fault_offset() ? 0 : 4;
  });
  CHECK(wait_child(child, std::chrono::seconds(20)) == 0);
}

TEST_CASE("a bus error outside every transport mapping still kills the process") {
  ShmFile file("fault-guarded");
  ShmFile other("fault-unguarded");
  pid_t child = spawn([&] {
    Region region = create_file_region(file);  // our handler is installed
    int fd = ::open(other.path().c_str(), O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ::ftruncate(fd, kSize) != 0) return 2;
    void* mapped = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mapped == MAP_FAILED) return 3;
    if (::ftruncate(fd, 0) != 0) return 4;
    touch(static_cast<std::byte*>(mapped) + 4096);  // not ours: must not survive this
    return 0;
  });
  check_killed_by_bus_error(wait_child(child, std::chrono::seconds(20)));
}

TEST_CASE("a SIGBUS sent with kill() is not taken for a transport fault") {
  ShmFile file("fault-kill");
  pid_t child = spawn([&] {
    Region region = create_file_region(file);
    ::kill(::getpid(), SIGBUS);
    return region.fault_offset() ? 1 : 0;
  });
  check_killed_by_bus_error(wait_child(child, std::chrono::seconds(20)));
}

TEST_CASE("the handler is removed with the last mapping, and a previous handler gets the faults that are not ours") {
  ShmFile file("fault-chain");
  ShmFile other("fault-chain-other");
  pid_t child = spawn([&] {
    static std::atomic<int> previous_calls{0};
    struct sigaction previous {};
    previous.sa_handler = [](int) {
      ++previous_calls;
      ::_exit(42);  // a sanitizer-like handler: reports and exits
    };
    sigemptyset(&previous.sa_mask);
    ::sigaction(SIGBUS, &previous, nullptr);
    {
      Region region = create_file_region(file);
      struct sigaction current {};
      ::sigaction(SIGBUS, nullptr, &current);
      if (!(current.sa_flags & SA_SIGINFO)) return 1;  // ours is installed over it
    }
    struct sigaction current {};
    ::sigaction(SIGBUS, nullptr, &current);
    if (current.sa_handler != previous.sa_handler) return 2;  // restored once the last region went
    Region region = create_file_region(file);
    int fd = ::open(other.path().c_str(), O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ::ftruncate(fd, kSize) != 0) return 3;
    void* mapped = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mapped == MAP_FAILED || ::ftruncate(fd, 0) != 0) return 4;
    touch(static_cast<std::byte*>(mapped));
    return 5;
  });
  CHECK(wait_child(child, std::chrono::seconds(20)) == 42);
}

TEST_CASE("the monitor reports a fault once, naming the path and the offset") {
  ShmFile file("fault-monitor");
  pid_t child = spawn([&] {
    Region region = create_file_region(file);
    std::mutex mutex;
    std::vector<std::string> messages;
    TransportFaultMonitor monitor(region, [&](const std::string& message) {
      std::lock_guard lock(mutex);
      messages.push_back(message);
    }, std::chrono::milliseconds(10));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (monitor.fired()) return 1;
    if (::truncate(file.path().c_str(), 8192) != 0) return 2;
    touch(region.base() + 3 * 4096);
    touch(region.base() + 5 * 4096);
    for (int i = 0; i < 500 && !monitor.fired(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::lock_guard lock(mutex);
    if (messages.size() != 1) return 3;
    std::string expected = "transport " + file.path() + ": truncated or removed under us (bus error at offset " +
                           std::to_string(3 * 4096) + ")";
    if (messages[0] != expected) {
      std::fprintf(stderr, "got: %s\n", messages[0].c_str());
      return 4;
    }
    return 0;
  });
  CHECK(wait_child(child, std::chrono::seconds(20)) == 0);
}
