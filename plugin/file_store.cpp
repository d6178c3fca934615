#include "plugin/file_store.hpp"

#include <fcntl.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <vector>

#include "common/error.hpp"
#include "common/layout.hpp"
#include "common/log.hpp"
#include "plugin/range_op_slicer.hpp"

namespace cbd::backend {
namespace {

constexpr std::uint64_t kDirectAlignment = 4096;

// Source of zeros for write-zeroes when the file system cannot allocate
// zeroed ranges itself: static, so it costs nothing until used and is never
// written.
alignas(kDirectAlignment) const std::byte kZeros[256 * 1024] = {};

bool is_not_supported(int error) { return error == EOPNOTSUPP || error == ENOTSUP || error == ENOSYS; }

bool read_rotational(const struct stat& st) {
  std::string base = "/sys/dev/block/" + std::to_string(major(st.st_rdev)) + ":" + std::to_string(minor(st.st_rdev));
  // A partition has no queue/ of its own; its parent disk's applies.
  for (const char* relative : {"/queue/rotational", "/../queue/rotational"}) {
    std::ifstream file(base + relative);
    int value = 0;
    if (file >> value) return value != 0;
  }
  return false;
}

int fallocate_errno(int fd, int mode, std::uint64_t offset, std::uint64_t length) {
  if (::fallocate(fd, mode, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) return 0;
  return errno;
}

}  // namespace

FileStore::FileStore(const FileStoreOptions& options) : path_(options.path) {
  const std::string where = "file " + path_;
  int flags = (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  fd_ = UniqueFd(::open(path_.c_str(), flags));
  if (!fd_) throw_errno(where + ": open");
  struct stat st{};
  if (::fstat(fd_.get(), &st) != 0) throw_errno(where + ": fstat");
  if (S_ISBLK(st.st_mode)) {
    block_device_ = true;
    std::uint64_t bytes = 0;
    if (::ioctl(fd_.get(), BLKGETSIZE64, &bytes) != 0) throw_errno(where + ": BLKGETSIZE64");
    info_.size = bytes;
    info_.rotational = read_rotational(st);
  } else if (S_ISREG(st.st_mode)) {
    info_.size = static_cast<std::uint64_t>(st.st_size);
    struct statfs fs{};
    if (::fstatfs(fd_.get(), &fs) == 0)
      memory_backed_ = fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC;
  } else {
    throw Error(where + ": not a regular file or block device — give file= a disk image or a /dev/sdX-like device");
  }
  if (options.direct) {
    direct_fd_ = UniqueFd(::open(path_.c_str(), flags | O_DIRECT));
    if (!direct_fd_) throw_errno(where + ": open with O_DIRECT (the file system may not support it; drop direct=true)");
    info_.block_min = kDirectAlignment;
  }
  info_.read_only = options.read_only;
  // Punching holes and zeroing ranges are single system calls that either
  // work or fail at once, so a fast zero never degrades to writing zeros.
  info_.can_fast_zero = true;
}

int FileStore::fd_for(const void* buffer, std::uint64_t length, std::uint64_t offset) const {
  if (direct_fd_ && reinterpret_cast<std::uintptr_t>(buffer) % kDirectAlignment == 0 &&
      length % kDirectAlignment == 0 && offset % kDirectAlignment == 0)
    return direct_fd_.get();
  return fd_.get();
}

int FileStore::pread(void* buffer, std::size_t length, std::uint64_t offset) {
  int fd = fd_for(buffer, length, offset);
  auto* out = static_cast<std::byte*>(buffer);
  while (length > 0) {
    ssize_t got = ::pread(fd, out, length, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      return report("read", offset, length, errno);
    }
    if (got == 0) return report("read (end of file: it shrank)", offset, length, EIO);
    out += got;
    length -= static_cast<std::size_t>(got);
    offset += static_cast<std::uint64_t>(got);
  }
  return 0;
}

int FileStore::pwrite(const void* buffer, std::size_t length, std::uint64_t offset, bool fua) {
  if (info_.read_only) return EPERM;
  int fd = fd_for(buffer, length, offset);
  const auto* in = static_cast<const std::byte*>(buffer);
  while (length > 0) {
    iovec vector{const_cast<std::byte*>(in), length};
    ssize_t put = ::pwritev2(fd, &vector, 1, static_cast<off_t>(offset), fua ? RWF_DSYNC : 0);
    if (put < 0) {
      if (errno == EINTR) continue;
      return report("write", offset, length, errno);
    }
    if (put == 0) return report("write (no progress)", offset, length, EIO);
    in += put;
    length -= static_cast<std::size_t>(put);
    offset += static_cast<std::uint64_t>(put);
  }
  return 0;
}

int FileStore::flush() {
  // fdatasync covers every write the kernel has completed on this inode,
  // whichever descriptor or io_uring it came through: that is what makes
  // multi-conn truthful.
  if (::fdatasync(fd_.get()) != 0) return report("flush (fdatasync)", 0, info_.size, errno);
  return 0;
}

int FileStore::trim(std::uint64_t offset, std::uint64_t length, bool fua) {
  if (info_.read_only) return EPERM;
  if (length == 0) return 0;
  int error;
  if (block_device_) {
    std::uint64_t range[2] = {offset, length};
    error = ::ioctl(fd_.get(), BLKDISCARD, range) == 0 ? 0 : errno;
  } else {
    error = fallocate_errno(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  }
  // Trim is advisory: a device or file system that cannot discard (or not
  // at this alignment) leaves the data in place, which is allowed.
  if (is_not_supported(error) || error == EINVAL) error = 0;
  if (error != 0) return report(block_device_ ? "trim (BLKDISCARD)" : "trim (punch hole)", offset, length, error);
  if (fua) error = flush();
  return error;
}

int FileStore::write_zeroes(std::uint64_t offset, std::uint64_t length) {
  while (length > 0) {
    std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(length, sizeof kZeros));
    if (int error = pwrite(kZeros, chunk, offset, false)) return error;
    offset += chunk;
    length -= chunk;
  }
  return 0;
}

int FileStore::zero(std::uint64_t offset, std::uint64_t length, bool no_hole, bool fast, bool fua) {
  if (info_.read_only) return EPERM;
  if (length == 0) return 0;
  int fd = fd_.get();
  int error = EOPNOTSUPP;
  if (!no_hole) {
    // A hole reads back as zeros and is the cheapest zero there is.  On a
    // block device the kernel maps this to a zero-out without fallback, so
    // it too either is cheap or fails.
    error = fallocate_errno(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  }
  if (error != 0 && !block_device_) error = fallocate_errno(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
  if (error != 0) {
    // What remains may write every byte: not fast.
    if (fast) return ENOTSUP;
    if (block_device_) {
      std::uint64_t range[2] = {offset, length};
      error = ::ioctl(fd, BLKZEROOUT, range) == 0 ? 0 : errno;
    }
    if (error != 0) error = write_zeroes(offset, length);  // its writes report their own errors
  }
  if (error == 0 && fua) error = flush();
  return error;
}

int FileStore::extents(std::uint64_t offset, std::uint64_t length, bool req_one, ExtentSink& sink) {
  std::uint64_t end = offset + length;
  if (block_device_) {
    // Block devices have no allocation map we can read: all data.
    sink.add(offset, length, 0);
    return 0;
  }
  int fd = fd_.get();
  std::uint64_t position = offset;
  while (position < end) {
    off_t data = ::lseek(fd, static_cast<off_t>(position), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) {
        data = static_cast<off_t>(end);  // no data after `position`: the rest is a hole
      } else if (position == offset) {
        // No SEEK_DATA here (some file systems): report everything as data.
        sink.add(offset, length, 0);
        return 0;
      } else {
        return report("block status (SEEK_DATA)", position, end - position, errno);
      }
    }
    std::uint64_t data_start = std::min<std::uint64_t>(static_cast<std::uint64_t>(data), end);
    if (data_start > position) {
      if (!sink.add(position, data_start - position, kExtentHole | kExtentZero) || req_one) return 0;
      position = data_start;
      if (position >= end) break;
    }
    off_t hole = ::lseek(fd, static_cast<off_t>(position), SEEK_HOLE);
    if (hole < 0) return errno == ENXIO ? 0 : report("block status (SEEK_HOLE)", position, end - position, errno);
    std::uint64_t data_end = std::min<std::uint64_t>(static_cast<std::uint64_t>(hole), end);
    if (data_end <= position) data_end = end;  // cannot happen on a sane file system; never loop forever
    if (!sink.add(position, data_end - position, 0) || req_one) return 0;
    position = data_end;
  }
  return 0;
}

int FileStore::cache(std::uint64_t offset, std::uint64_t length) {
  // Advisory prefetch; its failure is not the client's problem.
  (void)::posix_fadvise(fd_.get(), static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_WILLNEED);
  return 0;
}

// ---------------------------------------------------------------------------
// io_uring queue
// ---------------------------------------------------------------------------
namespace {

class UringQueue final : public StoreQueue {
 public:
  UringQueue(FileStore& store, unsigned depth) : store_(store), depth_(depth) {}
  UringQueue(const UringQueue&) = delete;
  UringQueue& operator=(const UringQueue&) = delete;
  ~UringQueue() override {
    if (!initialised_) return;
    // Nothing new starts at teardown: whether the slot is still ours is not
    // known here.  Requests still in the kernel write into memory we may
    // unmap next: wait for them before tearing the ring down.
    abandon_unstarted();
    std::vector<StoreCompletion> drained;
    while (async_in_flight_ > 0) {
      std::size_t before = drained.size();
      reap(drained, true);
      if (drained.size() == before && async_in_flight_ > 0 && !wait_one()) break;
    }
    io_uring_queue_exit(&ring_);
  }

  // 0 or the errno io_uring_queue_init failed with.
  int init() {
    int result = io_uring_queue_init(depth_, &ring_, 0);
    if (result < 0) return -result;
    initialised_ = true;
    slots_.resize(depth_);
    free_slots_.reserve(depth_);
    for (unsigned i = depth_; i > 0; --i) free_slots_.push_back(i - 1);
    finished_.reserve(depth_);
    prepared_.reserve(depth_);
    return 0;
  }

  unsigned room() const override { return depth_ - in_flight_; }
  unsigned in_flight() const override { return in_flight_; }

  void enqueue(const StoreRequest& request) override {
    ++in_flight_;
    if (abandoned_) {
      // The slot is lost: nothing may reach the store any more, not even a
      // request that would run in place (store.hpp, abandon_unstarted()).
      finished_.push_back({request.user_data, ECANCELED});
      return;
    }
    if (RangeOpSlicer::sliced(request.op)) {
      slices_.add(request);  // run a slice per submit()
      return;
    }
    if (request.op != StoreOp::Read && request.op != StoreOp::Write && request.op != StoreOp::Flush) {
      finished_.push_back({request.user_data, run_request(store_, request)});
      return;
    }
    if (request.op == StoreOp::Write && store_.info().read_only) {
      finished_.push_back({request.user_data, EPERM});
      return;
    }
    std::uint64_t done = 0;
    if (try_in_place(request, done)) {
      finished_.push_back({request.user_data, 0});
      return;
    }
    unsigned index = free_slots_.back();
    free_slots_.pop_back();
    slots_[index] = {request, done};
    ++async_in_flight_;
    prepare(index);
  }

  bool wants_another_turn() const override { return !slices_.empty() || !finished_.empty(); }

  void submit() override {
    if (abandoned_) return;
    if (!sliced_since_reap_) {
      sliced_since_reap_ = true;
      slices_.step(store_, finished_, [this](std::uint64_t user_data) { return may_start(user_data); });
    }
    if (unsubmitted_ == 0) return;
    int result = io_uring_submit(&ring_);
    if (result >= 0) {
      const auto started = std::min<unsigned>(unsubmitted_, static_cast<unsigned>(result));
      unsubmitted_ -= started;
      prepared_.erase(prepared_.begin(), prepared_.begin() + std::min<std::size_t>(started, prepared_.size()));
    } else if (result != -EAGAIN && result != -EBUSY && result != -EINTR && limit_.allow()) {
      log(LogLevel::Error, "file %s: io_uring_submit: %s", store_.path().c_str(), std::strerror(-result));
    }
  }

  void abandon_unstarted() override {
    if (abandoned_) return;
    abandoned_ = true;
    // Prepared but never handed to the kernel: the SQEs stay behind in the
    // ring's local queue, which io_uring_queue_exit() discards.
    for (unsigned index : prepared_) finish(index, ECANCELED);
    prepared_.clear();
    unsubmitted_ = 0;
    slices_.abandon(finished_);
  }

  // Starts nothing (store.hpp): a short transfer's remainder is prepared
  // here and goes to the kernel with the caller's next submit(), which it
  // makes only while its slot is still ours.
  void reap(std::vector<StoreCompletion>& out, bool wait) override {
    in_place_bytes_ = 0;
    sliced_since_reap_ = false;
    io_uring_cqe* cqe = nullptr;
    while (io_uring_peek_cqe(&ring_, &cqe) == 0 && cqe) {
      handle(cqe);
    }
    if (wait && finished_.empty()) wait_one();
    in_flight_ -= static_cast<unsigned>(finished_.size());
    out.insert(out.end(), finished_.begin(), finished_.end());
    finished_.clear();
  }

 private:
  struct Slot {
    StoreRequest request;
    std::uint64_t done;  // bytes transferred so far (short reads/writes continue)
  };

  // A page-cache hit needs no asynchronous machinery: try the transfer in
  // place without blocking (RWF_NOWAIT).  io_uring makes the same attempt,
  // but on file systems without non-blocking support it hands every request
  // to a worker thread: a context switch each, and on two cores the largest
  // cost of a 4 KiB write (docs/performance.md).  A file in memory (tmpfs,
  // ramfs — which refuse RWF_NOWAIT) has no device to wait for, so there
  // the transfer is done in place as a plain copy.  Only buffered reads and
  // plain writes qualify — O_DIRECT and FUA writes would wait for the
  // device.  `done` receives the bytes moved by a partial transfer;
  // io_uring carries on from there.  True when it is complete.
  bool try_in_place(const StoreRequest& request, std::uint64_t& done) {
    const bool read = request.op == StoreOp::Read;
    const bool write = request.op == StoreOp::Write && !request.fua;
    if (!read && !write) return false;
    const bool in_memory = store_.memory_backed();
    if (!in_memory && !(read ? nowait_reads_ : nowait_writes_)) return false;
    if (in_memory) {
      // A copy in memory can still block this thread (swap-in, reclaim when
      // a write fills a hole) while its other channels wait: only small
      // requests, and only so many bytes between two reaps; the rest goes
      // to io_uring's workers.
      if (request.length > kInPlaceMaxRequest || in_place_bytes_ + request.length > kInPlaceBytesPerReap) return false;
    }
    if (!store_.buffered(request.buffer, request.length, request.offset)) return false;
    // Charged before the copy: one that fails or comes up short still counts
    // in full (the bound errs on the safe side).
    if (in_memory) in_place_bytes_ += request.length;
    iovec iov{request.buffer, request.length};
    const int fd = store_.fd_for(request.buffer, request.length, request.offset);
    const auto offset = static_cast<off_t>(request.offset);
    const int flags = in_memory ? 0 : RWF_NOWAIT;
    ssize_t moved = read ? ::preadv2(fd, &iov, 1, offset, flags) : ::pwritev2(fd, &iov, 1, offset, flags);
    if (moved < 0) {
      // Not supported here at all: stop trying, io_uring does it all.
      if (errno == EOPNOTSUPP || errno == ENOTSUP || errno == EINVAL) (read ? nowait_reads_ : nowait_writes_) = false;
      return false;
    }
    done = static_cast<std::uint64_t>(moved);
    return done == request.length;
  }

  // Waits for one completion of a request in the kernel; false when none is
  // there to wait for (or the wait failed).
  bool wait_one() {
    if (async_in_flight_ <= unsubmitted_) return false;  // the rest waits for submit()
    io_uring_cqe* cqe = nullptr;
    int result = io_uring_wait_cqe(&ring_, &cqe);
    if (result == 0 && cqe) {
      handle(cqe);
      return true;
    }
    return result == -EINTR;
  }

  void prepare(unsigned index) {
    if (abandoned_) {
      finish(index, ECANCELED);  // a short transfer's remainder, after the slot was lost
      return;
    }
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) {
      // Cannot happen (the ring holds depth entries and we never exceed
      // depth), but a request must never be lost: run it in place.
      Slot& slot = slots_[index];
      finish(index, run_remainder(slot));
      return;
    }
    Slot& slot = slots_[index];
    const StoreRequest& r = slot.request;
    std::byte* buffer = r.buffer + slot.done;
    std::uint64_t offset = r.offset + slot.done;
    auto remaining = static_cast<unsigned>(r.length - slot.done);
    switch (r.op) {
      case StoreOp::Read:
        io_uring_prep_read(sqe, store_.fd_for(buffer, remaining, offset), buffer, remaining, offset);
        break;
      case StoreOp::Write:
        io_uring_prep_write(sqe, store_.fd_for(buffer, remaining, offset), buffer, remaining, offset);
        if (r.fua) sqe->rw_flags = RWF_DSYNC;  // durable before it completes
        break;
      default:
        io_uring_prep_fsync(sqe, store_.fd_for(nullptr, 1, 1), IORING_FSYNC_DATASYNC);
        break;
    }
    io_uring_sqe_set_data(sqe, reinterpret_cast<void*>(static_cast<std::uintptr_t>(index)));
    ++unsubmitted_;
    prepared_.push_back(index);
  }

  int run_remainder(Slot& slot) {
    StoreRequest rest = slot.request;
    rest.buffer += slot.done;
    rest.offset += slot.done;
    rest.length -= slot.done;
    return run_request(store_, rest);
  }

  void handle(io_uring_cqe* cqe) {
    auto index = static_cast<unsigned>(reinterpret_cast<std::uintptr_t>(io_uring_cqe_get_data(cqe)));
    int result = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    if (index >= slots_.size()) return;  // not ours; cannot happen
    Slot& slot = slots_[index];
    if ((result == -EINTR || result == -EAGAIN || (result > 0 && slot.done + static_cast<std::uint64_t>(result) <
                                                                   slot.request.length)) &&
        !may_start(slot.request.user_data)) {
      finish(index, ECANCELED);  // more to do, for a channel that no longer wants it
      return;
    }
    if (result == -EINTR || result == -EAGAIN) {
      prepare(index);
      return;
    }
    const std::uint64_t offset = slot.request.offset + slot.done;
    const std::uint64_t remaining = slot.request.length - slot.done;
    if (result < 0) {
      finish(index, slot.request.op == StoreOp::Flush
                        ? store_.report("flush (io_uring fsync)", 0, store_.info().size, -result)
                        : store_.report(slot.request.op == StoreOp::Read ? "read (io_uring)" : "write (io_uring)",
                                        offset, remaining, -result));
      return;
    }
    if (slot.request.op == StoreOp::Flush) {
      finish(index, 0);
      return;
    }
    if (result == 0) {  // no progress: the file shrank under us
      finish(index, store_.report(slot.request.op == StoreOp::Read ? "read (io_uring, end of file: it shrank)"
                                                                   : "write (io_uring, no progress)",
                                  offset, remaining, EIO));
      return;
    }
    slot.done += static_cast<std::uint64_t>(result);
    if (slot.done < slot.request.length) {
      prepare(index);
      return;
    }
    finish(index, 0);
  }

  void finish(unsigned index, int error) {
    finished_.push_back({slots_[index].request.user_data, error});
    free_slots_.push_back(index);
    --async_in_flight_;
  }

  FileStore& store_;
  unsigned depth_;
  io_uring ring_{};
  bool initialised_ = false;
  std::vector<Slot> slots_;
  std::vector<unsigned> free_slots_;
  std::vector<StoreCompletion> finished_;
  RangeOpSlicer slices_;          // trims and zeros, a slice per submit()
  bool sliced_since_reap_ = false;  // one slice per reap(), however often submit() runs
  unsigned in_flight_ = 0;        // enqueued, not yet reaped
  unsigned async_in_flight_ = 0;  // in the kernel
  unsigned unsubmitted_ = 0;
  std::vector<unsigned> prepared_;  // slots of the unsubmitted SQEs, in ring order
  bool abandoned_ = false;          // abandon_unstarted(): never submit again
  bool nowait_reads_ = true;   // preadv2(RWF_NOWAIT) works on this file
  bool nowait_writes_ = true;  // pwritev2(RWF_NOWAIT) works on this file
  std::uint64_t in_place_bytes_ = 0;  // copied in memory since the last reap()
  RateLimit limit_;
};

}  // namespace

std::unique_ptr<StoreQueue> FileStore::open_queue(unsigned depth) {
  if (depth == 0) depth = 1;
  auto queue = std::make_unique<UringQueue>(*this, depth);
  if (int error = queue->init()) {
    static RateLimit once(std::chrono::hours(24));
    if (once.allow())
      log(LogLevel::Warning, "file %s: io_uring unavailable (%s); handlers use synchronous I/O", path_.c_str(),
          std::strerror(error));
    return Store::open_queue(depth);
  }
  return queue;
}

}  // namespace cbd::backend
