#include "client/nbd_connection.hpp"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <vector>

#include "client/socket_io.hpp"
#include "client/nbd_protocol.hpp"
#include "common/log.hpp"

namespace cbd::proxy {

namespace {

const char* command_name(std::uint16_t type) {
  switch (type) {
    case nbd::kCmdRead: return "READ";
    case nbd::kCmdWrite: return "WRITE";
    case nbd::kCmdDisc: return "DISC";
    case nbd::kCmdFlush: return "FLUSH";
    case nbd::kCmdTrim: return "TRIM";
    case nbd::kCmdCache: return "CACHE";
    case nbd::kCmdWriteZeroes: return "WRITE_ZEROES";
    case nbd::kCmdBlockStatus: return "BLOCK_STATUS";
    default: return "unknown command";
  }
}

bool writes_data(std::uint16_t type) {
  return type == nbd::kCmdWrite || type == nbd::kCmdTrim || type == nbd::kCmdWriteZeroes;
}

// The flags the target acts on for each command; the rest are ours (DF) or
// meaningless for the command (clients are known to set FUA on reads).
std::uint16_t flags_for_target(const IoRequest& request) {
  switch (request.type) {
    case nbd::kCmdWrite:
    case nbd::kCmdTrim: return request.flags & nbd::kCmdFlagFua;
    case nbd::kCmdWriteZeroes:
      return request.flags & (nbd::kCmdFlagFua | nbd::kCmdFlagNoHole | nbd::kCmdFlagFastZero);
    case nbd::kCmdBlockStatus: return request.flags & nbd::kCmdFlagReqOne;
    default: return 0;
  }
}

}  // namespace

NbdConnection::NbdConnection(int in_fd, int out_fd, const ExportInfo& info, const HandshakeResult& negotiated,
                             std::shared_ptr<RequestTarget> target)
    : in_fd_(in_fd),
      out_fd_(out_fd),
      out_is_socket_(fd_is_socket(out_fd)),
      info_(info),
      negotiated_(negotiated),
      target_(std::move(target)) {}

NbdConnection::~NbdConnection() {
  // run() already drained; this only matters if it was never called or a
  // caller destroys us early: the target must not call a dead Replier.
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return in_flight_.empty(); });
}

NbdConnection::End NbdConnection::run() {
  End end = End::Eof;
  for (;;) {
    std::uint8_t raw[nbd::kRequestSize];
    const RecvStatus status = recv_exact(in_fd_, raw, sizeof raw);
    if (status != RecvStatus::Ok) {
      std::lock_guard lock(mutex_);
      end = status == RecvStatus::Eof || dead_ ? End::Eof : End::ConnectionError;
      break;
    }
    const nbd::Request wire = nbd::decode_request(raw);
    if (wire.magic != nbd::kRequestMagic) {
      std::lock_guard lock(mutex_);
      mark_dead("bad request magic", LogLevel::Warning);
      end = End::ProtocolError;
      break;
    }
    if (wire.type == nbd::kCmdDisc) {
      end = End::Disconnect;
      break;
    }
    const IoRequest request{wire.cookie, wire.type, wire.flags, wire.offset, wire.length};
    const bool has_payload = request.type == nbd::kCmdWrite;
    if (has_payload && request.length > nbd::kMaxDiscardablePayload) {
      std::lock_guard lock(mutex_);
      mark_dead("WRITE payload too large to skip", LogLevel::Warning);
      end = End::ProtocolError;
      break;
    }

    const int error = validate(request);
    if (error != 0) {
      log(LogLevel::Debug, "nbd: refusing %s offset=%llu length=%u flags=0x%x: %s", command_name(request.type),
          static_cast<unsigned long long>(request.offset), request.length, request.flags, std::strerror(error));
      // A refused WRITE's payload is still on the socket; skip it to stay in step.
      if (has_payload && !recv_discard(in_fd_, request.length)) {
        end = End::ConnectionError;
        break;
      }
      if (!reply_locally(request, error)) {
        end = End::ConnectionError;
        break;
      }
      continue;
    }
    if (request.length == 0 && request.type != nbd::kCmdFlush) {
      if (!reply_locally(request, 0)) {
        end = End::ConnectionError;
        break;
      }
      continue;
    }

    {
      std::lock_guard lock(mutex_);
      if (dead_) {
        end = End::ConnectionError;
        break;
      }
      if (in_flight_.contains(request.cookie)) {
        mark_dead("client reused a cookie still in flight", LogLevel::Warning);
        end = End::ProtocolError;
        break;
      }
      in_flight_.emplace(request.cookie, InFlight{request});
    }
    IoRequest submitted = request;
    submitted.flags = flags_for_target(request);
    if (!target_->submit(submitted, in_fd_, *this)) {
      // The target could not read the payload; it will not finish this one.
      std::lock_guard lock(mutex_);
      in_flight_.erase(request.cookie);
      changed_.notify_all();
      mark_dead("could not read a WRITE payload");
      end = End::ConnectionError;
      break;
    }
  }

  // Whatever ended the loop, the target may still be working on requests
  // that reference this Replier: wait for every finish().
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return in_flight_.empty(); });
  return end;
}

