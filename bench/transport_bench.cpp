// Micro-benchmarks of the cbd transport between two processes on one host.
//
//  round-trip   one submission entry through a real channel's submission ring
//               and one completion entry back, versus a raw ping-pong of one
//               64-bit word in the same shared mapping.
//  data-area    a producer writes extents into the channel's data area and
//               announces them through the submission ring; the consumer copies
//               each extent out (as a backend's write to its store would),
//               checks its stamps and completes it; the producer frees extents
//               on completion.  Compared with one thread doing memcpy of the
//               same sizes into a buffer as large as the data area.
//
// The two processes are pinned to different CPUs when there are at least two.
// Every figure is the median over many batches, so short interruptions by
// other processes on a shared machine move it little.  Output: JSON on stdout.
//
// Usage: cbd-transport-bench [transport=/dev/shm/PATH] [quick]
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/channel.hpp"
#include "common/data_area.hpp"
#include "common/layout.hpp"
#include "common/region.hpp"
#include "common/shared_atomic.hpp"
#include "common/transport.hpp"

namespace {

using Clock = std::chrono::steady_clock;

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#else
  __asm__ __volatile__("" ::: "memory");
#endif
}

// Busy-waits, but gives the CPU away after a millisecond of waiting: on a
// machine where other work keeps the peer process off its CPU, pure spinning
// would only burn the time slice the peer needs.  Waits for the peer's normal
// work (up to a 1 MiB copy) never get that far.
struct Backoff {
  unsigned spins = 0;
  std::chrono::steady_clock::time_point since{};
  void pause() {
    cpu_relax();
    if ((++spins & 255) != 0) return;
    auto now = std::chrono::steady_clock::now();
    if (spins == 256) {
      since = now;
    } else if (now - since > std::chrono::milliseconds(1)) {
      ::sched_yield();
      spins = 0;
    }
  }
};

double ns_since(Clock::time_point start) {
  return std::chrono::duration<double, std::nano>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}
double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return 0;
  std::size_t i = static_cast<std::size_t>(p / 100.0 * static_cast<double>(v.size() - 1));
  return v[i];
}

bool pin_to_cpu(int cpu) {
  long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  if (n < 2) return false;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu % n, &set);
  return ::sched_setaffinity(0, sizeof set, &set) == 0;
}

