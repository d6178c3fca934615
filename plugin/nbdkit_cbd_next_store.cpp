#include "plugin/nbdkit_cbd_next_store.hpp"

#include <algorithm>
#include <cerrno>
#include <string>

#include "common/error.hpp"
#include "common/layout.hpp"
#include "common/log.hpp"

namespace cbd::backend {

static_assert(NBDKIT_EXTENT_HOLE == kExtentHole && NBDKIT_EXTENT_ZERO == kExtentZero,
              "nbdkit's extent bits are the NBD base:allocation bits, like ours");

namespace {

// The next_* calls return -1 and leave the errno in *err; a layer that
// forgot to set one still failed.
int failed(int err) { return err > 0 ? err : EIO; }

// Runs `call(count, done)` over [0, length) in pieces of at most `chunk`
// bytes; `done` is how far the previous pieces got.
template <typename Call>
int in_chunks(std::uint64_t length, std::uint32_t chunk, Call&& call) {
  for (std::uint64_t done = 0; done < length;) {
    const auto count = static_cast<std::uint32_t>(std::min<std::uint64_t>(length - done, chunk));
    if (int error = call(count, done)) return error;
    done += count;
  }
  return 0;
}

}  // namespace

NextStore::NextStore(bool serialize) : serialize_(serialize) {
  // Until open() there is nothing to serve: an empty, read-only export
  // without capabilities.
  info_.size = 0;
  info_.read_only = true;
  info_.can_flush = info_.can_fua = info_.can_trim = info_.can_zero = false;
  info_.can_fast_zero = info_.can_extents = info_.can_cache = info_.can_multi_conn = false;
}

void NextStore::open(nbdkit_backend* backend, bool read_only) {
  if (next_) throw Error("cbd filter: the context into the plugin is already open");
  nbdkit_next* next = nbdkit_next_context_open(backend, read_only, "", 1);
  if (!next) throw Error("cbd filter: cannot open the plugin below the filter (see the error before this one)");
  if (next->prepare(next) == -1) {
    nbdkit_next_context_close(next);
    throw Error("cbd filter: the plugin below the filter failed to open (see the error before this one)");
  }
  next_ = next;
  try {
    auto ask = [](int answer, const char* what) {
      if (answer == -1)
        throw Error(std::string("cbd filter: the plugin below the filter failed to answer ") + what);
      return answer;
    };
    const std::int64_t size = next->get_size(next);
    if (size < 0) throw Error("cbd filter: the plugin below the filter failed to report its size");

    std::uint32_t minimum = 0, preferred = 0, maximum = 0;
    ask(next->block_size(next, &minimum, &preferred, &maximum), "block_size");

    StoreInfo info;
    info.size = static_cast<std::uint64_t>(size);
    // 0 everywhere means "no constraints".
    info.block_min = minimum ? minimum : 1;
    info.block_preferred = std::max(preferred ? preferred : 4096u, info.block_min);
    std::uint32_t chunk = (maximum && maximum < (1u << 31)) ? maximum : (1u << 31);
    chunk -= chunk % info.block_min;
    if (chunk == 0) chunk = info.block_min;

    info.read_only = !ask(next->can_write(next), "can_write");
    info.can_flush = ask(next->can_flush(next), "can_flush");
    const int fua = ask(next->can_fua(next), "can_fua");
    info.can_fua = fua != NBDKIT_FUA_NONE;
    info.can_trim = ask(next->can_trim(next), "can_trim");
    // Emulated zeroing (nbdkit writes zeros for a plugin without .zero)
    // still zeroes: offered exactly as nbdkit offers it to NBD clients.
    info.can_zero = ask(next->can_zero(next), "can_zero") != NBDKIT_ZERO_NONE;
    info.can_fast_zero = ask(next->can_fast_zero(next), "can_fast_zero");
    info.can_extents = ask(next->can_extents(next), "can_extents");
    const int cache = ask(next->can_cache(next), "can_cache");
    info.can_cache = cache != NBDKIT_CACHE_NONE;
    const bool below_multi_conn = ask(next->can_multi_conn(next), "can_multi_conn");
    // Every channel and every compute-node connection goes through this one
    // context, and a flush on a context covers every write completed on it:
    // that is the multi-conn promise whatever the plugin says about its own
    // separate connections.
    info.can_multi_conn = true;
    info.rotational = ask(next->is_rotational(next), "is_rotational");
    if (info.read_only) {
      info.can_trim = info.can_zero = info.can_fast_zero = false;
      info.can_fua = false;
    }

    info_ = info;
    chunk_ = chunk;
    fua_mode_ = fua;
    cache_mode_ = cache;
    log(LogLevel::Info,
        "cbd filter: plugin below: size %llu, block %u/%u/%u, %s, flush %d, fua %d, trim %d, zero %d, "
        "fast-zero %d, extents %d, cache %d, multi-conn %d (the shared context always has it), %s",
        static_cast<unsigned long long>(info.size), minimum, preferred, maximum,
        info.read_only ? "read-only" : "writable", info.can_flush, fua, info.can_trim, info.can_zero,
        info.can_fast_zero, info.can_extents, cache, below_multi_conn,
        serialize_ ? "calls serialised (not PARALLEL)" : "parallel calls");
  } catch (...) {
    close();
    throw;
  }
}

void NextStore::close() {
  if (!next_) return;
  next_->finalize(next_);
  nbdkit_next_context_close(next_);
  next_ = nullptr;
}

int NextStore::check_range(std::uint64_t offset, std::uint64_t length, int error) const {
  if (offset > info_.size || length > info_.size - offset) return error;
  return 0;
}

int NextStore::pread(void* buffer, std::size_t length, std::uint64_t offset) {
  auto lock = lock_if_serialized();
  if (!next_) return ESHUTDOWN;
  if (int error = check_range(offset, length, EINVAL)) return error;
  auto* bytes = static_cast<std::byte*>(buffer);
  return in_chunks(length, chunk_, [&](std::uint32_t count, std::uint64_t done) {
    int err = 0;
    return next_->pread(next_, bytes + done, count, offset + done, 0, &err) == -1
               ? report("read", offset + done, count, failed(err))
               : 0;
  });
}

int NextStore::pwrite(const void* buffer, std::size_t length, std::uint64_t offset, bool fua) {
  auto lock = lock_if_serialized();
  if (!next_) return ESHUTDOWN;
  if (info_.read_only) return EPERM;
  if (int error = check_range(offset, length, ENOSPC)) return error;
  const auto* bytes = static_cast<const std::byte*>(buffer);
  return in_chunks(length, chunk_, [&](std::uint32_t count, std::uint64_t done) {
    int err = 0;
    return next_->pwrite(next_, bytes + done, count, offset + done, fua_flag(fua), &err) == -1
               ? report("write", offset + done, count, failed(err))
               : 0;
  });
}

int NextStore::flush() {
  auto lock = lock_if_serialized();
  if (!next_) return ESHUTDOWN;
  // A plugin that cannot flush has nothing more durable to offer.
  if (!info_.can_flush) return 0;
  int err = 0;
  return next_->flush(next_, 0, &err) == -1 ? report("flush", 0, info_.size, failed(err)) : 0;
}

int NextStore::trim(std::uint64_t offset, std::uint64_t length, bool fua) {
  auto lock = lock_if_serialized();
  if (!next_) return ESHUTDOWN;
  if (info_.read_only) return EPERM;
  if (int error = check_range(offset, length, EINVAL)) return error;
  // Trim is advisory: without it the old data simply stays.
  if (!info_.can_trim) return 0;
  return in_chunks(length, chunk_, [&](std::uint32_t count, std::uint64_t done) {
    int err = 0;
    return next_->trim(next_, count, offset + done, fua_flag(fua), &err) == -1
               ? report("trim", offset + done, count, failed(err))
               : 0;
  });
}

int NextStore::zero(std::uint64_t offset, std::uint64_t length, bool no_hole, bool fast, bool fua) {
  auto lock = lock_if_serialized();
  if (!next_) return ESHUTDOWN;
  if (info_.read_only) return EPERM;
  if (int error = check_range(offset, length, ENOSPC)) return error;
  if (!info_.can_zero) return EINVAL;  // never advertised: the NBD answer to an unknown command
  if (fast && !info_.can_fast_zero) return ENOTSUP;
  std::uint32_t flags = fua_flag(fua);
  if (!no_hole) flags |= NBDKIT_FLAG_MAY_TRIM;
  if (fast) flags |= NBDKIT_FLAG_FAST_ZERO;
  return in_chunks(length, chunk_, [&](std::uint32_t count, std::uint64_t done) {
    int err = 0;
    return next_->zero(next_, count, offset + done, flags, &err) == -1
               ? report("write-zeroes", offset + done, count, failed(err))
               : 0;
  });
}

int NextStore::extents(std::uint64_t offset, std::uint64_t length, bool req_one, ExtentSink& sink) {
  auto lock = lock_if_serialized();
  if (!next_) return ESHUTDOWN;
  if (int error = check_range(offset, length, EINVAL)) return error;
  if (length == 0) return EINVAL;
  if (!info_.can_extents) {
    // What nbdkit itself answers for such a plugin: all of it is data.
    sink.add(offset, length, 0);
    return 0;
  }
  // One call down is enough: the sink needs only the first extent.
  const auto count = static_cast<std::uint32_t>(std::min<std::uint64_t>(length, chunk_));
  struct nbdkit_extents* list = nbdkit_extents_new(offset, offset + count);
  if (!list) return ENOMEM;
  int err = 0;
  int error = 0;
  if (next_->extents(next_, count, offset, req_one ? NBDKIT_FLAG_REQ_ONE : 0, list, &err) == -1) {
    error = report("block status", offset, count, failed(err));
  } else {
    const std::size_t n = nbdkit_extents_count(list);
    if (n == 0) error = EIO;
    for (std::size_t i = 0; i < n; ++i) {
      const struct nbdkit_extent extent = nbdkit_get_extent(list, i);
      if (!sink.add(extent.offset, extent.length, extent.type & (kExtentHole | kExtentZero))) break;
    }
  }
  nbdkit_extents_free(list);
  return error;
}

int NextStore::cache(std::uint64_t offset, std::uint64_t length) {
  auto lock = lock_if_serialized();
  if (!next_) return ESHUTDOWN;
  if (int error = check_range(offset, length, EINVAL)) return error;
  if (cache_mode_ == NBDKIT_CACHE_NONE) return 0;  // advisory
  return in_chunks(length, chunk_, [&](std::uint32_t count, std::uint64_t done) {
    int err = 0;
    return next_->cache(next_, count, offset + done, 0, &err) == -1
               ? report("cache", offset + done, count, failed(err))
               : 0;
  });
}

}  // namespace cbd::backend
