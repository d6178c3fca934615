// Regions, format and attach (common/region.hpp, common/transport.hpp):
// geometry round trip, options honoured, every refusal with a message of its
// own.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <set>
#include <string>

#include "common/crc32c.hpp"
#include "common/error.hpp"
#include "common/region.hpp"
#include "common/transport.hpp"
#include "tests/unit/shm_fixture.hpp"

using namespace cbd;
using cbd::test::ShmFile;

namespace {

Region create_region(const ShmFile& file, std::uint64_t size) {
  RegionOptions ro;
  ro.create = true;
  ro.size = size;
  return Region::open(file.path(), ro);
}

// The message of the cbd::Error thrown by `fn`, or "" when it succeeds.
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

std::string attach_error(const std::string& path) {
  return error_of([&] { Transport::attach(path); });
}

Superblock read_superblock(const std::string& path) {
  Region region = Region::open(path);
  Superblock sb;
  std::memcpy(&sb, region.base(), sizeof sb);
  return sb;
}

// Rewrites the superblock in the file; when `reseal`, with a correct
// checksum so only the intended defect remains.
void write_superblock(const std::string& path, Superblock sb, bool reseal) {
  if (reseal) {
    sb.checksum = 0;
    sb.checksum = crc32c(0, &sb, sizeof sb);
  }
  Region region = Region::open(path);
  std::memcpy(region.base(), &sb, sizeof sb);
}

bool same_area(const AreaGeometry& a, const AreaGeometry& b) {
  return a.offset == b.offset && a.slot_size == b.slot_size && a.count == b.count;
}

}  // namespace

TEST_CASE("transport: format then attach reads back the planned geometry") {
  struct Variant {
    bool checksum, flush;
  };
  for (Variant v : {Variant{false, false}, Variant{true, false}, Variant{false, true}, Variant{true, true}}) {
    CAPTURE(v.checksum);
    CAPTURE(v.flush);
    ShmFile file("roundtrip");
    FormatOptions o;
    o.hosts = 5;
    o.backends = 3;
    o.blkdevs = 7;
    o.channels = 3;
    o.data_size = 128 << 10;
    o.sq_entries = 32;
    o.cq_entries = 128;
    o.checksum = v.checksum;
    o.flush = v.flush;
    o.heartbeat_interval_ms = 50;
    o.dead_after_ms = 700;
    const std::uint64_t size = 4 << 20;
    {
      Region region = create_region(file, size);
      CHECK(region.size() == size);
      CHECK(region.kind() == RegionKind::File);
      CHECK_FALSE(looks_formatted(region));
      format(region, o);
      CHECK(looks_formatted(region));
    }
    const Superblock planned = plan_format(o, size);
    Transport t = Transport::attach(file.path());
    const Superblock& sb = t.superblock();
    CHECK(sb.magic == kSuperblockMagic);
    CHECK(sb.version_major == kVersionMajor);
    CHECK(sb.version_minor == kVersionMinor);
    CHECK(sb.superblock_size == sizeof(Superblock));
    CHECK(sb.region_size == size);
    CHECK(same_area(sb.hosts, planned.hosts));
    CHECK(same_area(sb.backends, planned.backends));
    CHECK(same_area(sb.blkdevs, planned.blkdevs));
    CHECK(same_area(sb.channels, planned.channels));
    CHECK(std::memcmp(&sb.channel, &planned.channel, sizeof sb.channel) == 0);
    CHECK(sb.features_incompat == planned.features_incompat);
    CHECK(sb.heartbeat_interval_ms == 50);
    CHECK(sb.dead_after_ms == 700);
    // Options honoured.
    CHECK(t.host_count() == 5);
    CHECK(t.backend_count() == 3);
    CHECK(t.blkdev_count() == 7);
    CHECK(t.channel_count() == 3);
    CHECK(sb.channel.data_size == (128u << 10));
    CHECK(sb.channel.sq_entries == 32);
    CHECK(sb.channel.cq_entries == 128);
    CHECK(t.mode().checksum == v.checksum);
    CHECK(t.mode().flush == v.flush);
    CHECK(((sb.features_incompat & kFeatureChecksum) != 0) == v.checksum);
    CHECK(((sb.features_incompat & kFeatureFlush) != 0) == v.flush);
    // Accessors land where the geometry says and refuse out-of-range indices.
    CHECK(reinterpret_cast<std::byte*>(&t.host(4)) == t.region().base() + sb.hosts.offset + 4 * sb.hosts.slot_size);
    CHECK(reinterpret_cast<std::byte*>(&t.backend(2)) ==
          t.region().base() + sb.backends.offset + 2 * sb.backends.slot_size);
    CHECK(reinterpret_cast<std::byte*>(&t.blkdev(6)) ==
          t.region().base() + sb.blkdevs.offset + 6 * sb.blkdevs.slot_size);
    CHECK(t.channel_base(2) == t.region().base() + sb.channels.offset + 2ull * sb.channels.slot_size);
    CHECK(reinterpret_cast<std::byte*>(&t.channel_control(1)) == t.channel_base(1));
    CHECK(t.channel_base(2) + sb.channels.slot_size <= t.region().base() + t.region().size());
    CHECK_THROWS_AS(t.host(5), std::out_of_range);
    CHECK_THROWS_AS(t.backend(3), std::out_of_range);
    CHECK_THROWS_AS(t.blkdev(7), std::out_of_range);
    CHECK_THROWS_AS(t.channel_control(3), std::out_of_range);
    CHECK_THROWS_AS(t.channel_base(0xffffffffu), std::out_of_range);
    // A fresh format leaves every slot free and every channel unset.
    for (std::uint32_t i = 0; i < t.host_count(); ++i) CHECK(t.host(i).header.state == 0);
    for (std::uint32_t i = 0; i < t.channel_count(); ++i) CHECK(t.channel_control(i).generation == 0);
  }
}