int NbdConnection::validate(const IoRequest& request) const {
  const std::uint16_t tx = negotiated_.transmission_flags;
  const std::uint16_t type = request.type;
  const std::uint16_t flags = request.flags;

  // Order as nbdkit: read-only first, then range, then flags, then support.
  if ((tx & nbd::kTxReadOnly) && writes_data(type)) return EPERM;

  switch (type) {
    case nbd::kCmdRead:
    case nbd::kCmdWrite:
    case nbd::kCmdTrim:
    case nbd::kCmdCache:
    case nbd::kCmdWriteZeroes:
    case nbd::kCmdBlockStatus:
      // Written so it cannot overflow: offset + length may exceed 2^64.
      if (request.offset > info_.size || request.length > info_.size - request.offset)
        return (type == nbd::kCmdWrite || type == nbd::kCmdWriteZeroes) ? ENOSPC : EINVAL;
      break;
    case nbd::kCmdFlush:
      if (request.offset != 0 || request.length != 0) return EINVAL;
      break;
    default:
      return EINVAL;
  }

  if (flags & ~nbd::kKnownCmdFlags) return EINVAL;
  if ((flags & nbd::kCmdFlagNoHole) && type != nbd::kCmdWriteZeroes) return EINVAL;
  if ((flags & nbd::kCmdFlagFastZero) && (type != nbd::kCmdWriteZeroes || !(tx & nbd::kTxSendFastZero)))
    return EINVAL;
  if ((flags & nbd::kCmdFlagDf) && (type != nbd::kCmdRead || !negotiated_.structured_replies)) return EINVAL;
  if ((flags & nbd::kCmdFlagReqOne) && type != nbd::kCmdBlockStatus) return EINVAL;
  if ((flags & nbd::kCmdFlagFua) && !(tx & nbd::kTxSendFua)) return EINVAL;

  if ((type == nbd::kCmdRead || type == nbd::kCmdWrite) && request.length > nbd::kMaxPayload) return EINVAL;
  // One chunk may not exceed the advertised maximum block size: the spec
  // allows EOVERFLOW for an unfragmented READ that would need a larger one.
  if (type == nbd::kCmdRead && (flags & nbd::kCmdFlagDf) && request.length > advertised_block_sizes(info_).maximum)
    return EOVERFLOW;
  if (type == nbd::kCmdFlush && !(tx & nbd::kTxSendFlush)) return EINVAL;
  if (type == nbd::kCmdTrim && !(tx & nbd::kTxSendTrim)) return EINVAL;
  if (type == nbd::kCmdWriteZeroes && !(tx & nbd::kTxSendWriteZeroes)) return EINVAL;
  if (type == nbd::kCmdCache && !(tx & nbd::kTxSendCache)) return EINVAL;
  if (type == nbd::kCmdBlockStatus) {
    if (!negotiated_.structured_replies || negotiated_.meta_context_id == 0) return EINVAL;
    if (request.length == 0) return EINVAL;
  }

  if (negotiated_.block_size_agreed && type != nbd::kCmdFlush && type != nbd::kCmdBlockStatus) {
    const std::uint32_t minimum = advertised_block_sizes(info_).minimum;
    // The tail of an export whose size is not a multiple of the minimum is
    // still reachable.
    const bool offset_aligned = request.offset % minimum == 0;
    const bool length_aligned = request.length % minimum == 0 || request.offset + request.length == info_.size;
    if (!offset_aligned || !length_aligned) return EINVAL;
  }
  return 0;
}

