// The transmission phase of one NBD connection.
//
// The reader (the thread calling run()) reads 28-byte requests, refuses the
// invalid ones itself with the errors nbdkit gives (see
// /work/shared/nbd-interop.md), and hands the valid ones to the
// RequestTarget.  The target answers through this object's Replier methods,
// from its own completion threads; every write to the socket happens under
// one mutex, header and data together in one sendmsg.
//
// Decisions a reader of the code should know:
//  - Zero-length READ/WRITE/TRIM/WRITE_ZEROES/CACHE (in range) succeed at
//    once without reaching the target: there is nothing to do, and answering
//    never hangs or disconnects.  A zero-length BLOCK_STATUS is EINVAL (there
//    is no non-empty extent to report).
//  - READ/WRITE above nbd::kMaxPayload (32 MiB) get EINVAL, the WRITE after
//    its payload is read and dropped; a WRITE above
//    nbd::kMaxDiscardablePayload (64 MiB) ends the connection.
//  - Misaligned requests are refused (EINVAL) only when the client asked for
//    NBD_INFO_BLOCK_SIZE in its GO and so promised to honour the minimum.
//  - A cookie equal to one still in flight is a broken client: disconnect
//    (replies could not be told apart).
//
// Contract for the RequestTarget's READ data, with simple replies (and with
// structured replies when the client set DF): a reply is a header followed by
// all of its data, so once the first piece of a READ has gone out, no other
// reply can be written until its last piece has.  Other requests' replies
// wait for it.  A target must therefore deliver a READ's pieces back to back;
// the natural way is to call read_data() for all pieces of a request when its
// last part has completed, then finish().  A thread that calls the Replier for
// another request while its own READ is half sent would wait on itself: that
// is detected and ends the connection rather than hanging.  With structured
// replies (qemu, libnbd tools) every piece is its own chunk and pieces of
// different requests interleave freely.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <sys/uio.h>
#include <thread>
#include <unordered_map>

#include "client/nbd_handshake.hpp"
#include "client/request_target.hpp"
#include "common/log.hpp"

namespace cbd::proxy {

class NbdConnection final : public Replier {
 public:
  enum class End {
    Disconnect,       // the client sent NBD_CMD_DISC
    Eof,              // the client closed (or the server stopped reading)
    ProtocolError,    // bad magic, absurd payload, duplicate cookie, broken target contract
    ConnectionError,  // read/write failure, or the target could not read a payload
  };

  // `in_fd` and `out_fd` stay owned by the caller and must outlive run().
  // `negotiated` is the outcome of negotiate_handshake() on the same fds.
  NbdConnection(int in_fd, int out_fd, const ExportInfo& info, const HandshakeResult& negotiated,
                std::shared_ptr<RequestTarget> target);
  ~NbdConnection() override;
  NbdConnection(const NbdConnection&) = delete;
  NbdConnection& operator=(const NbdConnection&) = delete;

  // Serves requests until DISC, EOF or an error; then waits until every
  // submitted request has been finished, so the target no longer holds a
  // reference to this Replier when it returns.
  End run();

  // Ends the connection at once from any thread: shuts the sockets down so
  // the client sees the connection drop and run() stops reading.  In-flight
  // requests still finish (their replies are dropped).
  void hard_disconnect();

  // Replier: called by the target, from any thread.
  bool read_data(const IoRequest& request, std::uint64_t relative_offset, const void* data,
                 std::uint32_t length) override;
  bool block_status(const IoRequest& request, std::span<const ExtentDescriptor> extents) override;
  void finish(const IoRequest& request, int error) override;

 private:
  struct InFlight {
    IoRequest request;
    std::uint32_t delivered = 0;  // READ bytes already sent
    bool extents_sent = false;    // BLOCK_STATUS chunk already sent
  };

  // Checks a request against the export and what was negotiated; 0 or an errno.
  int validate(const IoRequest& request) const;
  // Answers a request the reader handles itself (errors, zero-length).
  bool reply_locally(const IoRequest& request, int error);

  // All below: with mutex_ held.
  // Waits until no other request's reply is half sent.  `own_stream` lets a
  // READ continue its own stream.  False when the connection is dead.
  bool wait_for_socket(std::unique_lock<std::mutex>& lock, std::optional<std::uint64_t> own_stream);
  bool send(std::span<iovec> iov);
  bool send_simple(std::uint64_t cookie, int error, std::uint16_t flags);
  bool send_error_chunk(std::uint64_t cookie, int error, std::uint16_t flags);
  bool send_done_chunk(std::uint64_t cookie);
  void reply_final(std::unique_lock<std::mutex>& lock, InFlight& state, int error);
  void mark_dead(const char* why, LogLevel level = LogLevel::Debug);
  bool streams_whole_reply(const IoRequest& request) const;

  const int in_fd_;
  const int out_fd_;
  const bool out_is_socket_;
  const ExportInfo info_;
  const HandshakeResult negotiated_;
  const std::shared_ptr<RequestTarget> target_;

  std::mutex mutex_;                 // guards everything below and every socket write
  std::condition_variable changed_;  // a stream closed, a request finished, or the connection died
  std::unordered_map<std::uint64_t, InFlight> in_flight_;
  bool dead_ = false;                // no more writes: socket failed or hard disconnect
  // A reply whose header is out but whose data is not all sent yet.
  bool stream_open_ = false;
  std::uint64_t stream_cookie_ = 0;
  std::thread::id stream_thread_;    // thread that sent its last piece
};

}  // namespace cbd::proxy
