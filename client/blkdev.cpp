#include "client/blkdev.hpp"

#include <unistd.h>

#include <cerrno>

#include "common/error.hpp"
#include "common/flush_ranges.hpp"
#include "common/log.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"

namespace cbd::proxy {
namespace {

std::string local_hostname() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "localhost";
  return name;
}

template <typename Slot>
SlotClaim claim_first_free(std::uint32_t count, Slot& (Transport::*slot)(std::uint32_t) const,
                           const Transport& transport, std::uint32_t owner_host) {
  for (std::uint32_t i = 0; i < count; ++i) {
    SlotHeader& header = (transport.*slot)(i).header;
    if (auto word = try_claim(header, owner_host)) return SlotClaim(&header, i, *word);
  }
  return {};
}

}  // namespace

std::optional<ExportInfo> read_backend_export(const Transport& transport, std::uint32_t backend_id,
                                              std::uint64_t* epoch) {
  if (backend_id >= transport.backend_count()) return std::nullopt;
  const BackendSlot& slot = transport.backend(backend_id);
  refresh_lines(&slot, sizeof slot);  // flush mode: the backend wrote it back
  std::uint64_t word = load_acquire(slot.header.state);
  if (state_of(word) != SlotState::Live) return std::nullopt;
  // export_size is stored last (release) by the backend: nonzero means the
  // other fields are published.
  std::uint64_t size = load_acquire(slot.export_size);
  if (size == 0) return std::nullopt;
  ExportInfo info;
  info.name = read_name(slot.export_name);
  info.size = size;
  info.block_min = load_relaxed(slot.block_min);
  info.block_preferred = load_relaxed(slot.block_preferred);
  info.block_max = load_relaxed(slot.block_max);
  info.caps = load_relaxed(slot.caps);
  // Published by a peer: keep the block sizes within what NBD allows.
  auto power_of_two = [](std::uint32_t v) { return v && !(v & (v - 1)); };
  if (!power_of_two(info.block_min) || info.block_min > 65536) info.block_min = 1;
  if (!power_of_two(info.block_preferred) || info.block_preferred < info.block_min) info.block_preferred = 4096;
  if (info.block_preferred < info.block_min) info.block_preferred = info.block_min;
  if (info.block_max < info.block_preferred || info.block_max > (32u << 20)) info.block_max = 32u << 20;
  if (load_acquire(slot.header.state) != word) return std::nullopt;  // changed hands while we read
  if (epoch) *epoch = epoch_of(word);
  return info;
}

Blkdev::Blkdev(const Transport& transport, const BlkdevOptions& options)
    : transport_(transport),
      options_(options),
      backend_observer_(std::chrono::milliseconds(transport.superblock().dead_after_ms)) {
  const std::string where = "transport " + transport.path();
  if (options.backend_id >= transport.backend_count())
    throw Error(where + ": backend=" + std::to_string(options.backend_id) + " is out of range (the transport has " +
                std::to_string(transport.backend_count()) + " backend slots)");
  std::uint64_t epoch = 0;
  auto exported = read_backend_export(transport, options.backend_id, &epoch);
  if (!exported)
    throw Error(where + ": backend " + std::to_string(options.backend_id) +
                " is not live — start `nbdkit cbd transport=" + transport.path() + " ...` on the storage node first "
                "(`cbd-proxy list` shows the backends)");
  info_ = *exported;
  if (!options.export_name.empty()) info_.name = options.export_name;
  if (options.readonly) info_.caps |= kCapReadOnly;
  bound_epoch_ = epoch;

  host_ = claim_first_free(transport.host_count(), &Transport::host, transport, kNoSlot);
  if (!host_) throw Error(where + ": no free host slot — run `cbd-proxy gc` to reclaim dead ones");
  write_name(transport.host(host_.index()).hostname, options.hostname.empty() ? local_hostname() : options.hostname);
  blkdev_ = claim_first_free(transport.blkdev_count(), &Transport::blkdev, transport, host_.index());
  if (!blkdev_) throw Error(where + ": no free blkdev slot — run `cbd-proxy gc` to reclaim dead ones");
  BlkdevSlot& blkdev = transport.blkdev(blkdev_.index());
  store_relaxed(blkdev.backend_id, options.backend_id);
  store_relaxed(blkdev.backend_epoch, epoch);
  store_relaxed(blkdev.kernel_device, 0u);  // a former owner killed while serving /dev/nbdN left it set
  publish_lines(&blkdev, sizeof blkdev);

  // Heartbeats start before binding: the backend judges our channels by them.
  heartbeat_ = std::make_unique<PeriodicThread>(
      std::chrono::milliseconds(transport.superblock().heartbeat_interval_ms), [this] { beat(); });

  std::vector<SlotClaim> channels;
  for (std::uint32_t i = 0; i < transport.channel_count() && channels.size() < options.queues; ++i) {
    SlotHeader& header = transport.channel_control(i).header;
    if (auto word = try_claim(header, host_.index())) channels.emplace_back(&header, i, *word);
  }
  if (channels.empty())
    throw Error(where + ": no free channel — every channel is in use; run `cbd-proxy gc` or format with more channels");
  if (channels.size() < options.queues)
    log(LogLevel::Warning, "only %zu of %u channels were free; serving with %zu queues", channels.size(),
        options.queues, channels.size());
  store_relaxed(blkdev.queue_count, static_cast<std::uint32_t>(channels.size()));
  publish_lines(&blkdev, sizeof blkdev);

  Binding binding{options.backend_id, blkdev_.index(), epoch};
  for (SlotClaim& claim : channels) {
    auto queue = std::make_shared<ChannelQueue>(transport, std::move(claim), info_, options.poll);
    queues_.push_back(queue);
    std::lock_guard lock(beats_mutex_);
    channel_beats_.push_back({&queue->claim().header(), queue->claim().word(), initial_heartbeat(queue->claim().word())});
  }
  for (auto& queue : queues_) {
    // The handlers cannot answer a refusal through shared memory: a backend
    // that does not serve this host (allow-hosts=) simply never attaches.
    // Name that cause and the host name it judges by.
    if (!queue->bind(binding, options.attach_timeout))
      throw Error(where + ": backend " + std::to_string(options.backend_id) + " did not attach channel " +
                  std::to_string(queue->index()) + " within " + std::to_string(options.attach_timeout.count()) +
                  " ms — if it was started with allow-hosts=, this host (\"" +
                  read_name(transport.host(host_.index()).hostname) +
                  "\") is not in the list (set hostname= or extend allow-hosts=); otherwise its handlers are stuck");
  }
  watcher_ = std::make_unique<PeriodicThread>(std::chrono::milliseconds(50), [this] { watch_backend(); });
}

