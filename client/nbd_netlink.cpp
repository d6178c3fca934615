#include "client/nbd_netlink.hpp"

#include <linux/nbd-netlink.h>
#include <netlink/genl/ctrl.h>
#include <netlink/genl/genl.h>
#include <netlink/netlink.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <memory>

#include "common/error.hpp"

namespace cbd::proxy {

namespace {

struct SocketDeleter {
  void operator()(nl_sock* socket) const { nl_socket_free(socket); }
};
struct MessageDeleter {
  void operator()(nl_msg* message) const { nlmsg_free(message); }
};
using NetlinkSocket = std::unique_ptr<nl_sock, SocketDeleter>;
using NetlinkMessage = std::unique_ptr<nl_msg, MessageDeleter>;

// A connected generic-netlink socket and the nbd family's id.
struct NbdFamily {
  NetlinkSocket socket;
  int id = 0;
};

NbdFamily open_nbd_family(const std::string& device) {
  NbdFamily family;
  family.socket.reset(nl_socket_alloc());
  if (!family.socket) throw Error(device + ": netlink: cannot allocate a socket (out of memory)");
  if (int rc = genl_connect(family.socket.get()); rc < 0)
    throw Error(device + ": cannot open a generic netlink socket: " + nl_geterror(rc));
  // Bounded: the kernel acknowledges at once, and a reply that never comes
  // must not hang attach, detach or stop forever.
  timeval timeout{30, 0};
  if (::setsockopt(nl_socket_get_fd(family.socket.get()), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) != 0)
    throw Error(device + ": netlink: cannot set a receive timeout: " + std::strerror(errno));
  family.id = genl_ctrl_resolve(family.socket.get(), NBD_GENL_FAMILY_NAME);
  if (family.id < 0)
    throw Error(device +
                ": the kernel nbd driver is not loaded (no generic netlink family \"nbd\") — run `modprobe nbd`");
  return family;
}

NetlinkMessage new_command(const NbdFamily& family, std::uint8_t command, const std::string& device) {
  NetlinkMessage message(nlmsg_alloc());
  if (!message || !genlmsg_put(message.get(), NL_AUTO_PORT, NL_AUTO_SEQ, family.id, 0, 0, command, NBD_GENL_VERSION))
    throw Error(device + ": netlink: cannot build a message (out of memory)");
  return message;
}

void put(int rc, const std::string& device) {
  if (rc < 0) throw Error(device + ": netlink: message too large: " + nl_geterror(rc));
}

// Sends and waits for the kernel's acknowledgement; nl_send_sync frees the
// message.  Returns the libnl error (0 = acknowledged).
int send_sync(const NbdFamily& family, NetlinkMessage message) {
  return nl_send_sync(family.socket.get(), message.release());
}

}  // namespace

std::uint32_t parse_nbd_device(const std::string& text) {
  std::string digits = text;
  if (digits.rfind("/dev/", 0) == 0) digits.erase(0, 5);
  if (digits.rfind("nbd", 0) == 0) digits.erase(0, 3);
  bool ok = !digits.empty() && digits.size() <= 6;
  for (char c : digits) ok = ok && std::isdigit(static_cast<unsigned char>(c));
  if (!ok) throw Error("device=" + text + ": expected a kernel nbd device such as /dev/nbd0");
  return static_cast<std::uint32_t>(std::stoul(digits));
}

std::string nbd_device_path(std::uint32_t index) { return "/dev/nbd" + std::to_string(index); }

void require_nbd_driver(std::uint32_t index) { open_nbd_family(nbd_device_path(index)); }

void nbd_netlink_connect(const NbdAttachment& a) {
  const std::string device = nbd_device_path(a.index);
  NbdFamily family = open_nbd_family(device);
  NetlinkMessage message = new_command(family, NBD_CMD_CONNECT, device);
  nl_msg* m = message.get();
  put(nla_put_u32(m, NBD_ATTR_INDEX, a.index), device);
  put(nla_put_u64(m, NBD_ATTR_SIZE_BYTES, a.size_bytes), device);
  put(nla_put_u64(m, NBD_ATTR_BLOCK_SIZE_BYTES, a.block_size), device);
  put(nla_put_u64(m, NBD_ATTR_SERVER_FLAGS, a.server_flags), device);
  if (a.timeout.count() > 0) put(nla_put_u64(m, NBD_ATTR_TIMEOUT, static_cast<std::uint64_t>(a.timeout.count())), device);
  if (a.dead_conn_timeout.count() > 0)
    put(nla_put_u64(m, NBD_ATTR_DEAD_CONN_TIMEOUT, static_cast<std::uint64_t>(a.dead_conn_timeout.count())), device);
  nlattr* sockets = nla_nest_start(m, NBD_ATTR_SOCKETS);
  if (!sockets) put(-NLE_NOMEM, device);
  for (int fd : a.sockets) {
    nlattr* item = nla_nest_start(m, NBD_SOCK_ITEM);
    if (!item) put(-NLE_NOMEM, device);
    put(nla_put_u32(m, NBD_SOCK_FD, static_cast<std::uint32_t>(fd)), device);
    nla_nest_end(m, item);
  }
  nla_nest_end(m, sockets);

  const int rc = send_sync(family, std::move(message));
  if (rc == 0) return;
  std::string what = device + ": the kernel refused NBD_CMD_CONNECT: " + nl_geterror(rc);
  switch (-rc) {
    case NLE_BUSY:
      throw Error(what + " — it is in use; detach it first (`cbd-proxy disconnect device=" + device +
                  "` or `nbd-client -d " + device + "`) or pick another device");
    case NLE_PERM:
      throw Error(what + " — attaching a kernel nbd device needs root (CAP_SYS_ADMIN)");
    default:
      throw Error(what + " — check `dmesg` for the nbd driver's reason");
  }
}

void nbd_netlink_disconnect(std::uint32_t index) {
  const std::string device = nbd_device_path(index);
  NbdFamily family = open_nbd_family(device);
  NetlinkMessage message = new_command(family, NBD_CMD_DISCONNECT, device);
  put(nla_put_u32(message.get(), NBD_ATTR_INDEX, index), device);
  const int rc = send_sync(family, std::move(message));
  if (rc == 0) return;
  std::string what = device + ": the kernel refused NBD_CMD_DISCONNECT: " + nl_geterror(rc);
  if (-rc == NLE_PERM) throw Error(what + " — detaching a kernel nbd device needs root (CAP_SYS_ADMIN)");
  if (-rc == NLE_INVAL || -rc == NLE_OBJ_NOTFOUND)
    throw Error(what + " — it is not attached (see `cbd-proxy list`)");
  throw Error(what + " — check `dmesg` for the nbd driver's reason");
}

bool nbd_device_configured(std::uint32_t index) {
  return ::access(("/sys/block/nbd" + std::to_string(index) + "/pid").c_str(), F_OK) == 0;
}

}  // namespace cbd::proxy