// Runs `child` in a forked process pinned to CPU 1 and `parent` here, pinned
// to CPU 0.  Returns false when the child failed.
template <typename Parent, typename Child>
bool run_pair(Parent parent, Child child, bool& pinned) {
  pid_t pid = ::fork();
  if (pid < 0) {
    std::perror("fork");
    std::exit(1);
  }
  if (pid == 0) {
    pin_to_cpu(1);
    std::_Exit(child() ? 0 : 1);
  }
  pinned = pin_to_cpu(0);
  parent();
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

struct Config {
  std::string transport;
  // Short batches, many of them: on a shared machine most batches then run
  // while both processes hold a CPU, and the median is their speed.
  int rt_batches = 2000;
  int rt_batch = 200;
  int data_batches = 600;
  std::uint64_t data_batch_bytes = 2ull << 20;  // at least 8 extents
};

// ---------------------------------------------------------------------------
// Round trip
// ---------------------------------------------------------------------------

struct PingPong {
  alignas(cbd::kLineSize) std::uint64_t word;
};

// Sets a channel up as both sides of the attach protocol would (the slots
// themselves are not claimed: nothing else uses this transport).
void attach_channel(const cbd::Channel& channel) {
  std::uint64_t generation = channel.queue_setup(0, 0, 1);
  channel.handler_attach(generation, 1);
  if (!channel.handler_attached(generation)) {
    std::fprintf(stderr, "channel attach failed\n");
    std::exit(1);
  }
}

struct RoundTrips {
  std::vector<double> raw;      // ns per round trip, one value per batch
  std::vector<double> channel;  // ns per round trip, one value per batch
  std::vector<double> ratio;    // channel / raw of batches measured back to back
};

// Batches of raw ping-pongs and of channel round trips alternate, so both
// see the same state of the machine.  Batch 0 of each warms up.
RoundTrips round_trips(const cbd::Transport& transport, const Config& config, bool& pinned) {
  void* mem = ::mmap(nullptr, sizeof(PingPong), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    std::perror("mmap");
    std::exit(1);
  }
  auto* pp = new (mem) PingPong{};
  cbd::Channel channel(transport, 0);
  attach_channel(channel);
  RoundTrips out;
  const int batch = config.rt_batch;
  bool ok = run_pair(
      [&] {  // queue side / pinger
        auto sq = channel.submission_producer();
        auto cq = channel.completion_consumer();
        sq.reset();
        cq.reset();
        std::uint64_t value = 0, tag = 0;
        cbd::SubmissionEntry se{};
        se.op = static_cast<std::uint16_t>(cbd::Op::Read);
        se.length = 4096;
        se.data_length = 4096;
        cbd::CompletionEntry ce{};
        for (int b = 0; b <= config.rt_batches; ++b) {
          auto start = Clock::now();
          for (int i = 0; i < batch; ++i) {
            cbd::store_release(pp->word, ++value);  // odd: ping
            ++value;
            Backoff w;
            while (cbd::load_acquire(pp->word) != value) w.pause();  // even: pong
          }
          double raw = ns_since(start) / batch;
          start = Clock::now();
          for (int i = 0; i < batch; ++i) {
            se.tag = ++tag;
            se.offset = tag * 4096;
            Backoff w;
            while (!sq.push(se)) w.pause();
            cbd::PopStatus st;
            while ((st = cq.pop(ce)) == cbd::PopStatus::Empty) w.pause();
            if (st != cbd::PopStatus::Ok || ce.tag != tag) {
              std::fprintf(stderr, "bad completion\n");
              std::exit(1);
            }
            cq.release();
          }
          double chan = ns_since(start) / batch;
          if (b > 0) {
            out.raw.push_back(raw);
            out.channel.push_back(chan);
            out.ratio.push_back(chan / raw);
          }
        }
      },
      [&] {  // handler side / ponger
        auto sq = channel.submission_consumer();
        auto cq = channel.completion_producer();
        sq.reset();
        cq.reset();
        cbd::SubmissionEntry se{};
        cbd::CompletionEntry ce{};
        std::uint64_t expect = 1;
        for (int b = 0; b <= config.rt_batches; ++b) {
          for (int i = 0; i < batch; ++i, expect += 2) {
            Backoff w;
            while (cbd::load_acquire(pp->word) != expect) w.pause();
            cbd::store_release(pp->word, expect + 1);
          }
          for (int i = 0; i < batch; ++i) {
            cbd::PopStatus st;
            Backoff w;
            while ((st = sq.pop(se)) == cbd::PopStatus::Empty) w.pause();
            if (st != cbd::PopStatus::Ok) return false;
            sq.release();
            ce.tag = se.tag;
            ce.status = 0;
            ce.result_length = se.length;
            while (!cq.push(ce)) w.pause();
          }
        }
        return true;
      },
      pinned);
  ::munmap(mem, sizeof(PingPong));
  if (!ok) {
    std::fprintf(stderr, "round-trip child failed\n");
    std::exit(1);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Data-area throughput
// ---------------------------------------------------------------------------

void stamp(std::byte* p, std::size_t size, std::uint64_t tag) {
  std::memcpy(p, &tag, sizeof tag);
  std::memcpy(p + size - sizeof tag, &tag, sizeof tag);
}
bool check_stamp(const std::byte* p, std::size_t size, std::uint64_t tag) {
  std::uint64_t a, b;
  std::memcpy(&a, p, sizeof a);
  std::memcpy(&b, p + size - sizeof b, sizeof b);
  return a == tag && b == tag;
}

struct Throughputs {
  std::vector<double> channel;  // bytes per second, one value per batch
  std::vector<double> memcpy;   // bytes per second, one value per batch
  std::vector<double> ratio;    // channel / memcpy of batches measured back to back
};

// Batches through the channel alternate with batches of one thread copying
// the same pieces from one source buffer into a destination the size of the
// data area, walking through it as the producer does.
Throughputs data_area(const cbd::Transport& transport, const Config& config, std::uint32_t size, bool& pinned) {
  cbd::Channel channel(transport, 1);
  attach_channel(channel);
  const std::uint64_t per_batch = std::max<std::uint64_t>(8, config.data_batch_bytes / size);
  const std::uint64_t total = (config.data_batches + 1) * per_batch;
  Throughputs out;
  bool ok = run_pair(
      [&] {  // producer: queue side
        auto sq = channel.submission_producer();
        auto cq = channel.completion_consumer();
        sq.reset();
        cq.reset();
        cbd::DataAreaAllocator alloc(channel.data_size());
        std::vector<std::byte> source(size);
        for (std::uint32_t i = 0; i < size; ++i) source[i] = static_cast<std::byte>(i * 131 + 7);
        std::vector<std::byte> area(channel.data_size());
        std::memset(area.data(), 0, area.size());
        const std::uint64_t slots = std::max<std::uint64_t>(1, area.size() / size);
        std::uint64_t submitted = 0, completed = 0, copied = 0;
        Backoff w;
        cbd::CompletionEntry ce{};
        auto reap = [&] {
          bool any = false;
          for (;;) {
            cbd::PopStatus st = cq.pop(ce);
            if (st == cbd::PopStatus::Empty) break;
            if (st != cbd::PopStatus::Ok || ce.status != 0) {
              std::fprintf(stderr, "bad data completion\n");
              std::exit(1);
            }
            alloc.release(static_cast<std::uint32_t>(ce.tag >> 32));
            ++completed;
            any = true;
          }
          if (any) cq.release();
          return any;
        };
        for (int b = 0; b <= config.data_batches; ++b) {
          auto start = Clock::now();
          std::uint64_t end = submitted + per_batch;
          while (submitted < end) {
            auto offset = alloc.allocate(size);
            if (!offset || sq.free_slots() == 0) {
              if (offset) alloc.release(*offset);
              sq.publish();
              if (!reap()) w.pause();
              continue;
            }
            std::byte* dst = channel.data(*offset, size);
            std::memcpy(dst, source.data(), size);
            std::uint64_t seq = submitted & 0xffffffffu;
            stamp(dst, size, seq);
            cbd::SubmissionEntry se{};
            se.op = static_cast<std::uint16_t>(cbd::Op::Write);
            se.tag = (std::uint64_t{*offset} << 32) | seq;
            se.length = size;
            se.data_offset = *offset;
            se.data_length = size;
            se.data_crc = channel.publish_data(dst, size);
            sq.stage(se);
            ++submitted;
            // Publish every few entries, or every 256 KiB, so the consumer
            // starts early (large extents are published one by one).
            if ((submitted & 7) == 0 || size >= (256u << 10) / 8) sq.publish();
            reap();
          }
          sq.publish();
          // A batch ends when all its extents came back.
          while (completed < submitted) {
            if (!reap()) w.pause();
          }
          double through = double(per_batch) * size / (ns_since(start) * 1e-9);

          start = Clock::now();
          for (std::uint64_t i = 0; i < per_batch; ++i, ++copied) {
            std::byte* dst = area.data() + (copied % slots) * size;
            std::memcpy(dst, source.data(), size);
            stamp(dst, size, copied);
          }
          // Keep the compiler from dropping the copies.
          __asm__ __volatile__("" : : "r"(area.data()) : "memory");
          double copy = double(per_batch) * size / (ns_since(start) * 1e-9);
          if (b > 0) {
            out.channel.push_back(through);
            out.memcpy.push_back(copy);
            out.ratio.push_back(through / copy);
          }
        }
      },
      [&] {  // consumer: handler side
        auto sq = channel.submission_consumer();
        auto cq = channel.completion_producer();
        sq.reset();
        cq.reset();
        std::vector<std::byte> sink(size);
        cbd::SubmissionEntry se{};
        std::uint64_t done = 0;
        std::uint32_t since_publish = 0;
        Backoff w;
        while (done < total) {
          cbd::PopStatus st = sq.pop(se);
          if (st == cbd::PopStatus::Empty) {
            sq.release();
            cq.publish();
            since_publish = 0;
            w.pause();
            continue;
          }
          if (st != cbd::PopStatus::Ok) return false;
          const std::byte* src = channel.data(se.data_offset, se.data_length);
          if (src == nullptr || se.data_length != size) return false;
          if (!channel.consume_data(src, se.data_length, se.data_crc)) return false;
          // The copy a backend makes when it writes the extent to its store.
          std::memcpy(sink.data(), src, se.data_length);
          if (!check_stamp(sink.data(), size, se.tag & 0xffffffffu)) {
            std::fprintf(stderr, "data mismatch at entry %llu\n", static_cast<unsigned long long>(done));
            return false;
          }
          cbd::CompletionEntry ce{};
          ce.tag = se.tag;
          while (!cq.stage(ce)) {
            cq.publish();
            w.pause();
          }
          ++done;
          if (++since_publish >= 8 || size >= (256u << 10) / 8) {
            sq.release();
            cq.publish();
            since_publish = 0;
          }
        }
        sq.release();
        cq.publish();
        return true;
      },
      pinned);
  if (!ok) {
    std::fprintf(stderr, "data-area child failed (size %u)\n", size);
    std::exit(1);
  }
  return out;
}

std::string stats_json(const std::vector<double>& v, const char* format) {
  char buf[256];
  std::string f = std::string("{\"median\": ") + format + ", \"min\": " + format + ", \"p10\": " + format +
                  ", \"p90\": " + format + "}";
  std::snprintf(buf, sizeof buf, f.c_str(), median(v), percentile(v, 0), percentile(v, 10), percentile(v, 90));
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  config.transport = "/dev/shm/cbd-transport-bench-" + std::to_string(::getpid());
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("transport=", 0) == 0) {
      config.transport = arg.substr(10);
    } else if (arg == "quick") {
      config.rt_batches = 500;
      config.data_batches = 150;
    } else {
      std::fprintf(stderr, "usage: %s [transport=/dev/shm/PATH] [quick]\n", argv[0]);
      return 2;
    }
  }

  try {
    cbd::RegionOptions region_options;
    region_options.create = true;
    region_options.size = 64ull << 20;
    cbd::FormatOptions format_options;
    format_options.size = region_options.size;
    format_options.channels = 2;
    format_options.force = true;
    std::uint64_t data_size = 0;
    {
      cbd::Region region = cbd::Region::open(config.transport, region_options);
      cbd::format(region, format_options);
    }
    cbd::Transport transport = cbd::Transport::attach(config.transport);
    data_size = transport.superblock().channel.data_size;

    auto wall_start = Clock::now();
    bool pinned = false;
    RoundTrips rt = round_trips(transport, config, pinned);

    double load[3] = {0, 0, 0};
    ::getloadavg(load, 3);
    std::printf("{\n  \"pinned\": %s,\n  \"cpus\": %ld,\n  \"loadavg_at_start\": %.2f,\n", pinned ? "true" : "false",
                ::sysconf(_SC_NPROCESSORS_ONLN), load[0]);
    std::printf("  \"transport\": {\"data_area_bytes\": %llu, \"sq_entries\": %u, \"cq_entries\": %u},\n",
                static_cast<unsigned long long>(data_size), transport.superblock().channel.sq_entries,
                transport.superblock().channel.cq_entries);
    std::printf("  \"round_trip\": {\n");
    std::printf("    \"batch_round_trips\": %d, \"batches\": %d,\n", config.rt_batch, config.rt_batches);
    std::printf("    \"raw_ping_pong_ns\": %s,\n", stats_json(rt.raw, "%.1f").c_str());
    std::printf("    \"channel_ns\": %s,\n", stats_json(rt.channel, "%.1f").c_str());
    // The median of ratios of back-to-back batches: both halves of each
    // ratio saw the same machine.
    std::printf("    \"ratio_channel_to_raw\": %.3f\n  },\n", median(rt.ratio));

    std::printf("  \"data_area\": [\n");
    const std::uint32_t sizes[] = {4096, 65536, 1u << 20};
    for (std::size_t i = 0; i < std::size(sizes); ++i) {
      std::uint32_t size = sizes[i];
      Throughputs t = data_area(transport, config, size, pinned);
      std::printf("    {\"extent_bytes\": %u, \"channel_bytes_per_s\": %.0f, \"memcpy_bytes_per_s\": %.0f, "
                  "\"ratio_channel_to_memcpy\": %.3f}%s\n",
                  size, median(t.channel), median(t.memcpy), median(t.ratio), i + 1 < std::size(sizes) ? "," : "");
    }
    std::printf("  ],\n");
    // How much of the two CPUs the two processes actually got: well below 1
    // means other work on the machine interrupted the measurement.
    rusage self{}, children{};
    ::getrusage(RUSAGE_SELF, &self);
    ::getrusage(RUSAGE_CHILDREN, &children);
    auto seconds = [](const timeval& t) { return double(t.tv_sec) + double(t.tv_usec) * 1e-6; };
    double cpu = seconds(self.ru_utime) + seconds(self.ru_stime) + seconds(children.ru_utime) +
                 seconds(children.ru_stime);
    double wall = ns_since(wall_start) * 1e-9;
    std::printf("  \"wall_s\": %.2f,\n  \"cpu_share_of_two_cpus\": %.3f\n}\n", wall, cpu / (2 * wall));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbd-transport-bench: %s\n", e.what());
    ::unlink(config.transport.c_str());
    return 1;
  }
  ::unlink(config.transport.c_str());
  return 0;
}
