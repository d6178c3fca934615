#include <cstdio>
#include <string>

#include "client/commands.hpp"
#include "client/slot_survey.hpp"
#include "common/region.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"
#include "common/transport.hpp"

namespace cbd::proxy {

const std::vector<ParameterSpec> kListParameters = {
    {"transport", kDefaultTransport, "the transport to describe"},
};

namespace {

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c >= 0x7f) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out += escaped;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string caps_text(std::uint32_t caps) {
  static const std::pair<std::uint32_t, const char*> names[] = {
      {kCapReadOnly, "readonly"}, {kCapFlush, "flush"},     {kCapFua, "fua"},
      {kCapTrim, "trim"},         {kCapZero, "zero"},       {kCapFastZero, "fast-zero"},
      {kCapExtents, "extents"},   {kCapCache, "cache"},     {kCapMultiConn, "multi-conn"},
      {kCapRotational, "rotational"}};
  std::string out;
  for (auto [bit, name] : names)
    if (caps & bit) out += (out.empty() ? "" : ",") + std::string(name);
  return out;
}

std::string u64(std::uint64_t v) { return std::to_string(v); }

// One slot as JSON fields (without braces) and as a text line.
struct Described {
  std::string json;
  std::string text;
};

Described describe_slot(const Transport& t, const SurveyedSlot& s) {
  const SlotHeader& h = *s.header;
  std::string common = "\"id\": " + u64(s.index) + ", \"state\": " + json_string(slot_state_name(state_of(s.word))) +
                       ", \"epoch\": " + u64(epoch_of(s.word)) + ", \"alive\": " + (s.alive ? "true" : "false") +
                       ", \"owner_host\": " + (load_relaxed(h.owner_host) == kNoSlot ? std::string("null") : u64(load_relaxed(h.owner_host))) +
                       ", \"owner_pid\": " + u64(load_relaxed(h.owner_pid));
  std::string text = std::string(slot_kind_name(s.kind)) + " " + u64(s.index) + ": " + slot_state_name(state_of(s.word)) +
                     ", " + (s.alive ? "alive" : "dead") + ", epoch " + u64(epoch_of(s.word)) + ", pid " +
                     u64(load_relaxed(h.owner_pid));
  switch (s.kind) {
    case SlotKind::Host: {
      std::string name = read_name(t.host(s.index).hostname);
      common += ", \"hostname\": " + json_string(name);
      text += ", hostname " + name;
      break;
    }
    case SlotKind::Backend: {
      const BackendSlot& b = t.backend(s.index);
      std::string name = read_name(b.export_name);
      common += ", \"export\": " + json_string(name) + ", \"size\": " + u64(load_acquire(b.export_size)) +
                ", \"block_min\": " + u64(load_relaxed(b.block_min)) + ", \"block_preferred\": " +
                u64(load_relaxed(b.block_preferred)) + ", \"block_max\": " + u64(load_relaxed(b.block_max)) +
                ", \"caps\": " + json_string(caps_text(load_relaxed(b.caps)));
      text += ", export \"" + name + "\", size " + u64(load_acquire(b.export_size)) + " bytes, host " +
              u64(load_relaxed(h.owner_host)) + ", caps " + caps_text(load_relaxed(b.caps));
      break;
    }
    case SlotKind::Blkdev: {
      const BlkdevSlot& d = t.blkdev(s.index);
      common += ", \"backend\": " + u64(load_relaxed(d.backend_id)) + ", \"backend_epoch\": " +
                u64(load_relaxed(d.backend_epoch)) + ", \"queues\": " + u64(load_relaxed(d.queue_count));
      // The kernel nbd device it serves (device=): 1 + N of /dev/nbdN, 0 = none.
      const std::uint32_t kernel_device = load_acquire(d.kernel_device);
      const std::string nbd = kernel_device ? "/dev/nbd" + u64(kernel_device - 1) : "";
      common += ", \"device\": " + (nbd.empty() ? std::string("null") : json_string(nbd));
      text += ", backend " + u64(load_relaxed(d.backend_id)) + ", " + u64(load_relaxed(d.queue_count)) + " queues";
      if (!nbd.empty()) text += ", device " + nbd;
      break;
    }
    case SlotKind::Channel: {
      const ChannelControl& c = t.channel_control(s.index);
      bool attached = load_acquire(c.attached_generation) == load_acquire(c.generation) && load_relaxed(c.generation) != 0;
      common += ", \"backend\": " + u64(load_relaxed(c.backend_id)) + ", \"blkdev\": " + u64(load_relaxed(c.blkdev_id)) +
                ", \"generation\": " + u64(load_relaxed(c.generation)) + ", \"attached\": " +
                (attached ? "true" : "false") + ", \"requests\": " + u64(load_relaxed(c.requests)) + ", \"bytes\": " +
                u64(load_relaxed(c.bytes)) + ", \"errors\": " + u64(load_relaxed(c.errors)) + ", \"in_flight\": " +
                u64(load_relaxed(c.in_flight)) + ", \"handler_completed\": " + u64(load_relaxed(c.handler_completed)) +
                ", \"handler_errors\": " + u64(load_relaxed(c.handler_errors));
      text += ", backend " + u64(load_relaxed(c.backend_id)) + ", blkdev " + u64(load_relaxed(c.blkdev_id)) +
              (attached ? ", attached" : ", not attached") + ", requests " + u64(load_relaxed(c.requests)) + ", bytes " +
              u64(load_relaxed(c.bytes)) + ", errors " + u64(load_relaxed(c.errors)) + ", in flight " +
              u64(load_relaxed(c.in_flight));
      break;
    }
  }
  return {common, text};
}

}  // namespace