bool NbdConnection::reply_locally(const IoRequest& request, int error) {
  std::unique_lock lock(mutex_);
  if (!wait_for_socket(lock, std::nullopt)) return false;
  const bool structured_command =
      negotiated_.structured_replies && (request.type == nbd::kCmdRead || request.type == nbd::kCmdBlockStatus);
  if (!structured_command) return send_simple(request.cookie, error, request.flags);
  if (error != 0) return send_error_chunk(request.cookie, error, request.flags);
  return send_done_chunk(request.cookie);  // a zero-length READ: no data chunk
}

bool NbdConnection::streams_whole_reply(const IoRequest& request) const {
  return request.type == nbd::kCmdRead && (!negotiated_.structured_replies || (request.flags & nbd::kCmdFlagDf));
}

bool NbdConnection::read_data(const IoRequest& request, std::uint64_t relative_offset, const void* data,
                              std::uint32_t length) {
  std::unique_lock lock(mutex_);
  const auto found = in_flight_.find(request.cookie);
  if (found == in_flight_.end() || found->second.request.type != nbd::kCmdRead) {
    log(LogLevel::Error, "nbd: target sent READ data for cookie %llu which is not an in-flight READ",
        static_cast<unsigned long long>(request.cookie));
    return false;
  }
  if (dead_) return false;
  // References into an unordered_map survive rehashing; iterators do not,
  // and wait_for_socket may let the reader insert.
  InFlight& state = found->second;
  const IoRequest own = state.request;
  if (length == 0 || relative_offset != state.delivered || length > own.length - state.delivered) {
    mark_dead("target delivered READ data out of order", LogLevel::Error);
    return false;
  }

  std::uint8_t header[nbd::kChunkHeaderSize + 8];
  std::size_t header_size = 0;
  if (!streams_whole_reply(own)) {
    if (!wait_for_socket(lock, std::nullopt)) return false;
    nbd::encode_chunk_header(header, 0, nbd::kReplyTypeOffsetData, own.cookie, 8 + length);
    nbd::store_be64(header + nbd::kChunkHeaderSize, own.offset + relative_offset);
    header_size = sizeof header;
  } else {
    if (!wait_for_socket(lock, own.cookie)) return false;
    if (state.delivered == 0) {
      if (negotiated_.structured_replies) {  // DF: one chunk whose data arrives in pieces
        nbd::encode_chunk_header(header, 0, nbd::kReplyTypeOffsetData, own.cookie, 8 + own.length);
        nbd::store_be64(header + nbd::kChunkHeaderSize, own.offset);
        header_size = sizeof header;
      } else {
        nbd::encode_simple_reply(header, 0, own.cookie);
        header_size = nbd::kSimpleReplySize;
      }
      stream_open_ = true;
      stream_cookie_ = own.cookie;
    }
    stream_thread_ = std::this_thread::get_id();
  }

  iovec iov[2] = {{header, header_size}, {const_cast<void*>(data), length}};
  if (!send(iov)) return false;
  state.delivered += length;
  if (stream_open_ && stream_cookie_ == own.cookie && state.delivered == own.length) {
    stream_open_ = false;
    changed_.notify_all();
  }
  return true;
}

