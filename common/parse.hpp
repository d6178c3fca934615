// Parsing of the values users type in key=value parameters, shared by
// cbd-proxy and the nbdkit plugin and filter so both accept the same words.
// Each throws cbd::Error naming the parameter (`what`) when malformed.
#pragma once

#include <cstdint>
#include <string>

namespace cbd {

// 4096, 64k, 256M, 1G, 2T (binary multiples; "KiB"/"MB" spellings accepted).
std::uint64_t parse_size(const std::string& text, const std::string& what);
// true/false, on/off, yes/no, 1/0 (any case).
bool parse_bool(const std::string& text, const std::string& what);
// A whole unsigned number (decimal, or 0x.. hex).
std::uint64_t parse_number(const std::string& text, const std::string& what);

}  // namespace cbd
