// Fuzzes the proxy's NBD server side: the input is everything a client
// sends on a fresh connection (client flags, options, then requests and
// payloads).  The real negotiate_handshake() runs on one end of a
// socketpair and, when it enters transmission, the rest is served by
// NbdSession, the queue event loop's non-blocking connection state, on a
// real ChannelEngine over a channel in /dev/shm whose handler side is the
// unit tests' DiskHandler, answering in an order and with failures the input
// chooses; the loop here drives the session as the queue's loop does (pump,
// publish, answer, reap, flush, tick).
// A helper thread feeds the input and drains the replies, so neither side
// blocks on a full socket buffer.
//
// Input layout: [0] picks the export (bit 0 read-only, bits 1-2 capabilities,
// bit 3 an unaligned size, bit 4 block size constraints, bit 5 unused) and,
// with bit 6, that [1] says how the handler behaves (see Behaviour; without
// bit 6 it answers in order, without failures); the rest is the client's
// byte stream.
#define DOCTEST_CONFIG_DISABLE  // nbd_test_support.hpp's REQUIRE checks are unused here
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <memory>
#include <thread>

#include "client/channel_engine.hpp"
#include "client/nbd_handshake.hpp"
#include "client/nbd_session.hpp"
#include "common/log.hpp"
// With REQUIRE compiled out, some of its helpers have unused parameters.
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wunused-parameter"
#include "disk_handler.hpp"
#include "nbd_test_support.hpp"
#include "shm_fixture.hpp"
#pragma clang diagnostic pop

