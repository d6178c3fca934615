#include "common/thread_signals.hpp"

#include <pthread.h>
#include <signal.h>

#include <initializer_list>

namespace cbd {

void block_async_signals() {
  sigset_t set;
  sigfillset(&set);
  for (int synchronous : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS}) sigdelset(&set, synchronous);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

}  // namespace cbd
