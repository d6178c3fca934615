#include "client/kernel_device.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <fstream>
#include <memory>
#include <thread>
#include <vector>

#include "client/nbd_handshake.hpp"
#include "client/nbd_netlink.hpp"
#include "client/threaded_sink.hpp"
#include "common/error.hpp"
#include "common/flush_ranges.hpp"
#include "common/log.hpp"
#include "common/shared_atomic.hpp"
#include "common/unique_fd.hpp"

namespace cbd::proxy {

namespace {

// Written by the stop signals and by every connection that ends; the main
// thread sleeps on the read end.
int wake_fd = -1;
std::atomic<bool> stop_requested{false};

void on_stop_signal(int) {
  stop_requested.store(true);
  if (wake_fd >= 0) {
    const char byte = 's';
    [[maybe_unused]] ssize_t n = ::write(wake_fd, &byte, 1);
  }
}

void wake_main() {
  const char byte = 'c';
  [[maybe_unused]] ssize_t n = ::write(wake_fd, &byte, 1);
}

// Waits for a wake-up byte; false on timeout.
bool wait_wake(int read_fd, std::chrono::milliseconds timeout) {
  pollfd p{read_fd, POLLIN, 0};
  const int rc = ::poll(&p, 1, static_cast<int>(timeout.count()));
  if (rc <= 0) return false;
  char bytes[64];
  [[maybe_unused]] ssize_t n = ::read(read_fd, bytes, sizeof bytes);
  return true;
}

// The kernel's logical block size: the backend's minimum when it is one the
// block layer accepts (512 .. 4096), else the nearest of those.
std::uint64_t kernel_block_size(const ExportInfo& info) {
  const std::uint32_t minimum = advertised_block_sizes(info).minimum;
  return std::clamp<std::uint64_t>(minimum, 512, 4096);
}

// Writes back what the page cache holds for the device and has the backend
// flush (fsync on a block device sends a cache flush down).
void flush_device(std::uint32_t index) {
  const std::string path = nbd_device_path(index);
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd) {
    log(LogLevel::Warning, "%s: cannot open it to flush before detaching: %m", path.c_str());
    return;
  }
  if (::fsync(fd.get()) != 0) log(LogLevel::Warning, "%s: flush before detaching failed: %m", path.c_str());
}

void write_pidfile(const std::string& path) {
  if (path.empty()) return;
  std::ofstream out(path, std::ios::trunc);
  out << ::getpid() << "\n";
  if (!out) throw Error("pidfile " + path + ": cannot write — check the directory exists and is writable");
}

// Forks; the parent waits for the child to report /dev/nbdN usable (a byte
// on the pipe) or to die, and returns its exit status; the child returns -1
// with `ready` set to the pipe's write end.
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
    do n = ::read(read_end.get(), &byte, 1);
    while (n < 0 && errno == EINTR);
    if (n == 1) return 0;
    int status = 0;
    ::waitpid(child, &status, 0);
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

}  // namespace

