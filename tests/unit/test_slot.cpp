// Slot ownership (common/slot.hpp): CAS claims with epochs, stale owners
// locked out, RAII release, and 8 processes racing for the slots of one
// /dev/shm transport.
#include <doctest/doctest.h>

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <thread>
#include <cstring>
#include <set>
#include <vector>

#include "common/slot.hpp"
#include "common/transport.hpp"
#include "tests/unit/shm_fixture.hpp"

using namespace cbd;
using cbd::test::ShmFile;

TEST_CASE("slot: claim, release and epochs") {
  SlotHeader h{};
  CHECK(state_of(h.state) == SlotState::Free);
  CHECK(std::string(slot_state_name(SlotState::Live)) == "live");

  auto first = try_claim(h, 3);
  REQUIRE(first);
  CHECK(state_of(*first) == SlotState::Live);
  CHECK(epoch_of(*first) == 1);
  CHECK(h.state == *first);
  CHECK(h.owner_host == 3);
  CHECK(h.owner_pid == static_cast<std::uint32_t>(::getpid()));
  CHECK(h.heartbeat == initial_heartbeat(*first));  // a claim writes a fresh heartbeat
  CHECK(still_owned(h, *first));

  // A live slot cannot be claimed again.
  CHECK_FALSE(try_claim(h, 4));
  CHECK(h.owner_host == 3);

  std::uint64_t last = initial_heartbeat(*first);
  CHECK(beat(h, *first, last));
  CHECK(beat(h, *first, last));
  CHECK(h.heartbeat == initial_heartbeat(*first) + 2);
  CHECK(last == h.heartbeat);

  // Release frees it with a new epoch; a second release of the same word fails.
  CHECK(release(h, *first));
  CHECK(state_of(h.state) == SlotState::Free);
  CHECK(epoch_of(h.state) == 2);
  CHECK_FALSE(still_owned(h, *first));
  CHECK_FALSE(release(h, *first));

  auto second = try_claim(h, 5);
  REQUIRE(second);
  CHECK(epoch_of(*second) == 3);
  CHECK(*second != *first);

  // Clean shutdown: Live -> Stopping keeps the epoch, then release.
  std::uint64_t word = *second;
  CHECK(mark_stopping(h, word));
  CHECK(state_of(word) == SlotState::Stopping);
  CHECK(epoch_of(word) == 3);
  CHECK(still_owned(h, word));
  CHECK_FALSE(try_claim(h, 6));  // stopping is not free
  CHECK(release(h, word));
  CHECK(state_of(h.state) == SlotState::Free);
  CHECK(epoch_of(h.state) == 4);
}

TEST_CASE("slot: a stale owner cannot act after a reclaim or a take-over") {
  SlotHeader h{};
  const std::uint64_t old_word = *try_claim(h, 1);

  SUBCASE("reclaim by an observer") {
    CHECK_FALSE(reclaim(h, make_state_word(epoch_of(old_word) + 7, SlotState::Live)));  // stale view: refused
    CHECK(reclaim(h, old_word));
    CHECK(state_of(h.state) == SlotState::Free);
    CHECK_FALSE(reclaim(h, h.state));  // a free slot is not reclaimed again
    auto fresh = try_claim(h, 2);
    REQUIRE(fresh);
    CHECK(epoch_of(*fresh) > epoch_of(old_word));
    // The former owner wakes up: every CAS fails, the new owner keeps it.
    CHECK_FALSE(release(h, old_word));
    std::uint64_t stale = old_word;
    CHECK_FALSE(mark_stopping(h, stale));
    CHECK(stale == old_word);
    CHECK_FALSE(still_owned(h, old_word));
    CHECK(still_owned(h, *fresh));
    CHECK(h.owner_host == 2);
    // Even after the new owner releases, the old word stays dead (epochs only grow).
    CHECK(release(h, *fresh));
    CHECK_FALSE(release(h, old_word));
    CHECK_FALSE(reclaim(h, old_word));
  }

  SUBCASE("take-over of a live slot (restart with the same id)") {
    CHECK_FALSE(try_take_over(h, make_state_word(0, SlotState::Free), 9));  // expected word is stale
    auto taken = try_take_over(h, old_word, 9);
    REQUIRE(taken);
    CHECK(state_of(*taken) == SlotState::Live);
    CHECK(epoch_of(*taken) == epoch_of(old_word) + 1);
    CHECK(h.owner_host == 9);
    CHECK_FALSE(release(h, old_word));
    CHECK_FALSE(still_owned(h, old_word));
    // A second taker with the same (now stale) view loses.
    CHECK_FALSE(try_take_over(h, old_word, 10));
    CHECK(still_owned(h, *taken));
  }
}

