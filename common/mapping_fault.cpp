#include "common/mapping_fault.hpp"

#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>

#include "common/error.hpp"

namespace cbd {
namespace {

// The life of one table entry.  Registration and removal happen in ordinary
// code under registry_mutex; the signal handler only moves Live -> Remapping
// -> Zeroed (or Failed) and reads base and size.
enum EntryState : int { Free, Reserved, Live, Remapping, Zeroed, Failed };

struct Entry {
  std::atomic<int> state{Free};
  std::atomic<std::uintptr_t> base{0};
  std::atomic<std::uintptr_t> size{0};
  std::atomic<std::uint64_t> fault_offset{0};
};

static_assert(std::atomic<int>::is_always_lock_free && std::atomic<std::uintptr_t>::is_always_lock_free &&
                  std::atomic<std::uint64_t>::is_always_lock_free,
              "the signal handler needs lock-free atomics");

Entry entries[kMaxFaultGuardedMappings];
std::mutex registry_mutex;  // registration and handler installation; never taken by the handler
int registered = 0;         // guarded by registry_mutex
struct sigaction previous_action;  // written before our handler is installed, read by it

void on_bus_error(int signal, siginfo_t* info, void* context);

bool our_handler_installed() {
  struct sigaction current {};
  if (::sigaction(SIGBUS, nullptr, &current) != 0) return false;
  return (current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_bus_error;
}

// Hands a bus error that is not ours to whoever would have had it without us.
void chain(int signal, siginfo_t* info, void* context) {
  if (previous_action.sa_flags & SA_SIGINFO) {
    if (previous_action.sa_sigaction) {
      previous_action.sa_sigaction(signal, info, context);
      return;
    }
  } else if (previous_action.sa_handler != SIG_DFL && previous_action.sa_handler != SIG_IGN) {
    previous_action.sa_handler(signal);
    return;
  }
  // Default action.  A fault re-executes the faulting instruction when we
  // return, which now kills the process with SIGBUS (and a core, as without
  // us); a bus error sent with kill() is re-sent and delivered on return.
  struct sigaction default_action {};
  default_action.sa_handler = SIG_DFL;
  sigemptyset(&default_action.sa_mask);
  ::sigaction(SIGBUS, &default_action, nullptr);
  if (info->si_code <= 0) ::raise(signal);
}

// Async-signal-safe: atomics and raw system calls only (the mmap wrapper may
// be intercepted by a sanitizer runtime, which is not signal-safe).
void on_bus_error(int signal, siginfo_t* info, void* context) {
  int saved_errno = errno;
  // Only a fault raised by the kernel has a meaningful address.
  if (info->si_code > 0) {
    auto address = reinterpret_cast<std::uintptr_t>(info->si_addr);
    for (Entry& entry : entries) {
      int state = entry.state.load(std::memory_order_acquire);
      if (state != Live && state != Remapping && state != Zeroed) continue;
      std::uintptr_t base = entry.base.load(std::memory_order_relaxed);
      std::uintptr_t size = entry.size.load(std::memory_order_relaxed);
      if (address < base || address - base >= size) continue;
      if (state == Live && entry.state.compare_exchange_strong(state, Remapping, std::memory_order_acq_rel)) {
        long mapped = ::syscall(SYS_mmap, base, size, PROT_READ | PROT_WRITE,
                                MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mapped == static_cast<long>(base)) {
          entry.fault_offset.store(address - base, std::memory_order_relaxed);
          entry.state.store(Zeroed, std::memory_order_release);
          errno = saved_errno;
          return;  // the faulting access retries on a zero page
        }
        entry.state.store(Failed, std::memory_order_release);
        break;  // cannot repair it: die as without us
      }
      // Another thread is replacing (or has replaced) the mapping: retry
      // the access, which faults again until the zero pages are in place.
      if (state == Remapping || state == Zeroed) {
        errno = saved_errno;
        return;
      }
      break;
    }
  }
  chain(signal, info, context);
  errno = saved_errno;
}

void install_handler() {
  struct sigaction ours {};
  ours.sa_sigaction = on_bus_error;
  ours.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  sigemptyset(&ours.sa_mask);
  if (::sigaction(SIGBUS, nullptr, &previous_action) != 0) throw_errno("SIGBUS handler for the transport: sigaction");
  if (::sigaction(SIGBUS, &ours, nullptr) != 0) throw_errno("SIGBUS handler for the transport: sigaction");
}

void remove_handler() {
  // Only when nobody installed theirs over ours (it may chain to ours).
  if (our_handler_installed()) ::sigaction(SIGBUS, &previous_action, nullptr);
}

}  // namespace

FaultGuardedMapping::FaultGuardedMapping(void* base, std::uint64_t size) {
  std::lock_guard lock(registry_mutex);
  int index = -1;
  for (int i = 0; i < kMaxFaultGuardedMappings; ++i) {
    int expected = Free;
    if (entries[i].state.compare_exchange_strong(expected, Reserved)) {
      index = i;
      break;
    }
  }
  if (index < 0)
    throw Error("transport mapping: more than " + std::to_string(kMaxFaultGuardedMappings) +
                " transports mapped at once in this process — close some first");
  Entry& entry = entries[index];
  entry.base.store(reinterpret_cast<std::uintptr_t>(base), std::memory_order_relaxed);
  entry.size.store(static_cast<std::uintptr_t>(size), std::memory_order_relaxed);
  entry.fault_offset.store(0, std::memory_order_relaxed);
  if (registered == 0 && !our_handler_installed()) {
    try {
      install_handler();
    } catch (...) {
      entry.state.store(Free);
      throw;
    }
  }
  ++registered;
  entry.state.store(Live, std::memory_order_release);
  entry_ = index;
}

FaultGuardedMapping::FaultGuardedMapping(FaultGuardedMapping&& other) noexcept
    : entry_(std::exchange(other.entry_, -1)) {}

FaultGuardedMapping& FaultGuardedMapping::operator=(FaultGuardedMapping&& other) noexcept {
  if (this != &other) {
    reset();
    entry_ = std::exchange(other.entry_, -1);
  }
  return *this;
}

void FaultGuardedMapping::reset() noexcept {
  if (entry_ < 0) return;
  Entry& entry = entries[entry_];
  std::lock_guard lock(registry_mutex);
  // A handler replacing the mapping right now finishes before the caller
  // unmaps it.
  while (entry.state.load(std::memory_order_acquire) == Remapping) ::sched_yield();
  entry.state.store(Free, std::memory_order_release);
  if (--registered == 0) remove_handler();
  entry_ = -1;
}

std::optional<std::uint64_t> FaultGuardedMapping::fault_offset() const {
  if (entry_ < 0) return std::nullopt;
  const Entry& entry = entries[entry_];
  if (entry.state.load(std::memory_order_acquire) != Zeroed) return std::nullopt;
  return entry.fault_offset.load(std::memory_order_relaxed);
}

}  // namespace cbd
