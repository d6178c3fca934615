// The NBD wire protocol: constants and big-endian encoding.
//
// Values come from the NBD specification (NetworkBlockDevice/nbd,
// doc/proto.md).  Everything on the wire is big-endian ("network byte
// order"); we encode into byte arrays with the helpers below rather than
// overlaying packed structs, so no alignment or padding question arises.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace cbd::proxy::nbd {

// ---------------------------------------------------------------------------
// Handshake (fixed newstyle)
// ---------------------------------------------------------------------------

inline constexpr std::uint64_t kInitMagic = 0x4e42444d41474943ull;    // "NBDMAGIC"
inline constexpr std::uint64_t kOptionMagic = 0x49484156454f5054ull;  // "IHAVEOPT"
inline constexpr std::uint64_t kOptionReplyMagic = 0x3e889045565a9ull;

// Handshake flags (server, 16 bits) and client flags (32 bits) share bits.
inline constexpr std::uint16_t kFlagFixedNewstyle = 1u << 0;
inline constexpr std::uint16_t kFlagNoZeroes = 1u << 1;
inline constexpr std::uint32_t kClientFlagFixedNewstyle = 1u << 0;
inline constexpr std::uint32_t kClientFlagNoZeroes = 1u << 1;
inline constexpr std::uint32_t kKnownClientFlags = kClientFlagFixedNewstyle | kClientFlagNoZeroes;

// Options.
inline constexpr std::uint32_t kOptExportName = 1;
inline constexpr std::uint32_t kOptAbort = 2;
inline constexpr std::uint32_t kOptList = 3;
inline constexpr std::uint32_t kOptStartTls = 5;
inline constexpr std::uint32_t kOptInfo = 6;
inline constexpr std::uint32_t kOptGo = 7;
inline constexpr std::uint32_t kOptStructuredReply = 8;
inline constexpr std::uint32_t kOptListMetaContext = 9;
inline constexpr std::uint32_t kOptSetMetaContext = 10;

// Option reply types.  Errors have bit 31 set.
inline constexpr std::uint32_t kRepAck = 1;
inline constexpr std::uint32_t kRepServer = 2;
inline constexpr std::uint32_t kRepInfo = 3;
inline constexpr std::uint32_t kRepMetaContext = 4;
inline constexpr std::uint32_t kRepErrUnsup = 0x80000001u;
inline constexpr std::uint32_t kRepErrPolicy = 0x80000002u;
inline constexpr std::uint32_t kRepErrInvalid = 0x80000003u;
inline constexpr std::uint32_t kRepErrPlatform = 0x80000004u;
inline constexpr std::uint32_t kRepErrTlsReqd = 0x80000005u;
inline constexpr std::uint32_t kRepErrUnknown = 0x80000006u;
inline constexpr std::uint32_t kRepErrShutdown = 0x80000007u;
inline constexpr std::uint32_t kRepErrBlockSizeReqd = 0x80000008u;
inline constexpr std::uint32_t kRepErrTooBig = 0x80000009u;

// Information types (NBD_OPT_INFO / NBD_OPT_GO).
inline constexpr std::uint16_t kInfoExport = 0;
inline constexpr std::uint16_t kInfoName = 1;
inline constexpr std::uint16_t kInfoDescription = 2;
inline constexpr std::uint16_t kInfoBlockSize = 3;

// The only metadata context we know.
inline constexpr std::string_view kBaseAllocation = "base:allocation";
inline constexpr std::string_view kBaseNamespace = "base:";

// Sizes of fixed handshake messages.
inline constexpr std::size_t kGreetingSize = 18;        // magic, magic, u16 flags
inline constexpr std::size_t kOptionHeaderSize = 16;    // magic, u32 option, u32 length
inline constexpr std::size_t kOptionReplyHeaderSize = 20;
inline constexpr std::size_t kExportNameZeroes = 124;   // padding after NBD_OPT_EXPORT_NAME's reply

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

inline constexpr std::uint32_t kRequestMagic = 0x25609513u;
inline constexpr std::uint32_t kSimpleReplyMagic = 0x67446698u;
inline constexpr std::uint32_t kStructuredReplyMagic = 0x668e33efu;

inline constexpr std::size_t kRequestSize = 28;       // magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length
inline constexpr std::size_t kSimpleReplySize = 16;   // magic, u32 error, u64 cookie
inline constexpr std::size_t kChunkHeaderSize = 20;   // magic, u16 flags, u16 type, u64 cookie, u32 length

