#include "client/blkdev.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <thread>

#include "common/error.hpp"
#include "common/flush_ranges.hpp"
#include "common/kernel_identity.hpp"
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

  {
    std::lock_guard lock(claims_mutex_);
    host_ = claim_first_free(transport.host_count(), &Transport::host, transport, kNoSlot);
    if (!host_) throw Error(where + ": no free host slot — run `cbd-proxy gc` to reclaim dead ones");
    write_name(transport.host(host_.index()).hostname,
               options.hostname.empty() ? local_hostname() : options.hostname);
    write_kernel_id(transport.host(host_.index()), local_kernel_id());
    blkdev_ = claim_first_free(transport.blkdev_count(), &Transport::blkdev, transport, host_.index());
    if (!blkdev_) throw Error(where + ": no free blkdev slot — run `cbd-proxy gc` to reclaim dead ones");
    BlkdevSlot& blkdev = transport.blkdev(blkdev_.index());
    store_relaxed(blkdev.backend_id, options.backend_id);
    store_relaxed(blkdev.backend_epoch, epoch);
    store_relaxed(blkdev.kernel_device, 0u);  // a former owner killed while serving /dev/nbdN left it set
    publish_lines(&blkdev, sizeof blkdev);
    blkdev_index_.store(blkdev_.index());
  }

  // Heartbeats start before binding: the backend judges our channels by them.
  heartbeat_ = std::make_unique<PeriodicThread>(
      std::chrono::milliseconds(transport.superblock().heartbeat_interval_ms), [this] { beat(); });

  std::vector<SlotClaim> channels;
  for (std::uint32_t i = 0; i < options.queues; ++i) {
    auto claim = claim_channel(host_.index());
    if (!claim) break;
    channels.push_back(std::move(*claim));
  }
  if (channels.empty())
    throw Error(where + ": no free channel — every channel is in use; run `cbd-proxy gc` or format with more channels");
  if (channels.size() < options.queues)
    log(LogLevel::Warning, "only %zu of %u channels were free; serving with %zu queues", channels.size(),
        options.queues, channels.size());
  store_relaxed(transport.blkdev(blkdev_.index()).queue_count, static_cast<std::uint32_t>(channels.size()));
  publish_lines(&transport.blkdev(blkdev_.index()), sizeof(BlkdevSlot));

  for (SlotClaim& claim : channels) {
    {
      std::lock_guard lock(claims_mutex_);
      channel_beats_.push_back({&claim.header(), claim.index(), claim.word(), initial_heartbeat(claim.word())});
    }
    auto engine = std::make_unique<ChannelEngine>(transport, std::move(claim));
    loops_.push_back(std::make_unique<QueueLoop>(std::move(engine), info_, loop_options()));
  }
  set_up_at_ = std::chrono::steady_clock::now();
  for (auto& loop : loops_) loop->set_up(binding());
  const auto deadline = std::chrono::steady_clock::now() + options.attach_timeout;
  for (std::size_t q = 0; q < loops_.size(); ++q) {
    while (!loops_[q]->attached() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    // The handlers cannot answer a refusal through shared memory: a backend
    // that does not serve this host (allow-hosts=) simply never attaches.
    // Name that cause and the host name it judges by.
    if (!loops_[q]->attached())
      throw Error(where + ": backend " + std::to_string(options.backend_id) + " did not attach channel " +
                  std::to_string(channel_beats_[q].index) +
                  " within " + std::to_string(options.attach_timeout.count()) +
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
  // All stop at once, so the stop bound (QueueLoop::kStopLimit) holds for
  // the blkdev, not for each queue in turn.
  for (auto& loop : loops_) loop->stop();
  loops_.clear();
  heartbeat_.reset();
}

QueueLoopOptions Blkdev::loop_options() const {
  QueueLoopOptions loop;
  loop.spin_us = options_.spin_us;
  loop.max_sleep_us = options_.max_sleep_us;
  loop.payload_timeout = options_.payload_timeout;
  loop.reply_timeout = options_.reply_timeout;
  // docs/design.md §5: a channel with entries in flight and no completion
  // for max(5 s, 5 x dead-after) is set up again and re-driven.
  loop.stall_timeout = std::chrono::milliseconds(std::max(5000u, 5 * transport_.superblock().dead_after_ms));
  return loop;
}

Binding Blkdev::binding() const {
  return Binding{options_.backend_id, blkdev_index_.load(), bound_epoch_};
}

std::optional<SlotClaim> Blkdev::claim_channel(std::uint32_t owner_host) {
  for (std::uint32_t i = 0; i < transport_.channel_count(); ++i) {
    SlotHeader& header = transport_.channel_control(i).header;
    if (auto word = try_claim(header, owner_host)) return SlotClaim(&header, i, *word);
  }
  return std::nullopt;
}

void Blkdev::adopt(AdoptedConnection connection) {
  loops_[next_queue_.fetch_add(1) % loops_.size()]->adopt(std::move(connection));
}

void Blkdev::shutdown_connections() {
  for (auto& loop : loops_) loop->shutdown_connections();
}

void Blkdev::beat() {
  std::lock_guard lock(claims_mutex_);
  host_.beat();
  blkdev_.beat();
  for (ChannelBeat& channel : channel_beats_) cbd::beat(*channel.header, channel.word, channel.last);
}

bool Blkdev::reclaim_lost(const std::vector<bool>& channel_lost, bool host_lost, bool blkdev_lost) {
  std::lock_guard lock(claims_mutex_);
  if (host_lost) {
    SlotClaim host = claim_first_free(transport_.host_count(), &Transport::host, transport_, kNoSlot);
    if (!host) return false;
    write_name(transport_.host(host.index()).hostname,
               options_.hostname.empty() ? local_hostname() : options_.hostname);
    write_kernel_id(transport_.host(host.index()), local_kernel_id());
    host_ = std::move(host);
  }
  bool blkdev_changed = false;
  if (blkdev_lost) {
    SlotClaim blkdev = claim_first_free(transport_.blkdev_count(), &Transport::blkdev, transport_, host_.index());
    if (!blkdev) return false;
    BlkdevSlot& slot = transport_.blkdev(blkdev.index());
    store_relaxed(slot.backend_id, options_.backend_id);
    store_relaxed(slot.backend_epoch, bound_epoch_);
    store_relaxed(slot.kernel_device, kernel_device_.load());
    store_relaxed(slot.queue_count, static_cast<std::uint32_t>(loops_.size()));
    publish_lines(&slot, sizeof slot);  // flush mode
    blkdev_ = std::move(blkdev);
    blkdev_index_.store(blkdev_.index());
    blkdev_changed = true;
  }
  bool complete = true;
  for (std::size_t q = 0; q < loops_.size(); ++q) {
    if (channel_lost[q]) {
      auto claim = claim_channel(host_.index());
      if (!claim) {
        complete = false;
        continue;
      }
      channel_beats_[q] = {&claim->header(), claim->index(), claim->word(), initial_heartbeat(claim->word())};
      loops_[q]->replace_channel(std::make_unique<ChannelEngine>(transport_, std::move(*claim)), binding());
    } else if (blkdev_changed) {
      loops_[q]->set_up(binding());
    }
  }
  set_up_at_ = std::chrono::steady_clock::now();
  return complete;
}

void Blkdev::watch_backend() {
  const auto now = std::chrono::steady_clock::now();
  // docs/design.md, "Truncated or vanished transport": the mapping now
  // reads as zeros, which look like free slots.  Claiming them would only
  // write private pages; fail everything instead (the process is exiting).
  if (transport_.region().fault_offset()) {
    if (!failed_) {
      for (auto& loop : loops_) loop->fail_outstanding(EIO);
      failed_ = true;
    }
    return;
  }
  // A process stalled for longer than dead-after-ms (SIGSTOP, a paused VM,
  // an overloaded machine) is judged dead and its slots are reclaimed, by
  // the backend or by `cbd-proxy gc`, and may be claimed by someone else.
  // The fences keep us off them; here we claim new ones and carry on.
  std::vector<bool> channel_lost(loops_.size());
  bool host_lost, blkdev_lost, any_lost;
  {
    std::lock_guard lock(claims_mutex_);
    host_lost = !host_.owned();
    blkdev_lost = !blkdev_.owned();
    any_lost = host_lost || blkdev_lost;
    for (std::size_t q = 0; q < loops_.size(); ++q) {
      channel_lost[q] = loops_[q]->lost() || !still_owned(*channel_beats_[q].header, channel_beats_[q].word);
      any_lost = any_lost || channel_lost[q];
    }
  }
  if (any_lost) {
    if (!lost_since_) {
      lost_since_ = now;
      log(LogLevel::Error,
          "blkdev %u: our slots were reclaimed (this process was judged dead: stalled for over %u ms?); claiming new "
          "ones and moving outstanding requests to them", index(), transport_.superblock().dead_after_ms);
    }
    if (reclaim_lost(channel_lost, host_lost, blkdev_lost)) {
      log(LogLevel::Info, "blkdev %u: serving again on new slots", index());
      lost_since_.reset();
      failed_ = false;
    } else if (!failed_ && now - *lost_since_ >= options_.backend_timeout) {
      log(LogLevel::Error, "blkdev %u: no free slots to move to within %lld ms; failing outstanding and new requests "
          "with EIO", index(), static_cast<long long>(options_.backend_timeout.count()));
      for (auto& loop : loops_) loop->fail_outstanding(EIO);
      failed_ = true;
    }
    return;
  }

  const BackendSlot& slot = transport_.backend(options_.backend_id);
  Liveness liveness = backend_observer_.observe(options_.backend_id, slot.header);
  std::uint64_t epoch = 0;
  auto exported = read_backend_export(transport_, options_.backend_id, &epoch);

  if (exported && liveness == Liveness::Alive && epoch != bound_epoch_) {
    if (exported->size != info_.size) {
      static RateLimit size_log(std::chrono::seconds(10));
      if (size_log.allow())
        log(LogLevel::Error, "backend %u came back with size %llu instead of %llu; not re-attaching",
            options_.backend_id, static_cast<unsigned long long>(exported->size),
            static_cast<unsigned long long>(info_.size));
    } else {
      log(LogLevel::Info, "backend %u restarted (epoch %llu); re-attaching %zu channels", options_.backend_id,
          static_cast<unsigned long long>(epoch), loops_.size());
      bound_epoch_ = epoch;
      {
        std::lock_guard lock(claims_mutex_);
        if (blkdev_.owned()) {
          BlkdevSlot& slot = transport_.blkdev(blkdev_.index());
          store_relaxed(slot.backend_epoch, epoch);
          publish_lines(&slot, sizeof slot);  // flush mode
        }
      }
      for (auto& loop : loops_) loop->set_up(binding());
      set_up_at_ = now;
      failed_ = false;
    }
  }
  const bool backend_up = exported && liveness == Liveness::Alive && epoch == bound_epoch_;
  bool attached = true;
  for (auto& loop : loops_) attached = attached && loop->attached();
  if (backend_up && !attached && failed_) {
    // We failed everything while it was away, and it came back as it was:
    // set the channels up again (a new generation) to serve new requests.
    log(LogLevel::Info, "backend %u is serving again; re-attaching %zu channels", options_.backend_id, loops_.size());
    for (auto& loop : loops_) loop->set_up(binding());
    set_up_at_ = now;
    failed_ = false;
  }
  // A set-up is given attach-timeout= before it counts as the backend not
  // serving.
  const bool healthy = backend_up && (attached || now - set_up_at_ < options_.attach_timeout);
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
    for (auto& loop : loops_) loop->fail_outstanding(EIO);
    failed_ = true;
  }
}

void Blkdev::set_kernel_device(std::uint32_t value) {
  std::lock_guard lock(claims_mutex_);
  kernel_device_.store(value);
  if (!blkdev_.owned()) return;
  BlkdevSlot& slot = transport_.blkdev(blkdev_.index());
  store_release(slot.kernel_device, value);
  publish_lines(&slot, sizeof slot);  // flush mode
}

}  // namespace cbd::proxy