int serve_kernel_device(const Transport& transport, const BlkdevOptions& blkdev_options,
                        const KernelDeviceOptions& options) {
  const std::string device = nbd_device_path(options.index);
  require_nbd_driver(options.index);
  if (nbd_device_configured(options.index))
    throw Error(device + " is in use — detach it first (`cbd-proxy disconnect device=" + device +
                "` or `nbd-client -d " + device + "`) or pick another device");

  // Fork before any thread exists (threads do not survive fork).
  UniqueFd ready;
  if (options.daemon) {
    const int parent_status = daemonize(ready);
    if (parent_status >= 0) return parent_status;
  }

  int wake[2];
  if (::pipe2(wake, O_NONBLOCK | O_CLOEXEC) != 0) throw_errno("pipe2");
  UniqueFd wake_read(wake[0]);
  UniqueFd wake_write(wake[1]);
  wake_fd = wake_write.get();

  Blkdev blkdev(transport, blkdev_options);
  const ExportInfo info = blkdev.info();
  const std::uint32_t queues = blkdev_options.queues;
  std::atomic<std::uint32_t> open_connections{queues};
  // Declared after the blkdev: its threads hold the blkdev's queues, so it
  // is destroyed (and joined) first.
  ThreadedSink sink(info, [&] { return blkdev.next_target(); });

  HandshakeResult negotiated;
  negotiated.enter_transmission = true;
  negotiated.structured_replies = false;  // the kernel driver speaks simple replies only
  negotiated.transmission_flags = transmission_flags_for(info, false);

  NbdAttachment attachment;
  attachment.index = options.index;
  attachment.size_bytes = info.size;
  attachment.block_size = kernel_block_size(info);
  attachment.server_flags = negotiated.transmission_flags;
  // Longer than the proxy holds requests for an absent backend: the proxy
  // answers EIO itself then; a kernel timeout would drop the whole socket.
  const auto held = std::chrono::duration_cast<std::chrono::seconds>(blkdev_options.backend_timeout);
  attachment.timeout = held + std::chrono::seconds(30);
  attachment.dead_conn_timeout = held + std::chrono::seconds(30);

  std::vector<UniqueFd> kernel_ends;
  for (std::uint32_t q = 0; q < queues; ++q) {
    int pair[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) throw_errno("socketpair");
    kernel_ends.emplace_back(pair[0]);
    AdoptedConnection connection;
    connection.socket.reset(pair[1]);
    connection.in_fd = pair[1];
    connection.out_fd = pair[1];
    connection.negotiated = negotiated;
    connection.on_closed = [&open_connections] {
      open_connections.fetch_sub(1);
      wake_main();
    };
    attachment.sockets.push_back(pair[0]);
    sink.adopt(std::move(connection));
  }

  nbd_netlink_connect(attachment);  // on failure the sink's destructor ends our ends
  kernel_ends.clear();              // the kernel holds its own references
  BlkdevSlot& slot = transport.blkdev(blkdev.index());
  store_release(slot.kernel_device, options.index + 1);
  publish_lines(&slot, sizeof slot);

  // The kernel sets the capacity as part of CONNECT; wait until the block
  // device shows it, so whoever runs next can open and use it.
  const std::string size_file = "/sys/block/nbd" + std::to_string(options.index) + "/size";
  for (int i = 0; i < 100; ++i) {
    std::ifstream in(size_file);
    std::uint64_t sectors = 0;
    if (in >> sectors && sectors > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  log(LogLevel::Info, "%s: attached to backend %u (export \"%s\", %llu bytes, %u queues, blkdev %u)", device.c_str(),
      blkdev_options.backend_id, info.name.c_str(), static_cast<unsigned long long>(info.size), queues,
      blkdev.index());

  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGTERM, &action, nullptr);
  ::sigaction(SIGINT, &action, nullptr);
  ::sigaction(SIGHUP, &action, nullptr);
  write_pidfile(options.pidfile);
  if (ready) {
    const char byte = 'r';
    [[maybe_unused]] ssize_t n = ::write(ready.get(), &byte, 1);
    ready.reset();
  }

  while (!stop_requested.load() && open_connections.load() > 0) wait_wake(wake_read.get(), std::chrono::seconds(1));

  if (open_connections.load() > 0) {
    log(LogLevel::Info, "%s: stopping: flushing and detaching", device.c_str());
    flush_device(options.index);
    try {
      nbd_netlink_disconnect(options.index);
    } catch (const Error& e) {
      log(LogLevel::Warning, "%s", e.what());
    }
    // The kernel sends NBD_CMD_DISC and shuts its ends; requests in flight
    // finish first.  Bounded: a kernel that does not let go gets our ends shut.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (open_connections.load() > 0 && std::chrono::steady_clock::now() < deadline)
      wait_wake(wake_read.get(), std::chrono::milliseconds(200));
    if (open_connections.load() > 0) {
      log(LogLevel::Warning, "%s: the kernel kept %u socket(s) after NBD_CMD_DISCONNECT; closing them",
          device.c_str(), open_connections.load());
      sink.shutdown_all();
    }
  } else {
    log(LogLevel::Info, "%s: the kernel detached it", device.c_str());
  }
  store_release(slot.kernel_device, 0u);
  publish_lines(&slot, sizeof slot);
  ::signal(SIGTERM, SIG_DFL);
  ::signal(SIGINT, SIG_DFL);
  ::signal(SIGHUP, SIG_DFL);
  wake_fd = -1;
  if (!options.pidfile.empty()) ::unlink(options.pidfile.c_str());
  return 0;
}

}  // namespace cbd::proxy
