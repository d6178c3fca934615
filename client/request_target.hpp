// The seam between an NBD connection (protocol) and what executes its
// requests (a cbd queue driving a channel, or a test double in unit tests).
//
// Threading: a connection's reader thread calls RequestTarget::submit; the
// target calls the Replier from its own completion thread(s).  A Replier must
// therefore serialise what it writes to its socket.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "common/layout.hpp"

namespace cbd::proxy {

// What the proxy advertises: taken from the backend slot (never invented).
struct ExportInfo {
  std::string name;             // export name ("" is also accepted as the default)
  std::string description;
  std::uint64_t size = 0;       // bytes
  std::uint32_t block_min = 1;
  std::uint32_t block_preferred = 4096;
  std::uint32_t block_max = 32u << 20;  // advertised maximum payload
  std::uint32_t caps = 0;       // cbd::kCap* bits
};

// One NBD request, already validated by the connection (range, flags,
// read-only).  Field values are the NBD ones (command type, NBD flags).
struct IoRequest {
  std::uint64_t cookie = 0;
  std::uint16_t type = 0;   // NBD_CMD_*
  std::uint16_t flags = 0;  // NBD_CMD_FLAG_*
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
};

class Replier {
 public:
  virtual ~Replier() = default;
  // READ: a piece of the reply data, in ascending offset order, covering the
  // request exactly once before finish().  `relative_offset` is from the
  // request's offset.  `data` points into shared memory and is valid only
  // during the call.  Returns false if the connection is gone.
  virtual bool read_data(const IoRequest& request, std::uint64_t relative_offset,
                         const void* data, std::uint32_t length) = 0;
  // BLOCK_STATUS: the extents found (starting at request.offset, non-empty
  // lengths, covering at most request.length), before finish().
  virtual bool block_status(const IoRequest& request,
                            std::span<const ExtentDescriptor> extents) = 0;
  // Every submitted request ends with exactly one finish().  `error` is 0 or a
  // positive errno (EIO, EINVAL, ENOSPC, EPERM, ENOTSUP, ENOMEM, ...).
  virtual void finish(const IoRequest& request, int error) = 0;
};

class RequestTarget {
 public:
  virtual ~RequestTarget() = default;
  virtual ExportInfo info() const = 0;
  // Takes one request.  For NBD_CMD_WRITE the target reads exactly
  // request.length payload bytes from `payload_fd` (directly into shared
  // memory) before returning.  Blocks while the channel is full
  // (back-pressure).  Returns false only when the payload could not be read
  // (the connection is dead); the request is then not finished.
  virtual bool submit(const IoRequest& request, int payload_fd, Replier& replier) = 0;
};

}  // namespace cbd::proxy
