// Cache-line write-back and invalidation for the optional flush mode
// (design §3.7).  Best effort by nature: flushing a CPU cache does not make a
// write visible to another host in a known order when buffers below the
// root complex reorder it; the default (hardware-coherent) mode never calls
// these.
#pragma once

#include <cstddef>

namespace cbd {

// Writes back (and drops) every line covering [data, data + length), then
// orders that before later stores.
void write_back_lines(const void* data, std::size_t length);
// Drops every line covering the range so the next load reads memory.
void invalidate_lines(const void* data, std::size_t length);

}  // namespace cbd
