// The NBD listeners of cbd-proxy and the threads serving their connections.
//
// Usage (main.cpp):
//   NbdServer server([&] { return queues.target_for_new_connection(); });
//   server.listen_unix("/run/cbd.sock");        // and/or listen_tcp(), listen_activated(),
//                                               // or add_stdio_connection()
//   signal handler / sigwait thread:  server.request_stop();
//   server.serve();                              // returns after request_stop() (or, with no
//                                                // listeners, when the last connection ends)
//
// Each accepted connection gets one reader thread that runs the handshake
// and then the transmission phase (NbdConnection).  On stop we stop
// accepting, shut the read side of every connection (the reader sees EOF),
// let in-flight requests finish and their replies go out, and join.
//
// Ignore SIGPIPE in the process when serving stdout that may be a pipe: we
// use MSG_NOSIGNAL on sockets, but write() on a pipe can only be told to
// return EPIPE by the signal disposition.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "client/request_target.hpp"
#include "common/unique_fd.hpp"

namespace cbd::proxy {

// Runs one whole connection on (in_fd, out_fd) in the calling thread:
// handshake against target.info(), then transmission.  Does not close the fds.
void serve_nbd_connection(int in_fd, int out_fd, const std::shared_ptr<RequestTarget>& target);

class NbdServer {
 public:
  // Called once per new connection, from the accepting thread, before the
  // handshake.  Returning nullptr refuses the connection (it is closed).
  using TargetFactory = std::function<std::shared_ptr<RequestTarget>()>;

  static constexpr const char* kDefaultAddress = "127.0.0.1";
  static constexpr std::uint16_t kDefaultPort = 10809;

  explicit NbdServer(TargetFactory factory);
  // Stops (if serve() did not), joins every connection, closes the
  // listeners and removes the unix socket path we created.
  ~NbdServer();
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  // Listeners; each throws cbd::Error with a message saying what failed.
  // NBD has no authentication: a non-loopback address is refused unless
  // `allow_non_loopback` (an explicit user flag), and then warned about.
  // `address` may be a name or a numeric IPv4/IPv6 address; every address it
  // resolves to is bound.
  void listen_tcp(const std::string& address = kDefaultAddress, std::uint16_t port = kDefaultPort,
                  bool allow_non_loopback = false);
  // Replaces a stale socket file (one nobody accepts on); refuses to replace
  // a live socket or anything that is not a socket.
  void listen_unix(const std::string& path);
  // systemd-style socket activation: adopts fds 3 .. 3+LISTEN_FDS-1 when
  // LISTEN_PID is this process, and unsets the variables.  Returns how many.
  std::size_t listen_activated();
  // Serves one connection on stdin/stdout (nbdkit's -s, libnbd's
  // "nbdinfo -- [cbd-proxy ...]").  serve() then returns when it ends.
  void add_stdio_connection();

  // Accepts and serves until request_stop(), or, when there is no listener,
  // until every connection has ended.  Then drains and joins all connections.
  void serve();
  // Makes serve() return.  Async-signal-safe: may be called from a signal
  // handler or any thread, any number of times.
  void request_stop() noexcept;

  std::size_t connection_count() const;
  // The port of the first TCP listener (useful after listen_tcp(..., 0)); 0 if none.
  std::uint16_t tcp_port() const;

 private:
  struct Connection {
    std::thread thread;
    UniqueFd socket;          // owned socket; empty for stdio
    int in_fd = -1;           // what the reader reads (socket or stdin)
    std::atomic<bool> finished{false};
  };

  void start_connection(UniqueFd socket, int in_fd, int out_fd);
  void accept_from(int listen_fd);
  void reap_finished();
  void close_listeners();
  void drain_all();
  void wake() noexcept;

  TargetFactory factory_;
  std::vector<UniqueFd> listeners_;
  std::vector<std::string> unix_paths_;  // created by listen_unix: unlinked when we stop
  UniqueFd wake_read_;      // self-pipe: request_stop() and ending connections write a byte
  UniqueFd wake_write_;
  std::atomic<bool> stop_requested_{false};
  bool drained_ = false;

  mutable std::mutex connections_mutex_;
  std::list<std::unique_ptr<Connection>> connections_;
};

}  // namespace cbd::proxy