TEST_CASE("slot: SlotClaim releases on destruction unless the slot was lost") {
  SlotHeader h{};
  {
    SlotClaim claim(&h, 0, *try_claim(h, 1));
    CHECK(claim);
    CHECK(claim.owned());
    CHECK(claim.epoch() == 1);
    CHECK(claim.beat());
    CHECK(h.heartbeat == initial_heartbeat(claim.word()) + 1);
  }
  CHECK(state_of(h.state) == SlotState::Free);
  CHECK(epoch_of(h.state) == 2);

  // Moved-from claims do not release; the destination does, once.
  {
    SlotClaim a(&h, 4, *try_claim(h, 1));
    SlotClaim b = std::move(a);
    CHECK_FALSE(a);
    CHECK(b.owned());
    CHECK(b.index() == 4);
    SlotClaim c;
    c = std::move(b);
    CHECK(c.owned());
    CHECK(state_of(h.state) == SlotState::Live);
  }
  CHECK(state_of(h.state) == SlotState::Free);
  CHECK(epoch_of(h.state) == 4);

  // Stopping, then destruction releases.
  {
    SlotClaim claim(&h, 0, *try_claim(h, 1));
    CHECK(claim.stopping());
    CHECK(state_of(h.state) == SlotState::Stopping);
    CHECK(claim.owned());
  }
  CHECK(state_of(h.state) == SlotState::Free);

  // Lost to a reclaimer: the destructor must not free the new owner's slot.
  {
    SlotClaim claim(&h, 0, *try_claim(h, 1));
    REQUIRE(reclaim(h, claim.word()));
    auto thief = try_claim(h, 2);
    REQUIRE(thief);
    CHECK_FALSE(claim.owned());
    claim.reset();
    CHECK(h.state == *thief);
  }
  CHECK(state_of(h.state) == SlotState::Live);
  CHECK(h.owner_host == 2);
}

