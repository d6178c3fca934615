#include "client/parameters.hpp"

#include <algorithm>
#include <cctype>
#include <limits>

#include "common/error.hpp"

namespace cbd::proxy {

std::uint64_t parse_size(const std::string& text, const std::string& what) {
  std::size_t used = 0;
  unsigned long long value = 0;
  try {
    value = std::stoull(text, &used, 10);
  } catch (const std::exception&) {
    throw Error(what + "=" + text + ": not a size (examples: 4096, 64k, 256M, 1G)");
  }
  std::string suffix = text.substr(used);
  std::transform(suffix.begin(), suffix.end(), suffix.begin(), [](unsigned char c) { return std::tolower(c); });
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

Parameters::Parameters(const std::vector<std::string>& items, const std::vector<ParameterSpec>& specs) {
  for (const std::string& item : items) {
    auto equals = item.find('=');
    std::string key = equals == std::string::npos ? item : item.substr(0, equals);
    std::string value = equals == std::string::npos ? "true" : item.substr(equals + 1);
    bool known = std::any_of(specs.begin(), specs.end(), [&](const ParameterSpec& s) { return s.key == key; });
    if (!known) {
      std::string names;
      for (const auto& s : specs) names += (names.empty() ? "" : ", ") + s.key;
      throw Error("unknown parameter '" + key + "' (known: " + names + ")");
    }
    values_[key] = value;
  }
}

std::string Parameters::text(const std::string& key, const std::string& fallback) const {
  auto it = values_.find(key);
  return it == values_.end() ? fallback : it->second;
}

std::uint64_t Parameters::size(const std::string& key, std::uint64_t fallback) const {
  auto it = values_.find(key);
  return it == values_.end() ? fallback : parse_size(it->second, key);
}

std::uint64_t Parameters::number(const std::string& key, std::uint64_t fallback) const {
  auto it = values_.find(key);
  if (it == values_.end()) return fallback;
  std::size_t used = 0;
  try {
    auto value = std::stoull(it->second, &used, 0);
    if (used == it->second.size()) return value;
  } catch (const std::exception&) {
  }
  throw Error(key + "=" + it->second + ": not a number");
}

bool Parameters::flag(const std::string& key, bool fallback) const {
  auto it = values_.find(key);
  if (it == values_.end()) return fallback;
  std::string v = it->second;
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::tolower(c); });
  if (v == "true" || v == "on" || v == "1" || v == "yes") return true;
  if (v == "false" || v == "off" || v == "0" || v == "no") return false;
  throw Error(key + "=" + it->second + ": expected true or false");
}

std::string describe(const std::vector<ParameterSpec>& specs) {
  std::string out;
  for (const auto& s : specs) {
    std::string left = "  " + s.key + (s.default_text.empty() ? "" : "=" + s.default_text);
    if (left.size() < 26) left.resize(26, ' ');
    else left += "  ";
    out += left + s.help + "\n";
  }
  return out;
}

}  // namespace cbd::proxy