namespace {

using namespace cbd;
using namespace cbd::proxy;

// Writes `input` to `fd` and reads (drops) everything the server sends until
// it closes its end.
void play_client(int fd, const std::uint8_t* input, std::size_t size) {
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  std::size_t sent = 0;
  bool write_open = true;
  std::uint8_t sink[65536];
  for (;;) {
    if (write_open && sent == size) {
      ::shutdown(fd, SHUT_WR);  // the server sees EOF after the last byte
      write_open = false;
    }
    pollfd p{fd, static_cast<short>(POLLIN | (write_open ? POLLOUT : 0)), 0};
    if (::poll(&p, 1, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (write_open && (p.revents & POLLOUT)) {
      const ssize_t n = ::send(fd, input + sent, size - sent, MSG_NOSIGNAL);
      if (n > 0) sent += static_cast<std::size_t>(n);
      else if (n < 0 && errno != EAGAIN && errno != EINTR) write_open = false;  // server hung up
    }
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      const ssize_t n = ::recv(fd, sink, sizeof sink, 0);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return;  // server closed its end
    }
  }
}

ExportInfo export_for(std::uint8_t config) {
  std::uint32_t caps = cbd::proxy::test::kAllCaps;
  if (config & 1) caps |= kCapReadOnly;
  if (config & 2) caps &= ~(kCapExtents | kCapTrim | kCapZero);
  if (config & 4) caps &= ~(kCapFlush | kCapFua | kCapCache);
  ExportInfo info = cbd::proxy::test::test_export(caps, (config & 8) ? 65536 + 512 : 65536);
  if (config & 16) {
    info.block_min = 512;
    info.block_max = 16384;
  }
  return info;
}

// The handler's behaviour for NbdSession, from one input byte.
struct Behaviour {
  explicit Behaviour(std::uint8_t b)
      : lifo(b & 1),
        hold_turns((b >> 1) & 3),
        fail_every((b >> 3) & 3 ? ((b >> 3) & 3) + 1 : 0),
        small_limits(b & 32),
        tamper(b & 64),
        stop_early(b & 128) {}
  bool lifo;                // answer the newest pending entry first
  unsigned hold_turns;      // answer only every (hold_turns + 1)th turn
  unsigned fail_every;      // 0, or fail every Nth entry with EIO
  bool small_limits;        // shares of a few entries, a small backlog
  bool tamper;              // every 4th READ/BLOCK_STATUS result has a wrong length
  bool stop_early;          // begin_drain() after a few turns, as a stopping proxy
};

// One transport for the whole run; each input gets a fresh engine on it.
// A small data area (pieces of 8 KiB) and short rings, so that READs of the
// 64 KiB export are split, shares run out and rings fill.
FormatOptions session_geometry() {
  FormatOptions options = cbd::test::small_options();
  options.data_size = 32 << 10;
  options.sq_entries = 16;
  options.cq_entries = 16;
  return options;
}

struct SessionWorld {
  cbd::test::ShmFile file{"fuzz-session"};
  Transport transport{cbd::test::make_transport(file, session_geometry())};
  // The mapping is all we need: nothing is left in /dev/shm when libFuzzer
  // exits without unwinding.
  SessionWorld() { ::unlink(file.path().c_str()); }
};
SessionWorld* world = nullptr;

void serve_with_session(int server, const ExportInfo& info, const HandshakeResult& negotiated, std::uint8_t byte) {
  const Behaviour behaviour(byte);
  Transport& transport = world->transport;
  auto word = try_claim(transport.channel_control(0).header, kNoSlot);
  if (!word) std::abort();  // the last input's engine gave it back
  std::unique_ptr<ChannelEngine> engine =
      std::make_unique<ChannelEngine>(transport, SlotClaim(&transport.channel_control(0).header, 0, *word));
  cbd::test::DiskHandler handler(transport, 0, info.size);
  if (!engine->begin_setup(Binding{0, 0, 1})) std::abort();
  handler.attach();
  if (!engine->poll_attached()) std::abort();
  std::uint64_t answered = 0;
  if (behaviour.tamper)
    handler.tamper = [&answered](const SubmissionEntry& entry, CompletionEntry& done) {
      const Op op = static_cast<Op>(entry.op);
      if ((op == Op::Read || op == Op::BlockStatus) && answered % 4 == 3) done.result_length += 1;
    };

  SessionLimits limits;
  limits.payload_timeout = std::chrono::milliseconds(200);
  limits.drain_timeout = std::chrono::milliseconds(200);
  if (behaviour.small_limits) {
    limits.data_share = 8192;
    limits.entry_share = 3;
    limits.write_piece = 4096;
    limits.output_backlog = 4096;
  }
  AdoptedConnection connection;
  connection.socket = UniqueFd(server);
  connection.in_fd = connection.out_fd = server;
  connection.negotiated = negotiated;
  bool on_closed_called = false;
  connection.on_closed = [&on_closed_called] { on_closed_called = true; };
  auto session = std::make_unique<NbdSession>(std::move(connection), info, engine, limits);

  const auto start = std::chrono::steady_clock::now();
  bool stopping = false;
  for (unsigned turn = 0; !session->finished(); ++turn) {
    const auto now = std::chrono::steady_clock::now();
    if (!session->closed()) {
      if ((behaviour.stop_early && turn == 8) || (!stopping && now - start > std::chrono::seconds(5))) {
        session->begin_drain();
        stopping = true;
      }
      pollfd p{server, static_cast<short>(POLLIN | (session->wants_write() ? POLLOUT : 0)), 0};
      ::poll(&p, 1, 1);
      if (session->wants_read() || session->intake_stalled()) session->pump_input();
    }
    engine->publish();
    handler.take();
    if (turn % (behaviour.hold_turns + 1) == 0 || session->closed()) {
      while (!handler.pending.empty()) {
        const std::size_t index = behaviour.lifo ? handler.pending.size() - 1 : 0;
        const bool fail = behaviour.fail_every && answered % behaviour.fail_every == behaviour.fail_every - 1;
        if (!handler.answer_at(index, fail ? EIO : 0)) break;  // the completion ring is full: next turn
        ++answered;
      }
    }
    engine->reap(NbdSession::dispatch);
    if (!session->closed()) session->flush_output();
    if (!session->closed()) session->tick(std::chrono::steady_clock::now());
    if (session->closed()) session->release_socket();
    if (now - start > std::chrono::seconds(15)) std::abort();  // a session that never ends is a bug
  }
  if (!on_closed_called) std::abort();
  session.reset();
  if (engine->outstanding() != 0 || engine->free_entries() != engine->capacity()) std::abort();  // an entry leaked
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  set_log_sink([](LogLevel, const std::string&) {});
  world = new SessionWorld;  // lives for the process: libFuzzer exits without unwinding
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* input, std::size_t size) {
  if (size < 1) return 0;
  const std::uint8_t config = input[0];
  const bool behaviour_given = config & 64;
  if (behaviour_given && size < 2) return 0;
  const std::size_t skip = behaviour_given ? 2 : 1;
  const std::uint8_t behaviour = behaviour_given ? input[1] : 0;
  const ExportInfo info = export_for(config);

  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
  const int client = fds[0], server = fds[1];
  std::thread peer(play_client, client, input + skip, size - skip);

  const HandshakeResult negotiated = negotiate_handshake(server, server, info, IoDeadline{});
  if (negotiated.enter_transmission) {
    serve_with_session(server, info, negotiated, behaviour);  // owns and closes `server`
    peer.join();
    ::close(client);
    return 0;
  }
  ::shutdown(server, SHUT_RDWR);
  peer.join();
  ::close(server);
  ::close(client);
  return 0;
}
