#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

#include "client/commands.hpp"
#include "client/slot_survey.hpp"
#include "common/channel.hpp"
#include "common/flush_ranges.hpp"
#include "common/printable.hpp"
#include "common/region.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"
#include "common/transport.hpp"

namespace cbd::proxy {

const std::vector<ParameterSpec> kListParameters = {
    {"transport", kDefaultTransport, "the transport to describe"},
};

namespace {

// Key order as documented in cbd-proxy(1); the values are what the slots
// hold, peer-written names exactly (as UTF-8; bytes that are not UTF-8
// become U+FFFD when the document is written).
using Json = nlohmann::ordered_json;

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

// One slot as a JSON object and as a text line.  The slot is read once for
// both, so they agree; names a peer wrote go through printable() in the
// text line only.
struct Described {
  Json json;
  std::string text;
};

Described describe_slot(const Transport& t, const SurveyedSlot& s) {
  const SlotHeader& h = *s.header;
  // Flush mode: read the whole slot (or control block) from memory.
  static_assert(sizeof(HostSlot) == sizeof(BackendSlot) && sizeof(HostSlot) == sizeof(BlkdevSlot));
  refresh_lines(&h, s.kind == SlotKind::Channel ? sizeof(ChannelControl) : sizeof(HostSlot));
  const std::uint32_t owner_host = load_relaxed(h.owner_host);
  const std::uint64_t owner_pid = load_relaxed(h.owner_pid);
  Json json = {{"id", s.index},
               {"state", slot_state_name(state_of(s.word))},
               {"epoch", epoch_of(s.word)},
               {"alive", s.alive},
               {"owner_host", owner_host == kNoSlot ? Json(nullptr) : Json(owner_host)},
               {"owner_pid", owner_pid}};
  std::string text = std::string(slot_kind_name(s.kind)) + " " + u64(s.index) + ": " + slot_state_name(state_of(s.word)) +
                     ", " + (s.alive ? "alive" : "dead") + ", epoch " + u64(epoch_of(s.word)) + ", pid " + u64(owner_pid);
  switch (s.kind) {
    case SlotKind::Host: {
      std::string name = read_name(t.host(s.index).hostname);
      json["hostname"] = name;
      text += ", hostname " + printable(name);
      break;
    }
    case SlotKind::Backend: {
      const BackendSlot& b = t.backend(s.index);
      std::string name = read_name(b.export_name);
      const std::uint64_t size = load_acquire(b.export_size);
      const std::string caps = caps_text(load_relaxed(b.caps));
      json["export"] = name;
      json["size"] = size;
      json["block_min"] = load_relaxed(b.block_min);
      json["block_preferred"] = load_relaxed(b.block_preferred);
      json["block_max"] = load_relaxed(b.block_max);
      json["caps"] = caps;
      text += ", export \"" + printable(name) + "\", size " + u64(size) + " bytes, host " + u64(owner_host) + ", caps " +
              caps;
      break;
    }
    case SlotKind::Blkdev: {
      const BlkdevSlot& d = t.blkdev(s.index);
      const std::uint32_t backend = load_relaxed(d.backend_id);
      const std::uint32_t queues = load_relaxed(d.queue_count);
      json["backend"] = backend;
      json["backend_epoch"] = load_relaxed(d.backend_epoch);
      json["queues"] = queues;
      // The kernel nbd device it serves (device=): 1 + N of /dev/nbdN, 0 = none.
      const std::uint32_t kernel_device = load_acquire(d.kernel_device);
      const std::string nbd = kernel_device ? "/dev/nbd" + u64(kernel_device - 1) : "";
      if (nbd.empty()) json["device"] = nullptr; else json["device"] = nbd;
      text += ", backend " + u64(backend) + ", " + u64(queues) + " queues";
      if (!nbd.empty()) text += ", device " + nbd;
      break;
    }
    case SlotKind::Channel: {
      const ChannelControl& c = t.channel_control(s.index);
      bool attached = load_acquire(c.attached_generation) == load_acquire(c.generation) && load_relaxed(c.generation) != 0;
      const std::uint64_t requests = load_relaxed(c.requests), bytes = load_relaxed(c.bytes),
                          errors = load_relaxed(c.errors), in_flight = load_relaxed(c.in_flight);
      json["backend"] = load_relaxed(c.backend_id);
      json["blkdev"] = load_relaxed(c.blkdev_id);
      json["backend_epoch"] = load_relaxed(c.backend_epoch);
      json["generation"] = load_relaxed(c.generation);
      // The epoch of the backend instance that attached last: which one
      // serves (or last served) the channel.
      json["handler_backend_epoch"] = load_relaxed(c.handler_backend_epoch);
      json["attached"] = attached;
      json["requests"] = requests;
      json["bytes"] = bytes;
      json["errors"] = errors;
      json["in_flight"] = in_flight;
      json["handler_completed"] = load_relaxed(c.handler_completed);
      json["handler_errors"] = load_relaxed(c.handler_errors);
      // Whether the handler sleeps on a doorbell this queue side rings
      // (docs/design.md, Polling and doorbells): only when both share a
      // kernel.  What the attached handler announced; nothing otherwise.
      const bool doorbell = attached && load_relaxed(c.handler_doorbell) != 0;
      const bool wakes_queue =
          attached && load_relaxed(c.handler_wakes_queue) == rings_tag(load_relaxed(c.generation));
      json["doorbell"] = doorbell;
      json["wakes_queue"] = wakes_queue;
      text += ", backend " + u64(json["backend"].get<std::uint64_t>()) + ", blkdev " +
              u64(json["blkdev"].get<std::uint64_t>()) + (attached ? ", attached" : ", not attached") + ", requests " +
              u64(requests) + ", bytes " + u64(bytes) + ", errors " + u64(errors) + ", in flight " + u64(in_flight) +
              (doorbell ? ", doorbell" : "") + (wakes_queue ? ", wakes queue" : "");
      break;
    }
  }
  return {std::move(json), std::move(text)};
}

Json area_json(const AreaGeometry& a) {
  return {{"offset", a.offset}, {"slot_size", a.slot_size}, {"count", a.count}};
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
  if (json) {
    Json document;
    document["transport"] = transport.path();
    document["geometry"] = {{"version", u64(sb.version_major) + "." + u64(sb.version_minor)},
                            {"uuid", uuid},
                            {"region_size", sb.region_size},
                            {"checksum", transport.mode().checksum},
                            {"flush", transport.mode().flush},
                            {"heartbeat_interval_ms", sb.heartbeat_interval_ms},
                            {"dead_after_ms", sb.dead_after_ms},
                            {"hosts", area_json(sb.hosts)},
                            {"backends", area_json(sb.backends)},
                            {"blkdevs", area_json(sb.blkdevs)},
                            {"channels", area_json(sb.channels)},
                            {"channel",
                             {{"sq_entries", sb.channel.sq_entries},
                              {"cq_entries", sb.channel.cq_entries},
                              {"data_size", sb.channel.data_size}}}};
    for (SlotKind kind : {SlotKind::Host, SlotKind::Backend, SlotKind::Blkdev, SlotKind::Channel}) {
      Json& list = document[std::string(slot_kind_name(kind)) + "s"] = Json::array();
      for (const auto& s : slots)
        if (s.kind == kind) list.push_back(describe_slot(transport, s).json);
    }
    // Names are exact when they are UTF-8; other bytes become U+FFFD rather
    // than an invalid document.
    std::string out = document.dump(2, ' ', false, Json::error_handler_t::replace);
    std::fputs((out + "\n").c_str(), stdout);
    return 0;
  }
  std::printf("transport %s (format %u.%u, uuid %s)\n", printable(transport.path()).c_str(), sb.version_major, sb.version_minor, uuid);
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
