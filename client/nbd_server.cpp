#include "client/nbd_server.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "client/nbd_connection.hpp"
#include "client/nbd_handshake.hpp"
#include "common/error.hpp"
#include "common/log.hpp"

namespace cbd::proxy {

namespace {

const char* end_name(NbdConnection::End end) {
  switch (end) {
    case NbdConnection::End::Disconnect: return "client disconnected";
    case NbdConnection::End::Eof: return "connection closed";
    case NbdConnection::End::ProtocolError: return "protocol error";
    case NbdConnection::End::ConnectionError: return "connection error";
  }
  return "?";
}

bool is_loopback(const sockaddr* address) {
  if (address->sa_family == AF_INET) {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(address);
    return (ntohl(v4->sin_addr.s_addr) >> 24) == 127;
  }
  if (address->sa_family == AF_INET6) {
    const auto* v6 = reinterpret_cast<const sockaddr_in6*>(address);
    if (IN6_IS_ADDR_LOOPBACK(&v6->sin6_addr)) return true;
    return IN6_IS_ADDR_V4MAPPED(&v6->sin6_addr) && v6->sin6_addr.s6_addr[12] == 127;
  }
  return false;
}

std::string address_text(const sockaddr* address, socklen_t length) {
  char host[NI_MAXHOST];
  char port[NI_MAXSERV];
  if (::getnameinfo(address, length, host, sizeof host, port, sizeof port, NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return "?";
  return address->sa_family == AF_INET6 ? "[" + std::string(host) + "]:" + port : std::string(host) + ":" + port;
}

void set_nonblocking_cloexec(int fd) {
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

}  // namespace

void serve_nbd_connection(int in_fd, int out_fd, const std::shared_ptr<RequestTarget>& target) {
  const ExportInfo info = target->info();
  const HandshakeResult negotiated = negotiate_handshake(in_fd, out_fd, info);
  if (!negotiated.enter_transmission) {
    log(LogLevel::Debug, "nbd: no transmission: %s", negotiated.end_reason.c_str());
    return;
  }
  log(LogLevel::Debug, "nbd: transmission: structured replies %s, base:allocation %s, flags 0x%x",
      negotiated.structured_replies ? "on" : "off", negotiated.meta_context_id ? "on" : "off",
      negotiated.transmission_flags);
  NbdConnection connection(in_fd, out_fd, info, negotiated, target);
  const NbdConnection::End end = connection.run();
  log(LogLevel::Debug, "nbd: connection ended: %s", end_name(end));
}

NbdServer::NbdServer(TargetFactory factory) : factory_(std::move(factory)) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_NONBLOCK | O_CLOEXEC) != 0) throw_errno("nbd server: pipe2");
  wake_read_.reset(pipe_fds[0]);
  wake_write_.reset(pipe_fds[1]);
}

NbdServer::~NbdServer() {
  if (!drained_) drain_all();
  close_listeners();
}

void NbdServer::listen_tcp(const std::string& address, std::uint16_t port, bool allow_non_loopback) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* resolved = nullptr;
  const std::string port_text = std::to_string(port);
  const int rc = ::getaddrinfo(address.empty() ? nullptr : address.c_str(), port_text.c_str(), &hints, &resolved);
  if (rc != 0) throw Error("nbd server: cannot resolve '" + address + "': " + ::gai_strerror(rc));
  const std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> owner(resolved, &::freeaddrinfo);

  // Decide before binding anything: all or nothing.
  for (const addrinfo* entry = resolved; entry != nullptr; entry = entry->ai_next) {
    if (is_loopback(entry->ai_addr)) continue;
    const std::string text = address_text(entry->ai_addr, entry->ai_addrlen);
    if (!allow_non_loopback)
      throw Error("nbd server: refusing to listen on non-loopback address " + text +
                  ": NBD has no authentication or encryption; bind to 127.0.0.1 or a unix socket, "
                  "or explicitly allow a non-loopback address");
    log(LogLevel::Warning,
        "nbd server: listening on non-loopback address %s: anyone who can reach it can read and write the disk",
        text.c_str());
  }

