// The words users type in key=value parameters (common/parse.hpp): what is
// accepted, what is refused, and that a refusal names the parameter and the
// value so the user knows which one to fix.
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <string>

#include "common/error.hpp"
#include "common/parse.hpp"

using namespace cbd;

namespace {

// The message of the Error `body` throws ("" when it throws none).
template <typename Body>
std::string error_of(Body body) {
  try {
    body();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("parse_size accepts plain numbers and binary suffixes in any spelling") {
  CHECK(parse_size("0", "size") == 0);
  CHECK(parse_size("4096", "size") == 4096);
  CHECK(parse_size("1", "size") == 1);
  CHECK(parse_size("64k", "size") == 64ull << 10);
  CHECK(parse_size("64K", "size") == 64ull << 10);
  CHECK(parse_size("64KiB", "size") == 64ull << 10);
  CHECK(parse_size("64kb", "size") == 64ull << 10);
  CHECK(parse_size("256M", "size") == 256ull << 20);
  CHECK(parse_size("256MB", "size") == 256ull << 20);
  CHECK(parse_size("256MiB", "size") == 256ull << 20);
  CHECK(parse_size("256mib", "size") == 256ull << 20);
  CHECK(parse_size("1G", "size") == 1ull << 30);
  CHECK(parse_size("1g", "size") == 1ull << 30);
  CHECK(parse_size("2T", "size") == 2ull << 40);
  CHECK(parse_size("2TiB", "size") == 2ull << 40);
  CHECK(parse_size("1Gi", "size") == 1ull << 30);
  CHECK(parse_size("18446744073709551615", "size") == std::numeric_limits<std::uint64_t>::max());
  CHECK(parse_size("16777215T", "size") == 16777215ull << 40);  // the largest whole number of TiB
}

TEST_CASE("parse_size refuses malformed sizes with a message naming the parameter") {
  for (const char* bad : {"", "abc", "k", "M", "-", "x12", " ", "1.5G", "12q", "1KB!", "1 G", "1GG",
                          "1Tb2", "64iB", "1e3", "0x10"}) {
    CAPTURE(bad);
    const std::string message = error_of([&] { parse_size(bad, "data-size"); });
    CHECK_FALSE(message.empty());
    CHECK(contains(message, "data-size="));
    CHECK(contains(message, std::string("data-size=") + bad));
  }
  // Overflow of the number itself and of the shifted value.
  for (const char* big : {"18446744073709551616", "99999999999999999999999", "16777216T", "17179869184G",
                          "17592186044416M", "18014398509481984k"}) {
    CAPTURE(big);
    const std::string message = error_of([&] { parse_size(big, "size"); });
    CHECK_FALSE(message.empty());
    CHECK(contains(message, std::string("size=") + big));
  }
  CHECK(contains(error_of([] { parse_size("12q", "size"); }), "suffix"));
  CHECK(contains(error_of([] { parse_size("16777216T", "size"); }), "too large"));
  CHECK(contains(error_of([] { parse_size("abc", "size"); }), "not a size"));
}

TEST_CASE("parse_size refuses negative sizes") {
  // std::stoull would silently wrap "-1" to 2^64-1; a size is never negative.
  for (const char* negative : {"-1", "-4096", "-1G", " -1"}) {
    CAPTURE(negative);
    const std::string message = error_of([&] { parse_size(negative, "size"); });
    CHECK(contains(message, std::string("size=") + negative));
  }
}

TEST_CASE("parse_bool accepts the usual words in any case") {
  for (const char* yes : {"true", "TRUE", "True", "on", "ON", "yes", "Yes", "1"}) {
    CAPTURE(yes);
    CHECK(parse_bool(yes, "direct"));
  }
  for (const char* no : {"false", "FALSE", "off", "Off", "no", "NO", "0"}) {
    CAPTURE(no);
    CHECK_FALSE(parse_bool(no, "direct"));
  }
}

TEST_CASE("parse_bool refuses anything else, naming the parameter") {
  for (const char* bad : {"", "2", "y", "n", "tru", "enable", "onn", " true", "true ", "-1", "01"}) {
    CAPTURE(bad);
    const std::string message = error_of([&] { parse_bool(bad, "readonly"); });
    CHECK_FALSE(message.empty());
    CHECK(contains(message, std::string("readonly=") + bad));
    CHECK(contains(message, "true or false"));
  }
}

TEST_CASE("parse_number accepts decimal and hexadecimal whole numbers") {
  CHECK(parse_number("0", "backend") == 0);
  CHECK(parse_number("7", "backend") == 7);
  CHECK(parse_number("4294967295", "backend") == 4294967295ull);
  CHECK(parse_number("0x10", "backend") == 16);
  CHECK(parse_number("0XfF", "backend") == 255);
  CHECK(parse_number("18446744073709551615", "backend") == std::numeric_limits<std::uint64_t>::max());
  CHECK(parse_number("0xffffffffffffffff", "backend") == std::numeric_limits<std::uint64_t>::max());
}

TEST_CASE("parse_number refuses malformed numbers, naming the parameter") {
  for (const char* bad : {"", "-1", "-0", " -1", " 7", "+7", "abc", "12abc", "1k", "1.0", "0x", "0xg", " ", "+", "18446744073709551616",
                          "0x10000000000000000", "1 2"}) {
    CAPTURE(bad);
    const std::string message = error_of([&] { parse_number(bad, "backend-id"); });
    CHECK_FALSE(message.empty());
    CHECK(contains(message, std::string("backend-id=") + bad));
    CHECK(contains(message, "not a number"));
  }
}
