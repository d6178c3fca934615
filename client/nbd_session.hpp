// One NBD connection in its transmission phase, as non-blocking protocol
// state driven by its queue's event loop (docs/design.md, "Compute side:
// cbd-proxy"): an input buffer and request parser, the translation of each
// request into cbd entries (Op, kFlag*) on the queue's ChannelEngine, and an
// output queue of replies written in batches with one sendmsg/writev.
//
// Decisions a reader of the code should know:
//  - Requests are validated in nbdkit's order and with its errors (see
//    validate()); invalid ones are answered here.
//    Zero-length READ/WRITE/TRIM/WRITE_ZEROES/CACHE succeed at once; a
//    zero-length BLOCK_STATUS is EINVAL.
//  - READ/WRITE above nbd::kMaxPayload get EINVAL (a WRITE's payload is read
//    and dropped); a WRITE above nbd::kMaxDiscardablePayload ends the
//    connection.  A DF READ longer than the advertised maximum block size
//    gets EOVERFLOW (one chunk may not be that large).
//  - Cookies are only SHOULD-unique: a repeated in-flight cookie is simply
//    another request, and both are answered.
//  - A reply whose header announces data that follows in pieces (a simple
//    READ reply, or a DF READ's single chunk) is a stream: no other reply may
//    be written until its last byte is queued.  Replies that complete
//    meanwhile are held, their data copied out of the data area so that they
//    hold no extent the stream may need.  This rule lives here, with the
//    writer; the engine knows nothing of it.  A simple READ that fails after
//    its header is out can only be reported by dropping the connection (once
//    the replies queued before it are written); a DF READ is padded to its
//    announced length and followed by an error chunk.
//  - With structured replies a READ piece is an OFFSET_DATA chunk sent as
//    soon as it completes; the last one carries the DONE flag.
//  - Isolation: a connection holds at most `data_share` bytes of the data
//    area and `entry_share` entries, receives a WRITE payload into at most
//    `write_piece` bytes at a time, and stops reading its socket while its
//    output backlog (queued reply bytes it owns, held replies and the
//    copies of streams that wait) is over `output_backlog` or its share is
//    used up; a WRITE payload already announced is still received (it goes
//    into the share, and its client may read nothing until it is sent).  A
//    WRITE payload that has not fully arrived within `payload_timeout` of
//    its header ends the connection, and so does output that cannot be
//    written for `reply_timeout` (the client stopped reading).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <sys/uio.h>
#include <memory>
#include <span>
#include <vector>

#include "client/channel_engine.hpp"
#include "client/connection_handoff.hpp"
#include "client/nbd_protocol.hpp"

namespace cbd::proxy {

struct SessionLimits {
  std::uint64_t data_share = 2u << 20;
  std::uint32_t entry_share = 128;
  std::uint32_t write_piece = 256u << 10;
  std::size_t output_backlog = 1u << 20;
  std::chrono::milliseconds payload_timeout{30000};
  std::chrono::milliseconds reply_timeout{30000};  // replies not taken this long (no byte written): dropped
  std::chrono::milliseconds drain_timeout{2000};  // after DISC/EOF/stop: longest wait for replies to go out
};

class NbdSession {
 public:
  using Clock = std::chrono::steady_clock;
  struct Request;

  NbdSession(AdoptedConnection connection, const ExportInfo& info, std::unique_ptr<ChannelEngine>& engine,
             const SessionLimits& limits);
  ~NbdSession();
  NbdSession(const NbdSession&) = delete;
  NbdSession& operator=(const NbdSession&) = delete;

  int in_fd() const { return in_fd_; }
  int out_fd() const { return out_fd_; }

  // Takes requests from the socket as far as the share allows.  True when
  // anything moved.
  bool pump_input();
  // Writes queued replies.  True when anything moved.
  bool flush_output();
  // An engine completion whose owner is one of our requests.
  static void dispatch(const EngineCompletion& completion);
  // Deadlines: payload-timeout, drain timeout.
  void tick(Clock::time_point now);
  // Stop taking requests; finish what is in flight, then close (bounded by
  // the drain timeout).
  void begin_drain();
  // Ends the connection now: the socket is closed and on_closed called;
  // requests still in the channel finish into the void.
  void close(const char* why, bool warn = false);

  // What the event loop should wait for.
  bool wants_read() const;
  bool wants_write() const { return !closed_ && blocked_on_write_; }
  // The protocol is over (close() ran); the loop then stops watching the
  // fds and calls release_socket().
  bool closed() const { return closed_; }
  // Closes the owned socket and calls on_closed (once).
  void release_socket();
  // Closed, and no entry refers to this session any more: it may be destroyed.
  bool finished() const { return closed_ && requests_.empty(); }
  // A request may have become possible (share freed): worth pumping.
  bool intake_stalled() const { return intake_stalled_; }
  std::size_t pending_requests() const { return requests_.size(); }

