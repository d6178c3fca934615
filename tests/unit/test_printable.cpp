// Peer-written names on a terminal: escapes and non-ASCII bytes come out
// as \xHH, ordinary names unchanged.
#include <doctest/doctest.h>

#include <string>

#include "common/printable.hpp"

using cbd::printable;

TEST_CASE("ordinary names print unchanged") {
  CHECK(printable("storage-1.example.com") == "storage-1.example.com");
  CHECK(printable("disk 0 (ssd)") == "disk 0 (ssd)");
  CHECK(printable("") == "");
}

TEST_CASE("control characters, DEL and non-ASCII bytes are escaped, and the backslash too") {
  CHECK(printable("evil\x1b[2J\x07") == "evil\\x1b[2J\\x07");
  CHECK(printable("\x1b]0;title\x07") == "\\x1b]0;title\\x07");
  CHECK(printable("a\nb\rc\td") == "a\\x0ab\\x0dc\\x09d");
  CHECK(printable("\x7f") == "\\x7f");
  CHECK(printable("\xe2\x80\xae") == "\\xe2\\x80\\xae");  // U+202E, right-to-left override
  CHECK(printable("\xff") == "\\xff");
  CHECK(printable(std::string("a\0b", 3)) == "a\\x00b");
  // Unambiguous: a literal "\x1b" in a name does not look like an escaped ESC.
  CHECK(printable("\\x1b") == "\\\\x1b");
}

TEST_CASE("the result never holds a byte a terminal would interpret") {
  std::string every_byte;
  for (int b = 0; b < 256; ++b) every_byte += static_cast<char>(b);
  for (unsigned char c : printable(every_byte)) {
    CHECK(c >= 0x20);
    CHECK(c < 0x7f);
  }
}