TEST_CASE("transport: channels=0 fits as many channels as the size allows, at most 64") {
  FormatOptions o = cbd::test::small_options();
  o.channels = 0;
  o.data_size = 1 << 20;
  {
    ShmFile file("auto");
    Transport t = cbd::test::make_transport(file, o, 8 << 20);
    const Superblock& sb = t.superblock();
    CHECK(t.channel_count() >= 1);
    // No room for one more.
    CHECK(sb.channels.offset + std::uint64_t{sb.channels.slot_size} * (t.channel_count() + 1) > sb.region_size);
  }
  {
    o.data_size = 4096;
    ShmFile file("auto64");
    Transport t = cbd::test::make_transport(file, o, 64 << 20);
    CHECK(t.channel_count() == 64);
  }
  // Too small for even one channel: format explains.
  std::string message = error_of([&] { plan_format(o, 16 << 10); });
  CHECK(message.find("no room for one channel") != std::string::npos);
  // Bad options are refused before anything is written.
  FormatOptions bad = o;
  bad.data_size = 1000;
  CHECK(error_of([&] { plan_format(bad, 8 << 20); }).find("multiple of 4096") != std::string::npos);
  bad = o;
  bad.sq_entries = 100;
  CHECK(error_of([&] { plan_format(bad, 8 << 20); }).find("powers of two") != std::string::npos);
}

TEST_CASE("transport: format refuses to overwrite without force, succeeds with force") {
  ShmFile file("force");
  FormatOptions o = cbd::test::small_options();
  Region region = create_region(file, 4 << 20);
  format(region, o);
  Superblock first;
  std::memcpy(&first, region.base(), sizeof first);
  // Mark a slot as used: a forced format must clear it.
  Transport(Region::open(file.path())).host(1).header.state = 0x105;

  std::string message = error_of([&] { format(region, o); });
  CHECK(message.find("already formatted") != std::string::npos);
  CHECK(message.find("force") != std::string::npos);
  CHECK(message.find(file.path()) != std::string::npos);
  Superblock after_refusal;
  std::memcpy(&after_refusal, region.base(), sizeof after_refusal);
  CHECK(std::memcmp(&first, &after_refusal, sizeof first) == 0);  // untouched
  CHECK(Transport::attach(file.path()).host(1).header.state == 0x105);

  o.force = true;
  o.hosts = 6;
  CHECK_NOTHROW(format(region, o));
  Transport t = Transport::attach(file.path());
  CHECK(t.host_count() == 6);
  CHECK(t.host(1).header.state == 0);
  // A new format has a new UUID.
  CHECK(std::memcmp(first.uuid, t.superblock().uuid, sizeof first.uuid) != 0);
}

