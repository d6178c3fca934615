// nbdkit-style `key=value` command-line parameters (and bare words for
// booleans, e.g. `force`, `readonly`).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace cbd::proxy {

struct ParameterSpec {
  std::string key;
  std::string default_text;  // shown in --help ("" = none)
  std::string help;
};

class Parameters {
 public:
  // Throws cbd::Error for an unknown key or a malformed item.
  Parameters(const std::vector<std::string>& items, const std::vector<ParameterSpec>& specs);

  bool has(const std::string& key) const { return values_.count(key) != 0; }
  std::string text(const std::string& key, const std::string& fallback) const;
  std::uint64_t size(const std::string& key, std::uint64_t fallback) const;      // 4096, 4k, 256M, 1G
  std::uint64_t number(const std::string& key, std::uint64_t fallback) const;
  bool flag(const std::string& key, bool fallback) const;                        // true/false/on/off/1/0/yes/no, bare = true

 private:
  std::map<std::string, std::string> values_;
};

// The lines of --help text for these specs.
std::string describe(const std::vector<ParameterSpec>& specs);

}  // namespace cbd::proxy
