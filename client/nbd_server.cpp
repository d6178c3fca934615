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

#include "client/nbd_handshake.hpp"
#include "client/socket_io.hpp"
#include "common/error.hpp"
#include "common/log.hpp"

namespace cbd::proxy {

namespace {

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

void make_pipe(UniqueFd& read_end, UniqueFd& write_end) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_NONBLOCK | O_CLOEXEC) != 0) throw_errno("nbd server: pipe2");
  read_end.reset(pipe_fds[0]);
  write_end.reset(pipe_fds[1]);
}

NbdServer::Census::Census() { make_pipe(wake_read, wake_write); }

void NbdServer::Census::closed() noexcept {
  open.fetch_sub(1);
  wake();
}

void NbdServer::Census::wake() noexcept {
  const int saved = errno;  // may run in a signal handler
  const char byte = 1;
  [[maybe_unused]] const ssize_t ignored = ::write(wake_write.get(), &byte, 1);  // full pipe: already awake
  errno = saved;
}

NbdServer::NbdServer(SinkFactory factory) : NbdServer(std::move(factory), Limits{}) {}

NbdServer::NbdServer(SinkFactory factory, Limits limits)
    : factory_(std::move(factory)), limits_(limits), census_(std::make_shared<Census>()) {
  make_pipe(stop_read_, stop_write_);
}

