// Bus errors in a transport mapping (docs/design.md, "Truncated or vanished
// transport").  A file transport that is truncated (or a device that goes
// away) under a live mapping turns every later access beyond its new end
// into SIGBUS, which would kill the whole daemon: nbdkit together with its
// ordinary NBD export, cbd-proxy together with its clients' connections.
//
// A FaultGuardedMapping registers the address range of one mapping with a
// process-wide SIGBUS handler, installed with the first registration and
// removed with the last.  For a bus error inside a registered range the
// handler maps anonymous zero pages over the whole mapping in place
// (MAP_FIXED), which lets the faulting instruction retry and keeps every
// pointer into the mapping valid, records the offset and returns.  The
// process then reads zeros, which no slot or ring takes for its own state,
// until a TransportFaultMonitor (an ordinary thread) sees the record and
// stops whatever serves the transport.  A bus error anywhere else goes to
// the handler that was installed before ours (a sanitizer's, say) or gets
// the default action: real crashes still crash, with a core.
//
// SIGSEGV is left alone: a transport mapping never raises it (it stays
// mapped until its Region is destroyed), so there is no fault of ours to
// scope it to.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

namespace cbd {

class FaultGuardedMapping {
 public:
  FaultGuardedMapping() = default;
  // Registers [base, base + size).  Throws cbd::Error when too many mappings
  // are registered at once or the handler cannot be installed.
  FaultGuardedMapping(void* base, std::uint64_t size);
  FaultGuardedMapping(FaultGuardedMapping&& other) noexcept;
  FaultGuardedMapping& operator=(FaultGuardedMapping&& other) noexcept;
  FaultGuardedMapping(const FaultGuardedMapping&) = delete;
  FaultGuardedMapping& operator=(const FaultGuardedMapping&) = delete;
  // Unregisters; call it before the range is unmapped.
  ~FaultGuardedMapping() { reset(); }
  void reset() noexcept;

  // The offset of the first bus error in the mapping, once the handler has
  // replaced it with zero pages; nullopt while the mapping is intact.
  std::optional<std::uint64_t> fault_offset() const;

 private:
  int entry_ = -1;
};

// How many mappings can be registered at once (a daemon maps one transport;
// tests map a few).
inline constexpr int kMaxFaultGuardedMappings = 64;

}  // namespace cbd
