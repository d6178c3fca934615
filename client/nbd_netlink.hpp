// The kernel nbd driver's generic-netlink interface (family "nbd",
// <linux/nbd-netlink.h>): attach a /dev/nbdN to sockets that are already in
// the NBD transmission phase, and detach it again.
//
// This is what `nbd-client -L` (netlink mode), rbd-nbd and qemu-nbd -c use
// instead of the older NBD_SET_SOCK/NBD_DO_IT ioctls: the kernel takes one
// socket per hardware queue in one message and no process has to sit in an
// ioctl for the life of the device.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace cbd::proxy {

// "/dev/nbd3", "nbd3" or "3" -> 3.  Throws cbd::Error naming the expected form.
std::uint32_t parse_nbd_device(const std::string& text);
std::string nbd_device_path(std::uint32_t index);

struct NbdAttachment {
  std::uint32_t index = 0;                 // N of /dev/nbdN
  std::uint64_t size_bytes = 0;
  std::uint64_t block_size = 512;          // logical block size: a power of two in [512, 4096]
  std::uint16_t server_flags = 0;          // NBD transmission flags, as a handshake would have sent them
  std::chrono::seconds timeout{0};         // per-request timeout (0: the kernel's default)
  std::chrono::seconds dead_conn_timeout{0};  // how long a dead socket may wait for a replacement
  std::vector<int> sockets;                // kernel ends; the kernel takes its own reference
};

// Throws cbd::Error naming `modprobe nbd` when the kernel nbd driver (its
// generic netlink family) is not there.
void require_nbd_driver(std::uint32_t index);

// NBD_CMD_CONNECT.  Throws cbd::Error with what to do: the nbd module is not
// loaded (`modprobe nbd`), the device is in use, not permitted (root or
// CAP_SYS_ADMIN), ...
void nbd_netlink_connect(const NbdAttachment& attachment);

// NBD_CMD_DISCONNECT: the kernel sends NBD_CMD_DISC on every socket, fails
// what is still queued and releases the device once its sockets close.
void nbd_netlink_disconnect(std::uint32_t index);

// True while the kernel has a configuration (sockets) for /dev/nbdN: its
// sysfs `pid` attribute exists from connect until the device is released.
bool nbd_device_configured(std::uint32_t index);

}  // namespace cbd::proxy
