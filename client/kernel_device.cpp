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

#include "client/daemonize.hpp"
#include "client/nbd_handshake.hpp"
#include "client/nbd_netlink.hpp"
#include "common/error.hpp"
#include "common/flush_ranges.hpp"
#include "common/log.hpp"
#include "common/layout.hpp"
#include "common/shared_atomic.hpp"
#include "common/transport_fault_monitor.hpp"
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

// Whether /dev/nbdN is still configured with our sockets: the kernel
// records the pid of the process that attached it.  Checked before a detach
// at stop, so that a device the kernel already released and someone else
// attached since is left alone.
bool device_is_ours(std::uint32_t index) {
  std::ifstream in("/sys/block/nbd" + std::to_string(index) + "/pid");
  long pid = 0;
  return in >> pid && pid == static_cast<long>(::getpid());
}

// Detaches the device if the run ends by an exception after the kernel took
// our sockets: otherwise the device stays configured with sockets nobody
// answers, and fails I/O only after the dead-connection timeout.
class DetachOnUnwind {
 public:
  explicit DetachOnUnwind(std::uint32_t index) : index_(index) {}
  DetachOnUnwind(const DetachOnUnwind&) = delete;
  DetachOnUnwind& operator=(const DetachOnUnwind&) = delete;
  ~DetachOnUnwind() {
    if (!armed_) return;
    try {
      nbd_netlink_disconnect(index_);
    } catch (const Error& e) {
      log(LogLevel::Warning, "%s", e.what());
    }
  }
  void arm() { armed_ = true; }
  void disarm() { armed_ = false; }

 private:
  std::uint32_t index_;
  bool armed_ = false;
};

// Stop signals wake the main loop from the moment the device can exist, so
// that a signal between the attach and the main loop detaches it cleanly
// instead of killing the process with the device still configured.
class StopSignals {
 public:
  StopSignals() {
    struct sigaction action {};
    action.sa_handler = on_stop_signal;
    sigemptyset(&action.sa_mask);
    for (int signal : {SIGTERM, SIGINT, SIGHUP}) ::sigaction(signal, &action, nullptr);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  ~StopSignals() {
    for (int signal : {SIGTERM, SIGINT, SIGHUP}) ::signal(signal, SIG_DFL);
  }
};

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
  StopSignals stop_signals;

  // Declared before the blkdev: its queues call on_closed (below) until
  // they have stopped, in the blkdev's destructor.  Set once the blkdev
  // knows how many channels it got.
  std::atomic<std::uint32_t> open_connections{0};
  Blkdev blkdev(transport, blkdev_options);
  const ExportInfo info = blkdev.info();
  const std::uint32_t minimum = advertised_block_sizes(info).minimum;
  if (minimum > 4096)
    throw Error(device + ": backend " + std::to_string(blkdev_options.backend_id) + " needs requests aligned to " +
                std::to_string(minimum) +
                " bytes, more than the largest logical block size the kernel accepts (4096) — serve it over NBD "
                "(without device=) or give the backend a smaller minimum block size");
  // The kernel gets one socket per channel the blkdev actually claimed.
  const std::uint32_t queues = blkdev.queue_count();
  if (queues > 1 && (info.caps & kCapMultiConn) == 0)
    throw Error(device + ": backend " + std::to_string(blkdev_options.backend_id) +
                " does not allow several connections (no multi-conn), and the kernel attaches several queues only "
                "then — use queues=1");
  open_connections.store(queues);

  // docs/design.md, "Truncated or vanished transport": once the mapping
  // reads as zeros our slots are gone; detach the device (its I/O fails
  // with EIO either way) and exit 1.
  TransportFaultMonitor fault_monitor(transport.region(), [](const std::string& message) {
    log(LogLevel::Error, "%s; detaching the kernel device: its requests fail with EIO, cbd-proxy exits",
        message.c_str());
    stop_requested.store(true);
    wake_main();
  });

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
    blkdev.adopt(std::move(connection));  // round-robin: one socket per queue
  }

  DetachOnUnwind detach_on_unwind(options.index);
  nbd_netlink_connect(attachment);  // on failure the blkdev's destructor ends our ends
  detach_on_unwind.arm();
  kernel_ends.clear();              // the kernel holds its own references
  blkdev.set_kernel_device(options.index + 1);

  // The kernel sets the capacity as part of CONNECT; wait until the block
  // device shows it, so whoever runs next can open and use it.
  const std::string size_file = "/sys/block/nbd" + std::to_string(options.index) + "/size";
  for (int i = 0; i < 100 && !stop_requested.load(); ++i) {
    std::ifstream in(size_file);
    std::uint64_t sectors = 0;
    if (in >> sectors && sectors > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  log(LogLevel::Info, "%s: attached to backend %u (export \"%s\", %llu bytes, %u queues, blkdev %u)", device.c_str(),
      blkdev_options.backend_id, info.name.c_str(), static_cast<unsigned long long>(info.size), queues,
      blkdev.index());

  write_pidfile(options.pidfile);
  report_ready(ready);
  detach_on_unwind.disarm();  // from here on the stop path below detaches

  while (!stop_requested.load() && open_connections.load() > 0) wait_wake(wake_read.get(), std::chrono::seconds(1));

  if (open_connections.load() > 0) {
    log(LogLevel::Info, "%s: stopping: flushing and detaching", device.c_str());
    if (!fault_monitor.fired()) flush_device(options.index);
    if (device_is_ours(options.index)) {
      try {
        nbd_netlink_disconnect(options.index);
      } catch (const Error& e) {
        log(LogLevel::Warning, "%s", e.what());
      }
    }
    // The kernel sends NBD_CMD_DISC, shuts its ends and fails what it still
    // has queued (EIO): unmount first.  Bounded: a kernel that does not let
    // go gets our ends shut.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (open_connections.load() > 0 && std::chrono::steady_clock::now() < deadline)
      wait_wake(wake_read.get(), std::chrono::milliseconds(200));
    if (open_connections.load() > 0) {
      log(LogLevel::Warning, "%s: the kernel kept %u socket(s) after NBD_CMD_DISCONNECT; closing them",
          device.c_str(), open_connections.load());
      blkdev.shutdown_connections();
    }
  } else {
    // After a detach the kernel keeps the configuration until its last
    // opener is gone: give that a moment before judging.
    for (int i = 0; i < 50 && device_is_ours(options.index); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (device_is_ours(options.index)) {
      log(LogLevel::Warning, "%s: the kernel closed every socket but still holds the device; detaching it",
          device.c_str());
      try {
        nbd_netlink_disconnect(options.index);
      } catch (const Error& e) {
        log(LogLevel::Debug, "%s", e.what());  // a detach already under way
      }
    } else {
      log(LogLevel::Info, "%s: the kernel detached it", device.c_str());
    }
  }
  blkdev.set_kernel_device(0);
  wake_fd = -1;
  if (!options.pidfile.empty()) ::unlink(options.pidfile.c_str());
  return fault_monitor.fired() ? 1 : 0;
}

}  // namespace cbd::proxy
