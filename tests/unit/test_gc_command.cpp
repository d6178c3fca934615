// `cbd-proxy gc` frees the slots of dead owners, except a dead channel bound
// to a backend that is alive in the same epoch: that backend's sweep stops
// its handlers serving the channel before it reclaims it, which gc cannot
// (docs/design.md §4).  Real slots in a real transport; the live backend is
// a thread that beats its slot's heartbeat while gc watches.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "client/commands.hpp"
#include "client/parameters.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"
#include "common/transport.hpp"
#include "shm_fixture.hpp"

using namespace cbd;

namespace {

constexpr std::uint32_t kBackendHost = 0;
constexpr std::uint32_t kProxyHost = 1;

// Beats `claim` every heartbeat interval until destroyed: an owner that is
// alive.
class LiveOwner {
 public:
  LiveOwner(SlotClaim& claim, std::chrono::milliseconds interval)
      : thread_([this, &claim, interval] {
          while (!stop_.load()) {
            claim.beat();
            std::this_thread::sleep_for(interval);
          }
        }) {}
  ~LiveOwner() {
    stop_.store(true);
    thread_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Claims channel `index` for the proxy host and binds it to backend 0 at
// `backend_epoch`, as a queue set-up leaves it; nobody beats it.
std::uint64_t claim_dead_channel(Transport& transport, std::uint32_t index, std::uint64_t backend_epoch) {
  ChannelControl& control = transport.channel_control(index);
  auto word = try_claim(control.header, kProxyHost);
  REQUIRE(word);
  store_relaxed(control.backend_id, std::uint32_t{0});
  store_relaxed(control.backend_epoch, backend_epoch);
  return *word;
}

void check_gc_leaves_channels_of_a_live_backend(bool flush) {
  test::ShmFile file("gc");
  FormatOptions options = test::small_options();
  options.flush = flush;
  options.heartbeat_interval_ms = 20;
  options.dead_after_ms = 200;
  Transport transport = test::make_transport(file, options);

  auto backend_word = try_claim(transport.backend(0).header, kBackendHost);
  REQUIRE(backend_word);
  SlotClaim backend(&transport.backend(0).header, 0, *backend_word);
  const std::uint64_t bound_to_live = claim_dead_channel(transport, 0, backend.epoch());
  // Bound to an earlier instance of the backend slot: nobody serves it.
  const std::uint64_t bound_to_gone = claim_dead_channel(transport, 1, backend.epoch() - 1);
  {
    LiveOwner alive(backend, std::chrono::milliseconds(options.heartbeat_interval_ms / 2));
    proxy::Parameters parameters({"transport=" + file.path()}, proxy::kGcParameters);
    REQUIRE(proxy::run_gc(parameters) == 0);
  }
  CHECK(load_acquire(transport.channel_control(0).header.state) == bound_to_live);
  CHECK(state_of(load_acquire(transport.channel_control(1).header.state)) == SlotState::Free);
  CHECK(epoch_of(load_acquire(transport.channel_control(1).header.state)) == epoch_of(bound_to_gone) + 1);
  CHECK(backend.owned());
}

}  // namespace

TEST_CASE("gc: a dead channel bound to a live backend of the same epoch is left to it; one bound to an older epoch is freed") {
  SUBCASE("coherent memory") { check_gc_leaves_channels_of_a_live_backend(false); }
  SUBCASE("flush mode") { check_gc_leaves_channels_of_a_live_backend(true); }
}