TEST_CASE("transport: attach refuses each kind of bad superblock with its own message") {
  ShmFile file("refuse");
  const std::uint64_t size = 4 << 20;
  {
    Region region = create_region(file, size);
    format(region, cbd::test::small_options());
  }
  const Superblock good = read_superblock(file.path());
  REQUIRE(attach_error(file.path()).empty());

  std::string bad_magic, bad_version, bad_checksum, bad_feature, too_large, too_large_region, inconsistent;

  SUBCASE("each defect alone") {
    Superblock sb = good;
    sb.magic ^= 1;
    write_superblock(file.path(), sb, true);
    bad_magic = attach_error(file.path());
    CHECK(bad_magic.find("bad magic") != std::string::npos);

    sb = good;
    sb.version_major = kVersionMajor + 1;
    write_superblock(file.path(), sb, true);
    bad_version = attach_error(file.path());
    CHECK(bad_version.find("unknown format version") != std::string::npos);
    CHECK(bad_version.find(std::to_string(kVersionMajor + 1) + ".") != std::string::npos);

    sb = good;
    sb.uuid[3] ^= 0x40;  // any covered byte, checksum left stale
    write_superblock(file.path(), sb, false);
    bad_checksum = attach_error(file.path());
    CHECK(bad_checksum.find("checksum mismatch") != std::string::npos);
    sb = good;
    sb.checksum ^= 0x10000;
    write_superblock(file.path(), sb, false);
    CHECK(attach_error(file.path()).find("checksum mismatch") != std::string::npos);

    sb = good;
    sb.features_incompat |= 1ull << 17;
    write_superblock(file.path(), sb, true);
    bad_feature = attach_error(file.path());
    CHECK(bad_feature.find("unknown incompatible feature") != std::string::npos);
    CHECK(bad_feature.find("0x20000") != std::string::npos);  // names the unknown bit

    // The superblock claims more bytes than the mapping has.
    sb = good;
    sb.region_size = size * 2;
    write_superblock(file.path(), sb, true);
    too_large_region = attach_error(file.path());
    CHECK(too_large_region.find("geometry larger than the mapping") != std::string::npos);

    // The file shrank after formatting: a valid superblock, a short mapping.
    write_superblock(file.path(), good, false);
    REQUIRE(::truncate(file.path().c_str(), static_cast<off_t>(size / 2)) == 0);
    too_large = attach_error(file.path());
    CHECK(too_large.find("geometry larger than the mapping") != std::string::npos);
    REQUIRE(::truncate(file.path().c_str(), static_cast<off_t>(size)) == 0);
    CHECK(attach_error(file.path()).empty());

    // Self-contradicting geometry (ring size not a power of two).
    sb = good;
    sb.channel.sq_entries = 3;
    write_superblock(file.path(), sb, true);
    inconsistent = attach_error(file.path());
    CHECK(inconsistent.find("inconsistent geometry") != std::string::npos);
    // Overlapping areas.
    sb = good;
    sb.backends.offset = sb.hosts.offset;
    write_superblock(file.path(), sb, true);
    CHECK(attach_error(file.path()).find("inconsistent geometry") != std::string::npos);
    // A channel slot too small for its rings and data.
    sb = good;
    sb.channels.slot_size = static_cast<std::uint32_t>(sb.channel.data_offset);
    write_superblock(file.path(), sb, true);
    CHECK(attach_error(file.path()).find("inconsistent geometry") != std::string::npos);

    // Every message is distinct and names the transport.
    std::set<std::string> messages{bad_magic, bad_version, bad_checksum, bad_feature, too_large, inconsistent};
    CHECK(messages.size() == 6);
    for (const std::string& m : messages) {
      CAPTURE(m);
      CHECK(m.find(file.path()) != std::string::npos);
    }
    // Each defect is reported as itself, not as another one.
    CHECK(bad_version.find("checksum") == std::string::npos);
    CHECK(bad_feature.find("checksum") == std::string::npos);
    CHECK(too_large.find("checksum") == std::string::npos);
    CHECK(bad_checksum.find("magic") == std::string::npos);
  }

  SUBCASE("compatible differences are accepted") {
    Superblock sb = good;
    sb.version_minor = kVersionMinor + 3;
    sb.features_compat = 0xff00;
    write_superblock(file.path(), sb, true);
    CHECK(attach_error(file.path()).empty());
  }

  SUBCASE("a zeroed region is not a transport") {
    {
      Region region = Region::open(file.path());
      std::memset(region.base(), 0, kPageSize);
    }
    CHECK(attach_error(file.path()).find("bad magic") != std::string::npos);
  }

  SUBCASE("a file grown after formatting still attaches") {
    REQUIRE(::truncate(file.path().c_str(), static_cast<off_t>(size * 2)) == 0);
    CHECK(attach_error(file.path()).empty());
  }
}

