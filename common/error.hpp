// Start-up and configuration errors.  Hot paths return errno values instead;
// exceptions are caught at the C boundary of the plugin and in main().
#pragma once

#include <stdexcept>
#include <string>

namespace cbd {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "<what>: <strerror(errno)>" for a failed system call.
[[noreturn]] void throw_errno(const std::string& what);
[[noreturn]] void throw_errno(const std::string& what, int error);

}  // namespace cbd
