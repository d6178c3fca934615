#include "client/parameters.hpp"

#include <algorithm>
#include <cctype>
#include <limits>

#include "common/error.hpp"
#include "common/parse.hpp"

namespace cbd::proxy {

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
  return it == values_.end() ? fallback : parse_number(it->second, key);
}

bool Parameters::flag(const std::string& key, bool fallback) const {
  auto it = values_.find(key);
  return it == values_.end() ? fallback : parse_bool(it->second, key);
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
