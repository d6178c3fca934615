// Text that a peer wrote into shared memory (host names, export names), made
// safe to print on a terminal: a peer must not be able to send escape
// sequences (cursor moves, window titles, hyperlinks) to whoever runs
// `cbd-proxy list`, nor bidirectional overrides that make one name look like
// another.
#pragma once

#include <string>
#include <string_view>

namespace cbd {

// Printable ASCII (0x20-0x7e) stays as it is, a backslash becomes "\\" and
// every other byte "\xHH" (lower-case hex), so the result is unambiguous
// and never contains a control character or a non-ASCII byte.
std::string printable(std::string_view text);

}  // namespace cbd