// Commands.
inline constexpr std::uint16_t kCmdRead = 0;
inline constexpr std::uint16_t kCmdWrite = 1;
inline constexpr std::uint16_t kCmdDisc = 2;
inline constexpr std::uint16_t kCmdFlush = 3;
inline constexpr std::uint16_t kCmdTrim = 4;
inline constexpr std::uint16_t kCmdCache = 5;
inline constexpr std::uint16_t kCmdWriteZeroes = 6;
inline constexpr std::uint16_t kCmdBlockStatus = 7;

// Command flags.
inline constexpr std::uint16_t kCmdFlagFua = 1u << 0;
inline constexpr std::uint16_t kCmdFlagNoHole = 1u << 1;
inline constexpr std::uint16_t kCmdFlagDf = 1u << 2;
inline constexpr std::uint16_t kCmdFlagReqOne = 1u << 3;
inline constexpr std::uint16_t kCmdFlagFastZero = 1u << 4;
inline constexpr std::uint16_t kKnownCmdFlags =
    kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagReqOne | kCmdFlagFastZero;

// Transmission flags (per export).
inline constexpr std::uint16_t kTxHasFlags = 1u << 0;
inline constexpr std::uint16_t kTxReadOnly = 1u << 1;
inline constexpr std::uint16_t kTxSendFlush = 1u << 2;
inline constexpr std::uint16_t kTxSendFua = 1u << 3;
inline constexpr std::uint16_t kTxRotational = 1u << 4;
inline constexpr std::uint16_t kTxSendTrim = 1u << 5;
inline constexpr std::uint16_t kTxSendWriteZeroes = 1u << 6;
inline constexpr std::uint16_t kTxSendDf = 1u << 7;
inline constexpr std::uint16_t kTxCanMultiConn = 1u << 8;
inline constexpr std::uint16_t kTxSendCache = 1u << 10;
inline constexpr std::uint16_t kTxSendFastZero = 1u << 11;

// Structured reply chunks.
inline constexpr std::uint16_t kReplyFlagDone = 1u << 0;
inline constexpr std::uint16_t kReplyTypeNone = 0;
inline constexpr std::uint16_t kReplyTypeOffsetData = 1;
inline constexpr std::uint16_t kReplyTypeOffsetHole = 2;
inline constexpr std::uint16_t kReplyTypeBlockStatus = 5;
inline constexpr std::uint16_t kReplyTypeError = 0x8001;
inline constexpr std::uint16_t kReplyTypeErrorOffset = 0x8002;

// Block status flags of base:allocation (equal to cbd::kExtentHole/kExtentZero).
inline constexpr std::uint32_t kStateHole = 1u << 0;
inline constexpr std::uint32_t kStateZero = 1u << 1;

// Error values on the wire (fixed by the spec, not the host's errno).
inline constexpr std::uint32_t kErrPerm = 1;
inline constexpr std::uint32_t kErrIo = 5;
inline constexpr std::uint32_t kErrNoMem = 12;
inline constexpr std::uint32_t kErrInval = 22;
inline constexpr std::uint32_t kErrNoSpc = 28;
inline constexpr std::uint32_t kErrOverflow = 75;
inline constexpr std::uint32_t kErrNotSup = 95;
inline constexpr std::uint32_t kErrShutdown = 108;

// Maps a host errno to its wire value.  ENOTSUP is only meaningful to a
// client that asked for a fast zero, and EOVERFLOW only to one that asked for
// an unfragmented read; elsewhere they become EINVAL, as nbdkit does.
// Unknown errors become EIO: something failed in the storage path.
inline constexpr std::uint32_t wire_error(int error, std::uint16_t command_flags) {
  switch (error) {
    case 0: return 0;
    case EPERM:
    case EROFS: return kErrPerm;
    case EIO: return kErrIo;
    case ENOMEM: return kErrNoMem;
    case EINVAL: return kErrInval;
    case ENOSPC:
    case EFBIG:
    case EDQUOT: return kErrNoSpc;
    case EOVERFLOW: return (command_flags & kCmdFlagDf) ? kErrOverflow : kErrInval;
    case ENOTSUP: return (command_flags & kCmdFlagFastZero) ? kErrNotSup : kErrInval;
    case ESHUTDOWN: return kErrShutdown;
    default: return kErrIo;
  }
}

