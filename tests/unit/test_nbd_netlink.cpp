// The pieces of `cbd-proxy connect device=` that run without a kernel nbd
// driver: naming the device, and a connection handed over already in the
// transmission phase, as the kernel's socket sees it (no handshake, simple
// replies).  The netlink calls themselves run in the VM tests
// (scripts/vm-test.sh --device, --devdax).
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "client/nbd_handshake.hpp"
#include "client/nbd_netlink.hpp"
#include "common/error.hpp"
#include "nbd_test_support.hpp"

using namespace cbd;
using namespace cbd::proxy;
using namespace cbd::proxy::test;

TEST_CASE("nbd device names: /dev/nbdN, nbdN and N; anything else is refused with the expected form") {
  CHECK(parse_nbd_device("/dev/nbd0") == 0);
  CHECK(parse_nbd_device("/dev/nbd15") == 15);
  CHECK(parse_nbd_device("nbd3") == 3);
  CHECK(parse_nbd_device("7") == 7);
  CHECK(nbd_device_path(12) == "/dev/nbd12");
  for (const char* bad : {"", "/dev/nbd", "/dev/sda", "/dev/nbd0p1", "nbd-1", "/dev/nbd1234567", "/dev/nbd 1"}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH_AS(parse_nbd_device(bad), doctest::Contains("/dev/nbd0"), Error);
  }
}
