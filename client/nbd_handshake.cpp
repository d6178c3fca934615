#include "client/nbd_handshake.hpp"

#include <algorithm>
#include <bit>
#include <cstring>
#include <string_view>
#include <vector>

#include "client/socket_io.hpp"
#include "client/nbd_protocol.hpp"

namespace cbd::proxy {

namespace {

using Bytes = std::vector<std::uint8_t>;

bool is_power_of_two(std::uint32_t value) { return value != 0 && std::has_single_bit(value); }

std::string_view as_string(const Bytes& bytes, std::size_t offset, std::size_t length) {
  return {reinterpret_cast<const char*>(bytes.data()) + offset, length};
}

// A parsed NBD_OPT_INFO / NBD_OPT_GO payload.
struct InfoRequest {
  std::string_view export_name;
  std::vector<std::uint16_t> info_types;
};

// A parsed NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload.
struct MetaContextRequest {
  std::string_view export_name;
  std::vector<std::string_view> queries;
};

class Negotiation {
 public:
  Negotiation(int in_fd, int out_fd, const ExportInfo& info, const IoDeadline& deadline)
      : in_fd_(in_fd), out_fd_(out_fd), out_is_socket_(fd_is_socket(out_fd)), info_(info), deadline_(deadline) {}

  HandshakeResult run();

 private:
  // Each handler returns false when the connection must end now.
  bool handle_option(std::uint32_t option, const Bytes& payload);
  bool handle_export_name(const Bytes& payload);
  bool handle_list(const Bytes& payload);
  bool handle_info_or_go(std::uint32_t option, const Bytes& payload);
  bool handle_meta_context(std::uint32_t option, const Bytes& payload);

  bool send_reply(std::uint32_t option, std::uint32_t type, const Bytes& payload = {});
  bool end(std::string reason) {
    result_.end_reason = std::move(reason);
    return false;
  }
  // Ends after a failed read: says whether the client left, broke the
  // connection or ran out of time, while doing `what`.
  HandshakeResult& end_after_read(RecvStatus status, const char* what);
  bool send_bytes(const void* data, std::size_t length);
  // Reads and drops an oversized option's payload and answers TOO_BIG, or
  // ends the connection when that would drain more than we allow.
  bool refuse_oversized(std::uint32_t option, std::uint32_t length);
  bool export_name_matches(std::string_view name) const { return name.empty() || name == info_.name; }
  std::uint16_t current_flags() const { return transmission_flags_for(info_, result_.structured_replies); }

  static bool parse_info_request(const Bytes& payload, InfoRequest& out);
  static bool parse_meta_context_request(const Bytes& payload, MetaContextRequest& out);