TEST_CASE("transport: a mapping smaller than a page is refused") {
  ShmFile file("tiny");
  Region region = create_region(file, 100);
  CHECK(region.size() == 100);
  std::string message = error_of([&] { Transport t(std::move(region)); });
  CHECK(message.find("too small") != std::string::npos);
}

TEST_CASE("region: open refuses what it cannot map, with a clear message") {
  SUBCASE("missing file without create") {
    ShmFile file("missing");
    std::string message = error_of([&] { Region::open(file.path()); });
    CHECK(message.find(file.path()) != std::string::npos);
    CHECK(message.find("does not exist") != std::string::npos);
    CHECK(::access(file.path().c_str(), F_OK) != 0);  // not created behind our back
  }
  SUBCASE("a directory") {
    char dir[] = "/dev/shm/cbd-unit-dir-XXXXXX";
    REQUIRE(::mkdtemp(dir) != nullptr);
    std::string message = error_of([&] { Region::open(dir); });
    ::rmdir(dir);
    CAPTURE(message);
    CHECK(message.find(dir) != std::string::npos);
    CHECK(message.find("directory") != std::string::npos);
  }
  SUBCASE("an empty file without a size") {
    ShmFile file("empty");
    int fd = ::open(file.path().c_str(), O_CREAT | O_RDWR, 0600);
    REQUIRE(fd >= 0);
    ::close(fd);
    std::string message = error_of([&] { Region::open(file.path()); });
    CHECK(message.find("empty") != std::string::npos);
  }
  SUBCASE("a FIFO") {
    ShmFile file("fifo");
    REQUIRE(::mkfifo(file.path().c_str(), 0600) == 0);
    std::string message = error_of([&] { Region::open(file.path()); });
    CHECK(message.find("not a regular file, device-DAX device or PCI resource file") != std::string::npos);
  }
  SUBCASE("a character device that is not device-DAX (the DAX refusal path)") {
    for (const char* device : {"/dev/null", "/dev/zero"}) {
      CAPTURE(device);
      struct stat st{};
      if (::stat(device, &st) != 0 || !S_ISCHR(st.st_mode)) continue;
      std::string message = error_of([&] { Region::open(device); });
      CHECK(message.find("does not know as device-DAX") != std::string::npos);
      CHECK(message.find(device) != std::string::npos);
      CHECK(query_device_dax(device).size == 0);
    }
  }
}

TEST_CASE("region: regular files are created, grown and never mistaken for PCI BARs") {
  ShmFile file("create");
  {
    RegionOptions ro;
    ro.create = true;
    ro.size = 1 << 20;
    Region region = Region::open(file.path(), ro);
    CHECK(region.size() == (1u << 20));
    CHECK(region.kind() == RegionKind::File);
    CHECK(std::string(region_kind_name(region.kind())) == "file");
    CHECK(region.path() == file.path());
    region.base()[12345] = std::byte{0x5a};
  }
  {
    RegionOptions ro;
    ro.size = 2 << 20;  // grow an existing file; contents kept
    Region region = Region::open(file.path(), ro);
    CHECK(region.size() == (2u << 20));
    CHECK(region.base()[12345] == std::byte{0x5a});
  }
  {
    RegionOptions ro;
    ro.size = 4096;  // never shrinks
    Region region = Region::open(file.path(), ro);
    CHECK(region.size() == (2u << 20));
    // Moving a region moves the mapping.
    std::byte* base = region.base();
    Region moved = std::move(region);
    CHECK(moved.base() == base);
    CHECK(region.base() == nullptr);
  }
  CHECK(query_device_dax(file.path()).size == 0);

  // A file named like a BAR resource but outside /sys/devices is a plain file.
  char dir[] = "/dev/shm/cbd-unit-pci-XXXXXX";
  REQUIRE(::mkdtemp(dir) != nullptr);
  std::string resource = std::string(dir) + "/resource2";
  {
    RegionOptions ro;
    ro.create = true;
    ro.size = 1 << 16;
    Region region = Region::open(resource, ro);
    CHECK(region.kind() == RegionKind::File);
  }
  ::unlink(resource.c_str());
  ::rmdir(dir);
  CHECK(std::string(region_kind_name(RegionKind::DeviceDax)) == "device-dax");
  CHECK(std::string(region_kind_name(RegionKind::PciResource)) == "pci-resource");
}

