#include "client/nbd_session.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "client/nbd_handshake.hpp"
#include "client/socket_io.hpp"
#include "common/log.hpp"

namespace cbd::proxy {

namespace {

// Trim, write-zeroes and cache carry no data; one entry covers up to this
// much, so a 4 GiB trim is 64 entries, not thousands — and each completes
// soon enough for the stall timeout even where zeros are written byte by
// byte (64 MiB at 100 MB/s: under a second; the handler runs them in 32 MiB
// slices, docs/design.md §7).
constexpr std::uint32_t kNoDataPiece = 64u << 20;
// Room for block-status descriptors per request (2048 extents).
constexpr std::uint32_t kBlockStatusCapacity = 2048 * sizeof(ExtentDescriptor);
constexpr std::size_t kInputBuffer = 64u << 10;
constexpr std::size_t kMaxIovecs = 256;
constexpr std::uint32_t kExtentUnit = 4096;  // the data area allocator's alignment

const std::uint8_t kZeros[64u << 10] = {};

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

// The one place NBD commands and flags become cbd operations and entry
// flags.  Flags the backend does not act on for a command are dropped here
// (DF is ours; clients are known to set FUA on reads).
Op op_for(std::uint16_t type) {
  switch (type) {
    case nbd::kCmdRead: return Op::Read;
    case nbd::kCmdWrite: return Op::Write;
    case nbd::kCmdFlush: return Op::Flush;
    case nbd::kCmdTrim: return Op::Trim;
    case nbd::kCmdWriteZeroes: return Op::WriteZeroes;
    case nbd::kCmdBlockStatus: return Op::BlockStatus;
    case nbd::kCmdCache: return Op::Cache;
    default: return Op{};
  }
}

std::uint16_t entry_flags_for(std::uint16_t type, std::uint16_t flags) {
  std::uint16_t out = 0;
  switch (type) {
    case nbd::kCmdWrite:
    case nbd::kCmdTrim:
      if (flags & nbd::kCmdFlagFua) out |= kFlagFua;
      break;
    case nbd::kCmdWriteZeroes:
      if (flags & nbd::kCmdFlagFua) out |= kFlagFua;
      if (flags & nbd::kCmdFlagNoHole) out |= kFlagNoHole;
      if (flags & nbd::kCmdFlagFastZero) out |= kFlagFastZero;
      break;
    case nbd::kCmdBlockStatus:
      if (flags & nbd::kCmdFlagReqOne) out |= kFlagReqOne;
      break;
    default: break;
  }
  return out;
}

std::uint32_t extent_bytes(std::uint32_t length) {
  const std::uint64_t rounded = (std::uint64_t{length} + kExtentUnit - 1) / kExtentUnit * kExtentUnit;
  return static_cast<std::uint32_t>(std::max<std::uint64_t>(rounded, kExtentUnit));
}

void set_nonblocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0 && !(flags & O_NONBLOCK)) ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

}  // namespace

struct NbdSession::Request {
  NbdSession* session = nullptr;
  std::uint64_t cookie = 0;
  std::uint16_t type = 0;
  std::uint16_t nbd_flags = 0;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
  Op op{};
  std::uint16_t entry_flags = 0;
  std::vector<Piece> pieces;
  std::vector<std::vector<std::uint8_t>> copies;  // stream pieces copied out while another stream is open
  std::uint32_t issued = 0;     // pieces submitted to the engine
  std::uint32_t completed = 0;  // pieces completed
  std::uint32_t payload_got = 0;  // WRITE: bytes of the current piece received
  bool stream = false;          // READ whose reply is one header, then all the data
  bool waiting_stream = false;  // in waiting_streams_
  bool header_queued = false;
  std::uint32_t next_in_order = 0;  // stream: next piece to queue
  std::uint32_t queued_bytes = 0;
  bool replied = false;
  int error = 0;
};

NbdSession::NbdSession(AdoptedConnection connection, const ExportInfo& info, std::unique_ptr<ChannelEngine>& engine,
                       const SessionLimits& limits)
    : connection_(std::move(connection)),
      in_fd_(connection_.in_fd),
      out_fd_(connection_.out_fd),
      out_is_socket_(fd_is_socket(connection_.out_fd)),
      in_is_socket_(fd_is_socket(connection_.in_fd)),
      info_(info),
      max_block_(advertised_block_sizes(info).maximum),
      engine_(engine),
      limits_(limits),
      input_(kInputBuffer) {
  set_nonblocking(in_fd_);
  if (out_fd_ != in_fd_) set_nonblocking(out_fd_);
  iov_.reserve(kMaxIovecs);
}

NbdSession::~NbdSession() {
  close("queue stopped");
  // Any entry still pointing here is failed by the engine's owner first
  // (QueueLoop stops only once no session has requests).
}

bool NbdSession::wants_read() const {
  if (closed_ || intake_stalled_) return false;
  // A payload already announced is taken whatever the backlog: it goes into
  // the share, not the output, and a client blocked writing it may read no
  // reply before it is sent.
  if ((intake_ && intake_->op == Op::Write) || discard_left_) return true;
  if (input_done_) return false;
  return output_owned_bytes_ <= limits_.output_backlog;
}

