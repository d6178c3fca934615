// `cbd-proxy disconnect device=/dev/nbdN`: flush and detach a kernel nbd
// device that a `cbd-proxy connect ... device=` serves (or any
// netlink-attached one).  The
// serving proxy sees the kernel let go of its sockets, releases its blkdev
// and exits.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <thread>

#include "client/commands.hpp"
#include "client/nbd_netlink.hpp"
#include "common/error.hpp"
#include "common/unique_fd.hpp"

namespace cbd::proxy {

const std::vector<ParameterSpec> kDisconnectParameters = {
    {"device", "", "the kernel nbd device to detach (/dev/nbdN)"},
    {"wait", "10", "seconds to wait for the kernel to release the device (0: do not wait)"},
};

int run_disconnect(const Parameters& p) {
  if (!p.has("device")) throw Error("disconnect: device= is required (for example device=/dev/nbd0)");
  const std::uint32_t index = parse_nbd_device(p.text("device", ""));
  const std::string device = nbd_device_path(index);
  require_nbd_driver(index);
  if (!nbd_device_configured(index))
    throw Error(device + " is not attached (no /sys/block/nbd" + std::to_string(index) + "/pid) — nothing to do");
  // Write back what the page cache holds for the device and have the
  // backend flush before the kernel drops its sockets (fsync of a block
  // device sends NBD_CMD_FLUSH; read-only opening suffices, and works for a
  // read-only device).
  {
    UniqueFd fd(::open(device.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd || ::fsync(fd.get()) != 0)
      std::fprintf(stderr, "cbd-proxy: %s: flush before detaching failed: %s\n", device.c_str(), std::strerror(errno));
  }
  nbd_netlink_disconnect(index);
  // Released once the kernel has closed its sockets and the last opener is
  // gone; a second attach of the same device must wait for that.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(p.number("wait", 10));
  while (nbd_device_configured(index)) {
    if (std::chrono::steady_clock::now() >= deadline) {
      if (p.number("wait", 10) == 0) return 0;
      std::fprintf(stderr,
                   "cbd-proxy: %s: detach requested, but the kernel still holds it after %llu s "
                   "(is it still mounted or open?)\n",
                   device.c_str(), static_cast<unsigned long long>(p.number("wait", 10)));
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return 0;
}

}  // namespace cbd::proxy
