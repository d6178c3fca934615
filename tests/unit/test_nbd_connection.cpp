// The transmission phase over a socketpair, against MemoryTarget.
#include <doctest/doctest.h>

#include <set>

#include <memory>

#include "client/nbd_connection.hpp"
#include "nbd_test_support.hpp"

namespace cbd::proxy {
namespace {

using namespace test;

struct Chunk {
  std::uint16_t flags = 0;
  std::uint16_t type = 0;
  std::uint64_t cookie = 0;
  Bytes payload;
};

// A running connection plus the client end of its socket.
class Session {
 public:
  Session(std::uint32_t caps, bool structured, bool meta = false, std::uint64_t size = 1 << 20)
      : info_(test_export(caps, size)), target_(std::make_shared<MemoryTarget>(info_)) {
    negotiated_.enter_transmission = true;
    negotiated_.structured_replies = structured;
    negotiated_.meta_context_id = meta ? kBaseAllocationContextId : 0;
    negotiated_.transmission_flags = transmission_flags_for(info_, structured);
  }
  ~Session() {
    if (reader_.joinable()) {
      ::shutdown(pair_.client, SHUT_RDWR);
      reader_.join();
    }
  }

  MemoryTarget& target() { return *target_; }
  ExportInfo& info() { return info_; }  // before start()
  HandshakeResult& negotiated() { return negotiated_; }
  int client() const { return pair_.client; }

  void start() {
    connection_ = std::make_unique<NbdConnection>(pair_.server, pair_.server, info_, negotiated_, target_);
    reader_ = std::thread([this] { end_ = connection_->run(); });
  }
  NbdConnection::End wait_end() {
    reader_.join();
    return end_;
  }

  void request(std::uint16_t type, std::uint16_t flags, std::uint64_t cookie, std::uint64_t offset,
               std::uint32_t length, const Bytes& payload = {}) {
    Bytes raw(nbd::kRequestSize);
    nbd::encode_request(raw.data(), {nbd::kRequestMagic, flags, type, cookie, offset, length});
    send_bytes(pair_.client, cat({raw, payload}));
  }
  // Simple reply: returns the wire error, checks the cookie.
  std::uint32_t simple_reply(std::uint64_t cookie) {
    const Bytes header = recv_bytes(pair_.client, nbd::kSimpleReplySize);
    CHECK(nbd::load_be32(header.data()) == nbd::kSimpleReplyMagic);
    CHECK(nbd::load_be64(header.data() + 8) == cookie);
    return nbd::load_be32(header.data() + 4);
  }
  Chunk chunk() {
    const Bytes header = recv_bytes(pair_.client, nbd::kChunkHeaderSize);
    CHECK(nbd::load_be32(header.data()) == nbd::kStructuredReplyMagic);
    Chunk result{nbd::load_be16(header.data() + 4), nbd::load_be16(header.data() + 6), nbd::load_be64(header.data() + 8),
                 {}};
    result.payload = recv_bytes(pair_.client, nbd::load_be32(header.data() + 16));
    return result;
  }
  Bytes disk(std::uint64_t offset, std::uint32_t length) const {
    return Bytes(target_->disk().begin() + static_cast<std::ptrdiff_t>(offset),
                 target_->disk().begin() + static_cast<std::ptrdiff_t>(offset + length));
  }

