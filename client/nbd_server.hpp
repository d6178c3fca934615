// The NBD listeners of cbd-proxy: accepting, handshakes under a deadline, and
// the connection count (docs/design.md, "Compute side").
//
// Usage (connect_command.cpp):
//   NbdServer server([&] { return sink_for_new_connection(); }, limits);
//   server.listen_unix("/run/cbd.sock");        // and/or listen_tcp(), listen_activated(),
//                                               // or add_stdio_connection()
//   signal handler:  server.request_stop();
//   server.serve();                              // returns after request_stop() (or, with no
//                                                // listeners, when the last connection ends)
//
// serve() accepts in the calling thread.  Each accepted connection runs only
// its handshake, in a short-lived thread of its own, under one deadline
// (`handshake_timeout`, whatever the client sends or does not send); then
// the connection is handed to a ConnectionSink (client/connection_handoff.hpp)
// and the thread ends.  The server keeps counting the connection until the
// sink calls its `on_closed`: `max_connections` covers handshaking and
// transmitting connections alike, and connections beyond it are closed at
// once, with one log line per burst.
//
// On stop we close the listeners, end every handshake still running (they
// poll a stop pipe besides their socket) and join their threads.  The
// transmission phase is the sinks' to end: they are destroyed after serve()
// returns.
//
// Ignore SIGPIPE in the process when serving stdout that may be a pipe: we
// use MSG_NOSIGNAL on sockets, but write() on a pipe can only be told to
// return EPIPE by the signal disposition.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "client/connection_handoff.hpp"
#include "common/unique_fd.hpp"

namespace cbd::proxy {

class NbdServer {
 public:
  // Called once per new connection, from the accepting thread, before the
  // handshake (which advertises the sink's info()).  Returning nullptr
  // refuses the connection (it is closed).  The sink must outlive serve().
  using SinkFactory = std::function<ConnectionSink*()>;

  struct Limits {
    // A connection that has not entered transmission by then is dropped.
    std::chrono::milliseconds handshake_timeout{10000};
    // Open connections (handshaking or adopted by a sink) at most.
    std::size_t max_connections = 256;
  };

  static constexpr const char* kDefaultAddress = "127.0.0.1";
  static constexpr std::uint16_t kDefaultPort = 10809;

  explicit NbdServer(SinkFactory factory);
  NbdServer(SinkFactory factory, Limits limits);
  // Stops (if serve() did not), ends and joins every handshake, closes the
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

  // Accepts until request_stop(), or, when there is no listener, until every
  // connection has ended.  Then ends and joins the handshakes in progress.
  void serve();
  // Makes serve() return.  Async-signal-safe: may be called from a signal
  // handler or any thread, any number of times.
  void request_stop() noexcept;

  // Open connections: handshaking, plus adopted ones not yet closed.
  std::size_t connection_count() const;
  // The port of the first TCP listener (useful after listen_tcp(..., 0)); 0 if none.
  std::uint16_t tcp_port() const;

 private:
  // What outlives the server: a sink may report a connection closed after
  // the server is gone (it drains after serve() returns), so the count and
  // the pipe that wakes serve() are shared with every on_closed callback.
  struct Census {
    Census();
    void opened() { open.fetch_add(1); }
    void closed() noexcept;  // from any thread, once per opened()
    void wake() noexcept;
    std::atomic<std::size_t> open{0};
    UniqueFd wake_read;   // a byte per event; serve() drains it
    UniqueFd wake_write;
  };

  // A connection in its handshake, served by its own thread.
  struct Handshake {
    std::thread thread;
    std::atomic<bool> finished{false};
  };

  void start_handshake(UniqueFd socket, int in_fd, int out_fd);
  void run_handshake(ConnectionSink& sink, UniqueFd socket, int in_fd, int out_fd, Handshake& self);
  void accept_from(int listen_fd);
  void refuse_over_limit(UniqueFd socket);
  void reap_finished_handshakes();
  void close_listeners();
  void end_handshakes();

  SinkFactory factory_;
  const Limits limits_;
  std::vector<UniqueFd> listeners_;
  std::vector<std::string> unix_paths_;  // created by listen_unix: unlinked when we stop
  std::shared_ptr<Census> census_;
  // Written once by request_stop() and never drained: every handshake polls
  // it, so one byte ends them all.
  UniqueFd stop_read_;
  UniqueFd stop_write_;
  std::atomic<bool> stop_requested_{false};
  bool handshakes_ended_ = false;

  std::mutex handshakes_mutex_;
  std::list<std::unique_ptr<Handshake>> handshakes_;
};

}  // namespace cbd::proxy