int run_list(const Parameters& p, bool json) {
  Transport transport = Transport::attach(p.text("transport", kDefaultTransport));
  const Superblock& sb = transport.superblock();
  auto watch = std::chrono::milliseconds(sb.heartbeat_interval_ms * 5 / 2 + 50);
  std::vector<SurveyedSlot> slots = survey_slots(transport, watch);

  char uuid[40];
  std::snprintf(uuid, sizeof uuid, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", sb.uuid[0],
                sb.uuid[1], sb.uuid[2], sb.uuid[3], sb.uuid[4], sb.uuid[5], sb.uuid[6], sb.uuid[7], sb.uuid[8],
                sb.uuid[9], sb.uuid[10], sb.uuid[11], sb.uuid[12], sb.uuid[13], sb.uuid[14], sb.uuid[15]);
  auto area = [](const AreaGeometry& a) {
    return "{\"offset\": " + u64(a.offset) + ", \"slot_size\": " + u64(a.slot_size) + ", \"count\": " + u64(a.count) + "}";
  };
  if (json) {
    std::string out = "{\n  \"transport\": " + json_string(transport.path()) + ",\n  \"geometry\": {\"version\": \"" +
                      u64(sb.version_major) + "." + u64(sb.version_minor) + "\", \"uuid\": \"" + uuid +
                      "\", \"region_size\": " + u64(sb.region_size) + ", \"checksum\": " +
                      (transport.mode().checksum ? "true" : "false") + ", \"flush\": " +
                      (transport.mode().flush ? "true" : "false") + ", \"heartbeat_interval_ms\": " +
                      u64(sb.heartbeat_interval_ms) + ", \"dead_after_ms\": " + u64(sb.dead_after_ms) +
                      ", \"hosts\": " + area(sb.hosts) + ", \"backends\": " + area(sb.backends) + ", \"blkdevs\": " +
                      area(sb.blkdevs) + ", \"channels\": " + area(sb.channels) + ", \"channel\": {\"sq_entries\": " +
                      u64(sb.channel.sq_entries) + ", \"cq_entries\": " + u64(sb.channel.cq_entries) +
                      ", \"data_size\": " + u64(sb.channel.data_size) + "}}";
    for (SlotKind kind : {SlotKind::Host, SlotKind::Backend, SlotKind::Blkdev, SlotKind::Channel}) {
      out += ",\n  \"" + std::string(slot_kind_name(kind)) + "s\": [";
      bool first = true;
      for (const auto& s : slots) {
        if (s.kind != kind) continue;
        out += std::string(first ? "\n" : ",\n") + "    {" + describe_slot(transport, s).json + "}";
        first = false;
      }
      out += first ? "]" : "\n  ]";
    }
    out += "\n}\n";
    std::fputs(out.c_str(), stdout);
    return 0;
  }
  std::printf("transport %s (format %u.%u, uuid %s)\n", transport.path().c_str(), sb.version_major, sb.version_minor, uuid);
  std::printf("  %llu bytes; %u hosts, %u backends, %u blkdevs, %u channels; channel: sq %u, cq %u, data %llu KiB%s%s\n",
              static_cast<unsigned long long>(sb.region_size), sb.hosts.count, sb.backends.count, sb.blkdevs.count,
              sb.channels.count, sb.channel.sq_entries, sb.channel.cq_entries,
              static_cast<unsigned long long>(sb.channel.data_size >> 10), transport.mode().checksum ? "; checksum" : "",
              transport.mode().flush ? "; flush" : "");
  if (slots.empty()) std::printf("  no slots in use\n");
  for (const auto& s : slots) std::printf("  %s\n", describe_slot(transport, s).text.c_str());
  return 0;
}

}  // namespace cbd::proxy
