#include "plugin/backend_service.hpp"

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <thread>

#include "common/error.hpp"
#include "common/flush_ranges.hpp"
#include "common/kernel_identity.hpp"
#include "common/log.hpp"
#include "common/shared_atomic.hpp"
#include "common/wake_socket.hpp"

namespace cbd::backend {
namespace {

// Keys of the liveness observer: area << 32 | slot index.
constexpr std::uint64_t kChannelKey = 1ull << 32;
constexpr std::uint64_t kBlkdevKey = 2ull << 32;
constexpr std::uint64_t kBackendKey = 3ull << 32;

std::string local_hostname() {
  char name[HOST_NAME_MAX + 1] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "localhost";
  return name;
}

}  // namespace

std::uint32_t caps_for(const StoreInfo& info) {
  std::uint32_t caps = 0;
  if (info.read_only) caps |= kCapReadOnly;
  if (info.can_flush) caps |= kCapFlush;
  if (info.can_fua) caps |= kCapFua;
  if (info.can_trim) caps |= kCapTrim;
  if (info.can_zero) caps |= kCapZero;
  if (info.can_zero && info.can_fast_zero) caps |= kCapFastZero;
  if (info.can_extents) caps |= kCapExtents;
  if (info.can_cache) caps |= kCapCache;
  if (info.can_multi_conn) caps |= kCapMultiConn;
  if (info.rotational) caps |= kCapRotational;
  return caps;
}

BackendService::BackendService(const Transport& transport, Store& store, BackendConfig config)
    : transport_(transport),
      store_(store),
      config_(std::move(config)),
      context_(transport, store),
      wake_sockets_(transport.channel_count()),
      liveness_(std::chrono::milliseconds(transport.superblock().dead_after_ms)),
      refused_generation_logged_(transport.channel_count(), 0) {
  const StoreInfo& info = store.info();
  caps_ = caps_for(info);
  context_.limits.size = info.size;
  context_.limits.read_only = info.read_only;
  context_.limits.block_max = block_max_for(transport.superblock().channel.data_size);
  context_.queue_depth = std::clamp(config_.queue_depth, 1u, 4096u);
  context_.poll = config_.poll;
  context_.heartbeat_interval = std::chrono::milliseconds(transport.superblock().heartbeat_interval_ms);
  context_.shutdown_grace = config_.shutdown_grace;
  if (config_.hostname.empty()) config_.hostname = local_hostname();
}

void BackendService::claim_host() {
  if (config_.hostname.size() > kNameSize)
    throw Error("hostname=" + config_.hostname + ": longer than " + std::to_string(kNameSize) + " bytes");
  for (std::uint32_t i = 0; i < transport_.host_count(); ++i) {
    HostSlot& slot = transport_.host(i);
    if (auto word = try_claim(slot.header, kNoSlot)) {
      host_ = SlotClaim(&slot.header, i, *word);
      write_name(slot.hostname, config_.hostname);
      write_kernel_id(slot, context_.kernel_id);
      return;
    }
  }
  throw Error("transport " + transport_.path() + ": all " + std::to_string(transport_.host_count()) +
              " host slots are in use — free dead ones with `cbd-proxy gc transport=" + transport_.path() + "`");
}

void BackendService::claim_backend() {
  if (!config_.backend_id) {
    for (std::uint32_t i = 0; i < transport_.backend_count(); ++i) {
      BackendSlot& slot = transport_.backend(i);
      if (auto word = try_claim(slot.header, host_.index())) {
        backend_ = SlotClaim(&slot.header, i, *word);
        return;
      }
    }
    throw Error("transport " + transport_.path() + ": all " + std::to_string(transport_.backend_count()) +
                " backend slots are in use — free dead ones with `cbd-proxy gc` or take one over with backend-id=N");
  }
  const std::uint32_t id = *config_.backend_id;
  if (id >= transport_.backend_count())
    throw Error("backend-id=" + std::to_string(id) + ": the transport has only " +
                std::to_string(transport_.backend_count()) + " backend slots (0-" +
                std::to_string(transport_.backend_count() - 1) + ")");
  SlotHeader& header = transport_.backend(id).header;
  // Take the slot over only from a dead owner: watch its heartbeat for a
  // full timeout on our own clock (design §3.5).  A restart after a crash
  // waits that long; a live owner is refused at its first beat.
  const auto dead_after = std::chrono::milliseconds(transport_.superblock().dead_after_ms);
  const auto poll = std::max(std::chrono::milliseconds(transport_.superblock().heartbeat_interval_ms / 4),
                             std::chrono::milliseconds(1));
  LivenessObserver observer(dead_after);
  const std::uint64_t key = kBackendKey | id;
  const std::uint64_t first_heartbeat = load_acquire(header.heartbeat);
  const auto give_up = std::chrono::steady_clock::now() + dead_after + dead_after / 2;
  for (;;) {
    Liveness liveness = observer.observe(key, header);
    std::uint64_t word = observer.last_word(key);
    if (liveness == Liveness::Free || liveness == Liveness::Dead) {
      if (auto claimed = try_take_over(header, word, host_.index())) {
        if (liveness == Liveness::Dead)
          log(LogLevel::Info, "backend slot %u: took over from a dead owner (epoch %llu → %llu)", id,
              static_cast<unsigned long long>(epoch_of(word)), static_cast<unsigned long long>(epoch_of(*claimed)));
        backend_ = SlotClaim(&header, id, *claimed);
        return;
      }
      continue;  // the word changed under us: look again
    }
    if (load_acquire(header.heartbeat) != first_heartbeat || std::chrono::steady_clock::now() > give_up)
      throw Error("backend slot " + std::to_string(id) + " is owned by a live backend (pid " +
                  std::to_string(load_relaxed(header.owner_pid)) + ") — stop it first, or omit backend-id=");
    std::this_thread::sleep_for(poll);
  }
}

void BackendService::publish_backend() {
  BackendSlot& slot = transport_.backend(backend_.index());
  const StoreInfo& info = store_.info();
  // The proxy reads the fields only once it sees Live and a non-zero size:
  // hide any stale size from a former owner, fill in the rest, and publish
  // the size last with release.
  store_release(slot.export_size, std::uint64_t{0});
  write_name(slot.export_name, config_.export_name);
  store_relaxed(slot.block_min, info.block_min);
  store_relaxed(slot.block_preferred, std::max(info.block_preferred, info.block_min));
  store_relaxed(slot.block_max, context_.limits.block_max);
  store_relaxed(slot.caps, caps_);
  // Flush mode: the fields reach memory before the size that publishes them.
  publish_lines(&slot, sizeof slot);
  store_release(slot.export_size, info.size);
  publish_lines(&slot.export_size, sizeof slot.export_size);
  backend_.beat();
}

void BackendService::start() {
  if (running_) return;
  if (config_.export_name.size() > kNameSize)
    throw Error("export=" + config_.export_name + ": longer than " + std::to_string(kNameSize) + " bytes");
  if (store_.info().size == 0) throw Error("the backing store is empty: nothing to export");
  claim_host();
  try {
    claim_backend();
  } catch (...) {
    host_.reset();
    throw;
  }
  publish_backend();
  context_.backend_index = backend_.index();
  context_.backend_epoch = backend_.epoch();
  context_.fence.arm(transport_.backend(backend_.index()).header, backend_.epoch(), transport_.mode());
  serving_lost_ = false;
  refresh_allowed_hosts();
  log(LogLevel::Info, "backend slot %u (epoch %llu) on host slot %u (%s): export \"%s\", %llu bytes, block_max %u",
      backend_.index(), static_cast<unsigned long long>(backend_.epoch()), host_.index(), config_.hostname.c_str(),
      config_.export_name.c_str(), static_cast<unsigned long long>(context_.limits.size), context_.limits.block_max);

  // Queue loops on our kernel hand their wake sockets over here (not in
  // flush mode, which stands for memory between hosts).
  if (!transport_.mode().flush) {
    try {
      wake_listener_ = std::make_unique<WakeListener>(wake_listener_name(transport_, backend_.index(), backend_.epoch()),
                                                      wake_sockets_, transport_.channel_count());
      context_.wake_sockets = &wake_sockets_;
    } catch (const Error& e) {
      log(LogLevel::Info, "queue loops will poll for completions (no wake socket listener: %s)", e.what());
    }
  }
  heartbeat_ = std::make_unique<PeriodicThread>(context_.heartbeat_interval, [this] { heartbeat_tick(); });
  // Channel i goes to handler i mod N: a queue side with N queues on
  // consecutive channels spreads evenly.
  const unsigned threads = std::clamp(config_.handlers, 1u, std::max(1u, transport_.channel_count()));
  std::vector<std::vector<std::uint32_t>> assignment(threads);
  for (std::uint32_t i = 0; i < transport_.channel_count(); ++i) assignment[i % threads].push_back(i);
  // The first kBackendDoorbells threads each get a doorbell word; any more
  // only poll.
  for (std::uint32_t t = 0; t < threads; ++t)
    handlers_.push_back(std::make_unique<HandlerThread>(context_, std::move(assignment[t]),
                                                        t < kBackendDoorbells ? t + 1 : 0));
  running_ = true;
}

void BackendService::stop() {
  if (!running_) return;
  running_ = false;
  // Queue sides see Stopping and submit nothing new.  Under the claims
  // mutex: the heartbeat thread beats with the claim's word.
  {
    std::lock_guard<std::mutex> lock(claims_mutex_);
    backend_.stopping();
  }
  for (auto& handler : handlers_) handler->request_stop();
  for (auto& handler : handlers_) handler->join();
  handlers_.clear();
  context_.wake_sockets = nullptr;
  wake_listener_.reset();
  heartbeat_.reset();
  if (backend_.owned()) {
    BackendSlot& slot = transport_.backend(backend_.index());
    store_release(slot.export_size, std::uint64_t{0});
    publish_lines(&slot.export_size, sizeof slot.export_size);
  }
  const bool lost = serving_lost_;
  backend_.reset();
  host_.reset();
  if (lost)
    log(LogLevel::Info, "backend stopped (it had lost its backend slot; it released nothing of it)");
  else
    log(LogLevel::Info, "backend stopped; slots released");
}

void BackendService::heartbeat_tick() {
  std::lock_guard<std::mutex> lock(claims_mutex_);
  // Lost for good: write nothing to the transport any more, not even a
  // reclaim of a dead peer's slot (its binding is the new owner's business).
  if (serving_lost_) return;
  // The fenced beat fails once the slot changed hands (docs/design.md §4);
  // the handlers' fence may have seen it first.
  if (!backend_.beat() || !context_.fence.holds()) {
    lose_backend();
    return;
  }
  if (!host_.beat() && !host_lost_logged_) {
    host_lost_logged_ = true;
    log(LogLevel::Error, "host slot %u was taken over (we were judged dead); no longer beating it", host_.index());
  }
  refresh_allowed_hosts();
  sweep_channels();
  sweep_blkdevs();
}

void BackendService::lose_backend() {
  serving_lost_ = true;
  context_.fence.lose();
  const SlotHeader& header = transport_.backend(context_.backend_index).header;
  const std::uint64_t word = load_acquire(header.state);
  log(LogLevel::Error,
      "backend slot %u was taken over by epoch %llu (%s, pid %u): this instance stops serving the transport; "
      "nbdkit's own NBD export keeps serving",
      context_.backend_index, static_cast<unsigned long long>(epoch_of(word)), slot_state_name(state_of(word)),
      load_relaxed(header.owner_pid));
  // Hold nothing: our host slot goes too (a CAS on our own word: it fails
  // harmlessly if that slot changed hands as well).
  host_.reset();
}

void BackendService::refresh_allowed_hosts() {
  for (std::uint32_t i = 0; i < transport_.host_count(); ++i) {
    bool allowed = config_.allow_hosts.empty();
    if (!allowed) {
      const HostSlot& slot = transport_.host(i);
      if (state_of(load_acquire(slot.header.state)) != SlotState::Free) {
        std::string name = read_name(slot.hostname);
        allowed = std::find(config_.allow_hosts.begin(), config_.allow_hosts.end(), name) != config_.allow_hosts.end();
      }
    }
    context_.host_allowed[i].store(allowed, std::memory_order_relaxed);
  }
}

void BackendService::sweep_channels() {
  const auto now = LivenessObserver::Clock::now();
  for (std::uint32_t i = 0; i < transport_.channel_count(); ++i) {
    ChannelControl& control = transport_.channel_control(i);
    const std::uint64_t generation = load_acquire(control.generation);
    const bool bound = load_relaxed(control.backend_id) == context_.backend_index &&
                       load_relaxed(control.backend_epoch) == context_.backend_epoch;
    Liveness liveness = liveness_.observe(kChannelKey | i, control.header, now);
    const std::uint64_t word = liveness_.last_word(kChannelKey | i);
    auto& condemned = context_.channel_condemned[i];

    if (bound && liveness == Liveness::Dead) {
      // Handlers stop serving it; reclaim once none does (see the seq_cst
      // handshake in HandlerThread::discover).
      condemned.store(word, std::memory_order_seq_cst);
      if (!context_.channel_serving[i].load(std::memory_order_seq_cst)) {
        std::uint64_t suppressed = 0;
        if (reclaim(control.header, word) && channel_reclaim_log_.allow(&suppressed))
          log(LogLevel::Info, "channel %u: its queue side stopped beating for %u ms; reclaimed (%llu more not logged)",
              i, transport_.superblock().dead_after_ms, static_cast<unsigned long long>(suppressed));
        condemned.store(0, std::memory_order_seq_cst);
      }
    } else if (condemned.load(std::memory_order_relaxed) != 0 && condemned.load(std::memory_order_relaxed) != word) {
      condemned.store(0, std::memory_order_seq_cst);  // it changed hands: a new owner is alive
    }

    if (bound && liveness == Liveness::Alive && generation != 0 && generation != refused_generation_logged_[i]) {
      const std::uint32_t owner = load_relaxed(control.header.owner_host);
      if (owner >= transport_.host_count() || !context_.host_allowed[owner].load(std::memory_order_relaxed)) {
        refused_generation_logged_[i] = generation;
        std::uint64_t suppressed = 0;
        if (refused_log_.allow(&suppressed)) {
          std::string name = owner < transport_.host_count() ? read_name(transport_.host(owner).hostname) : "?";
          log(LogLevel::Warning,
              "channel %u: owned by host %u (\"%s\"), which is not in allow-hosts; not serving it (%llu more "
              "refusals not logged)",
              i, owner, name.c_str(), static_cast<unsigned long long>(suppressed));
        }
      }
    }
  }
}

void BackendService::sweep_blkdevs() {
  const auto now = LivenessObserver::Clock::now();
  for (std::uint32_t i = 0; i < transport_.blkdev_count(); ++i) {
    BlkdevSlot& slot = transport_.blkdev(i);
    Liveness liveness = liveness_.observe(kBlkdevKey | i, slot.header, now);
    if (liveness != Liveness::Dead || load_relaxed(slot.backend_id) != context_.backend_index) continue;
    std::uint64_t suppressed = 0;
    if (reclaim(slot.header, liveness_.last_word(kBlkdevKey | i)) && blkdev_reclaim_log_.allow(&suppressed))
      log(LogLevel::Info, "blkdev %u: its owner stopped beating; reclaimed (%llu more not logged)", i,
          static_cast<unsigned long long>(suppressed));
  }
}

}  // namespace cbd::backend