TEST_CASE("transport: read_name/write_name never run past the field") {
  char field[kNameSize];
  write_name(field, "export-a");
  CHECK(read_name(field) == "export-a");
  std::string longer(100, 'x');
  write_name(field, longer);
  CHECK(read_name(field) == std::string(kNameSize, 'x'));  // truncated, not terminated
  write_name(field, "");
  CHECK(read_name(field).empty());
}

// A peer can recompute CRC32C, so a superblock with a valid checksum is still
// input: each forged geometry must be refused, with a message of its own
// that names the field and its value, before anything is mapped through it.
TEST_CASE("transport: forged superblocks with valid checksums are refused, each with its own message") {
  ShmFile file("forged");
  const std::uint64_t size = 4 << 20;
  {
    Region region = create_region(file, size);
    format(region, cbd::test::small_options());
  }
  const Superblock good = read_superblock(file.path());
  REQUIRE(attach_error(file.path()).empty());

  struct Forgery {
    const char* what;
    void (*forge)(Superblock&);
    const char* expected;  // a piece of the message: the field it names
    std::string value;     // the forged value, as the message must print it
  };
  const Forgery forgeries[] = {
      {"an area offset near 2^64", [](Superblock& sb) { sb.hosts.offset = ~std::uint64_t{0} - 4095; },
       "hosts.offset", std::to_string(~std::uint64_t{0} - 4095)},
      {"a channel area offset near 2^64", [](Superblock& sb) { sb.channels.offset = ~std::uint64_t{0} - 4095; },
       "channels.offset", std::to_string(~std::uint64_t{0} - 4095)},
      {"overlapping areas", [](Superblock& sb) { sb.blkdevs.offset = sb.backends.offset; }, "overlaps the backends.offset",
       ""},
      {"an area over the superblock", [](Superblock& sb) { sb.hosts.offset = 0; }, "overlaps the superblock", ""},
      {"count × slot size past the region",
       [](Superblock& sb) {
         sb.channels.count = 4096;
         sb.channels.slot_size = 0xffffffc0u;
       },
       "channels.offset", "4096 slots"},
      {"a region smaller than its areas", [](Superblock& sb) { sb.region_size = sb.channels.offset + 4096; },
       "past region_size", ""},
      {"heartbeat 0x80000001, dead-after 2",
       [](Superblock& sb) {
         sb.heartbeat_interval_ms = 0x80000001u;
         sb.dead_after_ms = 2;
       },
       "heartbeat_interval_ms", std::to_string(0x80000001u)},
      {"dead-after below twice the heartbeat", [](Superblock& sb) { sb.dead_after_ms = sb.heartbeat_interval_ms; },
       "dead_after_ms", std::to_string(good.heartbeat_interval_ms)},
      {"a submission ring over the control block", [](Superblock& sb) { sb.channel.sq_offset = 64; },
       "channel.sq_offset [64,", ""},
      {"a data area past the channel", [](Superblock& sb) { sb.channel.data_offset = sb.channels.slot_size; },
       "runs past the end of the channel", ""},
  };
  std::set<std::string> messages;
  for (const Forgery& forgery : forgeries) {
    CAPTURE(forgery.what);
    Superblock sb = good;
    forgery.forge(sb);
    write_superblock(file.path(), sb, true);
    const std::string message = attach_error(file.path());
    CAPTURE(message);
    CHECK(message.find(file.path()) != std::string::npos);
    CHECK(message.find(forgery.expected) != std::string::npos);
    if (!forgery.value.empty()) CHECK(message.find(forgery.value) != std::string::npos);
    CHECK(message.find("checksum") == std::string::npos);
    messages.insert(message);
  }
  CHECK(messages.size() == std::size(forgeries));
  write_superblock(file.path(), good, false);
  CHECK(attach_error(file.path()).empty());
}

TEST_CASE("transport: format refuses heartbeat and dead-after values outside their ranges") {
  ShmFile file("timing");
  Region region = create_region(file, 4 << 20);
  FormatOptions o = cbd::test::small_options();
  o.heartbeat_interval_ms = 5;
  CHECK(error_of([&] { format(region, o); }).find("heartbeat_interval_ms 5") != std::string::npos);
  o.heartbeat_interval_ms = 100;
  o.dead_after_ms = 700'000;
  CHECK(error_of([&] { format(region, o); }).find("dead_after_ms 700000") != std::string::npos);
  o.dead_after_ms = 200;
  CHECK(error_of([&] { format(region, o); }).empty());
}
