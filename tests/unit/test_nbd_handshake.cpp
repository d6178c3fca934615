// Fixed-newstyle negotiation, checked byte for byte: the client side writes
// its whole conversation first (it fits in the socket buffer), the server
// negotiates, and we compare everything it wrote.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "client/nbd_handshake.hpp"
#include "nbd_test_support.hpp"

namespace cbd::proxy {
namespace {

using namespace test;

Bytes option(std::uint32_t code, const Bytes& payload = {}) {
  return cat({be64(nbd::kOptionMagic), be32(code), be32(static_cast<std::uint32_t>(payload.size())), payload});
}

Bytes reply(std::uint32_t code, std::uint32_t type, const Bytes& payload = {}) {
  return cat({be64(nbd::kOptionReplyMagic), be32(code), be32(type), be32(static_cast<std::uint32_t>(payload.size())),
              payload});
}

Bytes info_request(std::string_view name, std::initializer_list<std::uint16_t> types) {
  Bytes payload = cat({be32(static_cast<std::uint32_t>(name.size())), text(name), be16(static_cast<std::uint16_t>(types.size()))});
  for (std::uint16_t type : types) payload = cat({payload, be16(type)});
  return payload;
}

Bytes meta_request(std::string_view name, std::initializer_list<std::string_view> queries) {
  Bytes payload = cat({be32(static_cast<std::uint32_t>(name.size())), text(name), be32(static_cast<std::uint32_t>(queries.size()))});
  for (std::string_view query : queries) payload = cat({payload, be32(static_cast<std::uint32_t>(query.size())), text(query)});
  return payload;
}

const Bytes kGreeting = cat({be64(nbd::kInitMagic), be64(nbd::kOptionMagic), be16(3)});

struct Conversation {
  HandshakeResult result;
  Bytes server_wrote;  // after the greeting
};

Conversation negotiate(const ExportInfo& info, const Bytes& client_sends,
                       std::uint32_t client_flags = nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes) {
  SocketPair pair;
  send_bytes(pair.client, cat({be32(client_flags), client_sends}));
  ::shutdown(pair.client, SHUT_WR);
  Conversation conversation;
  conversation.result = negotiate_handshake(pair.server, pair.server, info, IoDeadline{});
  ::close(pair.server);
  pair.server = -1;
  const Bytes all = recv_all(pair.client);
  REQUIRE(all.size() >= kGreeting.size());
  CHECK(Bytes(all.begin(), all.begin() + kGreeting.size()) == kGreeting);
  conversation.server_wrote.assign(all.begin() + kGreeting.size(), all.end());
  return conversation;
}

Bytes export_info_reply(std::uint32_t code, const ExportInfo& info, std::uint16_t flags) {
  return reply(code, nbd::kRepInfo, cat({be16(nbd::kInfoExport), be64(info.size), be16(flags)}));
}
Bytes block_size_reply(std::uint32_t code) {
  return reply(code, nbd::kRepInfo, cat({be16(nbd::kInfoBlockSize), be32(1), be32(4096), be32(32u << 20)}));
}

TEST_CASE("handshake: GO on the default export enters transmission") {
  const ExportInfo info = test_export(kCapFlush | kCapMultiConn);
  const Conversation c = negotiate(info, option(nbd::kOptGo, info_request("", {})));
  const std::uint16_t flags = nbd::kTxHasFlags | nbd::kTxSendFlush | nbd::kTxCanMultiConn;
  CHECK(c.server_wrote == cat({export_info_reply(nbd::kOptGo, info, flags), block_size_reply(nbd::kOptGo),
                               reply(nbd::kOptGo, nbd::kRepAck)}));
  CHECK(c.result.enter_transmission);
  CHECK_FALSE(c.result.structured_replies);
  CHECK(c.result.transmission_flags == flags);
  CHECK_FALSE(c.result.block_size_agreed);
}

TEST_CASE("handshake: GO by name with NAME, DESCRIPTION and BLOCK_SIZE requests") {
  const ExportInfo info = test_export(0);
  const Conversation c = negotiate(
      info, option(nbd::kOptGo, info_request("disk0", {nbd::kInfoBlockSize, nbd::kInfoDescription, nbd::kInfoName})));
  CHECK(c.server_wrote ==
        cat({export_info_reply(nbd::kOptGo, info, nbd::kTxHasFlags),
             reply(nbd::kOptGo, nbd::kRepInfo, cat({be16(nbd::kInfoName), text("disk0")})),
             reply(nbd::kOptGo, nbd::kRepInfo, cat({be16(nbd::kInfoDescription), text("cbd test disk")})),
             block_size_reply(nbd::kOptGo), reply(nbd::kOptGo, nbd::kRepAck)}));
  CHECK(c.result.enter_transmission);
  CHECK(c.result.block_size_agreed);
}

TEST_CASE("handshake: INFO answers without entering transmission; GO follows") {
  const ExportInfo info = test_export(0);
  const Conversation c =
      negotiate(info, cat({option(nbd::kOptInfo, info_request("", {})), option(nbd::kOptGo, info_request("", {}))}));
  CHECK(c.server_wrote == cat({export_info_reply(nbd::kOptInfo, info, 1), block_size_reply(nbd::kOptInfo),
                               reply(nbd::kOptInfo, nbd::kRepAck), export_info_reply(nbd::kOptGo, info, 1),
                               block_size_reply(nbd::kOptGo), reply(nbd::kOptGo, nbd::kRepAck)}));
  CHECK(c.result.enter_transmission);
}

TEST_CASE("handshake: unknown export gets ERR_UNKNOWN and haggling goes on") {
  const ExportInfo info = test_export(0);
  const Conversation c =
      negotiate(info, cat({option(nbd::kOptGo, info_request("other", {})), option(nbd::kOptInfo, info_request("x", {})),
                           option(nbd::kOptAbort)}));
  CHECK(c.server_wrote == cat({reply(nbd::kOptGo, nbd::kRepErrUnknown), reply(nbd::kOptInfo, nbd::kRepErrUnknown),
                               reply(nbd::kOptAbort, nbd::kRepAck)}));
  CHECK_FALSE(c.result.enter_transmission);
}

TEST_CASE("handshake: malformed GO payload gets ERR_INVALID") {
  const ExportInfo info = test_export(0);
  Bytes bad = info_request("", {nbd::kInfoName});
  bad.pop_back();  // half an info type
  const Conversation c = negotiate(info, cat({option(nbd::kOptGo, bad), option(nbd::kOptGo, Bytes{0, 0})}));
  CHECK(c.server_wrote == cat({reply(nbd::kOptGo, nbd::kRepErrInvalid), reply(nbd::kOptGo, nbd::kRepErrInvalid)}));
  CHECK_FALSE(c.result.enter_transmission);
}

TEST_CASE("handshake: LIST names the export with its description, then ABORT") {
  const ExportInfo info = test_export(0);
  const Conversation c = negotiate(info, cat({option(nbd::kOptList), option(nbd::kOptAbort)}));
  CHECK(c.server_wrote == cat({reply(nbd::kOptList, nbd::kRepServer, cat({be32(5), text("disk0"), text("cbd test disk")})),
                               reply(nbd::kOptList, nbd::kRepAck), reply(nbd::kOptAbort, nbd::kRepAck)}));
  CHECK_FALSE(c.result.enter_transmission);
  CHECK(c.result.end_reason.find("abort") != std::string::npos);
}

TEST_CASE("handshake: EXPORT_NAME with and without NO_ZEROES") {
  const ExportInfo info = test_export(kCapReadOnly | kCapTrim);  // trim is not advertised read-only
  const std::uint16_t flags = nbd::kTxHasFlags | nbd::kTxReadOnly;
  SUBCASE("NO_ZEROES") {
    const Conversation c = negotiate(info, option(nbd::kOptExportName, text("disk0")));
    CHECK(c.server_wrote == cat({be64(info.size), be16(flags)}));
    CHECK(c.result.enter_transmission);
  }
  SUBCASE("without NO_ZEROES: 124 zero bytes follow") {
    const Conversation c = negotiate(info, option(nbd::kOptExportName, {}), nbd::kClientFlagFixedNewstyle);
    CHECK(c.server_wrote == cat({be64(info.size), be16(flags), Bytes(124, 0)}));
    CHECK(c.result.enter_transmission);
  }
  SUBCASE("unknown export: disconnect without a word") {
    const Conversation c = negotiate(info, option(nbd::kOptExportName, text("nope")));
    CHECK(c.server_wrote.empty());
    CHECK_FALSE(c.result.enter_transmission);
  }
}

TEST_CASE("handshake: unknown options and STARTTLS get ERR_UNSUP; their payload is skipped") {
  const ExportInfo info = test_export(0);
  const Conversation c = negotiate(info, cat({option(11, Bytes{1, 2, 3, 4, 5}), option(nbd::kOptStartTls),
                                              option(0x7fffffff, Bytes(100, 0xaa)), option(nbd::kOptAbort)}));
  CHECK(c.server_wrote == cat({reply(11, nbd::kRepErrUnsup), reply(nbd::kOptStartTls, nbd::kRepErrUnsup),
                               reply(0x7fffffff, nbd::kRepErrUnsup), reply(nbd::kOptAbort, nbd::kRepAck)}));
}

TEST_CASE("handshake: an oversized option is skipped and refused with ERR_TOO_BIG") {
  const ExportInfo info = test_export(0);
  const Bytes big(nbd::kMaxOptionLength + 1, 0);
  // Too big to pre-write into the socket buffer: feed it from a thread.
  SocketPair pair;
  std::thread client([&] {
    send_bytes(pair.client, cat({be32(3), option(nbd::kOptInfo, big), option(nbd::kOptAbort)}));
    ::shutdown(pair.client, SHUT_WR);
  });
  const HandshakeResult result = negotiate_handshake(pair.server, pair.server, info, IoDeadline{});
  client.join();
  ::close(pair.server);
  pair.server = -1;
  const Bytes all = recv_all(pair.client);
  CHECK(Bytes(all.begin() + kGreeting.size(), all.end()) ==
        cat({reply(nbd::kOptInfo, nbd::kRepErrTooBig), reply(nbd::kOptAbort, nbd::kRepAck)}));
  CHECK_FALSE(result.enter_transmission);
}

TEST_CASE("handshake: bad option magic or unknown client flags end the connection") {
  const ExportInfo info = test_export(0);
  SUBCASE("bad magic") {
    Bytes bad = option(nbd::kOptGo, info_request("", {}));
    bad[0] ^= 1;
    const Conversation c = negotiate(info, bad);
    CHECK(c.server_wrote.empty());
    CHECK_FALSE(c.result.enter_transmission);
  }
  SUBCASE("unknown client flag") {
    const Conversation c = negotiate(info, option(nbd::kOptGo, info_request("", {})), 0x1 | 0x4);
    CHECK(c.server_wrote.empty());
    CHECK_FALSE(c.result.enter_transmission);
  }
  SUBCASE("EOF") {
    const Conversation c = negotiate(info, {});
    CHECK(c.server_wrote.empty());
    CHECK_FALSE(c.result.enter_transmission);
  }
}

TEST_CASE("handshake: structured replies and base:allocation") {
  const ExportInfo info = test_export(kCapExtents);
  const Bytes context_set = reply(nbd::kOptSetMetaContext, nbd::kRepMetaContext,
                                  cat({be32(kBaseAllocationContextId), text("base:allocation")}));
  const Bytes context_listed =
      reply(nbd::kOptListMetaContext, nbd::kRepMetaContext, cat({be32(0), text("base:allocation")}));

  SUBCASE("qemu's sequence: STRUCTURED_REPLY, SET base:allocation, GO") {
    const Conversation c = negotiate(info, cat({option(nbd::kOptStructuredReply),
                                                option(nbd::kOptSetMetaContext, meta_request("disk0", {"base:allocation"})),
                                                option(nbd::kOptGo, info_request("disk0", {nbd::kInfoBlockSize}))}));
    const std::uint16_t flags = nbd::kTxHasFlags | nbd::kTxSendDf;
    CHECK(c.server_wrote == cat({reply(nbd::kOptStructuredReply, nbd::kRepAck), context_set,
                                 reply(nbd::kOptSetMetaContext, nbd::kRepAck), export_info_reply(nbd::kOptGo, info, flags),
                                 block_size_reply(nbd::kOptGo), reply(nbd::kOptGo, nbd::kRepAck)}));
    CHECK(c.result.enter_transmission);
    CHECK(c.result.structured_replies);
    CHECK(c.result.meta_context_id == kBaseAllocationContextId);
    CHECK(c.result.transmission_flags == flags);
  }
  SUBCASE("SET before STRUCTURED_REPLY is invalid") {
    const Conversation c =
        negotiate(info, cat({option(nbd::kOptSetMetaContext, meta_request("", {"base:allocation"})), option(nbd::kOptAbort)}));
    CHECK(c.server_wrote ==
          cat({reply(nbd::kOptSetMetaContext, nbd::kRepErrInvalid), reply(nbd::kOptAbort, nbd::kRepAck)}));
  }
  SUBCASE("LIST with no query lists everything, with id 0; 'base:' is a wildcard; others are ignored") {
    const Conversation c = negotiate(
        info, cat({option(nbd::kOptListMetaContext, meta_request("", {})),
                   option(nbd::kOptListMetaContext, meta_request("", {"base:"})),
                   option(nbd::kOptListMetaContext, meta_request("", {"qemu:dirty-bitmap:b", "base:other", "nocolon"})),
                   option(nbd::kOptAbort)}));
    CHECK(c.server_wrote == cat({context_listed, reply(nbd::kOptListMetaContext, nbd::kRepAck), context_listed,
                                 reply(nbd::kOptListMetaContext, nbd::kRepAck),
                                 reply(nbd::kOptListMetaContext, nbd::kRepAck), reply(nbd::kOptAbort, nbd::kRepAck)}));
  }
  SUBCASE("SET 'base:' selects nothing, and replaces an earlier selection") {
    const Conversation c =
        negotiate(info, cat({option(nbd::kOptStructuredReply),
                             option(nbd::kOptSetMetaContext, meta_request("", {"base:allocation"})),
                             option(nbd::kOptSetMetaContext, meta_request("", {"base:"})),
                             option(nbd::kOptGo, info_request("", {}))}));
    CHECK(c.result.enter_transmission);
    CHECK(c.result.meta_context_id == 0);
  }
  SUBCASE("unknown export and malformed queries") {
    Bytes truncated = meta_request("", {"base:allocation"});
    truncated.pop_back();
    const Conversation c =
        negotiate(info, cat({option(nbd::kOptStructuredReply),
                             option(nbd::kOptSetMetaContext, meta_request("other", {"base:allocation"})),
                             option(nbd::kOptListMetaContext, truncated), option(nbd::kOptAbort)}));
    CHECK(c.server_wrote == cat({reply(nbd::kOptStructuredReply, nbd::kRepAck),
                                 reply(nbd::kOptSetMetaContext, nbd::kRepErrUnknown),
                                 reply(nbd::kOptListMetaContext, nbd::kRepErrInvalid), reply(nbd::kOptAbort, nbd::kRepAck)}));
  }
  SUBCASE("no extents capability: no contexts") {
    const Conversation c = negotiate(test_export(0), cat({option(nbd::kOptStructuredReply),
                                                          option(nbd::kOptListMetaContext, meta_request("", {})),
                                                          option(nbd::kOptSetMetaContext, meta_request("", {"base:allocation"})),
                                                          option(nbd::kOptAbort)}));
    CHECK(c.server_wrote == cat({reply(nbd::kOptStructuredReply, nbd::kRepAck),
                                 reply(nbd::kOptListMetaContext, nbd::kRepAck),
                                 reply(nbd::kOptSetMetaContext, nbd::kRepAck), reply(nbd::kOptAbort, nbd::kRepAck)}));
    CHECK(c.result.meta_context_id == 0);
  }
}

TEST_CASE("handshake: transmission flags follow the capabilities") {
  CHECK(transmission_flags_for(test_export(0), false) == nbd::kTxHasFlags);
  CHECK(transmission_flags_for(test_export(kAllCaps), true) ==
        (nbd::kTxHasFlags | nbd::kTxSendFlush | nbd::kTxSendFua | nbd::kTxRotational | nbd::kTxSendTrim |
         nbd::kTxSendWriteZeroes | nbd::kTxSendDf | nbd::kTxCanMultiConn | nbd::kTxSendCache | nbd::kTxSendFastZero));
  CHECK(transmission_flags_for(test_export(kAllCaps | kCapReadOnly), false) ==
        (nbd::kTxHasFlags | nbd::kTxReadOnly | nbd::kTxSendFlush | nbd::kTxRotational | nbd::kTxCanMultiConn |
         nbd::kTxSendCache));
  // FAST_ZERO means nothing without WRITE_ZEROES.
  CHECK(transmission_flags_for(test_export(kCapFastZero), false) == nbd::kTxHasFlags);
}

TEST_CASE("handshake: advertised block sizes are made consistent") {
  ExportInfo info = test_export(0);
  info.block_min = 512;
  info.block_preferred = 4096;
  info.block_max = 64u << 20;  // more than we accept
  BlockSizes sizes = advertised_block_sizes(info);
  CHECK(sizes.minimum == 512);
  CHECK(sizes.preferred == 4096);
  CHECK(sizes.maximum == nbd::kMaxPayload);

  info.block_min = 3;  // not a power of two: no constraint
  info.block_preferred = 0;
  info.block_max = 1000;
  sizes = advertised_block_sizes(info);
  CHECK(sizes.minimum == 1);
  CHECK(sizes.preferred == 512);
  CHECK(sizes.maximum == 1000);
}

TEST_CASE("handshake: a preferred block size under 512 is never advertised") {
  ExportInfo info = test_export(0);
  for (const std::uint32_t preferred : {1u, 2u, 64u, 256u}) {
    CAPTURE(preferred);
    info.block_min = 1;
    info.block_preferred = preferred;
    info.block_max = 32u << 20;
    BlockSizes sizes = advertised_block_sizes(info);
    CHECK(sizes.preferred == kMinPreferredBlockSize);
    CHECK(sizes.maximum == nbd::kMaxPayload);
    // A maximum under 512 is raised rather than the preferred size lowered.
    info.block_max = 256;
    sizes = advertised_block_sizes(info);
    CHECK(sizes.preferred == kMinPreferredBlockSize);
    CHECK(sizes.maximum == kMinPreferredBlockSize);
    CHECK(sizes.maximum % sizes.minimum == 0);
  }
  // And what the client reads in NBD_INFO_BLOCK_SIZE says the same.
  info.block_preferred = 256;
  info.block_max = 32u << 20;
  const Conversation c = negotiate(info, option(nbd::kOptGo, info_request("", {nbd::kInfoBlockSize})));
  CHECK(c.server_wrote == cat({export_info_reply(nbd::kOptGo, info, nbd::kTxHasFlags),
                               reply(nbd::kOptGo, nbd::kRepInfo,
                                     cat({be16(nbd::kInfoBlockSize), be32(1), be32(512), be32(32u << 20)})),
                               reply(nbd::kOptGo, nbd::kRepAck)}));
}

TEST_CASE("handshake: at most 32 options, then the connection ends as with nbdkit") {
  const ExportInfo info = test_export(0);
  Bytes lists;
  for (std::size_t i = 0; i + 1 < kMaxHandshakeOptions; ++i) lists = cat({lists, option(nbd::kOptList)});
  const Bytes list_replies = [&] {
    Bytes out;
    for (std::size_t i = 0; i + 1 < kMaxHandshakeOptions; ++i)
      out = cat({out, reply(nbd::kOptList, nbd::kRepServer, cat({be32(5), text("disk0"), text("cbd test disk")})),
                 reply(nbd::kOptList, nbd::kRepAck)});
    return out;
  }();
  SUBCASE("a GO as the 32nd option is served") {
    const Conversation c = negotiate(info, cat({lists, option(nbd::kOptGo, info_request("", {}))}));
    CHECK(c.result.enter_transmission);
  }
  SUBCASE("a 33rd option is not read: the connection ends") {
    const Conversation c =
        negotiate(info, cat({lists, option(nbd::kOptList), option(nbd::kOptGo, info_request("", {}))}));
    CHECK_FALSE(c.result.enter_transmission);
    CHECK(c.result.end_reason.find("32 options") != std::string::npos);
    const Bytes last_list = cat({reply(nbd::kOptList, nbd::kRepServer, cat({be32(5), text("disk0"), text("cbd test disk")})),
                                 reply(nbd::kOptList, nbd::kRepAck)});
    CHECK(c.server_wrote == cat({list_replies, last_list}));
  }
}

// Sends `bytes` from a thread, ignoring a server that hangs up part way.
struct BackgroundSender {
  std::thread thread;
  BackgroundSender(int fd, Bytes bytes)
      : thread([fd, bytes = std::move(bytes)] {
          send_all(fd, true, bytes.data(), bytes.size());
          ::shutdown(fd, SHUT_WR);
        }) {}
  ~BackgroundSender() { thread.join(); }
};

TEST_CASE("handshake: oversized option payloads are drained only up to a bound") {
  const ExportInfo info = test_export(0);
  const std::uint32_t big = 600u << 10;  // over kMaxOptionLength; two of them exceed kMaxDrainedOptionBytes
  static_assert(600u << 10 > nbd::kMaxOptionLength && 2 * (600u << 10) > kMaxDrainedOptionBytes);
  SocketPair pair;
  Bytes conversation = cat({be32(3), option(nbd::kOptInfo, Bytes(big, 0)), option(0x4242, Bytes(big, 0)),
                            option(nbd::kOptAbort)});
  HandshakeResult result;
  {
    BackgroundSender client(pair.client, std::move(conversation));
    result = negotiate_handshake(pair.server, pair.server, info, IoDeadline::after(std::chrono::seconds(20)));
    ::shutdown(pair.server, SHUT_RDWR);  // the sender may still be writing what we refuse to read
  }
  ::close(pair.server);
  pair.server = -1;
  const Bytes all = recv_all(pair.client);
  REQUIRE(all.size() >= kGreeting.size());
  // The first is refused with TOO_BIG; the second is not read at all.
  CHECK(Bytes(all.begin() + kGreeting.size(), all.end()) == reply(nbd::kOptInfo, nbd::kRepErrTooBig));
  CHECK_FALSE(result.enter_transmission);
  CHECK(result.end_reason.find("bytes") != std::string::npos);
}

TEST_CASE("handshake: an oversized SET_META_CONTEXT answered TOO_BIG clears the selected context") {
  const ExportInfo info = test_export(kCapExtents);
  SocketPair pair;
  const Bytes conversation =
      cat({be32(3), option(nbd::kOptStructuredReply),
           option(nbd::kOptSetMetaContext, meta_request("", {"base:allocation"})),
           option(nbd::kOptSetMetaContext, cat({meta_request("", {"base:allocation"}), Bytes(nbd::kMaxOptionLength, 0)})),
           option(nbd::kOptGo, info_request("", {}))});
  HandshakeResult result;
  {
    BackgroundSender client(pair.client, conversation);
    result = negotiate_handshake(pair.server, pair.server, info, IoDeadline::after(std::chrono::seconds(20)));
  }
  ::close(pair.server);
  pair.server = -1;
  const Bytes all = recv_all(pair.client);
  const Bytes expected_start =
      cat({reply(nbd::kOptStructuredReply, nbd::kRepAck),
           reply(nbd::kOptSetMetaContext, nbd::kRepMetaContext, cat({be32(kBaseAllocationContextId), text("base:allocation")})),
           reply(nbd::kOptSetMetaContext, nbd::kRepAck), reply(nbd::kOptSetMetaContext, nbd::kRepErrTooBig)});
  REQUIRE(all.size() >= kGreeting.size() + expected_start.size());
  CHECK(Bytes(all.begin() + kGreeting.size(), all.begin() + kGreeting.size() + expected_start.size()) == expected_start);
  CHECK(result.enter_transmission);
  CHECK(result.meta_context_id == 0);
}

TEST_CASE("handshake: everything happens under the deadline, a slow-dripping client included") {
  const ExportInfo info = test_export(0);
  const auto deadline_after = std::chrono::milliseconds(300);
  SUBCASE("a client that never sends a byte") {
    SocketPair pair;
    const auto start = std::chrono::steady_clock::now();
    const HandshakeResult result = negotiate_handshake(pair.server, pair.server, info, IoDeadline::after(deadline_after));
    const auto took = std::chrono::steady_clock::now() - start;
    CHECK(result.timed_out);
    CHECK_FALSE(result.enter_transmission);
    CHECK(took >= deadline_after);
    CHECK(took < std::chrono::seconds(3));
  }
  SUBCASE("a client that sends one byte every 20 ms, each read well inside any per-read timeout") {
    SocketPair pair;
    std::atomic<bool> stop{false};
    std::thread client([&] {
      Bytes conversation = cat({be32(3), option(nbd::kOptList), option(nbd::kOptList), option(nbd::kOptAbort)});
      // Never finishes within the deadline: 60 bytes at 20 ms is 1.2 s.
      for (std::size_t i = 0; i < conversation.size() && !stop.load(); ++i) {
        if (!send_all(pair.client, true, &conversation[i], 1)) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    });
    const auto start = std::chrono::steady_clock::now();
    const HandshakeResult result = negotiate_handshake(pair.server, pair.server, info, IoDeadline::after(deadline_after));
    const auto took = std::chrono::steady_clock::now() - start;
    stop = true;
    client.join();
    CHECK(result.timed_out);
    CHECK_FALSE(result.enter_transmission);
    CHECK(took < std::chrono::milliseconds(900));
  }
  SUBCASE("the cancel descriptor ends the handshake at once") {
    SocketPair pair;
    int stop_pipe[2];
    REQUIRE(::pipe(stop_pipe) == 0);
    std::thread stopper([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      [[maybe_unused]] const ssize_t written = ::write(stop_pipe[1], "x", 1);
    });
    const auto start = std::chrono::steady_clock::now();
    const HandshakeResult result =
        negotiate_handshake(pair.server, pair.server, info, IoDeadline::after(std::chrono::seconds(30), stop_pipe[0]));
    const auto took = std::chrono::steady_clock::now() - start;
    stopper.join();
    ::close(stop_pipe[0]);
    ::close(stop_pipe[1]);
    CHECK(result.timed_out);
    CHECK(took < std::chrono::seconds(5));
  }
}

}  // namespace
}  // namespace cbd::proxy
