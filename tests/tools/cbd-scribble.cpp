// cbd-scribble: corrupts a live transport on purpose, for the hostile
// shared-memory tests.
//
//   cbd-scribble TRANSPORT scribble SECONDS [SEED [AREAS]]
//       For SECONDS, writes short runs of random bytes at random places of
//       AREAS (comma separated: control, rings, data, slots; default all):
//       channel control blocks, submission/completion ring entries, channel
//       data areas, host/backend/blkdev slots.  Never the superblock.
//       Prints how many writes it made to each area.
//   cbd-scribble TRANSPORT superblock magic|checksum|geometry
//       Breaks the superblock in one way: a wrong magic, a flipped byte the
//       checksum no longer covers, or a channel count too large for the
//       mapping with a matching checksum.
//   cbd-scribble TRANSPORT forge FIELD=VALUE...
//       Forges the superblock: sets each named geometry field (hosts.offset,
//       channels.count, region_size, heartbeat_interval_ms, ...) and
//       recomputes the checksum, as a hostile peer could.
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/crc32c.hpp"
#include "common/layout.hpp"
#include "common/region.hpp"
#include "common/transport.hpp"

namespace {

using namespace cbd;

struct Span {
  std::uint64_t offset;  // from the start of the region
  std::uint64_t length;
};

int usage() {
  std::fprintf(stderr,
               "usage: cbd-scribble TRANSPORT scribble SECONDS [SEED [control,rings,data,slots]]\n"
               "       cbd-scribble TRANSPORT superblock magic|checksum|geometry\n"
               "       cbd-scribble TRANSPORT forge FIELD=VALUE...\n");
  return 2;
}

int break_superblock(const std::string& path, const std::string& how) {
  Region region = Region::open(path);
  Superblock sb;
  std::memcpy(&sb, region.base(), sizeof sb);
  if (how == "magic") {
    sb.magic ^= 0xff;
  } else if (how == "checksum") {
    sb.heartbeat_interval_ms ^= 0x10;  // checksum left as it was
  } else if (how == "geometry") {
    sb.channels.count = 0x40000000u;   // cannot fit: consistent checksum, impossible geometry
    sb.checksum = 0;
    sb.checksum = crc32c(0, &sb, sizeof sb);
  } else {
    return usage();
  }
  std::memcpy(region.base(), &sb, sizeof sb);
  std::printf("superblock of %s: %s broken\n", path.c_str(), how.c_str());
  return 0;
}

// Sets one named superblock field; false when the name is unknown.
bool set_field(Superblock& sb, const std::string& field, std::uint64_t value) {
  auto u32 = [&](std::uint32_t& f) { f = static_cast<std::uint32_t>(value); };
  struct Area {
    const char* name;
    AreaGeometry* area;
  };
  for (Area a : {Area{"hosts", &sb.hosts}, Area{"backends", &sb.backends}, Area{"blkdevs", &sb.blkdevs},
                 Area{"channels", &sb.channels}}) {
    const std::string prefix = std::string(a.name) + ".";
    if (field == prefix + "offset") return a.area->offset = value, true;
    if (field == prefix + "slot_size") return u32(a.area->slot_size), true;
    if (field == prefix + "count") return u32(a.area->count), true;
  }
  if (field == "region_size") return sb.region_size = value, true;
  if (field == "heartbeat_interval_ms") return u32(sb.heartbeat_interval_ms), true;
  if (field == "dead_after_ms") return u32(sb.dead_after_ms), true;
  if (field == "channel.sq_offset") return u32(sb.channel.sq_offset), true;
  if (field == "channel.cq_offset") return u32(sb.channel.cq_offset), true;
  if (field == "channel.data_offset") return sb.channel.data_offset = value, true;
  if (field == "channel.data_size") return sb.channel.data_size = value, true;
  return false;
}

int forge_superblock(const std::string& path, int count, char** assignments) {
  Region region = Region::open(path);
  Superblock sb;
  std::memcpy(&sb, region.base(), sizeof sb);
  for (int i = 0; i < count; ++i) {
    const std::string assignment = assignments[i];
    const auto equals = assignment.find('=');
    if (equals == std::string::npos) return usage();
    const std::string field = assignment.substr(0, equals);
    if (!set_field(sb, field, std::stoull(assignment.substr(equals + 1), nullptr, 0))) {
      std::fprintf(stderr, "cbd-scribble: unknown superblock field %s\n", field.c_str());
      return 2;
    }
  }
  sb.checksum = 0;
  sb.checksum = crc32c(0, &sb, sizeof sb);
  std::memcpy(region.base(), &sb, sizeof sb);
  return 0;
}

int scribble(const std::string& path, double seconds, std::uint64_t seed, const std::string& areas) {
  const Transport transport = Transport::attach(path);
  const Superblock& sb = transport.superblock();
  const auto wants = [&](const char* area) { return areas.find(area) != std::string::npos; };

  // Where we may write, grouped by kind.
  std::vector<Span> control, rings, data, slots;
  const std::uint64_t channels = sb.channels.offset;
  for (std::uint32_t i = 0; i < sb.channels.count; ++i) {
    const std::uint64_t base = channels + std::uint64_t{i} * sb.channels.slot_size;
    control.push_back({base, sizeof(ChannelControl)});
    rings.push_back({base + sb.channel.sq_offset, std::uint64_t{sb.channel.sq_entries} * sizeof(SubmissionEntry)});
    rings.push_back({base + sb.channel.cq_offset, std::uint64_t{sb.channel.cq_entries} * sizeof(CompletionEntry)});
    data.push_back({base + sb.channel.data_offset, sb.channel.data_size});
  }
  for (const AreaGeometry* area : {&sb.hosts, &sb.backends, &sb.blkdevs})
    if (area->count) slots.push_back({area->offset, std::uint64_t{area->slot_size} * area->count});

  struct Kind {
    const char* name;
    std::vector<Span>* spans;
    std::uint64_t writes = 0;
  };
  std::vector<Kind> kinds;
  if (wants("control")) kinds.push_back({"control", &control});
  if (wants("rings")) kinds.push_back({"rings", &rings});
  if (wants("data")) kinds.push_back({"data", &data});
  if (wants("slots")) kinds.push_back({"slots", &slots});
  if (kinds.empty()) return usage();

  std::mt19937_64 random(seed);
  std::byte* base = transport.region().base();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    // A burst of writes, then a short pause so traffic gets through between
    // bursts (every request should not fail, or nothing is exercised).
    for (int burst = 0; burst < 16; ++burst) {
      Kind& kind = kinds[random() % kinds.size()];
      if (kind.spans->empty()) continue;
      const Span& span = (*kind.spans)[random() % kind.spans->size()];
      const std::uint64_t length = std::min<std::uint64_t>(1 + random() % 16, span.length);
      const std::uint64_t at = span.offset + random() % (span.length - length + 1);
      for (std::uint64_t i = 0; i < length; ++i) base[at + i] = static_cast<std::byte>(random());
      ++kind.writes;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  for (const Kind& kind : kinds) std::printf("%s: %llu writes\n", kind.name, static_cast<unsigned long long>(kind.writes));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 4) return usage();
    const std::string path = argv[1], command = argv[2];
    if (command == "superblock") return break_superblock(path, argv[3]);
    if (command == "forge") return forge_superblock(path, argc - 3, argv + 3);
    if (command == "scribble")
      return scribble(path, std::stod(argv[3]), argc > 4 ? std::stoull(argv[4]) : 1,
                      argc > 5 ? argv[5] : "control,rings,data,slots");
    return usage();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbd-scribble: %s\n", e.what());
    return 1;
  }
}