bool NbdConnection::block_status(const IoRequest& request, std::span<const ExtentDescriptor> extents) {
  std::unique_lock lock(mutex_);
  const auto found = in_flight_.find(request.cookie);
  if (found == in_flight_.end() || found->second.request.type != nbd::kCmdBlockStatus) {
    log(LogLevel::Error, "nbd: target sent extents for cookie %llu which is not an in-flight BLOCK_STATUS",
        static_cast<unsigned long long>(request.cookie));
    return false;
  }
  if (dead_) return false;
  InFlight& state = found->second;
  const IoRequest own = state.request;
  // One BLOCK_STATUS chunk per context and request: keep the first answer.
  if (state.extents_sent) return true;

  // Clip to the request (the target may describe more), drop empty extents,
  // and with REQ_ONE send exactly one.
  std::vector<std::uint8_t> payload;
  payload.reserve(4 + 8 * std::min<std::size_t>(extents.size(), 1024));
  nbd::append_be32(payload, negotiated_.meta_context_id);
  std::uint32_t remaining = own.length;
  for (const ExtentDescriptor& extent : extents) {
    if (remaining == 0) break;
    if (extent.length == 0) continue;
    const std::uint32_t length = std::min(extent.length, remaining);
    nbd::append_be32(payload, length);
    nbd::append_be32(payload, extent.flags & (nbd::kStateHole | nbd::kStateZero));
    remaining -= length;
    if (own.flags & nbd::kCmdFlagReqOne) break;
  }
  if (payload.size() == 4) return true;  // nothing usable; finish() reports EIO

  if (!wait_for_socket(lock, std::nullopt)) return false;
  std::uint8_t header[nbd::kChunkHeaderSize];
  nbd::encode_chunk_header(header, 0, nbd::kReplyTypeBlockStatus, own.cookie,
                           static_cast<std::uint32_t>(payload.size()));
  iovec iov[2] = {{header, sizeof header}, {payload.data(), payload.size()}};
  if (!send(iov)) return false;
  state.extents_sent = true;
  return true;
}

void NbdConnection::finish(const IoRequest& request, int error) {
  std::unique_lock lock(mutex_);
  const auto found = in_flight_.find(request.cookie);
  if (found == in_flight_.end()) {
    log(LogLevel::Error, "nbd: target finished cookie %llu which is not in flight",
        static_cast<unsigned long long>(request.cookie));
    return;
  }
  InFlight& state = found->second;
  if (!dead_) reply_final(lock, state, error);
  if (stream_open_ && stream_cookie_ == request.cookie) stream_open_ = false;  // cut short: connection is dead
  in_flight_.erase(request.cookie);
  changed_.notify_all();
}

void NbdConnection::reply_final(std::unique_lock<std::mutex>& lock, InFlight& state, int error) {
  const IoRequest own = state.request;
  switch (own.type) {
    case nbd::kCmdRead:
      if (!negotiated_.structured_replies) {
        if (state.delivered == 0 && error != 0) {
          if (wait_for_socket(lock, std::nullopt)) send_simple(own.cookie, error, own.flags);
        } else if (error != 0 || state.delivered != own.length) {
          // A simple reply announced success with its header; the only way
          // left to report a failure is to drop the connection (the spec's
          // "hard disconnect").
          mark_dead(error != 0 ? "READ failed after its data was sent" : "target finished a READ without all its data",
                    LogLevel::Warning);
        }
        return;
      }
      if ((own.flags & nbd::kCmdFlagDf) && state.delivered > 0 && state.delivered < own.length) {
        // The chunk's header announced the whole length: pad it (this
        // thread still holds the stream), then report the failure in an
        // error chunk, as the spec asks.
        static const std::uint8_t zeros[64u << 10] = {};
        std::uint32_t left = own.length - state.delivered;
        while (left > 0 && !dead_) {
          const std::size_t step = std::min<std::size_t>(left, sizeof zeros);
          iovec pad{const_cast<std::uint8_t*>(zeros), step};  // send() consumes it in place
          if (!send(std::span<iovec>(&pad, 1))) return;
          left -= static_cast<std::uint32_t>(step);
        }
        state.delivered = own.length;
        stream_open_ = false;
        changed_.notify_all();
        send_error_chunk(own.cookie, error != 0 ? error : EIO, own.flags);
        return;
      }
      if (!wait_for_socket(lock, std::nullopt)) return;
      // Structured replies may follow data chunks with an error chunk.
      if (error != 0) {
        send_error_chunk(own.cookie, error, own.flags);
      } else if (state.delivered == own.length) {
        send_done_chunk(own.cookie);
      } else {
        log(LogLevel::Error, "nbd: target finished a READ without all its data");
        send_error_chunk(own.cookie, EIO, own.flags);
      }
      return;

    case nbd::kCmdBlockStatus:
      if (!wait_for_socket(lock, std::nullopt)) return;
      if (error != 0) {
        send_error_chunk(own.cookie, error, own.flags);
      } else if (state.extents_sent) {
        send_done_chunk(own.cookie);
      } else {
        log(LogLevel::Error, "nbd: target finished a BLOCK_STATUS without extents");
        send_error_chunk(own.cookie, EIO, own.flags);
      }
      return;

    default:
      if (wait_for_socket(lock, std::nullopt)) send_simple(own.cookie, error, own.flags);
      return;
  }
}