  std::size_t bound = 0;
  std::string last_failure;
  for (const addrinfo* entry = resolved; entry != nullptr; entry = entry->ai_next) {
    const std::string text = address_text(entry->ai_addr, entry->ai_addrlen);
    UniqueFd socket_fd(::socket(entry->ai_family, entry->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!socket_fd) {
      // A host without IPv6 still resolves "localhost" to ::1; skip it.
      last_failure = text + ": socket: " + std::strerror(errno);
      continue;
    }
    const int on = 1;
    ::setsockopt(socket_fd.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    if (entry->ai_family == AF_INET6) ::setsockopt(socket_fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on);
    if (::bind(socket_fd.get(), entry->ai_addr, entry->ai_addrlen) != 0) {
      const int error = errno;
      if (error == EADDRNOTAVAIL || error == EAFNOSUPPORT) {
        last_failure = text + ": bind: " + std::strerror(error);
        continue;
      }
      throw_errno("nbd server: bind " + text, error);
    }
    if (::listen(socket_fd.get(), SOMAXCONN) != 0) throw_errno("nbd server: listen " + text);
    log(LogLevel::Info, "nbd server: listening on %s", text.c_str());
    listeners_.push_back(std::move(socket_fd));
    ++bound;
  }
  if (bound == 0) throw Error("nbd server: could not listen on '" + address + "': " + last_failure);
}

void NbdServer::listen_unix(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof address.sun_path)
    throw Error("nbd server: unix socket path '" + path + "' is empty or longer than " +
                std::to_string(sizeof address.sun_path - 1) + " bytes");
  std::memcpy(address.sun_path, path.c_str(), path.size() + 1);

  struct stat existing {};
  if (::lstat(path.c_str(), &existing) == 0) {
    if (!S_ISSOCK(existing.st_mode))
      throw Error("nbd server: " + path + " exists and is not a socket; remove it or choose another path");
    // A socket file left by a dead server is replaced; a live one is not ours to take.
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (probe && ::connect(probe.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0)
      throw Error("nbd server: another server is listening on " + path + "; stop it or choose another path");
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) throw_errno("nbd server: removing stale socket " + path);
  }

  UniqueFd socket_fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!socket_fd) throw_errno("nbd server: socket");
  if (::bind(socket_fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0)
    throw_errno("nbd server: bind " + path);
  unix_paths_.push_back(path);
  if (::listen(socket_fd.get(), SOMAXCONN) != 0) throw_errno("nbd server: listen " + path);
  log(LogLevel::Info, "nbd server: listening on unix socket %s", path.c_str());
  listeners_.push_back(std::move(socket_fd));
}

std::size_t NbdServer::listen_activated() {
  constexpr int kFirstActivatedFd = 3;  // fixed by the socket activation protocol
  const char* pid_text = std::getenv("LISTEN_PID");
  const char* count_text = std::getenv("LISTEN_FDS");
  if (pid_text == nullptr || count_text == nullptr) return 0;
  char* end = nullptr;
  const long pid = std::strtol(pid_text, &end, 10);
  if (*end != '\0' || pid != static_cast<long>(::getpid())) return 0;  // meant for another process
  const long count = std::strtol(count_text, &end, 10);
  if (*end != '\0' || count < 1 || count > 64)
    throw Error(std::string("nbd server: LISTEN_FDS='") + count_text + "' is not a count of sockets");
  // Children must not think the sockets are theirs.
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");

  for (int fd = kFirstActivatedFd; fd < kFirstActivatedFd + count; ++fd) {
    int accepting = 0;
    socklen_t length = sizeof accepting;
    if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &length) != 0 || !accepting)
      throw Error("nbd server: socket activation fd " + std::to_string(fd) + " is not a listening socket");
    set_nonblocking_cloexec(fd);
    listeners_.emplace_back(fd);
  }
  log(LogLevel::Info, "nbd server: serving %ld socket-activated listener(s)", count);
  return static_cast<std::size_t>(count);
}

void NbdServer::add_stdio_connection() { start_connection(UniqueFd{}, STDIN_FILENO, STDOUT_FILENO); }

std::uint16_t NbdServer::tcp_port() const {
  for (const UniqueFd& listener : listeners_) {
    sockaddr_storage address{};
    socklen_t length = sizeof address;
    if (::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&address), &length) != 0) continue;
    if (address.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in*>(&address)->sin_port);
    if (address.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6*>(&address)->sin6_port);
  }
  return 0;
}