// ---------------------------------------------------------------------------
// Limits of this server
// ---------------------------------------------------------------------------

// Largest READ/WRITE we execute.  Clients send up to 32 MiB whatever we
// advertise (the kernel, qemu), so this is also the most we advertise.
inline constexpr std::uint32_t kMaxPayload = 32u << 20;
// A WRITE larger than kMaxPayload but at most this is answered EINVAL after
// its payload is read and dropped; a larger one is taken as garbage and ends
// the connection (discarding gigabytes would only feed an attacker).
inline constexpr std::uint32_t kMaxDiscardablePayload = 64u << 20;
// Option payloads carry names and queries of at most a few KiB.
inline constexpr std::uint32_t kMaxOptionLength = 64u << 10;

// ---------------------------------------------------------------------------
// Big-endian encoding
// ---------------------------------------------------------------------------

inline void store_be16(std::uint8_t* out, std::uint16_t value) {
  out[0] = static_cast<std::uint8_t>(value >> 8);
  out[1] = static_cast<std::uint8_t>(value);
}
inline void store_be32(std::uint8_t* out, std::uint32_t value) {
  for (int i = 3; i >= 0; --i, value >>= 8) out[i] = static_cast<std::uint8_t>(value);
}
inline void store_be64(std::uint8_t* out, std::uint64_t value) {
  for (int i = 7; i >= 0; --i, value >>= 8) out[i] = static_cast<std::uint8_t>(value);
}
inline std::uint16_t load_be16(const std::uint8_t* in) {
  return static_cast<std::uint16_t>((in[0] << 8) | in[1]);
}
inline std::uint32_t load_be32(const std::uint8_t* in) {
  std::uint32_t value = 0;
  for (int i = 0; i < 4; ++i) value = (value << 8) | in[i];
  return value;
}
inline std::uint64_t load_be64(const std::uint8_t* in) {
  std::uint64_t value = 0;
  for (int i = 0; i < 8; ++i) value = (value << 8) | in[i];
  return value;
}

// Appending variants, for building variable-length option replies.
inline void append_be16(std::vector<std::uint8_t>& out, std::uint16_t value) {
  out.resize(out.size() + 2);
  store_be16(out.data() + out.size() - 2, value);
}
inline void append_be32(std::vector<std::uint8_t>& out, std::uint32_t value) {
  out.resize(out.size() + 4);
  store_be32(out.data() + out.size() - 4, value);
}
inline void append_be64(std::vector<std::uint8_t>& out, std::uint64_t value) {
  out.resize(out.size() + 8);
  store_be64(out.data() + out.size() - 8, value);
}
inline void append_bytes(std::vector<std::uint8_t>& out, std::string_view bytes) {
  out.insert(out.end(), bytes.begin(), bytes.end());
}

// ---------------------------------------------------------------------------
// Transmission messages
// ---------------------------------------------------------------------------

struct Request {
  std::uint32_t magic = 0;
  std::uint16_t flags = 0;
  std::uint16_t type = 0;
  std::uint64_t cookie = 0;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
};

inline Request decode_request(const std::uint8_t* in) {
  return Request{load_be32(in), load_be16(in + 4), load_be16(in + 6), load_be64(in + 8),
                 load_be64(in + 16), load_be32(in + 24)};
}

inline void encode_request(std::uint8_t* out, const Request& request) {
  store_be32(out, request.magic);
  store_be16(out + 4, request.flags);
  store_be16(out + 6, request.type);
  store_be64(out + 8, request.cookie);
  store_be64(out + 16, request.offset);
  store_be32(out + 24, request.length);
}

// `error` is already a wire value.
inline void encode_simple_reply(std::uint8_t* out, std::uint32_t error, std::uint64_t cookie) {
  store_be32(out, kSimpleReplyMagic);
  store_be32(out + 4, error);
  store_be64(out + 8, cookie);
}

inline void encode_chunk_header(std::uint8_t* out, std::uint16_t flags, std::uint16_t type,
                                std::uint64_t cookie, std::uint32_t payload_length) {
  store_be32(out, kStructuredReplyMagic);
  store_be16(out + 4, flags);
  store_be16(out + 6, type);
  store_be64(out + 8, cookie);
  store_be32(out + 16, payload_length);
}

}  // namespace cbd::proxy::nbd