  int in_fd_;
  int out_fd_;
  bool out_is_socket_;
  const ExportInfo& info_;
  const IoDeadline deadline_;
  bool no_zeroes_ = false;
  std::uint64_t drained_ = 0;  // oversized option bytes dropped so far
  HandshakeResult result_;
};

HandshakeResult& Negotiation::end_after_read(RecvStatus status, const char* what) {
  switch (status) {
    case RecvStatus::Eof: result_.end_reason = std::string("client closed ") + what; break;
    case RecvStatus::TimedOut:
      result_.timed_out = true;
      result_.end_reason = std::string("handshake deadline passed ") + what;
      break;
    case RecvStatus::Error:
    case RecvStatus::Ok: result_.end_reason = std::string("read error ") + what; break;
  }
  return result_;
}

bool Negotiation::send_bytes(const void* data, std::size_t length) {
  iovec single{const_cast<void*>(data), length};
  if (send_all(out_fd_, out_is_socket_, std::span<iovec>(&single, 1), deadline_)) return true;
  if (errno == ETIMEDOUT) result_.timed_out = true;
  return false;
}

HandshakeResult Negotiation::run() {
  std::uint8_t greeting[nbd::kGreetingSize];
  nbd::store_be64(greeting, nbd::kInitMagic);
  nbd::store_be64(greeting + 8, nbd::kOptionMagic);
  nbd::store_be16(greeting + 16, nbd::kFlagFixedNewstyle | nbd::kFlagNoZeroes);
  if (!send_bytes(greeting, sizeof greeting)) {
    result_.end_reason = "could not send the greeting";
    return result_;
  }

  std::uint8_t client_flags_bytes[4];
  const RecvStatus flags_status = recv_exact(in_fd_, client_flags_bytes, sizeof client_flags_bytes, deadline_);
  if (flags_status != RecvStatus::Ok) return end_after_read(flags_status, "before sending its flags");
  const std::uint32_t client_flags = nbd::load_be32(client_flags_bytes);
  // The spec requires a server to drop a client that sets flags it does not
  // know: the client may expect behaviour we cannot give.
  if ((client_flags & ~nbd::kKnownClientFlags) != 0) {
    result_.end_reason = "client sent unknown handshake flags";
    return result_;
  }
  no_zeroes_ = (client_flags & nbd::kClientFlagNoZeroes) != 0;

  for (std::size_t options = 0;; ++options) {
    if (options == kMaxHandshakeOptions) {
      result_.end_reason = "client sent " + std::to_string(kMaxHandshakeOptions) +
                           " options without choosing an export";
      return result_;
    }
    std::uint8_t header[nbd::kOptionHeaderSize];
    const RecvStatus status = recv_exact(in_fd_, header, sizeof header, deadline_);
    if (status != RecvStatus::Ok) return end_after_read(status, "during option haggling");
    if (nbd::load_be64(header) != nbd::kOptionMagic) {
      result_.end_reason = "bad option magic";
      return result_;
    }
    const std::uint32_t option = nbd::load_be32(header + 8);
    const std::uint32_t length = nbd::load_be32(header + 12);

    if (length > nbd::kMaxOptionLength) {
      // EXPORT_NAME can only be refused by hanging up; other options can be
      // answered once their payload is out of the way.
      if (option == nbd::kOptExportName) {
        result_.end_reason = "export name too long";
        return result_;
      }
      if (!refuse_oversized(option, length)) return result_;
      continue;
    }

    Bytes payload(length);
    if (length > 0) {
      const RecvStatus payload_status = recv_exact(in_fd_, payload.data(), length, deadline_);
      if (payload_status != RecvStatus::Ok) return end_after_read(payload_status, "in the middle of an option");
    }
    if (!handle_option(option, payload)) return result_;
    if (result_.enter_transmission) return result_;
  }
}

bool Negotiation::refuse_oversized(std::uint32_t option, std::uint32_t length) {
  if (length > kMaxDrainedOptionBytes - drained_)
    return end("client sent an option of " + std::to_string(length) + " bytes, more than the " +
               std::to_string(kMaxDrainedOptionBytes - drained_) + " we still read to refuse it");
  drained_ += length;
  // SET_META_CONTEXT replaces the selection even when it fails (NBD spec).
  if (option == nbd::kOptSetMetaContext) result_.meta_context_id = 0;
  if (!recv_discard(in_fd_, length, deadline_)) {
    if (errno == ETIMEDOUT) result_.timed_out = true;
    return end(result_.timed_out ? "handshake deadline passed while skipping an oversized option"
                                 : "connection lost while skipping an oversized option");
  }
  return send_reply(option, nbd::kRepErrTooBig) || end("write failed while refusing an oversized option");
}

bool Negotiation::handle_option(std::uint32_t option, const Bytes& payload) {
  switch (option) {
    case nbd::kOptExportName:
      return handle_export_name(payload);

    case nbd::kOptAbort:
      // The client may not wait for the ACK, so a failed write is fine.
      send_reply(option, nbd::kRepAck);
      return end("client aborted the handshake");

    case nbd::kOptList:
      return handle_list(payload);

    case nbd::kOptInfo:
    case nbd::kOptGo:
      return handle_info_or_go(option, payload);

    case nbd::kOptStructuredReply:
      if (!payload.empty()) return send_reply(option, nbd::kRepErrInvalid) || end("write failed");
      result_.structured_replies = true;
      return send_reply(option, nbd::kRepAck) || end("write failed");

    case nbd::kOptListMetaContext:
    case nbd::kOptSetMetaContext:
      return handle_meta_context(option, payload);

    case nbd::kOptStartTls:  // we have no TLS; the client decides whether plain text is acceptable
    default:
      return send_reply(option, nbd::kRepErrUnsup) || end("write failed");
  }
}

bool Negotiation::handle_export_name(const Bytes& payload) {
  const std::string_view name = as_string(payload, 0, payload.size());
  if (!export_name_matches(name)) return end("client asked for an unknown export (EXPORT_NAME)");

  Bytes reply;
  nbd::append_be64(reply, info_.size);
  nbd::append_be16(reply, current_flags());
  if (!no_zeroes_) reply.resize(reply.size() + nbd::kExportNameZeroes, 0);
  if (!send_bytes(reply.data(), reply.size())) return end("write failed");

  result_.transmission_flags = current_flags();
  result_.enter_transmission = true;
  return true;
}

bool Negotiation::handle_list(const Bytes& payload) {
  if (!payload.empty()) return send_reply(nbd::kOptList, nbd::kRepErrInvalid) || end("write failed");
  // One export.  The description may follow the name in an NBD_REP_SERVER.
  Bytes server;
  nbd::append_be32(server, static_cast<std::uint32_t>(info_.name.size()));
  nbd::append_bytes(server, info_.name);
  nbd::append_bytes(server, info_.description);
  return (send_reply(nbd::kOptList, nbd::kRepServer, server) && send_reply(nbd::kOptList, nbd::kRepAck)) ||
         end("write failed");
}

bool Negotiation::parse_info_request(const Bytes& payload, InfoRequest& out) {
  // u32 name length, name, u16 count, count x u16 information type.
  if (payload.size() < 6) return false;
  const std::uint32_t name_length = nbd::load_be32(payload.data());
  if (name_length > payload.size() - 6) return false;
  out.export_name = as_string(payload, 4, name_length);
  const std::size_t count_at = 4 + name_length;
  const std::uint16_t count = nbd::load_be16(payload.data() + count_at);
  if (payload.size() != count_at + 2 + 2 * std::size_t{count}) return false;
  for (std::size_t i = 0; i < count; ++i)
    out.info_types.push_back(nbd::load_be16(payload.data() + count_at + 2 + 2 * i));
  return true;
}

bool Negotiation::handle_info_or_go(std::uint32_t option, const Bytes& payload) {
  InfoRequest request;
  if (!parse_info_request(payload, request)) return send_reply(option, nbd::kRepErrInvalid) || end("write failed");
  if (!export_name_matches(request.export_name))
    return send_reply(option, nbd::kRepErrUnknown) || end("write failed");

  const auto asked = [&](std::uint16_t type) {
    return std::find(request.info_types.begin(), request.info_types.end(), type) != request.info_types.end();
  };

  Bytes export_info;
  nbd::append_be16(export_info, nbd::kInfoExport);
  nbd::append_be64(export_info, info_.size);
  nbd::append_be16(export_info, current_flags());
  if (!send_reply(option, nbd::kRepInfo, export_info)) return end("write failed");

  if (asked(nbd::kInfoName)) {
    Bytes name;
    nbd::append_be16(name, nbd::kInfoName);
    nbd::append_bytes(name, info_.name);
    if (!send_reply(option, nbd::kRepInfo, name)) return end("write failed");
  }
  if (asked(nbd::kInfoDescription) && !info_.description.empty()) {
    Bytes description;
    nbd::append_be16(description, nbd::kInfoDescription);
    nbd::append_bytes(description, info_.description);
    if (!send_reply(option, nbd::kRepInfo, description)) return end("write failed");
  }
  // Always sent: the spec allows it unasked, and a client that knows our
  // maximum payload sends fewer requests we must refuse.
  const BlockSizes sizes = advertised_block_sizes(info_);
  Bytes block_size;
  nbd::append_be16(block_size, nbd::kInfoBlockSize);
  nbd::append_be32(block_size, sizes.minimum);
  nbd::append_be32(block_size, sizes.preferred);
  nbd::append_be32(block_size, sizes.maximum);
  if (!send_reply(option, nbd::kRepInfo, block_size)) return end("write failed");

  if (!send_reply(option, nbd::kRepAck)) return end("write failed");
  if (option == nbd::kOptGo) {
    result_.transmission_flags = current_flags();
    result_.block_size_agreed = asked(nbd::kInfoBlockSize);
    result_.enter_transmission = true;
  }
  return true;
}

bool Negotiation::parse_meta_context_request(const Bytes& payload, MetaContextRequest& out) {
  // u32 name length, name, u32 query count, count x (u32 length, query).
  if (payload.size() < 8) return false;
  const std::uint32_t name_length = nbd::load_be32(payload.data());
  if (name_length > payload.size() - 8) return false;
  out.export_name = as_string(payload, 4, name_length);
  std::size_t at = 4 + name_length;
  const std::uint32_t count = nbd::load_be32(payload.data() + at);
  at += 4;
  // Every query needs at least its 4-byte length, so the loop is bounded by
  // the (already bounded) payload, not by the client's count.
  for (std::uint32_t i = 0; i < count; ++i) {
    if (payload.size() - at < 4) return false;
    const std::uint32_t query_length = nbd::load_be32(payload.data() + at);
    at += 4;
    if (query_length > payload.size() - at) return false;
    out.queries.push_back(as_string(payload, at, query_length));
    at += query_length;
  }
  return at == payload.size();
}

bool Negotiation::handle_meta_context(std::uint32_t option, const Bytes& payload) {
  const bool is_set = option == nbd::kOptSetMetaContext;
  // SET replaces the previous selection even when it fails.
  if (is_set) result_.meta_context_id = 0;
  if (is_set && !result_.structured_replies) return send_reply(option, nbd::kRepErrInvalid) || end("write failed");

  MetaContextRequest request;
  if (!parse_meta_context_request(payload, request)) return send_reply(option, nbd::kRepErrInvalid) || end("write failed");
  if (!export_name_matches(request.export_name)) return send_reply(option, nbd::kRepErrUnknown) || end("write failed");

  bool selects_allocation = false;
  if ((info_.caps & kCapExtents) != 0) {
    if (!is_set && request.queries.empty()) selects_allocation = true;  // LIST with no query lists everything
    for (const std::string_view query : request.queries) {
      // "base:" is a wildcard for LIST and selects nothing in SET; any other
      // leaf of base, and any other namespace, is silently ignored.
      if (query == nbd::kBaseAllocation || (!is_set && query == nbd::kBaseNamespace)) selects_allocation = true;
    }
  }

  if (selects_allocation) {
    // LIST replies carry a reserved id of 0; SET hands out the real one.
    Bytes context;
    nbd::append_be32(context, is_set ? kBaseAllocationContextId : 0);
    nbd::append_bytes(context, nbd::kBaseAllocation);
    if (!send_reply(option, nbd::kRepMetaContext, context)) return end("write failed");
    if (is_set) result_.meta_context_id = kBaseAllocationContextId;
  }
  return send_reply(option, nbd::kRepAck) || end("write failed");
}

bool Negotiation::send_reply(std::uint32_t option, std::uint32_t type, const Bytes& payload) {
  std::uint8_t header[nbd::kOptionReplyHeaderSize];
  nbd::store_be64(header, nbd::kOptionReplyMagic);
  nbd::store_be32(header + 8, option);
  nbd::store_be32(header + 12, type);
  nbd::store_be32(header + 16, static_cast<std::uint32_t>(payload.size()));
  iovec iov[2] = {{header, sizeof header}, {const_cast<std::uint8_t*>(payload.data()), payload.size()}};
  if (send_all(out_fd_, out_is_socket_, std::span<iovec>(iov), deadline_)) return true;
  if (errno == ETIMEDOUT) result_.timed_out = true;
  return false;
}

}  // namespace

BlockSizes advertised_block_sizes(const ExportInfo& info) {
  BlockSizes sizes;
  // A minimum above 64 KiB is not something the spec's clients handle well;
  // treat such a value (or a non power of two) as "no constraint".
  sizes.minimum = is_power_of_two(info.block_min) && info.block_min <= (64u << 10) ? info.block_min : 1;
  // A preferred size under 512 means nothing to a block device and nbdkit
  // refuses it; clients take it as a promise, so never advertise one.
  const std::uint32_t lowest_preferred = std::max(kMinPreferredBlockSize, sizes.minimum);
  sizes.preferred = is_power_of_two(info.block_preferred) ? std::max(info.block_preferred, lowest_preferred)
                                                          : std::max<std::uint32_t>(4096, lowest_preferred);
  std::uint32_t maximum = info.block_max == 0 ? nbd::kMaxPayload : std::min(info.block_max, nbd::kMaxPayload);
  maximum -= maximum % sizes.minimum;
  // Preferred must stay a power of two; it should not exceed the maximum,
  // unless the maximum is itself under the lowest preferred size: then the
  // maximum is raised (requests are split into entries anyway).
  if (sizes.preferred > maximum) sizes.preferred = std::max(std::bit_floor(std::max(maximum, 1u)), lowest_preferred);
  sizes.maximum = std::max(maximum, sizes.preferred);
  return sizes;
}

std::uint16_t transmission_flags_for(const ExportInfo& info, bool structured_replies) {
  const std::uint32_t caps = info.caps;
  const bool read_only = (caps & kCapReadOnly) != 0;
  std::uint16_t flags = nbd::kTxHasFlags;
  if (read_only) flags |= nbd::kTxReadOnly;
  if (caps & kCapFlush) flags |= nbd::kTxSendFlush;
  if (!read_only && (caps & kCapFua)) flags |= nbd::kTxSendFua;
  if (caps & kCapRotational) flags |= nbd::kTxRotational;
  if (!read_only && (caps & kCapTrim)) flags |= nbd::kTxSendTrim;
  if (!read_only && (caps & kCapZero)) {
    flags |= nbd::kTxSendWriteZeroes;
    if (caps & kCapFastZero) flags |= nbd::kTxSendFastZero;
  }
  if (structured_replies) flags |= nbd::kTxSendDf;
  if (caps & kCapMultiConn) flags |= nbd::kTxCanMultiConn;
  if (caps & kCapCache) flags |= nbd::kTxSendCache;
  return flags;
}

HandshakeResult negotiate_handshake(int in_fd, int out_fd, const ExportInfo& info, const IoDeadline& deadline) {
  return Negotiation(in_fd, out_fd, info, deadline).run();
}

}  // namespace cbd::proxy
