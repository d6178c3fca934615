#include "common/parse.hpp"

#include <algorithm>
#include <cctype>
#include <limits>

#include "common/error.hpp"

namespace cbd {
namespace {

std::string lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::tolower(c); });
  return text;
}

}  // namespace

std::uint64_t parse_size(const std::string& text, const std::string& what) {
  std::size_t used = 0;
  unsigned long long value = 0;
  try {
    // std::stoull skips blanks and accepts a sign, silently wrapping "-1"
    // to 2^64-1: a size must start with a digit.
    if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) throw std::invalid_argument(text);
    value = std::stoull(text, &used, 10);
  } catch (const std::exception&) {
    throw Error(what + "=" + text + ": not a size (examples: 4096, 64k, 256M, 1G)");
  }
  std::string suffix = lower(text.substr(used));
  if (!suffix.empty() && suffix.back() == 'b') suffix.pop_back();
  if (suffix.size() == 2 && suffix[1] == 'i') suffix.pop_back();
  int shift = 0;
  if (suffix.empty()) shift = 0;
  else if (suffix == "k") shift = 10;
  else if (suffix == "m") shift = 20;
  else if (suffix == "g") shift = 30;
  else if (suffix == "t") shift = 40;
  else throw Error(what + "=" + text + ": unknown size suffix (use k, M, G or T)");
  if (shift && value > (std::numeric_limits<std::uint64_t>::max() >> shift)) throw Error(what + "=" + text + ": too large");
  return static_cast<std::uint64_t>(value) << shift;
}

bool parse_bool(const std::string& text, const std::string& what) {
  const std::string v = lower(text);
  if (v == "true" || v == "on" || v == "1" || v == "yes") return true;
  if (v == "false" || v == "off" || v == "0" || v == "no") return false;
  throw Error(what + "=" + text + ": expected true or false");
}

std::uint64_t parse_number(const std::string& text, const std::string& what) {
  std::size_t used = 0;
  try {
    // Not just "no leading '-'": std::stoull also skips blanks first, so
    // " -1" would wrap to 2^64-1.
    if (!text.empty() && std::isdigit(static_cast<unsigned char>(text[0]))) {
      auto value = std::stoull(text, &used, 0);
      if (used == text.size()) return value;
    }
  } catch (const std::exception&) {
  }
  throw Error(what + "=" + text + ": not a number");
}

}  // namespace cbd
