#include "plugin/store.hpp"

#include <cerrno>
#include <cstring>

#include "common/log.hpp"
#include "plugin/inline_store_queue.hpp"

namespace cbd::backend {

std::unique_ptr<StoreQueue> Store::open_queue(unsigned depth) {
  return std::make_unique<InlineStoreQueue>(*this, depth);
}

int run_request(Store& store, const StoreRequest& request) {
  switch (request.op) {
    case StoreOp::Read: return store.pread(request.buffer, request.length, request.offset);
    case StoreOp::Write: return store.pwrite(request.buffer, request.length, request.offset, request.fua);
    case StoreOp::Flush: return store.flush();
    case StoreOp::Trim: return store.trim(request.offset, request.length, request.fua);
    case StoreOp::Zero:
      return store.zero(request.offset, request.length, request.no_hole, request.fast_zero, request.fua);
    case StoreOp::Cache: return store.cache(request.offset, request.length);
  }
  return EINVAL;
}

int report_store_error(RateLimit& limit, const std::string& where, const char* what, std::uint64_t offset,
                       std::uint64_t length, int error) {
  std::uint64_t suppressed = 0;
  // strerrordesc_np(), not strerror(): the untranslated text, with no
  // message-catalogue lookup from a handler thread.  With strerror() here
  // nbdkit's exit in the sanitizer build hung in glibc's locale lock after a
  // store error (tests/e2e/test-fault-disk.sh).
  const char* description = ::strerrordesc_np(error);
  if (limit.allow(&suppressed))
    log(LogLevel::Error, "%s: %s at offset %llu, length %llu failed: %s (errno %d; %llu more store errors suppressed)",
        where.c_str(), what, static_cast<unsigned long long>(offset), static_cast<unsigned long long>(length),
        description ? description : "unknown error", error, static_cast<unsigned long long>(suppressed));
  return error;
}

}  // namespace cbd::backend