 private:
  ExportInfo info_;
  std::shared_ptr<MemoryTarget> target_;
  HandshakeResult negotiated_;
  SocketPair pair_;
  std::unique_ptr<NbdConnection> connection_;
  std::thread reader_;
  NbdConnection::End end_ = NbdConnection::End::Eof;
};

constexpr std::uint64_t kSize = 1 << 20;

TEST_CASE("connection: simple READ arrives as one header and the data, even in pieces") {
  Session s(kAllCaps, false);
  s.target().read_piece_size = 1000;
  s.start();
  s.request(nbd::kCmdRead, 0, 0x1122334455667788ull, 4096, 4096);
  CHECK(s.simple_reply(0x1122334455667788ull) == 0);
  CHECK(recv_bytes(s.client(), 4096) == s.disk(4096, 4096));
  s.request(nbd::kCmdDisc, 0, 2, 0, 0);
  CHECK(s.wait_end() == NbdConnection::End::Disconnect);
  CHECK(peer_closed(s.client()) == false);  // we don't close: the server owns the fd
}

TEST_CASE("connection: WRITE then READ back; FLUSH, TRIM, WRITE_ZEROES, CACHE succeed") {
  Session s(kAllCaps, false);
  s.start();
  const Bytes data(512, 0x5a);
  s.request(nbd::kCmdWrite, nbd::kCmdFlagFua, 1, 8192, 512, data);
  CHECK(s.simple_reply(1) == 0);
  s.request(nbd::kCmdRead, 0, 2, 8192, 512);
  CHECK(s.simple_reply(2) == 0);
  CHECK(recv_bytes(s.client(), 512) == data);
  s.request(nbd::kCmdFlush, 0, 3, 0, 0);
  CHECK(s.simple_reply(3) == 0);
  s.request(nbd::kCmdTrim, 0, 4, 0, 4096);
  CHECK(s.simple_reply(4) == 0);
  s.request(nbd::kCmdWriteZeroes, nbd::kCmdFlagNoHole | nbd::kCmdFlagFastZero, 5, 4096, 4096);
  CHECK(s.simple_reply(5) == 0);
  s.request(nbd::kCmdCache, 0, 6, 0, 4096);
  CHECK(s.simple_reply(6) == 0);
  CHECK(s.disk(0, 8192) == Bytes(8192, 0));
  // FUA reaches the target on a WRITE; flags the target does not use are stripped.
  s.request(nbd::kCmdRead, nbd::kCmdFlagFua, 7, 0, 1);
  CHECK(s.simple_reply(7) == 0);
  recv_bytes(s.client(), 1);
  const auto requests = s.target().requests();
  CHECK(requests.at(0).flags == nbd::kCmdFlagFua);
  CHECK(requests.back().flags == 0);
}

TEST_CASE("connection: invalid requests get nbdkit's errors and never reach the target") {
  struct Case {
    const char* name;
    std::uint32_t caps;
    std::uint16_t type;
    std::uint16_t flags;
    std::uint64_t offset;
    std::uint32_t length;
    std::uint32_t expected;
  };
  const std::uint32_t no_fua = kAllCaps & ~kCapFua;
  const std::uint32_t no_fast_zero = kAllCaps & ~kCapFastZero;
  const Case cases[] = {
      {"READ past the end", kAllCaps, nbd::kCmdRead, 0, kSize - 512, 1024, nbd::kErrInval},
      {"READ offset overflow", kAllCaps, nbd::kCmdRead, 0, ~0ull - 10, 512, nbd::kErrInval},
      {"WRITE past the end", kAllCaps, nbd::kCmdWrite, 0, kSize, 512, nbd::kErrNoSpc},
      {"WRITE_ZEROES past the end", kAllCaps, nbd::kCmdWriteZeroes, 0, kSize - 1, 2, nbd::kErrNoSpc},
      {"TRIM past the end", kAllCaps, nbd::kCmdTrim, 0, kSize, 1, nbd::kErrInval},
      {"CACHE past the end", kAllCaps, nbd::kCmdCache, 0, kSize, 1, nbd::kErrInval},
      {"WRITE read-only", kAllCaps | kCapReadOnly, nbd::kCmdWrite, 0, 0, 512, nbd::kErrPerm},
      {"WRITE read-only past the end", kAllCaps | kCapReadOnly, nbd::kCmdWrite, 0, kSize, 512, nbd::kErrPerm},
      {"TRIM read-only", kAllCaps | kCapReadOnly, nbd::kCmdTrim, 0, 0, 512, nbd::kErrPerm},
      {"WRITE_ZEROES read-only", kAllCaps | kCapReadOnly, nbd::kCmdWriteZeroes, 0, 0, 512, nbd::kErrPerm},
      {"unknown command", kAllCaps, 42, 0, 0, 0, nbd::kErrInval},
      {"unknown flag", kAllCaps, nbd::kCmdRead, 0x100, 0, 512, nbd::kErrInval},
      {"NO_HOLE on WRITE", kAllCaps, nbd::kCmdWrite, nbd::kCmdFlagNoHole, 0, 512, nbd::kErrInval},
      {"NO_HOLE on TRIM", kAllCaps, nbd::kCmdTrim, nbd::kCmdFlagNoHole, 0, 512, nbd::kErrInval},
      {"FUA not advertised", no_fua, nbd::kCmdWrite, nbd::kCmdFlagFua, 0, 512, nbd::kErrInval},
      {"FAST_ZERO not advertised", no_fast_zero, nbd::kCmdWriteZeroes, nbd::kCmdFlagFastZero, 0, 512, nbd::kErrInval},
      {"FAST_ZERO on WRITE", kAllCaps, nbd::kCmdWrite, nbd::kCmdFlagFastZero, 0, 512, nbd::kErrInval},
      {"DF without structured replies", kAllCaps, nbd::kCmdRead, nbd::kCmdFlagDf, 0, 512, nbd::kErrInval},
      {"REQ_ONE on READ", kAllCaps, nbd::kCmdRead, nbd::kCmdFlagReqOne, 0, 512, nbd::kErrInval},
      {"FLUSH with an offset", kAllCaps, nbd::kCmdFlush, 0, 512, 0, nbd::kErrInval},
      {"FLUSH with a length", kAllCaps, nbd::kCmdFlush, 0, 0, 512, nbd::kErrInval},
      {"FLUSH not advertised", 0, nbd::kCmdFlush, 0, 0, 0, nbd::kErrInval},
      {"TRIM not advertised", 0, nbd::kCmdTrim, 0, 0, 512, nbd::kErrInval},
      {"WRITE_ZEROES not advertised", 0, nbd::kCmdWriteZeroes, 0, 0, 512, nbd::kErrInval},
      {"CACHE not advertised", 0, nbd::kCmdCache, 0, 0, 512, nbd::kErrInval},
      {"BLOCK_STATUS without a meta context", kAllCaps, nbd::kCmdBlockStatus, 0, 0, 512, nbd::kErrInval},
      {"READ above 32 MiB", kAllCaps, nbd::kCmdRead, 0, 0, (32u << 20) + 1, nbd::kErrInval},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    Session s(c.caps, false, false, c.type == nbd::kCmdRead && c.length > kSize ? 64u << 20 : kSize);
    s.start();
    const Bytes payload(c.type == nbd::kCmdWrite ? c.length : 0, 0xee);
    s.request(c.type, c.flags, 77, c.offset, c.length, payload);
    CHECK(s.simple_reply(77) == c.expected);
    // Still in step (a WRITE's payload was skipped): a valid request works.
    s.request(nbd::kCmdRead, 0, 78, 0, 16);
    CHECK(s.simple_reply(78) == 0);
    CHECK(recv_bytes(s.client(), 16) == s.disk(0, 16));
    CHECK(s.target().submitted() == 1);
  }
}

TEST_CASE("connection: a WRITE above 32 MiB is refused after its payload is skipped; above 64 MiB disconnects") {
  SUBCASE("33 MiB: EINVAL, then in step") {
    Session s(kAllCaps, false, false, 128u << 20);
    s.start();
    const std::uint32_t length = 33u << 20;
    std::thread writer([&] { s.request(nbd::kCmdWrite, 0, 1, 0, length, Bytes(length, 1)); });
    CHECK(s.simple_reply(1) == nbd::kErrInval);
    writer.join();
    s.request(nbd::kCmdFlush, 0, 2, 0, 0);
    CHECK(s.simple_reply(2) == 0);
    CHECK(s.target().submitted() == 1);
  }
  SUBCASE("65 MiB: disconnect") {
    Session s(kAllCaps, false, false, 128u << 20);
    s.start();
    s.request(nbd::kCmdWrite, 0, 1, 0, 65u << 20);
    CHECK(s.wait_end() == NbdConnection::End::ProtocolError);
    CHECK(peer_closed(s.client()));
  }
}

TEST_CASE("connection: zero-length requests succeed without reaching the target") {
  Session s(kAllCaps, false);
  s.start();
  s.request(nbd::kCmdRead, 0, 1, 0, 0);
  CHECK(s.simple_reply(1) == 0);
  s.request(nbd::kCmdWrite, 0, 2, kSize, 0);
  CHECK(s.simple_reply(2) == 0);
  s.request(nbd::kCmdTrim, 0, 3, 0, 0);
  CHECK(s.simple_reply(3) == 0);
  s.request(nbd::kCmdWrite, 0, 4, kSize + 1, 0);  // still range-checked
  CHECK(s.simple_reply(4) == nbd::kErrNoSpc);
  s.request(nbd::kCmdFlush, 0, 5, 0, 0);
  CHECK(s.simple_reply(5) == 0);
  CHECK(s.target().submitted() == 1);  // only the FLUSH
}

TEST_CASE("connection: target errors are mapped to wire values") {
  Session s(kAllCaps, false);
  SUBCASE("EIO on WRITE") {
    s.target().fail_with = EIO;
    s.start();
    s.request(nbd::kCmdWrite, 0, 1, 0, 4, Bytes(4, 0));
    CHECK(s.simple_reply(1) == nbd::kErrIo);
  }
  SUBCASE("ENOTSUP is ENOTSUP only for a fast zero") {
    s.target().fail_with = ENOTSUP;
    s.start();
    s.request(nbd::kCmdWriteZeroes, nbd::kCmdFlagFastZero, 1, 0, 4);
    CHECK(s.simple_reply(1) == nbd::kErrNotSup);
    s.request(nbd::kCmdWriteZeroes, 0, 2, 0, 4);
    CHECK(s.simple_reply(2) == nbd::kErrInval);
  }
  SUBCASE("READ failing before any data: a clean error reply") {
    s.target().fail_with = EIO;
    s.start();
    s.request(nbd::kCmdRead, 0, 1, 0, 4096);
    CHECK(s.simple_reply(1) == nbd::kErrIo);
    s.request(nbd::kCmdFlush, 0, 2, 0, 0);
    CHECK(s.simple_reply(2) == nbd::kErrIo);
  }
}

TEST_CASE("connection: a simple READ that fails after its data was sent is a hard disconnect") {
  Session s(kAllCaps, false);
  s.target().fail_with = EIO;
  s.target().fail_after_data = true;
  s.target().read_piece_size = 512;
  s.start();
  s.request(nbd::kCmdRead, 0, 1, 0, 2048);
  CHECK(s.simple_reply(1) == 0);
  CHECK(recv_bytes(s.client(), 2048) == s.disk(0, 2048));
  CHECK(peer_closed(s.client()));
  CHECK(s.wait_end() == NbdConnection::End::Eof);
}

TEST_CASE("connection: structured READ: one OFFSET_DATA chunk per piece, then NONE+DONE") {
  Session s(kAllCaps, true);
  s.target().read_piece_size = 1500;
  s.start();
  s.request(nbd::kCmdRead, 0, 9, 10000, 4000);
  std::uint64_t expected_offset = 10000;
  for (std::uint32_t piece : {1500u, 1500u, 1000u}) {
    const Chunk data = s.chunk();
    CHECK(data.cookie == 9);
    CHECK(data.type == nbd::kReplyTypeOffsetData);
    CHECK(data.flags == 0);
    REQUIRE(data.payload.size() == 8 + piece);
    CHECK(nbd::load_be64(data.payload.data()) == expected_offset);
    CHECK(Bytes(data.payload.begin() + 8, data.payload.end()) == s.disk(expected_offset, piece));
    expected_offset += piece;
  }
  const Chunk done = s.chunk();
  CHECK(done.type == nbd::kReplyTypeNone);
  CHECK(done.flags == nbd::kReplyFlagDone);
  CHECK(done.payload.empty());
}

TEST_CASE("connection: structured READ with DF is one chunk even when the data comes in pieces") {
  Session s(kAllCaps, true);
  s.target().read_piece_size = 1000;
  s.start();
  s.request(nbd::kCmdRead, nbd::kCmdFlagDf, 9, 0, 2500);
  const Chunk data = s.chunk();
  CHECK(data.type == nbd::kReplyTypeOffsetData);
  REQUIRE(data.payload.size() == 8 + 2500);
  CHECK(nbd::load_be64(data.payload.data()) == 0);
  CHECK(Bytes(data.payload.begin() + 8, data.payload.end()) == s.disk(0, 2500));
  CHECK(s.chunk().type == nbd::kReplyTypeNone);
}

TEST_CASE("connection: structured READ errors are ERROR chunks, even after data") {
  Session s(kAllCaps, true);
  s.target().fail_with = EIO;
  SUBCASE("after data") {
    s.target().fail_after_data = true;
    s.start();
    s.request(nbd::kCmdRead, 0, 3, 0, 512);
    CHECK(s.chunk().type == nbd::kReplyTypeOffsetData);
  }
  SUBCASE("before data") {
    s.start();
    s.request(nbd::kCmdRead, 0, 3, 0, 512);
  }
  const Chunk error = s.chunk();
  CHECK(error.type == nbd::kReplyTypeError);
  CHECK(error.flags == nbd::kReplyFlagDone);
  CHECK(error.cookie == 3);
  REQUIRE(error.payload.size() == 6);
  CHECK(nbd::load_be32(error.payload.data()) == nbd::kErrIo);
  // A range error on a structured READ is an ERROR chunk too; other commands stay simple.
  s.request(nbd::kCmdRead, 0, 4, kSize, 1);
  const Chunk range = s.chunk();
  CHECK(range.type == nbd::kReplyTypeError);
  CHECK(nbd::load_be32(range.payload.data()) == nbd::kErrInval);
  s.request(nbd::kCmdWrite, 0, 5, kSize, 1, Bytes{0});
  CHECK(s.simple_reply(5) == nbd::kErrNoSpc);
  // Zero-length structured READ: just NONE+DONE.
  s.request(nbd::kCmdRead, 0, 6, 0, 0);
  const Chunk empty = s.chunk();
  CHECK(empty.type == nbd::kReplyTypeNone);
  CHECK(empty.flags == nbd::kReplyFlagDone);
}

TEST_CASE("connection: BLOCK_STATUS carries the context id, clips extents, honours REQ_ONE") {
  Session s(kAllCaps, true, true);
  s.target().extents = {{4096, 0}, {0, 0}, {8192, kExtentHole | kExtentZero}, {4096, 0}};
  s.start();
  SUBCASE("all extents, clipped to the request") {
    s.request(nbd::kCmdBlockStatus, 0, 1, 0, 10000);
    const Chunk status = s.chunk();
    CHECK(status.type == nbd::kReplyTypeBlockStatus);
    CHECK(status.flags == 0);
    CHECK(status.payload == cat({be32(kBaseAllocationContextId), be32(4096), be32(0), be32(10000 - 4096), be32(3)}));
    const Chunk done = s.chunk();
    CHECK(done.type == nbd::kReplyTypeNone);
    CHECK(done.flags == nbd::kReplyFlagDone);
  }
  SUBCASE("REQ_ONE: exactly one extent") {
    s.request(nbd::kCmdBlockStatus, nbd::kCmdFlagReqOne, 1, 0, 1 << 16);
    CHECK(s.chunk().payload == cat({be32(kBaseAllocationContextId), be32(4096), be32(0)}));
    CHECK(s.chunk().type == nbd::kReplyTypeNone);
    CHECK(s.target().requests().at(0).flags == nbd::kCmdFlagReqOne);
  }
  SUBCASE("errors") {
    s.request(nbd::kCmdBlockStatus, 0, 2, kSize, 1);
    Chunk error = s.chunk();
    CHECK(error.type == nbd::kReplyTypeError);
    CHECK(nbd::load_be32(error.payload.data()) == nbd::kErrInval);
    s.request(nbd::kCmdBlockStatus, 0, 3, 0, 0);
    error = s.chunk();
    CHECK(error.type == nbd::kReplyTypeError);
    CHECK(nbd::load_be32(error.payload.data()) == nbd::kErrInval);
  }
}

TEST_CASE("connection: bad magic disconnects") {
  Session s(kAllCaps, false);
  s.start();
  Bytes raw(nbd::kRequestSize, 0);
  send_bytes(s.client(), raw);
  CHECK(s.wait_end() == NbdConnection::End::ProtocolError);
  CHECK(peer_closed(s.client()));
}

TEST_CASE("connection: DISC waits for requests in flight; their replies still go out") {
  Session s(kAllCaps, false);
  s.target().delay = std::chrono::milliseconds(200);
  s.start();
  s.request(nbd::kCmdWrite, 0, 1, 0, 4, Bytes{1, 2, 3, 4});
  s.request(nbd::kCmdRead, 0, 2, 100, 8);
  s.request(nbd::kCmdDisc, 0, 3, 0, 0);
  CHECK(s.wait_end() == NbdConnection::End::Disconnect);  // returned only after both finished
  CHECK(s.target().submitted() == 2);
  // Replies may come in either order (NBD matches them by cookie); the
  // READ's data follows its own header.
  std::set<std::uint64_t> seen;
  for (int i = 0; i < 2; ++i) {
    const Bytes header = recv_bytes(s.client(), nbd::kSimpleReplySize);
    CHECK(nbd::load_be32(header.data()) == nbd::kSimpleReplyMagic);
    CHECK(nbd::load_be32(header.data() + 4) == 0);
    const std::uint64_t cookie = nbd::load_be64(header.data() + 8);
    CHECK((cookie == 1 || cookie == 2));
    if (cookie == 2) CHECK(recv_bytes(s.client(), 8) == s.disk(100, 8));
    seen.insert(cookie);
  }
  CHECK(seen.size() == 2);
}

TEST_CASE("connection: EOF without DISC is a normal end after in-flight requests finish") {
  Session s(kAllCaps, true);
  s.target().delay = std::chrono::milliseconds(100);
  s.start();
  s.request(nbd::kCmdFlush, 0, 1, 0, 0);
  ::shutdown(s.client(), SHUT_WR);
  CHECK(s.wait_end() == NbdConnection::End::Eof);
  CHECK(s.simple_reply(1) == 0);
}

TEST_CASE("connection: a cookie reused while in flight disconnects") {
  Session s(kAllCaps, false);
  s.target().delay = std::chrono::milliseconds(200);
  s.start();
  s.request(nbd::kCmdFlush, 0, 1, 0, 0);
  s.request(nbd::kCmdFlush, 0, 1, 0, 0);
  CHECK(s.wait_end() == NbdConnection::End::ProtocolError);
}

TEST_CASE("connection: misaligned requests are refused only when the client agreed to the block size") {
  for (const bool agreed : {true, false}) {
    CAPTURE(agreed);
    Session s(kAllCaps, false);
    s.info().block_min = 512;
    s.negotiated().block_size_agreed = agreed;
    s.start();
    s.request(nbd::kCmdRead, 0, 1, 1, 512);
    CHECK(s.simple_reply(1) == (agreed ? nbd::kErrInval : 0));
    if (!agreed) recv_bytes(s.client(), 512);
    s.request(nbd::kCmdWrite, 0, 2, 512, 100, Bytes(100, 0));
    CHECK(s.simple_reply(2) == (agreed ? nbd::kErrInval : 0));
    s.request(nbd::kCmdRead, 0, 3, 1024, 512);
    CHECK(s.simple_reply(3) == 0);
    recv_bytes(s.client(), 512);
  }
}

TEST_CASE("connection: a DF READ that fails part-way is padded to its announced length, then an ERROR chunk") {
  Session s(kAllCaps, true);
  s.target().read_piece_size = 1000;
  s.target().fail_with = EIO;
  s.target().fail_after_data = true;
  s.target().fail_after_bytes = 1000;
  s.start();
  s.request(nbd::kCmdRead, nbd::kCmdFlagDf, 11, 0, 2500);
  const Chunk data = s.chunk();
  CHECK(data.type == nbd::kReplyTypeOffsetData);
  CHECK(data.flags == 0);
  REQUIRE(data.payload.size() == 8 + 2500);
  CHECK(Bytes(data.payload.begin() + 8, data.payload.begin() + 8 + 1000) == s.disk(0, 1000));
  CHECK(Bytes(data.payload.begin() + 8 + 1000, data.payload.end()) == Bytes(1500, 0));
  const Chunk error = s.chunk();
  CHECK(error.type == nbd::kReplyTypeError);
  CHECK(error.flags == nbd::kReplyFlagDone);
  REQUIRE(error.payload.size() == 6);
  CHECK(nbd::load_be32(error.payload.data()) == nbd::kErrIo);
  // The connection is still usable.
  s.target().fail_with = 0;
  s.target().fail_after_data = false;
  s.request(nbd::kCmdWrite, 0, 12, 0, 4, Bytes{1, 2, 3, 4});
  CHECK(s.simple_reply(12) == 0);
}

TEST_CASE("connection: a DF READ longer than the advertised maximum block size gets EOVERFLOW") {
  Session s(kAllCaps, true);
  s.info().block_max = 64u << 10;
  s.start();
  s.request(nbd::kCmdRead, nbd::kCmdFlagDf, 13, 0, (64u << 10) + 4096);
  const Chunk error = s.chunk();
  CHECK(error.type == nbd::kReplyTypeError);
  CHECK(error.flags == nbd::kReplyFlagDone);
  REQUIRE(error.payload.size() == 6);
  CHECK(nbd::load_be32(error.payload.data()) == nbd::kErrOverflow);
  CHECK(s.target().submitted() == 0);
  // Without DF the same READ is served (in chunks as the data comes).
  s.request(nbd::kCmdRead, 0, 14, 0, (64u << 10) + 4096);
  std::uint64_t got = 0;
  for (;;) {
    const Chunk chunk = s.chunk();
    if (chunk.type == nbd::kReplyTypeOffsetData) got += chunk.payload.size() - 8;
    if (chunk.flags & nbd::kReplyFlagDone) break;
  }
  CHECK(got == (64u << 10) + 4096);
}

}  // namespace
}  // namespace cbd::proxy
