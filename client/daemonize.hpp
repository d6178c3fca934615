// Going into the background with a readiness hand-off: the command that
// started the daemon returns only once the daemon is actually serving (or
// with the daemon's own exit status if it failed first), so a script that
// runs `cbd-proxy connect ... daemon && nbd-client ...` never races it.
#pragma once

#include <string>

#include "common/unique_fd.hpp"

namespace cbd::proxy {

// Forks.  In the parent: waits until the child calls report_ready() (returns
// 0) or exits (returns its exit status, at least 1).  In the child: returns
// -1 with `ready` holding the hand-off pipe, in a new session with stdin and
// stdout on /dev/null (stderr is kept: errors before readiness are the
// user's to see).  Call before any thread exists: threads do not survive fork.
int daemonize(UniqueFd& ready);

// Tells the waiting parent that the daemon is serving; closes the pipe.
// Does nothing when `ready` is empty (not a daemon).
void report_ready(UniqueFd& ready);

// Writes our pid to `path` (nothing when empty); throws cbd::Error naming
// the file when it cannot.
void write_pidfile(const std::string& path);

}  // namespace cbd::proxy