namespace {

constexpr int kProcesses = 8;

// Bookkeeping shared by the racing processes (an anonymous shared mapping
// created before fork, separate from the transport under test).
struct RaceBoard {
  std::atomic<int> ready;
  std::atomic<int> go;
  std::atomic<std::uint32_t> holder[4096];          // who holds slot i right now (process + 1), 0 = nobody
  std::atomic<std::uint32_t> got[kProcesses][4096];  // indices each process claimed (count first)
  std::atomic<std::uint32_t> got_count[kProcesses];
  std::atomic<std::uint32_t> violations;
};

RaceBoard* map_board() {
  void* p = ::mmap(nullptr, sizeof(RaceBoard), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(p != MAP_FAILED);
  std::memset(p, 0, sizeof(RaceBoard));
  return static_cast<RaceBoard*>(p);
}

void start_line(RaceBoard& board) {
  board.ready.fetch_add(1);
  while (board.go.load() == 0) std::this_thread::yield();
}

void run_racers(RaceBoard& board, const std::function<int(int)>& body) {
  std::vector<pid_t> children;
  for (int p = 0; p < kProcesses; ++p) children.push_back(cbd::test::spawn([&, p] { return body(p); }));
  while (board.ready.load() < kProcesses) std::this_thread::yield();
  board.go.store(1);
  for (pid_t pid : children) CHECK(cbd::test::wait_child(pid, std::chrono::seconds(120)) == 0);
}

}  // namespace

TEST_CASE("slot: 8 processes racing to claim every slot never share one") {
  ShmFile file("slotrace");
  FormatOptions o = cbd::test::small_options();
  o.hosts = 61;       // fewer slots than 8 claimers could take on their own
  o.backends = 5;     // fewer slots than claimers
  Transport t = cbd::test::make_transport(file, o);
  const std::string path = file.path();
  RaceBoard* board = map_board();

  SUBCASE("each process claims as many host slots as it can") {
    run_racers(*board, [&](int p) {
      Transport mine = Transport::attach(path);  // each racer maps the transport itself
      start_line(*board);
      for (std::uint32_t i = 0; i < mine.host_count(); ++i) {
        if (try_claim(mine.host(i).header, static_cast<std::uint32_t>(p))) {
          board->got[p][board->got_count[p]++] = i;
        }
      }
      return 0;
    });
    std::vector<int> owner(t.host_count(), -1);
    std::uint32_t total = 0;
    for (int p = 0; p < kProcesses; ++p) {
      for (std::uint32_t k = 0; k < board->got_count[p]; ++k) {
        std::uint32_t index = board->got[p][k];
        REQUIRE(index < t.host_count());
        CAPTURE(index);
        CHECK(owner[index] == -1);  // never claimed by two processes
        owner[index] = p;
        ++total;
      }
    }
    CHECK(total == t.host_count());  // more claimers than slots: every slot went to someone
    for (std::uint32_t i = 0; i < t.host_count(); ++i) {
      CHECK(state_of(t.host(i).header.state) == SlotState::Live);
      CHECK(epoch_of(t.host(i).header.state) == 1);
      CHECK(static_cast<int>(t.host(i).header.owner_host) == owner[i]);
    }
  }

  SUBCASE("one slot each, many rounds: 5 slots, 8 claimers") {
    for (int round = 0; round < 25; ++round) {
      CAPTURE(round);
      std::memset(static_cast<void*>(board), 0, sizeof(RaceBoard));
      for (std::uint32_t i = 0; i < t.backend_count(); ++i) t.backend(i).header.state = make_state_word(round, SlotState::Free);
      run_racers(*board, [&](int p) {
        start_line(*board);
        for (std::uint32_t i = 0; i < t.backend_count(); ++i) {
          if (try_claim(t.backend(i).header, static_cast<std::uint32_t>(p))) {
            board->got[p][board->got_count[p]++] = i;
            break;  // one each
          }
        }
        return 0;
      });
      std::set<std::uint32_t> seen;
      int winners = 0, losers = 0;
      for (int p = 0; p < kProcesses; ++p) {
        REQUIRE(board->got_count[p] <= 1);
        if (board->got_count[p] == 0) {
          ++losers;  // "no free slot"
          continue;
        }
        ++winners;
        CHECK(seen.insert(board->got[p][0]).second);
        CHECK(static_cast<int>(t.backend(board->got[p][0]).header.owner_host) == p);
      }
      CHECK(winners == static_cast<int>(t.backend_count()));
      CHECK(losers == kProcesses - static_cast<int>(t.backend_count()));
    }
  }

  SUBCASE("claim/release churn: a held slot is never held twice") {
    // Every process repeatedly claims any free slot, marks itself as the
    // holder (which must find the slot unheld), releases, and repeats.
    constexpr int kIterations = 20000;
    run_racers(*board, [&](int p) {
      Transport mine = Transport::attach(path);
      const std::uint32_t me = static_cast<std::uint32_t>(p) + 1;
      start_line(*board);
      std::uint32_t next = static_cast<std::uint32_t>(p);
      for (int it = 0; it < kIterations; ++it) {
        std::uint32_t i = next++ % mine.backend_count();
        SlotHeader& h = mine.backend(i).header;
        auto word = try_claim(h, me);
        if (!word) continue;
        std::uint32_t nobody = 0;
        if (!board->holder[i].compare_exchange_strong(nobody, me)) board->violations.fetch_add(1);
        board->got_count[p].fetch_add(1, std::memory_order_relaxed);
        for (int spin = 0; spin < 20; ++spin) {
          if (!still_owned(h, *word)) board->violations.fetch_add(1);
        }
        std::uint32_t expected = me;
        if (!board->holder[i].compare_exchange_strong(expected, 0)) board->violations.fetch_add(1);
        if (!release(h, *word)) board->violations.fetch_add(1);
      }
      return 0;
    });
    CHECK(board->violations.load() == 0);
    std::uint64_t claims = 0, epochs = 0;
    for (int p = 0; p < kProcesses; ++p) claims += board->got_count[p];
    for (std::uint32_t i = 0; i < t.backend_count(); ++i) {
      CHECK(state_of(t.backend(i).header.state) == SlotState::Free);
      epochs += epoch_of(t.backend(i).header.state);
    }
    MESSAGE("claims: " << claims);
    CHECK(claims > 0);
    CHECK(epochs == 2 * claims);  // every claim and every release bumped an epoch exactly once
  }

  ::munmap(board, sizeof(RaceBoard));
}

TEST_CASE("slot: an owner whose slot was taken over can no longer beat it, even from a stale view") {
  SlotHeader h{};
  auto old_word = try_claim(h, 1);
  REQUIRE(old_word);
  SlotClaim old_owner(&h, 0, *old_word);
  REQUIRE(old_owner.beat());
  // The owner is paused; an observer judges it dead and a new owner takes over.
  auto new_word = try_take_over(h, *old_word, 2);
  REQUIRE(new_word);
  std::uint64_t new_last = initial_heartbeat(*new_word);
  REQUIRE(beat(h, *new_word, new_last));
  const std::uint64_t new_heartbeat = h.heartbeat;
  // The old owner wakes up: its beat fails, the heartbeat keeps one writer.
  CHECK_FALSE(old_owner.beat());
  CHECK(old_owner.lost());
  CHECK_FALSE(old_owner.owned());
  CHECK(h.heartbeat == new_heartbeat);
  // Paused between its check of the state word and its heartbeat write: the
  // check passed on the old word, but the heartbeat holds the new owner's
  // value, so the compare-and-swap fails.
  std::uint64_t stale_last = initial_heartbeat(*old_word) + 1;
  h.state = *old_word;  // what the stale load saw
  CHECK_FALSE(beat(h, *old_word, stale_last));
  CHECK(h.heartbeat == new_heartbeat);
  h.state = *new_word;
  // Releasing the lost claim leaves the new owner's slot alone.
  old_owner.reset();
  CHECK(h.state == *new_word);
  CHECK(beat(h, *new_word, new_last));
}