bool NbdSession::can_hold(std::uint32_t bytes) const {
  if (held_entries_ >= limits_.entry_share) return false;
  return held_bytes_ == 0 || held_bytes_ + bytes <= limits_.data_share;
}

// ---------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------

// Non-blocking read: true with got > 0, true with got == 0 on EAGAIN, false
// on EOF (input_done_ set) or error (connection closed).
bool NbdSession::recv_some(void* buffer, std::size_t length, std::size_t& got) {
  got = 0;
  for (;;) {
    const ssize_t n = in_is_socket_ ? ::recv(in_fd_, buffer, length, MSG_DONTWAIT) : ::read(in_fd_, buffer, length);
    if (n > 0) {
      got = static_cast<std::size_t>(n);
      return true;
    }
    if (n == 0) {
      input_done_ = true;
      return false;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
    log(LogLevel::Debug, "nbd: read from client failed: %s", std::strerror(errno));
    close("read from client failed");
    return false;
  }
}

bool NbdSession::pump_input() {
  bool progress = false;
  while (!closed_) {
    if (intake_) {
      if (!continue_intake()) break;
      progress = true;
      continue;
    }
    if (discard_left_) {
      if (!discard_payload()) break;
      progress = true;
      continue;
    }
    if (input_done_) break;
    if (output_owned_bytes_ > limits_.output_backlog) break;  // no new request until the client reads
    if (!parse_one()) break;
    progress = true;
  }
  if (input_done_ && !closed_ && requests_.empty() && output_.empty() && !intake_ && !discard_left_)
    close("connection ended");
  return progress;
}

bool NbdSession::parse_one() {
  if (input_end_ - input_start_ < nbd::kRequestSize) {
    if (input_start_ > 0) {
      std::memmove(input_.data(), input_.data() + input_start_, input_end_ - input_start_);
      input_end_ -= input_start_;
      input_start_ = 0;
    }
    // Receive until a whole header is here or the socket is empty: the
    // readiness is edge-triggered, so stopping after a part would miss an
    // end of file that came with it (a client that sends half a header and
    // closes would be held forever).
    while (input_end_ - input_start_ < nbd::kRequestSize) {
      std::size_t got = 0;
      if (!recv_some(input_.data() + input_end_, input_.size() - input_end_, got)) {
        if (input_done_ && input_end_ > input_start_) close("client closed in the middle of a request");
        return false;
      }
      if (got == 0) return false;  // nothing more for now: the next edge brings it
      input_end_ += got;
    }
  }
  const nbd::Request wire = nbd::decode_request(input_.data() + input_start_);
  input_start_ += nbd::kRequestSize;
  if (wire.magic != nbd::kRequestMagic) {
    close("bad request magic", true);
    return false;
  }
  if (wire.type == nbd::kCmdDisc) {
    input_done_ = true;
    return false;
  }
  const bool has_payload = wire.type == nbd::kCmdWrite;
  if (has_payload && wire.length > nbd::kMaxDiscardablePayload) {
    close("WRITE payload too large to skip", true);
    return false;
  }
  const int error = validate(wire);
  if (error != 0) {
    log(LogLevel::Debug, "nbd: refusing %s offset=%llu length=%u flags=0x%x: %s", command_name(wire.type),
        static_cast<unsigned long long>(wire.offset), wire.length, wire.flags, std::strerror(error));
    if (has_payload && wire.length > 0) {
      // Skip the payload to stay in step, then answer.
      discard_left_ = wire.length;
      discarded_ = wire;
      discarded_error_ = error;
      return true;
    }
    const bool structured = negotiated().structured_replies &&
                            (wire.type == nbd::kCmdRead || wire.type == nbd::kCmdBlockStatus);
    if (structured)
      emit_error_chunk(wire.cookie, error, wire.flags, nullptr);
    else
      emit_simple(wire.cookie, error, wire.flags, nullptr);
    return true;
  }
  if (wire.length == 0 && wire.type != nbd::kCmdFlush) {
    if (negotiated().structured_replies && wire.type == nbd::kCmdRead)
      emit_done_chunk(wire.cookie, nullptr);  // a zero-length READ: no data chunk
    else
      emit_simple(wire.cookie, 0, wire.flags, nullptr);
    return true;
  }
  start_request(wire);
  return true;
}

void NbdSession::start_request(const nbd::Request& wire) {
  auto owned = std::make_unique<Request>();
  Request& request = *owned;
  request.session = this;
  request.cookie = wire.cookie;
  request.type = wire.type;
  request.nbd_flags = wire.flags;
  request.offset = wire.offset;
  request.length = wire.length;
  request.op = op_for(wire.type);
  request.entry_flags = entry_flags_for(wire.type, wire.flags);
  std::uint32_t piece = 0;
  switch (request.op) {
    case Op::Read: piece = engine_->max_piece(); break;
    case Op::Write: piece = std::min(engine_->max_piece(), limits_.write_piece); break;
    case Op::BlockStatus: piece = 0; break;  // one entry: the backend answers from the start
    case Op::Flush: piece = 0; break;
    default: piece = kNoDataPiece; break;
  }
  const std::uint32_t count = piece == 0 ? 1 : static_cast<std::uint32_t>((std::uint64_t{wire.length} + piece - 1) / piece);
  request.pieces.resize(std::max<std::uint32_t>(count, 1));
  for (std::uint32_t i = 0; i < request.pieces.size(); ++i) {
    Piece& p = request.pieces[i];
    p.relative = piece == 0 ? 0 : i * piece;
    p.length = piece == 0 ? wire.length : std::min(piece, wire.length - p.relative);
    if (request.op == Op::Read || request.op == Op::Write) p.extent = p.length;
    if (request.op == Op::BlockStatus) p.extent = kBlockStatusCapacity;
  }
  request.stream = request.op == Op::Read &&
                   (!negotiated().structured_replies || (wire.flags & nbd::kCmdFlagDf));
  if (request.op == Op::Write) payload_since_ = Clock::now();
  intake_ = &request;
  requests_.push_back(std::move(owned));
}

bool NbdSession::reserve_next_piece(Request& request) {
  Piece& piece = request.pieces[request.issued];
  const std::uint32_t bytes = piece.extent ? extent_bytes(piece.extent) : 0;
  if (!can_hold(bytes)) return false;
  auto slot = engine_->reserve(piece.extent, piece.extent > 0, reinterpret_cast<std::uintptr_t>(&request));
  if (!slot) return false;
  piece.slot = *slot;
  piece.reserved = true;
  held_bytes_ += bytes;
  ++held_entries_;
  SubmissionEntry& se = engine_->submission(*slot);
  se.op = static_cast<std::uint16_t>(request.op);
  se.flags = request.entry_flags;
  se.offset = request.offset + piece.relative;
  se.length = request.op == Op::BlockStatus ? request.length : piece.length;
  return true;
}

bool NbdSession::continue_intake() {
  Request& request = *intake_;
  if (request.op == Op::Write) return receive_payload(request);
  while (request.issued < request.pieces.size()) {
    if (request.replied) {
      request.pieces.resize(request.issued);  // already answered (an error): the rest is not needed
      break;
    }
    if (!reserve_next_piece(request)) {
      intake_stalled_ = true;
      return false;
    }
    engine_->submit(request.pieces[request.issued].slot);
    ++request.issued;
  }
  intake_stalled_ = false;
  intake_ = nullptr;
  maybe_forget(request);
  return true;
}

bool NbdSession::receive_payload(Request& request) {
  while (request.issued < request.pieces.size()) {
    Piece& piece = request.pieces[request.issued];
    if (!piece.reserved) {
      if (!reserve_next_piece(request)) {
        intake_stalled_ = true;
        return false;
      }
      intake_stalled_ = false;
      request.payload_got = 0;
      payload_since_ = Clock::now();  // the deadline runs per piece, from when it can be received
    }
    std::byte* extent = engine_->writable_extent(piece.slot);
    if (!extent) {
      // The channel was taken from us (this process was paused past
      // dead-after): its data area is another node's now.  The payload
      // waits in the socket until the queue moves to a new channel — or,
      // when none is to be had (the engine fails everything), is read into
      // scratch and dropped, and the entry fails at submit.
      if (!engine_->failing()) {
        intake_stalled_ = true;
        return false;
      }
      discard_.resize(piece.length);
      extent = discard_.data();
    }
    const std::uint32_t want = piece.length - request.payload_got;
    std::size_t got = std::min<std::size_t>(want, input_end_ - input_start_);
    if (got > 0) {
      // Payload that arrived with the headers before it.
      std::memcpy(extent + request.payload_got, input_.data() + input_start_, got);
      input_start_ += got;
    } else if (!recv_some(extent + request.payload_got, want, got)) {
      if (input_done_) close("client closed in the middle of a WRITE payload");
      return false;
    } else if (got == 0) {
      return false;  // more later
    }
    engine_->payload_received(piece.slot, request.payload_got, static_cast<std::uint32_t>(got));
    request.payload_got += static_cast<std::uint32_t>(got);
    if (request.payload_got == piece.length) {
      engine_->submit(piece.slot);
      ++request.issued;
    }
  }
  intake_stalled_ = false;
  intake_ = nullptr;
  return true;
}

bool NbdSession::discard_payload() {
  while (discard_left_ > 0) {
    std::size_t buffered = std::min<std::uint64_t>(discard_left_, input_end_ - input_start_);
    if (buffered > 0) {
      input_start_ += buffered;
      discard_left_ -= buffered;
      continue;
    }
    input_start_ = input_end_ = 0;
    std::size_t got = 0;
    if (!recv_some(input_.data(), std::min<std::uint64_t>(discard_left_, input_.size()), got)) {
      if (input_done_) close("client closed in the middle of a WRITE payload");
      return false;
    }
    if (got == 0) return false;
    discard_left_ -= got;
  }
  emit_simple(discarded_.cookie, discarded_error_, discarded_.flags, nullptr);
  return true;
}

// Order as nbdkit: read-only first, then range, then flags, then support.
int NbdSession::validate(const nbd::Request& request) const {
  const HandshakeResult& n = negotiated();
  const std::uint16_t tx = n.transmission_flags;
  const std::uint16_t type = request.type;
  const std::uint16_t flags = request.flags;
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
  if ((flags & nbd::kCmdFlagDf) && (type != nbd::kCmdRead || !n.structured_replies)) return EINVAL;
  if ((flags & nbd::kCmdFlagReqOne) && type != nbd::kCmdBlockStatus) return EINVAL;
  if ((flags & nbd::kCmdFlagFua) && !(tx & nbd::kTxSendFua)) return EINVAL;
  if ((type == nbd::kCmdRead || type == nbd::kCmdWrite) && request.length > nbd::kMaxPayload) return EINVAL;
  // One chunk may not exceed the advertised maximum: the spec allows
  // EOVERFLOW for an unfragmented read that would need a larger one.
  if (type == nbd::kCmdRead && (flags & nbd::kCmdFlagDf) && request.length > max_block_) return EOVERFLOW;
  if (type == nbd::kCmdFlush && !(tx & nbd::kTxSendFlush)) return EINVAL;
  if (type == nbd::kCmdTrim && !(tx & nbd::kTxSendTrim)) return EINVAL;
  if (type == nbd::kCmdWriteZeroes && !(tx & nbd::kTxSendWriteZeroes)) return EINVAL;
  if (type == nbd::kCmdCache && !(tx & nbd::kTxSendCache)) return EINVAL;
  if (type == nbd::kCmdBlockStatus) {
    if (!n.structured_replies || n.meta_context_id == 0) return EINVAL;
    if (request.length == 0) return EINVAL;
  }
  if (n.block_size_agreed && type != nbd::kCmdFlush && type != nbd::kCmdBlockStatus) {
    const std::uint32_t minimum = advertised_block_sizes(info_).minimum;
    // The tail of an export whose size is not a multiple of the minimum is
    // still reachable.
    const bool offset_aligned = request.offset % minimum == 0;
    const bool length_aligned = request.length % minimum == 0 || request.offset + request.length == info_.size;
    if (!offset_aligned || !length_aligned) return EINVAL;
  }
  return 0;
}

// ---------------------------------------------------------------------------
// Completions
// ---------------------------------------------------------------------------

void NbdSession::dispatch(const EngineCompletion& completion) {
  auto* request = reinterpret_cast<Request*>(static_cast<std::uintptr_t>(completion.owner));
  if (!request) return;
  NbdSession& session = *request->session;
  for (std::uint32_t i = 0; i < request->pieces.size(); ++i) {
    const Piece& piece = request->pieces[i];
    if (piece.reserved && !piece.completed && piece.slot == completion.slot) {
      session.on_piece(*request, i, completion);
      return;
    }
  }
  // Not ours (cannot happen): give the entry back.
  session.engine_->release(completion.slot);
}

void NbdSession::release_piece(Request& request, std::uint32_t index) {
  Piece& piece = request.pieces[index];
  if (piece.released || !piece.reserved) return;
  piece.released = true;
  engine_->release(piece.slot);
  held_bytes_ -= piece.extent ? extent_bytes(piece.extent) : 0;
  --held_entries_;
}

void NbdSession::give_back(std::uint32_t slot, std::uint32_t held) {
  engine_->release(slot);
  held_bytes_ -= held;
  --held_entries_;
}

// Hands a completed READ piece's extent to the output queue, which gives
// the entry back once the bytes are on the socket.
NbdSession::OutItem NbdSession::extent_item(Request& request, std::uint32_t index) {
  Piece& piece = request.pieces[index];
  OutItem data;
  data.kind = OutItem::Kind::Extent;
  data.length = piece.length;
  data.slot = piece.slot;
  data.held = piece.extent ? extent_bytes(piece.extent) : 0;
  piece.released = true;
  return data;
}

void NbdSession::on_piece(Request& request, std::uint32_t index, const EngineCompletion& completion) {
  Piece& piece = request.pieces[index];
  piece.completed = true;
  piece.status = completion.status;
  piece.result_length = completion.result_length;
  piece.result_crc = completion.result_crc;
  ++request.completed;
  if (closed_) {
    release_piece(request, index);
    maybe_forget(request);
    return;
  }
  switch (request.op) {
    case Op::Read:
      if (piece.status == 0) {
        const std::byte* data = engine_->extent(piece.slot);
        if (!data || piece.result_length != piece.length ||
            !engine_->channel().consume_data(data, piece.length, piece.result_crc))
          piece.status = EIO;
      }
      advance_read(request);
      break;
    case Op::BlockStatus: {
      if (!request.replied) {
        std::vector<ExtentDescriptor> extents;
        const std::uint32_t bytes = piece.result_length;
        const std::byte* data = engine_->extent(piece.slot);
        int error = piece.status;
        if (!error && (!data || bytes == 0 || bytes > piece.extent || bytes % sizeof(ExtentDescriptor) != 0 ||
                       !engine_->channel().consume_data(data, bytes, piece.result_crc)))
          error = EIO;
        if (!error) {
          // Copy out and check: descriptors come from the peer.
          extents.resize(bytes / sizeof(ExtentDescriptor));
          std::memcpy(extents.data(), data, bytes);
        }
        release_piece(request, index);
        if (!error) {
          emit_block_status(request, extents);
        } else {
          emit_error_chunk(request.cookie, error, request.nbd_flags, &request);
        }
        request.replied = true;
      }
      release_piece(request, index);
      break;
    }
    default:
      release_piece(request, index);
      if (!request.error) request.error = piece.status;
      if (request.completed == request.pieces.size() && request.issued == request.pieces.size()) {
        emit_simple(request.cookie, request.error, request.nbd_flags, &request);
        request.replied = true;
      }
      break;
  }
  maybe_forget(request);
}

void NbdSession::advance_read(Request& request) {
  auto release_done = [&] {
    for (std::uint32_t i = 0; i < request.pieces.size(); ++i)
      if (request.pieces[i].completed) release_piece(request, i);
  };
  if (request.replied) {
    release_done();
    return;
  }
  const bool structured = negotiated().structured_replies;
  const bool fully_issued = request.issued == request.pieces.size();
  if (!request.stream) {
    // Structured, fragmented: every piece is its own chunk, in completion order.
    for (std::uint32_t i = 0; i < request.pieces.size(); ++i) {
      Piece& piece = request.pieces[i];
      if (!piece.completed || piece.released) continue;
      if (piece.status) {
        release_done();
        emit_error_chunk(request.cookie, piece.status, request.nbd_flags, &request);
        request.replied = true;
        return;
      }
      const bool last = fully_issued && request.queued_bytes + piece.length == request.length;
      std::uint8_t header[nbd::kChunkHeaderSize + 8];
      nbd::encode_chunk_header(header, last ? nbd::kReplyFlagDone : 0, nbd::kReplyTypeOffsetData, request.cookie,
                               8 + piece.length);
      nbd::store_be64(header + nbd::kChunkHeaderSize, request.offset + piece.relative);
      emit_bytes(header, sizeof header, &request);
      emit(extent_item(request, i), &request);
      request.queued_bytes += piece.length;
      if (last) request.replied = true;
    }
    return;
  }
  // A stream: one header, then every piece in order.  Only one stream is
  // open per connection; a later one waits with its data copied out.
  if (stream_ && stream_ != &request) {
    for (std::uint32_t i = 0; i < request.pieces.size(); ++i) {
      Piece& piece = request.pieces[i];
      if (!piece.completed || piece.released) continue;
      // Data being read again after its channel was lost (or in a channel
      // not ours now) is not copied: the piece keeps its extent and goes
      // out from it when this stream's turn comes (fill_iovecs waits).
      if (piece.status == 0 && engine_->data_state(piece.slot) != ChannelEngine::DataState::Ready) continue;
      if (piece.status == 0) {
        if (request.copies.size() < request.pieces.size()) request.copies.resize(request.pieces.size());
        const auto* data = reinterpret_cast<const std::uint8_t*>(engine_->extent(piece.slot));
        request.copies[i].assign(data, data + piece.length);
        output_owned_bytes_ += piece.length;  // output waiting to be written: it counts against the backlog
      }
      release_piece(request, i);
      piece.released = true;
    }
    if (!request.waiting_stream) {
      request.waiting_stream = true;
      waiting_streams_.push_back(&request);
    }
    return;
  }
  while (request.next_in_order < request.pieces.size() && request.pieces[request.next_in_order].completed) {
    const std::uint32_t i = request.next_in_order;
    Piece& piece = request.pieces[i];
    if (piece.status) {
      request.error = piece.status;
      release_done();
      if (!request.header_queued) {
        if (structured)
          emit_error_chunk(request.cookie, piece.status, request.nbd_flags, &request);
        else
          emit_simple(request.cookie, piece.status, request.nbd_flags, &request);
      } else if (!structured) {
        // A simple reply announced success with its header; the only way
        // left to report a failure is to drop the connection.  Not at once:
        // replies queued before this one are whole and still go out.  Not
        // here either: we may be inside another request's completion.
        end_after_output("READ failed after its data was sent");
        request.replied = true;
        return;
      } else {
        // DF: pad the announced chunk, then the error.
        OutItem pad;
        pad.kind = OutItem::Kind::Zeros;
        pad.length = request.length - request.queued_bytes;
        emit(std::move(pad), &request);
        if (stream_ == &request) close_stream();
        emit_error_chunk(request.cookie, piece.status, request.nbd_flags, &request);
      }
      if (stream_ == &request) close_stream();
      request.replied = true;
      return;
    }
    const bool single = request.pieces.size() == 1;
    if (!request.header_queued) {
      if (structured) {
        std::uint8_t header[nbd::kChunkHeaderSize + 8];
        nbd::encode_chunk_header(header, single ? nbd::kReplyFlagDone : 0, nbd::kReplyTypeOffsetData, request.cookie,
                                 8 + request.length);
        nbd::store_be64(header + nbd::kChunkHeaderSize, request.offset);
        emit_bytes(header, sizeof header, &request);
      } else {
        std::uint8_t header[nbd::kSimpleReplySize];
        nbd::encode_simple_reply(header, 0, request.cookie);
        emit_bytes(header, sizeof header, &request);
      }
      request.header_queued = true;
      if (!single) stream_ = &request;
    }
    if (i < request.copies.size() && !request.copies[i].empty()) {
      emit_bytes(request.copies[i].data(), request.copies[i].size(), &request);
      output_owned_bytes_ -= request.copies[i].size();
      std::vector<std::uint8_t>().swap(request.copies[i]);
    } else {
      emit(extent_item(request, i), &request);
    }
    request.queued_bytes += piece.length;
    ++request.next_in_order;
  }
  if (request.next_in_order == request.pieces.size()) {
    if (stream_ == &request) close_stream();
    if (structured && request.pieces.size() > 1) emit_done_chunk(request.cookie, &request);
    request.replied = true;
  }
}

void NbdSession::drop_copies(Request& request) {
  for (std::vector<std::uint8_t>& copy : request.copies) output_owned_bytes_ -= copy.size();
  request.copies.clear();
}

void NbdSession::maybe_forget(Request& request) {
  if (!request.replied || request.completed < request.issued || intake_ == &request) return;
  drop_copies(request);
  for (std::uint32_t i = 0; i < request.pieces.size(); ++i)
    if (request.pieces[i].completed) release_piece(request, i);
  if (request.waiting_stream) {
    auto found = std::find(waiting_streams_.begin(), waiting_streams_.end(), &request);
    if (found != waiting_streams_.end()) waiting_streams_.erase(found);
  }
  auto owned = std::find_if(requests_.begin(), requests_.end(), [&](const auto& r) { return r.get() == &request; });
  if (owned != requests_.end()) requests_.erase(owned);
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

NbdSession::OutItem NbdSession::materialize(OutItem item) {
  if (item.kind == OutItem::Kind::Extent) {
    const auto* data = reinterpret_cast<const std::uint8_t*>(engine_->extent(item.slot));
    OutItem copy;
    copy.kind = OutItem::Kind::Bytes;
    copy.length = item.length;
    copy.heap.assign(data + item.extent_offset, data + item.extent_offset + item.length);
    give_back(item.slot, item.held);
    return copy;
  }
  if (item.kind == OutItem::Kind::Zeros) {
    OutItem copy;
    copy.kind = OutItem::Kind::Bytes;
    copy.length = item.length;
    copy.heap.assign(item.length, 0);
    return copy;
  }
  return item;
}

void NbdSession::emit(OutItem item, const Request* from) {
  if (closed_ || ending_) {
    if (item.kind == OutItem::Kind::Extent) materialize(std::move(item));  // releases the extent
    return;
  }
  if (stream_ && from != stream_) {
    OutItem copy = materialize(std::move(item));
    output_owned_bytes_ += copy.length;
    held_replies_.push_back(std::move(copy));
    return;
  }
  if (item.kind != OutItem::Kind::Extent) output_owned_bytes_ += item.length;
  output_.push_back(std::move(item));
}

void NbdSession::emit_bytes(const std::uint8_t* data, std::size_t length, const Request* from) {
  OutItem item;
  item.kind = OutItem::Kind::Bytes;
  item.length = static_cast<std::uint32_t>(length);
  if (length <= item.inline_bytes.size()) {
    std::memcpy(item.inline_bytes.data(), data, length);
    item.inline_length = static_cast<std::uint8_t>(length);
  } else {
    item.heap.assign(data, data + length);
  }
  emit(std::move(item), from);
}

void NbdSession::emit_simple(std::uint64_t cookie, int error, std::uint16_t flags, const Request* from) {
  std::uint8_t reply[nbd::kSimpleReplySize];
  nbd::encode_simple_reply(reply, nbd::wire_error(error, flags), cookie);
  emit_bytes(reply, sizeof reply, from);
}

void NbdSession::emit_error_chunk(std::uint64_t cookie, int error, std::uint16_t flags, const Request* from) {
  // Payload: u32 error, u16 message length (0: no message).
  std::uint8_t chunk[nbd::kChunkHeaderSize + 6];
  nbd::encode_chunk_header(chunk, nbd::kReplyFlagDone, nbd::kReplyTypeError, cookie, 6);
  nbd::store_be32(chunk + nbd::kChunkHeaderSize, nbd::wire_error(error, flags));
  nbd::store_be16(chunk + nbd::kChunkHeaderSize + 4, 0);
  emit_bytes(chunk, sizeof chunk, from);
}

void NbdSession::emit_done_chunk(std::uint64_t cookie, const Request* from) {
  std::uint8_t chunk[nbd::kChunkHeaderSize];
  nbd::encode_chunk_header(chunk, nbd::kReplyFlagDone, nbd::kReplyTypeNone, cookie, 0);
  emit_bytes(chunk, sizeof chunk, from);
}

void NbdSession::emit_block_status(Request& request, std::span<const ExtentDescriptor> extents) {
  // Clip to the request (the backend may describe more), drop empty
  // extents, and with REQ_ONE send exactly one.  DONE rides on the chunk.
  std::vector<std::uint8_t> payload;
  payload.reserve(nbd::kChunkHeaderSize + 4 + 8 * std::min<std::size_t>(extents.size(), 1024));
  payload.resize(nbd::kChunkHeaderSize);
  nbd::append_be32(payload, negotiated().meta_context_id);
  std::uint32_t remaining = request.length;
  for (const ExtentDescriptor& extent : extents) {
    if (remaining == 0) break;
    if (extent.length == 0) break;
    const std::uint32_t length = std::min(extent.length, remaining);
    nbd::append_be32(payload, length);
    nbd::append_be32(payload, extent.flags & (nbd::kStateHole | nbd::kStateZero));
    remaining -= length;
    if (request.nbd_flags & nbd::kCmdFlagReqOne) break;
  }
  if (payload.size() == nbd::kChunkHeaderSize + 4) {
    emit_error_chunk(request.cookie, EIO, request.nbd_flags, &request);
    return;
  }
  nbd::encode_chunk_header(payload.data(), nbd::kReplyFlagDone, nbd::kReplyTypeBlockStatus, request.cookie,
                           static_cast<std::uint32_t>(payload.size() - nbd::kChunkHeaderSize));
  emit_bytes(payload.data(), payload.size(), &request);
}

void NbdSession::close_stream() {
  stream_ = nullptr;
  for (OutItem& item : held_replies_) output_.push_back(std::move(item));
  held_replies_.clear();
  // Streams that waited for this one, oldest first; one may open a new
  // stream and make the rest wait again.
  std::vector<Request*> waiting;
  waiting.swap(waiting_streams_);
  for (Request* request : waiting) request->waiting_stream = false;
  for (Request* request : waiting) {
    if (closed_) break;
    advance_read(*request);
    maybe_forget(*request);
  }
}

std::size_t NbdSession::fill_iovecs(std::vector<iovec>& iov) {
  iov.clear();
  output_data_lost_ = false;  // decided afresh: a lost item may be refilled since (a Replace)
  std::size_t total = 0;
  for (OutItem& item : output_) {
    if (iov.size() >= kMaxIovecs) break;
    const std::uint32_t left = item.length - item.sent;
    switch (item.kind) {
      case OutItem::Kind::Bytes: {
        std::uint8_t* base = item.inline_length ? item.inline_bytes.data() : item.heap.data();
        iov.push_back({base + item.sent, left});
        break;
      }
      case OutItem::Kind::Extent: {
        // READ data straight from the data area, while it is ours to read
        // (docs/design.md §5, "A lost channel"): output waits here until
        // the bytes are back, and the connection ends if they cannot be.
        const ChannelEngine::DataState state = engine_->data_state(item.slot);
        if (state == ChannelEngine::DataState::Lost) output_data_lost_ = true;
        if (state != ChannelEngine::DataState::Ready) return total;
        std::byte* base = engine_->extent(item.slot);
        iov.push_back({base + item.extent_offset + item.sent, left});
        break;
      }
      case OutItem::Kind::Zeros:
        iov.push_back({const_cast<std::uint8_t*>(kZeros), std::min<std::size_t>(left, sizeof kZeros)});
        break;
    }
    total += iov.back().iov_len;
  }
  return total;
}

void NbdSession::consume_sent(std::size_t bytes) {
  while (bytes > 0 && !output_.empty()) {
    OutItem& item = output_.front();
    const std::size_t step = std::min<std::size_t>(bytes, item.length - item.sent);
    item.sent += static_cast<std::uint32_t>(step);
    bytes -= step;
    if (item.sent < item.length) break;
    if (item.kind == OutItem::Kind::Extent) {
      give_back(item.slot, item.held);  // the bytes are on the socket
    } else {
      output_owned_bytes_ -= item.length;
    }
    output_.pop_front();
  }
}

bool NbdSession::flush_output() {
  if (ending_ && !closed_ && output_.empty()) {
    close(ending_reason_, true);
    return true;
  }
  if (closed_ || output_.empty()) return false;
  bool progress = false;
  blocked_on_write_ = false;
  while (!output_.empty()) {
    const std::size_t want = fill_iovecs(iov_);
    if (want == 0) {
      if (output_data_lost_) {
        // What was queued before it went out whole; this reply cannot.
        log(LogLevel::Warning, "nbd: the data of a READ could not be read again after its channel was lost; "
            "ending the connection");
        close("READ data lost with its channel");
        return true;
      }
      // The next item's data is not back yet (not a full socket).
      if (data_pending_since_ == Clock::time_point{}) data_pending_since_ = Clock::now();
      break;
    }
    data_pending_since_ = {};
    ssize_t n;
    if (out_is_socket_) {
      msghdr message{};
      message.msg_iov = iov_.data();
      message.msg_iovlen = iov_.size();
      n = ::sendmsg(out_fd_, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
    } else {
      n = ::writev(out_fd_, iov_.data(), static_cast<int>(iov_.size()));
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        blocked_on_write_ = true;
        break;
      }
      log(LogLevel::Debug, "nbd: write to client failed: %s", std::strerror(errno));
      close("write to client failed");
      return true;
    }
    progress = true;
    consume_sent(static_cast<std::size_t>(n));
    if (static_cast<std::size_t>(n) < want) {
      blocked_on_write_ = true;  // the socket is full; epoll says when it drains
      break;
    }
  }
  // Deadlines count from the last byte the client took, not from the first
  // time its socket was full: a slow reader is not a stopped one.
  if (blocked_on_write_ && (progress || write_blocked_since_ == Clock::time_point{})) write_blocked_since_ = Clock::now();
  if (!blocked_on_write_) write_blocked_since_ = {};
  if (ending_ && output_.empty()) close(ending_reason_, true);
  else if (input_done_ && requests_.empty() && output_.empty() && !intake_ && !discard_left_) close("connection ended");
  return progress;
}

void NbdSession::end_after_output(const char* why) {
  if (closed_ || ending_) return;
  ending_ = true;
  ending_reason_ = why;
  input_done_ = true;
  // What is in output_ ends with the broken reply; nothing may follow it.
  stream_ = nullptr;
  for (const OutItem& item : held_replies_) output_owned_bytes_ -= item.length;
  held_replies_.clear();
  for (Request* request : waiting_streams_) request->waiting_stream = false;
  waiting_streams_.clear();
  // No reply is sent any more: each request gives its pieces back as they
  // complete and is forgotten then (or by close()).
  for (auto& owned : requests_) {
    Request& request = *owned;
    request.replied = true;
    for (std::uint32_t i = 0; i < request.pieces.size(); ++i)
      if (request.pieces[i].completed) release_piece(request, i);
    drop_copies(request);
  }
  if (!draining_) {
    draining_ = true;
    drain_deadline_ = Clock::now() + limits_.drain_timeout;
  }
}

void NbdSession::drop_output() {
  for (OutItem& item : output_)
    if (item.kind == OutItem::Kind::Extent) give_back(item.slot, item.held);
  output_.clear();
  held_replies_.clear();
  output_owned_bytes_ = 0;
}

void NbdSession::tick(Clock::time_point now) {
  if (closed_) return;
  if (ending_ && output_.empty()) {
    close(ending_reason_, true);
    return;
  }
  if (intake_ && intake_->op == Op::Write && !intake_stalled_ && now - payload_since_ > limits_.payload_timeout) {
    log(LogLevel::Warning, "nbd: dropping a connection whose WRITE payload (%u bytes) did not arrive within %lld ms "
        "(payload-timeout=)", intake_->length, static_cast<long long>(limits_.payload_timeout.count()));
    close("payload timeout");
    return;
  }
  if (draining_ && now >= drain_deadline_) {
    close("stopping: replies not taken within the drain timeout");
    return;
  }
  if (input_done_ && blocked_on_write_ && write_blocked_since_ != Clock::time_point{} &&
      now - write_blocked_since_ > limits_.drain_timeout) {
    close("client stopped reading after it disconnected");
    return;
  }
  if (data_pending_since_ != Clock::time_point{} && now - data_pending_since_ > limits_.reply_timeout) {
    // The channel was lost and neither came back nor failed: bounded too.
    close("READ data not back from a lost channel within reply-timeout");
    return;
  }
  if (blocked_on_write_ && write_blocked_since_ != Clock::time_point{} &&
      now - write_blocked_since_ > limits_.reply_timeout) {
    // Its held replies pin its share of the data area and entries: bounded,
    // but held for nothing once the client is gone in all but name.
    log(LogLevel::Warning, "nbd: dropping a connection that took no reply bytes for %lld ms (reply-timeout=)",
        static_cast<long long>(limits_.reply_timeout.count()));
    close("reply timeout");
    return;
  }
}

void NbdSession::begin_drain() {
  if (closed_ || draining_) return;
  draining_ = true;
  input_done_ = true;
  drain_deadline_ = Clock::now() + limits_.drain_timeout;
  if (intake_ && intake_->op == Op::Write) close("stopping in the middle of a WRITE payload");
  else if (requests_.empty() && output_.empty()) close("stopping");
}

void NbdSession::close(const char* why, bool warn) {
  if (closed_) return;
  log(warn ? LogLevel::Warning : LogLevel::Debug, "nbd: closing connection: %s", why);
  drop_output();
  for (auto& owned : requests_) owned->copies.clear();  // drop_output() forgot every owned byte
  closed_ = true;
  stream_ = nullptr;
  waiting_streams_.clear();
  // Entries not in a ring yet (a payload being received, pieces not
  // submitted) go back now; entries in a ring finish into the void.
  for (auto& owned : requests_) {
    Request& request = *owned;
    request.waiting_stream = false;
    request.replied = true;
    for (std::uint32_t i = 0; i < request.pieces.size(); ++i) {
      Piece& piece = request.pieces[i];
      if (!piece.reserved || piece.released) continue;
      if (piece.completed || i >= request.issued) {
        release_piece(request, i);
        if (!piece.completed) {
          piece.completed = true;  // never submitted
          ++request.completed;
          ++request.issued;  // counts as done for maybe_forget
        }
      }
    }
  }
  intake_ = nullptr;
  std::vector<Request*> all;
  for (auto& owned : requests_) all.push_back(owned.get());
  for (Request* request : all) maybe_forget(*request);
  if (in_fd_ >= 0 && in_is_socket_) ::shutdown(in_fd_, SHUT_RDWR);
}

void NbdSession::release_socket() {
  if (socket_released_) return;
  socket_released_ = true;
  connection_.socket.reset();
  if (connection_.on_closed) connection_.on_closed();
}

const HandshakeResult& NbdSession::negotiated() const { return connection_.negotiated; }

}  // namespace cbd::proxy
