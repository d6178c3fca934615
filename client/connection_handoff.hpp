// The seam between the NBD listener (accepts, runs the handshake under a
// deadline) and the queue event loop that serves the transmission phase
// (docs/design.md, "Compute side").
//
// The listener side (NbdServer) owns accepting, max-connections= and
// handshake-timeout=; once negotiate_handshake() says the client enters the
// transmission phase it hands the connection to a ConnectionSink and forgets
// it, except for `on_closed`, which the sink calls exactly once, from any
// thread, when the connection is over (so the listener can count
// connections and, in stdio mode, exit).
#pragma once

#include <functional>

#include "client/nbd_handshake.hpp"
#include "client/export_info.hpp"
#include "common/unique_fd.hpp"

namespace cbd::proxy {

struct AdoptedConnection {
  UniqueFd socket;       // owned: closed by the sink when the connection ends (empty for stdio)
  int in_fd = -1;        // what requests are read from (socket.get(), or stdin)
  int out_fd = -1;       // what replies are written to (socket.get(), or stdout)
  HandshakeResult negotiated;
  std::function<void()> on_closed;  // called once when the connection is over
};

class ConnectionSink {
 public:
  virtual ~ConnectionSink() = default;
  // What the handshake advertises.
  virtual ExportInfo info() const = 0;
  // Takes a connection in the transmission phase.  Thread-safe; never blocks
  // on the connection's peer.
  virtual void adopt(AdoptedConnection connection) = 0;
};

}  // namespace cbd::proxy