 private:
  struct Piece {
    std::uint32_t slot = 0;
    std::uint32_t relative = 0;  // from the request's offset
    std::uint32_t length = 0;
    std::uint32_t extent = 0;    // bytes of data area it holds
    bool reserved = false;
    bool completed = false;
    bool released = false;
    int status = 0;
    std::uint32_t result_length = 0;
    std::uint32_t result_crc = 0;
  };
  struct OutItem {
    enum class Kind : std::uint8_t { Bytes, Extent, Zeros };
    Kind kind = Kind::Bytes;
    std::uint32_t length = 0;
    std::uint32_t sent = 0;
    std::uint8_t inline_length = 0;
    std::array<std::uint8_t, 32> inline_bytes{};
    std::vector<std::uint8_t> heap;
    std::uint32_t slot = 0;          // Extent: the entry whose data this is; given back once sent
    std::uint32_t extent_offset = 0;
    std::uint32_t held = 0;          // Extent: bytes of share it holds
  };

  int validate(const nbd::Request& request) const;
  bool parse_one();
  bool continue_intake();
  bool receive_payload(Request& request);
  bool discard_payload();
  void start_request(const nbd::Request& wire);
  bool reserve_next_piece(Request& request);
  void on_piece(Request& request, std::uint32_t index, const EngineCompletion& completion);
  void advance_read(Request& request);
  void finish_request(Request& request, int error);
  void maybe_forget(Request& request);
  void drop_copies(Request& request);
  void release_piece(Request& request, std::uint32_t index);
  bool can_hold(std::uint32_t bytes) const;
  void give_back(std::uint32_t slot, std::uint32_t held);
  OutItem extent_item(Request& request, std::uint32_t index);
  const HandshakeResult& negotiated() const;

  void emit(OutItem item, const Request* from);
  void emit_bytes(const std::uint8_t* data, std::size_t length, const Request* from);
  void emit_simple(std::uint64_t cookie, int error, std::uint16_t flags, const Request* from);
  void emit_error_chunk(std::uint64_t cookie, int error, std::uint16_t flags, const Request* from);
  void emit_done_chunk(std::uint64_t cookie, const Request* from);
  void emit_block_status(Request& request, std::span<const ExtentDescriptor> extents);
  void close_stream();
  // Ends the connection once what is queued now has been written; no reply
  // is queued any more.  Safe inside a completion (close() is not).
  void end_after_output(const char* why);
  OutItem materialize(OutItem item);
  void drop_output();
  std::size_t fill_iovecs(std::vector<iovec>& iov);
  void consume_sent(std::size_t bytes);
  bool recv_some(void* buffer, std::size_t length, std::size_t& got);

  AdoptedConnection connection_;
  const int in_fd_;
  const int out_fd_;
  const bool out_is_socket_;
  const bool in_is_socket_;
  const ExportInfo info_;
  const std::uint32_t max_block_;  // advertised maximum block size
  std::unique_ptr<ChannelEngine>& engine_;
  const SessionLimits limits_;

  // Input.
  std::vector<std::uint8_t> input_;
  std::size_t input_start_ = 0;
  std::size_t input_end_ = 0;
  Request* intake_ = nullptr;          // a request still taking pieces (or payload)
  std::uint64_t discard_left_ = 0;     // payload bytes of a refused WRITE still to skip
  nbd::Request discarded_{};           // the refused WRITE, answered once skipped
  int discarded_error_ = 0;
  bool input_done_ = false;            // DISC, EOF or drain: take nothing more
  bool intake_stalled_ = false;        // waiting for share or entries
  std::vector<std::byte> discard_;     // a WRITE payload for a lost channel that fails anyway
  Clock::time_point payload_since_{};  // header of the WRITE whose payload is awaited

  // Requests in flight (owned; engine entries point at them).
  std::vector<std::unique_ptr<Request>> requests_;
  std::uint64_t held_bytes_ = 0;
  std::uint32_t held_entries_ = 0;

  // Output.
  std::deque<OutItem> output_;
  std::vector<OutItem> held_replies_;  // completed while a stream was open
  std::size_t output_owned_bytes_ = 0;
  const Request* stream_ = nullptr;    // whose stream is open
  std::vector<Request*> waiting_streams_;  // streams that wait for the open one
  bool blocked_on_write_ = false;
  bool output_data_lost_ = false;  // a queued READ's data cannot be delivered (fill_iovecs)
  Clock::time_point data_pending_since_{};  // output waits for READ data a lost channel holds
  Clock::time_point write_blocked_since_{};  // blocked on a full socket, no byte written since
  std::vector<iovec> iov_;

  bool ending_ = false;                // end_after_output() ran
  const char* ending_reason_ = "";
  bool draining_ = false;
  Clock::time_point drain_deadline_{};
  bool closed_ = false;
  bool socket_released_ = false;
};

}  // namespace cbd::proxy