NbdServer::~NbdServer() {
  if (!handshakes_ended_) end_handshakes();
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

void NbdServer::add_stdio_connection() { start_handshake(UniqueFd{}, STDIN_FILENO, STDOUT_FILENO); }

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

void NbdServer::start_handshake(UniqueFd socket, int in_fd, int out_fd) {
  ConnectionSink* sink = nullptr;
  try {
    sink = factory_();
  } catch (const std::exception& failure) {
    log(LogLevel::Error, "nbd server: cannot serve a new connection: %s", failure.what());
  }
  if (sink == nullptr) {
    static RateLimit limit;
    if (limit.allow()) log(LogLevel::Warning, "nbd server: no queue available for a new connection; closing it");
    return;
  }

  census_->opened();
  auto handshake = std::make_unique<Handshake>();
  Handshake& self = *handshake;
  std::lock_guard lock(handshakes_mutex_);
  try {
    // The thread owns the socket from here; `self` outlives it (joined
    // before the list entry goes).
    self.thread = std::thread([this, sink, in_fd, out_fd, &self, socket = std::move(socket)]() mutable {
      run_handshake(*sink, std::move(socket), in_fd, out_fd, self);
    });
  } catch (const std::system_error& failure) {
    log(LogLevel::Error, "nbd server: cannot start a handshake thread: %s", failure.what());
    census_->closed();
    return;  // the socket went with the lambda that was never run: closed
  }
  handshakes_.push_back(std::move(handshake));
}

void NbdServer::run_handshake(ConnectionSink& sink, UniqueFd socket, int in_fd, int out_fd, Handshake& self) {
  std::shared_ptr<Census> census = census_;
  try {
    const ExportInfo info = sink.info();
    const IoDeadline deadline = IoDeadline::after(limits_.handshake_timeout, stop_read_.get());
    HandshakeResult negotiated = negotiate_handshake(in_fd, out_fd, info, deadline);
    if (negotiated.enter_transmission) {
      log(LogLevel::Debug, "nbd: transmission: structured replies %s, base:allocation %s, flags 0x%x",
          negotiated.structured_replies ? "on" : "off", negotiated.meta_context_id ? "on" : "off",
          negotiated.transmission_flags);
      AdoptedConnection connection;
      connection.socket = std::move(socket);
      connection.in_fd = in_fd;
      connection.out_fd = out_fd;
      connection.negotiated = std::move(negotiated);
      // Exactly once, from whichever thread ends the connection.
      connection.on_closed = [census] { census->closed(); };
      sink.adopt(std::move(connection));
      self.finished = true;
      census->wake();
      return;
    }
    if (negotiated.timed_out && !stop_requested_.load()) {
      static RateLimit limit;
      std::uint64_t suppressed = 0;
      if (limit.allow(&suppressed))
        log(LogLevel::Info,
            "nbd server: dropped a connection that did not finish its handshake within handshake-timeout=%lld "
            "(%llu more since the last message)",
            static_cast<long long>(limits_.handshake_timeout.count() / 1000),
            static_cast<unsigned long long>(suppressed));
    } else {
      log(LogLevel::Debug, "nbd: no transmission: %s", negotiated.end_reason.c_str());
    }
  } catch (const std::exception& failure) {
    log(LogLevel::Error, "nbd server: connection failed during its handshake: %s", failure.what());
  }
  socket.reset();  // the client sees the close now, not when the thread is reaped
  self.finished = true;
  census->closed();
}

void NbdServer::refuse_over_limit(UniqueFd socket) {
  socket.reset();
  static RateLimit limit(std::chrono::seconds(10));
  std::uint64_t suppressed = 0;
  if (limit.allow(&suppressed))
    log(LogLevel::Warning,
        "nbd server: refusing connections: max-connections=%zu are open (%llu refused before this one since the "
        "last message); raise max-connections= or close idle clients",
        limits_.max_connections, static_cast<unsigned long long>(suppressed));
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
  if (census_->open.load() >= limits_.max_connections) {
    refuse_over_limit(std::move(socket));
    return;
  }
  const int on = 1;
  // Replies are single sendmsg calls; don't let Nagle hold back the small ones.
  ::setsockopt(accepted, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);  // fails harmlessly on unix sockets
  start_handshake(std::move(socket), accepted, accepted);
}

void NbdServer::serve() {
  while (!stop_requested_.load()) {
    reap_finished_handshakes();
    if (listeners_.empty() && connection_count() == 0) break;

    std::vector<pollfd> watched;
    watched.push_back({census_->wake_read.get(), POLLIN, 0});
    watched.push_back({stop_read_.get(), POLLIN, 0});
    for (const UniqueFd& listener : listeners_) watched.push_back({listener.get(), POLLIN, 0});
    if (::poll(watched.data(), watched.size(), -1) < 0) {
      if (errno == EINTR) continue;
      log(LogLevel::Error, "nbd server: poll: %s", std::strerror(errno));
      break;
    }
    if (watched[0].revents != 0) {
      char drained[64];
      while (::read(census_->wake_read.get(), drained, sizeof drained) > 0) {
      }
    }
    if (stop_requested_.load()) break;
    for (std::size_t i = 2; i < watched.size(); ++i)
      if (watched[i].revents != 0) accept_from(watched[i].fd);
  }
  end_handshakes();
}

void NbdServer::request_stop() noexcept {
  stop_requested_.store(true);
  const int saved = errno;  // may run in a signal handler
  const char byte = 1;
  [[maybe_unused]] const ssize_t ignored = ::write(stop_write_.get(), &byte, 1);
  errno = saved;
}

std::size_t NbdServer::connection_count() const { return census_->open.load(); }

void NbdServer::reap_finished_handshakes() {
  std::list<std::unique_ptr<Handshake>> ended;
  {
    std::lock_guard lock(handshakes_mutex_);
    for (auto it = handshakes_.begin(); it != handshakes_.end();) {
      if ((*it)->finished.load()) {
        ended.splice(ended.end(), handshakes_, it++);
      } else {
        ++it;
      }
    }
  }
  for (auto& handshake : ended) handshake->thread.join();
}

void NbdServer::close_listeners() {
  listeners_.clear();
  for (const std::string& path : unix_paths_) ::unlink(path.c_str());
  unix_paths_.clear();
}

void NbdServer::end_handshakes() {
  request_stop();  // every handshake polls the stop pipe: they end now
  close_listeners();
  std::list<std::unique_ptr<Handshake>> all;
  {
    std::lock_guard lock(handshakes_mutex_);
    all.swap(handshakes_);
  }
  for (auto& handshake : all) handshake->thread.join();
  handshakes_ended_ = true;
}

}  // namespace cbd::proxy
