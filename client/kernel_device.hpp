// `cbd-proxy connect ... device=/dev/nbdN`: the proxy serves a kernel nbd
// device itself, with no NBD listener and no nbd-client.
//
// One socketpair per queue: our end is handed to a ConnectionSink as a
// connection already in the transmission phase (simple replies, the flags
// a handshake would have advertised); the other end goes to the kernel in
// one NBD_CMD_CONNECT (client/nbd_netlink.hpp).  The run ends when the
// kernel lets go of every socket (`cbd-proxy disconnect`, nbd-client -d) or
// on SIGTERM/SIGINT/SIGHUP, which flush the device and detach it first.
#pragma once

#include <cstdint>
#include <string>

#include "client/blkdev.hpp"
#include "common/transport.hpp"

namespace cbd::proxy {

struct KernelDeviceOptions {
  std::uint32_t index = 0;  // N of /dev/nbdN
  bool daemon = false;      // fork; the parent returns once /dev/nbdN is usable
  std::string pidfile;      // written once /dev/nbdN is usable, removed at exit
};

// Returns the exit status; throws cbd::Error for configuration errors (in
// the daemon's parent when they happen before the device is usable: the
// child's stderr is kept).
int serve_kernel_device(const Transport& transport, const BlkdevOptions& blkdev_options,
                        const KernelDeviceOptions& options);

}  // namespace cbd::proxy
