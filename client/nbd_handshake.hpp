// NBD fixed-newstyle negotiation (the handshake before transmission).
//
// One call runs the whole option haggling on a fresh connection: greeting,
// client flags, then options until the client picks the export (GO or
// EXPORT_NAME) or leaves (ABORT, EOF, garbage).  We serve one export; its
// configured name and the default name "" both select it.  No TLS.
#pragma once

#include <cstdint>
#include <string>

#include "client/request_target.hpp"

namespace cbd::proxy {

// The block size constraints we advertise, made consistent whatever the
// backend published (min a power of two, preferred a power of two >= min,
// max a multiple of min >= preferred, max <= nbd::kMaxPayload).
struct BlockSizes {
  std::uint32_t minimum = 1;
  std::uint32_t preferred = 4096;
  std::uint32_t maximum = 32u << 20;
};
BlockSizes advertised_block_sizes(const ExportInfo& info);

// The transmission flags for `info`: each bit only when the backend's caps
// say so.  Write-side operations are not advertised on a read-only export;
// SEND_DF only once structured replies are negotiated.
std::uint16_t transmission_flags_for(const ExportInfo& info, bool structured_replies);

// Metadata context id we hand out for base:allocation (any nonzero value).
inline constexpr std::uint32_t kBaseAllocationContextId = 1;

struct HandshakeResult {
  bool enter_transmission = false;   // false: the connection is over (close it)
  bool structured_replies = false;
  std::uint32_t meta_context_id = 0; // base:allocation's id; 0 = none selected
  std::uint16_t transmission_flags = 0;
  // The client asked for NBD_INFO_BLOCK_SIZE in its GO, which commits it to
  // the advertised minimum block size; only then do we refuse misaligned
  // requests (the kernel never asks, and sends 512-byte aligned requests).
  bool block_size_agreed = false;
  std::string end_reason;            // why not entering transmission (for logs)
};

// Runs the handshake, reading from `in_fd` and writing to `out_fd` (equal for
// a socket).  Never throws on peer input; returns when the outcome is known.
HandshakeResult negotiate_handshake(int in_fd, int out_fd, const ExportInfo& info);

}  // namespace cbd::proxy
