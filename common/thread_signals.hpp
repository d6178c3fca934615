// Signal mask of service threads (heartbeats, handlers, completion pollers).
#pragma once

namespace cbd {

// Leaves asynchronous signals (SIGTERM, SIGINT, SIGHUP, ...) to the main
// thread, which owns shutdown, by blocking them in the calling thread.
// Signals raised by a fault in the thread itself (SIGSEGV, SIGBUS, SIGFPE,
// SIGILL, SIGTRAP, SIGSYS) stay unblocked: blocked, the kernel would kill
// the process without running any handler, and a sanitizer's report of the
// fault would be lost.
void block_async_signals();

}  // namespace cbd
