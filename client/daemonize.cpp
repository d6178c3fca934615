#include "client/daemonize.hpp"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>

#include "common/error.hpp"

namespace cbd::proxy {

int daemonize(UniqueFd& ready) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw_errno("daemon: pipe2");
  UniqueFd read_end(fds[0]);
  ready.reset(fds[1]);
  const pid_t child = ::fork();
  if (child < 0) throw_errno("daemon: fork");
  if (child > 0) {
    ready.reset();
    char byte = 0;
    ssize_t n;
    // EOF without a byte: the child exited (or exec'd) before it was ready.
    do n = ::read(read_end.get(), &byte, 1);
    while (n < 0 && errno == EINTR);
    if (n == 1) return 0;
    int status = 0;
    while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(status) && WEXITSTATUS(status) != 0 ? WEXITSTATUS(status) : 1;
  }
  read_end.reset();
  ::setsid();
  UniqueFd null(::open("/dev/null", O_RDWR | O_CLOEXEC));
  if (null) {
    ::dup2(null.get(), STDIN_FILENO);
    ::dup2(null.get(), STDOUT_FILENO);
  }
  return -1;
}

void report_ready(UniqueFd& ready) {
  if (!ready) return;
  const char byte = 'r';
  ssize_t n;
  do n = ::write(ready.get(), &byte, 1);
  while (n < 0 && errno == EINTR);
  ready.reset();
}

void write_pidfile(const std::string& path) {
  if (path.empty()) return;
  std::ofstream out(path, std::ios::trunc);
  out << ::getpid() << "\n";
  if (!out) throw Error("pidfile " + path + ": cannot write — check that the directory exists and is writable");
}

}  // namespace cbd::proxy