Blkdev::~Blkdev() {
  watcher_.reset();
  // Queues finish what is in flight and release their channels; then the
  // heartbeat stops and the blkdev and host slots are released.
  queues_.clear();
  heartbeat_.reset();
}

std::shared_ptr<RequestTarget> Blkdev::next_target() {
  return queues_[next_queue_.fetch_add(1) % queues_.size()];
}

void Blkdev::beat() {
  host_.beat();
  blkdev_.beat();
  // Not through queues_: the destructor clears it (each queue draining, then
  // releasing its channel) while this thread keeps beating the channels that
  // are left; a released channel is no longer ours to beat.
  std::lock_guard lock(beats_mutex_);
  for (ChannelBeat& channel : channel_beats_) cbd::beat(*channel.header, channel.word, channel.last);
}

void Blkdev::watch_backend() {
  // A process stalled for longer than dead-after-ms (SIGSTOP, a paused VM,
  // an overloaded machine) is judged dead and its slots are reclaimed, by
  // the backend or by `cbd-proxy gc`, and may be claimed by someone else.
  // Using a reclaimed channel would share it with its new owner: stop for
  // good and fail every request instead.
  if (lost_) return;
  bool owned = host_.owned() && blkdev_.owned();
  for (auto& queue : queues_) owned = owned && queue->claim().owned();
  if (!owned) {
    log(LogLevel::Error, "blkdev %u: our slots were reclaimed (this process was judged dead: stalled for over %u ms?); "
        "failing every request with EIO — restart cbd-proxy", blkdev_.index(), transport_.superblock().dead_after_ms);
    for (auto& queue : queues_) queue->fail_outstanding(EIO);
    lost_ = true;
    return;
  }
  const BackendSlot& slot = transport_.backend(options_.backend_id);
  Liveness liveness = backend_observer_.observe(options_.backend_id, slot.header);
  std::uint64_t epoch = 0;
  auto exported = read_backend_export(transport_, options_.backend_id, &epoch);
  auto now = std::chrono::steady_clock::now();

  if (exported && liveness == Liveness::Alive && epoch != bound_epoch_) {
    if (exported->size != info_.size) {
      if (!backend_gone_since_) backend_gone_since_ = now;
      static RateLimit size_log(std::chrono::seconds(10));
      if (size_log.allow())
        log(LogLevel::Error, "backend %u came back with size %llu instead of %llu; not re-attaching",
            options_.backend_id, static_cast<unsigned long long>(exported->size),
            static_cast<unsigned long long>(info_.size));
    } else {
      log(LogLevel::Info, "backend %u restarted (epoch %llu); re-attaching %zu channels", options_.backend_id,
          static_cast<unsigned long long>(epoch), queues_.size());
      bool all = true;
      for (auto& queue : queues_) all = queue->rebind(epoch, options_.attach_timeout) && all;
      if (all) {
        bound_epoch_ = epoch;
        store_relaxed(transport_.blkdev(blkdev_.index()).backend_epoch, epoch);
        backend_gone_since_.reset();
        failed_ = false;
        return;
      }
    }
  }
  bool healthy = exported && liveness == Liveness::Alive && epoch == bound_epoch_;
  if (healthy) {
    backend_gone_since_.reset();
    return;
  }
  if (!backend_gone_since_) {
    backend_gone_since_ = now;
    log(LogLevel::Warning, "backend %u is not serving; holding requests for up to %lld ms", options_.backend_id,
        static_cast<long long>(options_.backend_timeout.count()));
  }
  if (!failed_ && now - *backend_gone_since_ >= options_.backend_timeout) {
    log(LogLevel::Error, "backend %u did not return within %lld ms; failing outstanding and new requests with EIO",
        options_.backend_id, static_cast<long long>(options_.backend_timeout.count()));
    for (auto& queue : queues_) queue->fail_outstanding(EIO);
    failed_ = true;
  }
}

}  // namespace cbd::proxy
