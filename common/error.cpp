#include "common/error.hpp"

#include <cerrno>
#include <cstring>

namespace cbd {

void throw_errno(const std::string& what) { throw_errno(what, errno); }

void throw_errno(const std::string& what, int error) {
  throw Error(what + ": " + std::strerror(error));
}

}  // namespace cbd
