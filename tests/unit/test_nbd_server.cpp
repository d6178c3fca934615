// The listener on a real unix socket: handshakes under handshake_timeout,
// max_connections, the hand-off to a ConnectionSink and the count it keeps
// until on_closed, and stop ending handshakes in progress.
#include <doctest/doctest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include "client/nbd_server.hpp"
#include "nbd_test_support.hpp"

namespace cbd::proxy {
namespace {

using namespace test;
using Clock = std::chrono::steady_clock;

// Keeps what it adopts, so a test decides when each connection is over.
class KeepingSink final : public ConnectionSink {
 public:
  ExportInfo info() const override { return test_export(0); }
  void adopt(AdoptedConnection connection) override {
    std::lock_guard lock(mutex_);
    adopted_.push_back(std::move(connection));
  }
  std::size_t adopted() {
    std::lock_guard lock(mutex_);
    return adopted_.size();
  }
  void close_all() {
    std::vector<AdoptedConnection> all;
    {
      std::lock_guard lock(mutex_);
      all.swap(adopted_);
    }
    for (AdoptedConnection& connection : all) {
      connection.socket.reset();
      connection.on_closed();
    }
  }

 private:
  std::mutex mutex_;
  std::vector<AdoptedConnection> adopted_;
};

struct ServerFixture {
  std::filesystem::path dir;
  std::string socket_path;
  KeepingSink sink;
  bool refuse = false;
  std::unique_ptr<NbdServer> server;
  std::thread serving;

  explicit ServerFixture(NbdServer::Limits limits) {
    char pattern[] = "/tmp/cbd-test-nbd-server.XXXXXX";
    REQUIRE(::mkdtemp(pattern) != nullptr);
    dir = pattern;
    socket_path = (dir / "nbd.sock").string();
    server = std::make_unique<NbdServer>([this]() -> ConnectionSink* { return refuse ? nullptr : &sink; }, limits);
    server->listen_unix(socket_path);
    serving = std::thread([this] { server->serve(); });
  }
  ~ServerFixture() {
    server->request_stop();
    serving.join();
    sink.close_all();
    server.reset();
    std::filesystem::remove_all(dir);
  }

  int connect() const {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd >= 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, socket_path.c_str(), sizeof address.sun_path - 1);
    REQUIRE(::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0);
    timeval timeout{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    return fd;
  }

  template <typename Predicate>
  static bool eventually(Predicate done, std::chrono::milliseconds limit = std::chrono::seconds(5)) {
    const auto until = Clock::now() + limit;
    while (Clock::now() < until) {
      if (done()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return done();
  }
};

Bytes go_conversation() {
  return cat({be32(nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes), be64(nbd::kOptionMagic),
              be32(nbd::kOptGo), be32(6), be32(0), be16(0)});
}

TEST_CASE("nbd server: a connection that sends nothing is dropped after handshake_timeout") {
  ServerFixture fixture({std::chrono::milliseconds(300), 8});
  const int client = fixture.connect();
  const auto start = Clock::now();
  const Bytes received = recv_all(client);  // the greeting, then EOF
  const auto took = Clock::now() - start;
  CHECK(received.size() == nbd::kGreetingSize);
  CHECK(took >= std::chrono::milliseconds(250));
  CHECK(took < std::chrono::seconds(3));
  CHECK(ServerFixture::eventually([&] { return fixture.server->connection_count() == 0; }));
  CHECK(fixture.sink.adopted() == 0);
  ::close(client);
}

TEST_CASE("nbd server: GO hands the connection to the sink, counted until on_closed") {
  ServerFixture fixture({std::chrono::seconds(10), 8});
  const int client = fixture.connect();
  send_bytes(client, go_conversation());
  REQUIRE(ServerFixture::eventually([&] { return fixture.sink.adopted() == 1; }));
  CHECK(fixture.server->connection_count() == 1);
  // Past the handshake the deadline no longer applies: the sink owns it.
  fixture.sink.close_all();
  CHECK(ServerFixture::eventually([&] { return fixture.server->connection_count() == 0; }));
  ::close(client);
}

TEST_CASE("nbd server: connections beyond max_connections are closed at once, without a greeting") {
  ServerFixture fixture({std::chrono::seconds(10), 2});
  const int first = fixture.connect();
  const int second = fixture.connect();
  CHECK(recv_bytes(first, nbd::kGreetingSize).size() == nbd::kGreetingSize);
  CHECK(recv_bytes(second, nbd::kGreetingSize).size() == nbd::kGreetingSize);
  const int third = fixture.connect();
  const auto start = Clock::now();
  CHECK(recv_all(third).empty());
  CHECK(Clock::now() - start < std::chrono::seconds(2));
  CHECK(fixture.server->connection_count() == 2);
  // An adopted connection counts too.
  send_bytes(first, go_conversation());
  REQUIRE(ServerFixture::eventually([&] { return fixture.sink.adopted() == 1; }));
  const int fourth = fixture.connect();
  CHECK(recv_all(fourth).empty());
  for (const int fd : {first, second, third, fourth}) ::close(fd);
}

TEST_CASE("nbd server: a factory that returns no sink refuses the connection") {
  ServerFixture fixture({std::chrono::seconds(10), 8});
  fixture.refuse = true;
  const int client = fixture.connect();
  CHECK(recv_all(client).empty());
  CHECK(fixture.server->connection_count() == 0);
  ::close(client);
}

TEST_CASE("nbd server: stop ends the handshakes in progress at once") {
  NbdServer::Limits limits{std::chrono::seconds(60), 8};
  auto fixture = std::make_unique<ServerFixture>(limits);
  const int client = fixture->connect();
  CHECK(recv_bytes(client, nbd::kGreetingSize).size() == nbd::kGreetingSize);
  REQUIRE(ServerFixture::eventually([&] { return fixture->server->connection_count() == 1; }));
  const auto start = Clock::now();
  fixture.reset();  // request_stop(), then serve() ends and joins the handshake
  CHECK(Clock::now() - start < std::chrono::seconds(3));
  CHECK(peer_closed(client));
  ::close(client);
}

}  // namespace
}  // namespace cbd::proxy
