#include <cstdio>

#include "client/commands.hpp"
#include "common/region.hpp"
#include "common/transport.hpp"

namespace cbd::proxy {

const std::vector<ParameterSpec> kFormatParameters = {
    {"transport", kDefaultTransport, "file in /dev/shm, /dev/daxX.Y or a PCI resource file"},
    {"size", "256M", "size of a regular-file transport to create (device sizes are fixed)"},
    {"channels", "auto", "number of channels (auto: as many as fit, at most 64)"},
    {"data", "4M", "data area per channel"},
    {"hosts", "16", "host slots"},
    {"backends", "16", "backend slots"},
    {"blkdevs", "16", "blkdev slots"},
    {"sq-entries", "256", "submission ring entries per channel (power of two)"},
    {"cq-entries", "256", "completion ring entries per channel (power of two)"},
    {"checksum", "false", "CRC32C over entries and data, verified by the reader"},
    {"flush", "false", "write back / invalidate cache lines (non-coherent memory; best effort)"},
    {"heartbeat-ms", "200", "heartbeat interval of every slot owner"},
    {"dead-after-ms", "2000", "an owner whose heartbeat stalls this long is dead"},
    {"force", "", "overwrite an already formatted transport"},
};

int run_format(const Parameters& p) {
  FormatOptions options;
  std::string path = p.text("transport", kDefaultTransport);
  options.size = p.size("size", options.size);
  options.channels = static_cast<std::uint32_t>(p.text("channels", "auto") == "auto" ? 0 : p.number("channels", 0));
  options.data_size = p.size("data", options.data_size);
  options.hosts = static_cast<std::uint32_t>(p.number("hosts", options.hosts));
  options.backends = static_cast<std::uint32_t>(p.number("backends", options.backends));
  options.blkdevs = static_cast<std::uint32_t>(p.number("blkdevs", options.blkdevs));
  options.sq_entries = static_cast<std::uint32_t>(p.number("sq-entries", options.sq_entries));
  options.cq_entries = static_cast<std::uint32_t>(p.number("cq-entries", options.cq_entries));
  options.checksum = p.flag("checksum", false);
  options.flush = p.flag("flush", false);
  options.heartbeat_interval_ms = static_cast<std::uint32_t>(p.number("heartbeat-ms", options.heartbeat_interval_ms));
  options.dead_after_ms = static_cast<std::uint32_t>(p.number("dead-after-ms", options.dead_after_ms));
  options.force = p.flag("force", false);

  RegionOptions region_options;
  region_options.create = true;
  region_options.size = options.size;
  Region region = Region::open(path, region_options);
  format(region, options);
  Transport transport(std::move(region));
  const Superblock& sb = transport.superblock();
  std::printf("formatted %s: %llu bytes, %u channels of %llu KiB data (sq %u, cq %u), %u hosts, %u backends, %u blkdevs%s%s\n",
              path.c_str(), static_cast<unsigned long long>(sb.region_size), sb.channels.count,
              static_cast<unsigned long long>(sb.channel.data_size >> 10), sb.channel.sq_entries, sb.channel.cq_entries,
              sb.hosts.count, sb.backends.count, sb.blkdevs.count, transport.mode().checksum ? ", checksum" : "",
              transport.mode().flush ? ", flush" : "");
  return 0;
}

}  // namespace cbd::proxy