bool NbdConnection::wait_for_socket(std::unique_lock<std::mutex>& lock, std::optional<std::uint64_t> own_stream) {
  while (!dead_ && stream_open_ && own_stream != stream_cookie_) {
    if (stream_thread_ == std::this_thread::get_id()) {
      mark_dead("target interleaved another reply into a half-sent READ on the same thread", LogLevel::Error);
      return false;
    }
    changed_.wait(lock);
  }
  return !dead_;
}

bool NbdConnection::send(std::span<iovec> iov) {
  if (dead_) return false;
  if (!send_all(out_fd_, out_is_socket_, iov)) {
    const int saved = errno;
    log(LogLevel::Debug, "nbd: write to client failed: %s", std::strerror(saved));
    mark_dead("write to client failed");
    return false;
  }
  return true;
}

bool NbdConnection::send_simple(std::uint64_t cookie, int error, std::uint16_t flags) {
  std::uint8_t reply[nbd::kSimpleReplySize];
  nbd::encode_simple_reply(reply, nbd::wire_error(error, flags), cookie);
  iovec iov{reply, sizeof reply};
  return send(std::span<iovec>(&iov, 1));
}

bool NbdConnection::send_error_chunk(std::uint64_t cookie, int error, std::uint16_t flags) {
  // Payload: u32 error, u16 message length (0: no message).
  std::uint8_t chunk[nbd::kChunkHeaderSize + 6];
  nbd::encode_chunk_header(chunk, nbd::kReplyFlagDone, nbd::kReplyTypeError, cookie, 6);
  nbd::store_be32(chunk + nbd::kChunkHeaderSize, nbd::wire_error(error, flags));
  nbd::store_be16(chunk + nbd::kChunkHeaderSize + 4, 0);
  iovec iov{chunk, sizeof chunk};
  return send(std::span<iovec>(&iov, 1));
}

bool NbdConnection::send_done_chunk(std::uint64_t cookie) {
  std::uint8_t chunk[nbd::kChunkHeaderSize];
  nbd::encode_chunk_header(chunk, nbd::kReplyFlagDone, nbd::kReplyTypeNone, cookie, 0);
  iovec iov{chunk, sizeof chunk};
  return send(std::span<iovec>(&iov, 1));
}

void NbdConnection::hard_disconnect() {
  std::lock_guard lock(mutex_);
  mark_dead("hard disconnect requested");
}

void NbdConnection::mark_dead(const char* why, LogLevel level) {
  if (dead_) return;
  dead_ = true;
  log(level, "nbd: dropping connection: %s", why);
  // shutdown (not close): the fds stay valid for every thread still using
  // them, but the client sees the connection end and our reader wakes up.
  if (out_is_socket_) ::shutdown(out_fd_, SHUT_RDWR);
  if (in_fd_ != out_fd_ && fd_is_socket(in_fd_)) ::shutdown(in_fd_, SHUT_RDWR);
  changed_.notify_all();
}

}  // namespace cbd::proxy
