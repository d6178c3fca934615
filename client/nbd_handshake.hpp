// NBD fixed-newstyle negotiation (the handshake before transmission).
//
// One call runs the whole option haggling on a fresh connection: greeting,
// client flags, then options until the client picks the export (GO or
// EXPORT_NAME) or leaves (ABORT, EOF, garbage).  We serve one export; its
// configured name and the default name "" both select it.  No TLS.
//
// A hostile or broken client cannot hold the handshake: everything is read
// and written under one deadline, at most kMaxHandshakeOptions options are
// answered (nbdkit's limit), and option payloads we refuse as too big are
// read and dropped only up to kMaxDrainedOptionBytes in all.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "client/export_info.hpp"
#include "client/socket_io.hpp"

namespace cbd::proxy {

// The block size constraints we advertise, made consistent whatever the
// backend published (min a power of two, preferred a power of two >= min,
// max a multiple of min >= preferred, max <= nbd::kMaxPayload; preferred is
// never below kMinPreferredBlockSize).
inline constexpr std::uint32_t kMinPreferredBlockSize = 512;
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

// Options answered per handshake; a client that has not chosen an export
// (GO or EXPORT_NAME) by then is dropped, as nbdkit does.
inline constexpr std::size_t kMaxHandshakeOptions = 32;
// Bytes of oversized option payloads (above nbd::kMaxOptionLength) we read
// and drop over one handshake to answer them TOO_BIG; an option that would
// take the total past this ends the connection instead.  Large enough for a
// client that probes with one big option, small enough that nobody makes us
// read gigabytes.
inline constexpr std::uint64_t kMaxDrainedOptionBytes = 1u << 20;

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
  bool timed_out = false;            // the deadline passed (or was cancelled) first
  std::string end_reason;            // why not entering transmission (for logs)
};

// Runs the handshake, reading from `in_fd` and writing to `out_fd` (equal for
// a socket).  Never throws on peer input; returns when the outcome is known,
// and never later than `deadline` (then with timed_out set).
HandshakeResult negotiate_handshake(int in_fd, int out_fd, const ExportInfo& info, const IoDeadline& deadline);

}  // namespace cbd::proxy
