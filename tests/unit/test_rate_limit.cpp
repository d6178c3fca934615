// RateLimit: what keeps a peer that triggers a log line at will from
// flooding the log.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "common/rate_limit.hpp"

using namespace cbd;
using namespace std::chrono_literals;

TEST_CASE("rate limit: one event per interval, the dropped ones counted into the next allowed one") {
  RateLimit limit(1000ms);
  const auto t0 = std::chrono::steady_clock::now();
  std::uint64_t suppressed = 99;
  CHECK(limit.allow_at(t0, &suppressed));
  CHECK(suppressed == 0);
  for (int i = 0; i < 1000; ++i) CHECK_FALSE(limit.allow_at(t0 + std::chrono::microseconds(i * 999), &suppressed));
  CHECK_FALSE(limit.allow_at(t0 + 999ms));
  CHECK(limit.allow_at(t0 + 1000ms, &suppressed));
  CHECK(suppressed == 1001);
  // The count starts again after each allowed event.
  CHECK_FALSE(limit.allow_at(t0 + 1500ms));
  CHECK(limit.allow_at(t0 + 2500ms, &suppressed));
  CHECK(suppressed == 1);
  // A long quiet spell lets the next event through at once.
  CHECK(limit.allow_at(t0 + 1h, &suppressed));
  CHECK(suppressed == 0);
}

TEST_CASE("rate limit: threads hammering one limit get one event through per interval") {
  RateLimit limit(std::chrono::hours(1));
  std::atomic<unsigned> allowed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i)
        if (limit.allow()) ++allowed;
    });
  for (auto& thread : threads) thread.join();
  CHECK(allowed == 1);
  std::uint64_t suppressed = 0;
  CHECK(limit.allow_at(std::chrono::steady_clock::now() + std::chrono::hours(2), &suppressed));
  CHECK(suppressed == 39999);
}
