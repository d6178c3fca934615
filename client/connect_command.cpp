#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>

#include "client/blkdev.hpp"
#include "client/commands.hpp"
#include "client/daemonize.hpp"
#include "client/kernel_device.hpp"
#include "client/nbd_netlink.hpp"
#include "client/nbd_server.hpp"
#include "common/error.hpp"
#include "common/log.hpp"
#include "common/region.hpp"
#include "common/transport_fault_monitor.hpp"

namespace cbd::proxy {

const std::vector<ParameterSpec> kConnectParameters = {
    {"backend", "0", "backend slot to serve (see `cbd-proxy list`)"},
    {"transport", kDefaultTransport, "file in /dev/shm, /dev/daxX.Y or a PCI resource file"},
    {"unix", "", "serve NBD on this unix socket instead of TCP"},
    {"port", "10809", "TCP port"},
    {"bind", "127.0.0.1", "TCP address; anything but loopback needs allow-remote"},
    {"allow-remote", "", "allow a non-loopback bind address (NBD has no authentication)"},
    {"stdio", "", "serve one NBD connection on stdin/stdout, then exit"},
    {"socket-activation", "", "serve the sockets passed by LISTEN_FDS/LISTEN_PID"},
    {"device", "", "attach this kernel nbd device (/dev/nbdN) through netlink instead of serving NBD"},
    {"queues", "2", "channels to claim; connections share them round-robin"},
    {"export", "", "export name to advertise (default: the backend's)"},
    {"readonly", "", "refuse writes whatever the backend allows"},
    {"hostname", "", "name recorded in the host slot (default: gethostname)"},
    {"timeout", "30", "seconds to hold requests while the backend is away before failing them with EIO"},
    {"attach-timeout", "10", "seconds to wait for the backend to attach each channel"},
    {"handshake-timeout", "10", "seconds a new connection has to finish its NBD handshake before it is dropped"},
    {"max-connections", "256", "open NBD connections at most (handshaking or serving); more are refused"},
    {"payload-timeout", "30", "seconds a WRITE payload may stop arriving before its connection is dropped"},
    {"reply-timeout", "30", "seconds a client may take no reply bytes before its connection is dropped"},
    {"spin-us", "50", "queue loops: keep polling this long after activity before waiting"},
    {"max-sleep-us", "1000", "queue loops: longest wait while requests are in flight"},
    {"daemon", "", "fork into the background once serving"},
    {"pidfile", "", "write the serving process id here once ready"},
    {"verbose", "", "debug messages"},
};

namespace {

NbdServer* active_server = nullptr;

void on_stop_signal(int) {
  if (active_server) active_server->request_stop();
}

}  // namespace

int run_connect(const Parameters& p) {
  set_log_verbose(p.flag("verbose", false));
  BlkdevOptions options;
  options.backend_id = static_cast<std::uint32_t>(p.number("backend", 0));
  options.queues = static_cast<std::uint32_t>(p.number("queues", options.queues));
  if (options.queues == 0) throw Error("queues=0: at least one channel is needed");
  options.export_name = p.text("export", "");
  options.readonly = p.flag("readonly", false);
  options.hostname = p.text("hostname", "");
  options.backend_timeout = std::chrono::milliseconds(p.number("timeout", 30) * 1000);
  options.attach_timeout = std::chrono::milliseconds(p.number("attach-timeout", 10) * 1000);
  const std::uint64_t payload_seconds = p.number("payload-timeout", 30);
  if (payload_seconds == 0 || payload_seconds > 86400)
    throw Error("payload-timeout=" + std::to_string(payload_seconds) + ": give clients 1 to 86400 seconds");
  options.payload_timeout = std::chrono::milliseconds(payload_seconds * 1000);
  const std::uint64_t reply_seconds = p.number("reply-timeout", 30);
  if (reply_seconds == 0 || reply_seconds > 86400)
    throw Error("reply-timeout=" + std::to_string(reply_seconds) + ": give clients 1 to 86400 seconds");
  options.reply_timeout = std::chrono::milliseconds(reply_seconds * 1000);
  options.spin_us = static_cast<std::uint32_t>(std::min<std::uint64_t>(p.number("spin-us", options.spin_us), 1000000));
  options.max_sleep_us =
      static_cast<std::uint32_t>(std::clamp<std::uint64_t>(p.number("max-sleep-us", options.max_sleep_us), 1, 100000));
  bool stdio = p.flag("stdio", false);
  bool activated = p.flag("socket-activation", false) || (!p.has("unix") && !p.has("port") && !stdio && std::getenv("LISTEN_FDS"));
  bool daemon = p.flag("daemon", false);
  if (stdio && daemon) throw Error("stdio and daemon cannot be combined");

  Transport transport = Transport::attach(p.text("transport", kDefaultTransport));
  // Clients of a socket that vanished must not kill us with SIGPIPE; stdout
  // may be a pipe.
  ::signal(SIGPIPE, SIG_IGN);
  if (p.has("device")) {
    if (stdio || activated || p.has("unix") || p.has("port"))
      throw Error("device= serves the kernel nbd device only: drop stdio, socket-activation, unix= and port=");
    return serve_kernel_device(transport, options, {parse_nbd_device(p.text("device", "")), daemon, p.text("pidfile", "")});
  }

  NbdServer::Limits limits;
  const std::uint64_t handshake_seconds = p.number("handshake-timeout", 10);
  if (handshake_seconds == 0 || handshake_seconds > 86400)
    throw Error("handshake-timeout=" + std::to_string(handshake_seconds) + ": give clients 1 to 86400 seconds");
  limits.handshake_timeout = std::chrono::milliseconds(handshake_seconds * 1000);
  limits.max_connections = static_cast<std::size_t>(p.number("max-connections", limits.max_connections));
  if (limits.max_connections == 0) throw Error("max-connections=0: at least one connection is needed");

  std::unique_ptr<Blkdev> blkdev;
  auto attach = [&] { blkdev = std::make_unique<Blkdev>(transport, options); };
  NbdServer server([&]() -> ConnectionSink* { return blkdev.get(); }, limits);
  if (stdio) {
    // Added once the blkdev is attached (below): the connection asks for
    // its queue as soon as it starts.
  } else if (activated) {
    if (server.listen_activated() == 0) throw Error("socket-activation: no sockets passed (LISTEN_FDS/LISTEN_PID)");
  } else if (p.has("unix")) {
    server.listen_unix(p.text("unix", ""));
  } else {
    server.listen_tcp(p.text("bind", NbdServer::kDefaultAddress),
                      static_cast<std::uint16_t>(p.number("port", NbdServer::kDefaultPort)),
                      p.flag("allow-remote", false));
  }

  UniqueFd ready;
  if (daemon) {
    // Fork before any thread exists (threads do not survive fork); the
    // listening sockets are inherited.  The parent returns once the child
    // is attached and serving, or with its exit status if it failed.  It
    // leaves with _exit(): the listeners, the unix socket path and the
    // server's stop pipe are the child's now, and running their destructors
    // here would stop the child's server (and unlink its socket).
    const int parent_status = daemonize(ready);
    if (parent_status >= 0) ::_exit(parent_status);
  }

  attach();
  const ExportInfo info = blkdev->info();
  log(LogLevel::Info, "serving backend %u (export \"%s\", %llu bytes) as blkdev %u", options.backend_id,
      info.name.c_str(), static_cast<unsigned long long>(info.size), blkdev->index());

  // docs/design.md, "Truncated or vanished transport": once the mapping
  // reads as zeros our slots are gone, so the blkdev fails every request
  // with EIO; stop serving and exit 1.
  TransportFaultMonitor fault_monitor(transport.region(), [&](const std::string& message) {
    log(LogLevel::Error, "%s; stopped serving it: outstanding requests fail with EIO, cbd-proxy exits", message.c_str());
    server.request_stop();
  });

  active_server = &server;
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGTERM, &action, nullptr);
  ::sigaction(SIGINT, &action, nullptr);
  ::sigaction(SIGHUP, &action, nullptr);
  write_pidfile(p.text("pidfile", ""));
  if (stdio) server.add_stdio_connection();
  report_ready(ready);

  server.serve();
  active_server = nullptr;
  // serve() ended the handshakes; the blkdev's queues end the connections
  // they serve (bounded), then its channels and slots are released.
  blkdev.reset();
  std::string pidfile = p.text("pidfile", "");
  if (!pidfile.empty()) ::unlink(pidfile.c_str());
  return fault_monitor.fired() ? 1 : 0;
}

}  // namespace cbd::proxy