void NbdServer::start_connection(UniqueFd socket, int in_fd, int out_fd) {
  std::shared_ptr<RequestTarget> target;
  try {
    target = factory_();
  } catch (const std::exception& failure) {
    log(LogLevel::Error, "nbd server: cannot serve a new connection: %s", failure.what());
  }
  if (!target) {
    log(LogLevel::Warning, "nbd server: no queue available for a new connection; closing it");
    return;
  }

  auto connection = std::make_unique<Connection>();
  connection->socket = std::move(socket);
  connection->in_fd = in_fd;
  Connection* const raw = connection.get();
  std::lock_guard lock(connections_mutex_);
  try {
    raw->thread = std::thread([this, raw, in_fd, out_fd, target = std::move(target)]() mutable {
      try {
        serve_nbd_connection(in_fd, out_fd, target);
      } catch (const std::exception& failure) {
        log(LogLevel::Error, "nbd server: connection failed: %s", failure.what());
      }
      target.reset();  // hand the queue back before we announce the end
      // The client sees the close now; the fd itself is closed when reaped.
      if (raw->socket) ::shutdown(raw->socket.get(), SHUT_RDWR);
      raw->finished = true;
      wake();
    });
  } catch (const std::system_error& failure) {
    log(LogLevel::Error, "nbd server: cannot start a connection thread: %s", failure.what());
    return;
  }
  connections_.push_back(std::move(connection));
}

void NbdServer::accept_from(int listen_fd) {
  const int accepted = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
  if (accepted < 0) {
    const int error = errno;
    if (error == EAGAIN || error == EWOULDBLOCK || error == EINTR || error == ECONNABORTED) return;
    static RateLimit limit;
    if (limit.allow()) log(LogLevel::Error, "nbd server: accept: %s", std::strerror(error));
    // Out of descriptors: back off instead of spinning on a ready listener.
    if (error == EMFILE || error == ENFILE || error == ENOBUFS || error == ENOMEM)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    return;
  }
  UniqueFd socket(accepted);
  const int on = 1;
  // Replies are single sendmsg calls; don't let Nagle hold back the small ones.
  ::setsockopt(accepted, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);  // fails harmlessly on unix sockets
  start_connection(std::move(socket), accepted, accepted);
}

void NbdServer::serve() {
  while (!stop_requested_.load()) {
    reap_finished();
    if (listeners_.empty() && connection_count() == 0) break;

    std::vector<pollfd> watched;
    watched.push_back({wake_read_.get(), POLLIN, 0});
    for (const UniqueFd& listener : listeners_) watched.push_back({listener.get(), POLLIN, 0});
    if (::poll(watched.data(), watched.size(), -1) < 0) {
      if (errno == EINTR) continue;
      log(LogLevel::Error, "nbd server: poll: %s", std::strerror(errno));
      break;
    }
    if (watched[0].revents != 0) {
      char drained[64];
      while (::read(wake_read_.get(), drained, sizeof drained) > 0) {
      }
    }
    if (stop_requested_.load()) break;
    for (std::size_t i = 1; i < watched.size(); ++i)
      if (watched[i].revents != 0) accept_from(watched[i].fd);
  }
  drain_all();
}

void NbdServer::request_stop() noexcept {
  stop_requested_.store(true);
  wake();
}

void NbdServer::wake() noexcept {
  const int saved = errno;  // may run in a signal handler
  const char byte = 1;
  [[maybe_unused]] const ssize_t ignored = ::write(wake_write_.get(), &byte, 1);  // full pipe: already awake
  errno = saved;
}

std::size_t NbdServer::connection_count() const {
  std::lock_guard lock(connections_mutex_);
  return connections_.size();
}

void NbdServer::reap_finished() {
  std::list<std::unique_ptr<Connection>> ended;
  {
    std::lock_guard lock(connections_mutex_);
    for (auto it = connections_.begin(); it != connections_.end();) {
      if ((*it)->finished.load()) {
        ended.splice(ended.end(), connections_, it++);
      } else {
        ++it;
      }
    }
  }
  for (auto& connection : ended) connection->thread.join();
}

void NbdServer::close_listeners() {
  listeners_.clear();
  for (const std::string& path : unix_paths_) ::unlink(path.c_str());
  unix_paths_.clear();
}

void NbdServer::drain_all() {
  stop_requested_.store(true);
  close_listeners();
  std::list<std::unique_ptr<Connection>> all;
  {
    std::lock_guard lock(connections_mutex_);
    all.swap(connections_);
  }
  // Closing the read side makes each reader see EOF: it stops taking
  // requests, waits for the ones in flight (their replies still go out) and
  // returns.  (A pipe on stdin cannot be interrupted this way; that
  // connection ends when its client closes.)
  for (auto& connection : all)
    if (!connection->finished.load()) ::shutdown(connection->in_fd, SHUT_RD);
  for (auto& connection : all) connection->thread.join();
  drained_ = true;
}

}  // namespace cbd::proxy
