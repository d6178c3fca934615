// The queue side of one channel: turns NBD requests into submission entries
// and data extents, and completions back into replies (design §1, §3.8,
// §3.9, §3.11).
//
// - Requests larger than a channel can hold at once are split into entries;
//   READ pieces are handed to the Replier strictly in order.
// - A full ring, a full data area or a full in-flight table blocks the
//   submitting connection (back-pressure), never fails it.
// - Every entry stays recorded until its completion is consumed, so after a
//   backend restart (new epoch) the queue re-initialises the channel and
//   re-drives them; if the backend stays away past the timeout they fail with
//   EIO.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <memory>
#include <thread>
#include <unordered_map>
#include <vector>

#include "client/request_target.hpp"
#include "common/channel.hpp"
#include "common/data_area.hpp"
#include "common/poller.hpp"
#include "common/slot.hpp"

namespace cbd::proxy {

struct Binding {
  std::uint32_t backend_id = 0;
  std::uint32_t blkdev_id = 0;
  std::uint64_t backend_epoch = 0;
};

class ChannelQueue final : public RequestTarget {
 public:
  ChannelQueue(const Transport& transport, SlotClaim claim, ExportInfo info, PollTunables poll);
  ChannelQueue(const ChannelQueue&) = delete;
  ChannelQueue& operator=(const ChannelQueue&) = delete;
  ~ChannelQueue() override;

  // Sets the channel up for `binding` and waits up to `timeout` for the
  // backend's handler to attach.  False on timeout (the queue then keeps
  // requests waiting until rebind() or fail_outstanding()).
  bool bind(const Binding& binding, std::chrono::milliseconds timeout);
  // After a backend restart: re-initialise the channel for the new epoch and
  // submit again every entry that has not completed.
  bool rebind(std::uint64_t backend_epoch, std::chrono::milliseconds timeout) {
    return set_up(backend_epoch, timeout);
  }
  // The backend is gone for good (timeout): complete every outstanding entry
  // with EIO, and fail new requests until rebind() succeeds.
  void fail_outstanding(int error);

  ExportInfo info() const override { return info_; }
  bool submit(const IoRequest& request, int payload_fd, Replier& replier) override;

  std::uint32_t index() const { return channel_.index(); }
  SlotClaim& claim() { return claim_; }
  std::size_t outstanding() const;

 private:
  struct Request;
  struct Entry {
    Request* request = nullptr;  // null: slot free
    std::uint64_t serial = 0;    // distinguishes reuses of this slot in tags
    SubmissionEntry submission{};
    std::uint64_t relative_offset = 0;  // from the start of the request
    bool has_extent = false;
    bool pushed = false;      // in the ring (or consumed by the handler)
    bool completed = false;
    int status = 0;
    std::uint32_t result_length = 0;
    std::uint32_t result_crc = 0;
  };
  struct Request {
    IoRequest io;
    Replier* replier = nullptr;
    std::vector<std::uint32_t> entries;  // slots, in offset order
    std::size_t next_to_deliver = 0;      // READ: first piece not yet handed to the replier
    bool all_submitted = false;
    bool send_failed = false;             // the connection refused data: skip the rest, still finish()
    bool deferred = false;                // READ stream waiting for older requests of its connection
    std::uint64_t sequence = 0;           // submission order on this queue
    int error = 0;
  };

  // Steps 1-3 of the attach protocol with a new generation (for
  // `backend_epoch`, or the current one), then re-drives every outstanding
  // entry.  Gives up after `timeout`, or early on stop or fail_outstanding().
  bool set_up(std::optional<std::uint64_t> backend_epoch, std::chrono::milliseconds timeout);
  // Waits until `length` bytes of data area and one entry slot are free.
  // Returns the entry slot, or -1 if the queue is failing requests.
  int reserve(std::unique_lock<std::mutex>& lock, std::uint32_t data_length, bool needs_extent);
  void push(std::unique_lock<std::mutex>& lock, std::uint32_t slot);
  void completion_loop();
  void complete(std::unique_lock<std::mutex>& lock, const CompletionEntry& completion);
  void fail_in_flight(std::unique_lock<std::mutex>& lock, int error);
  // Hands completed pieces of `request` to its replier in order, and finishes
  // it when everything is delivered.  Only the completion thread delivers,
  // except for a request that never reached the ring.
  void deliver(std::unique_lock<std::mutex>& lock, Request& request);
  void finish_if_done(std::unique_lock<std::mutex>& lock, Request& request);
  // True when `request` must not start its reply stream yet (see deliver()).
  bool must_defer_stream(const Request& request) const;
  // Delivers what is ready among the requests of `replier`, now that no
  // stream holds it.
  void release_held(std::unique_lock<std::mutex>& lock, Replier* replier);
  void retire(std::uint32_t slot);
  std::uint64_t tag_of(std::uint32_t slot) const { return (entries_[slot].serial << 20) | slot; }

  Channel channel_;
  SlotClaim claim_;
  ExportInfo info_;
  PollTunables poll_;
  std::uint32_t max_piece_ = 0;   // largest data extent per entry
  // With entries in flight and no completion for this long, or with an
  // impossible completion ring, the channel is set up again and its entries
  // re-driven: whatever a corrupt peer or a scribbled control block lost,
  // clients see a delay, never a hang.
  std::chrono::milliseconds stall_timeout_{10000};

  mutable std::mutex mutex_;
  std::condition_variable space_;  // data area, entry slot or ring space freed; or rebound
  DataAreaAllocator allocator_;
  RingProducer<SubmissionEntry> submissions_;
  RingConsumer<CompletionEntry> completions_;
  std::vector<Entry> entries_;           // fixed size: min(sq, cq) entries in flight at most
  std::vector<std::uint32_t> free_slots_;
  std::unordered_map<Request*, std::unique_ptr<Request>> requests_;
  // Per connection, the READ whose reply is half sent.  With simple replies
  // nothing else may be written to that connection until it ends, so other
  // replies for it are held back — never waited for inside the completion
  // thread, which is the one thread that can finish the stream.
  std::unordered_map<Replier*, Request*> streaming_;
  // Per connection, how many READs wait to start their stream.
  std::unordered_map<Replier*, unsigned> deferred_streams_;
  std::uint64_t next_sequence_ = 1;
  std::condition_variable work_;   // wakes the completion thread when it sleeps with nothing in flight
  std::size_t in_flight_ = 0;      // entries pushed and not completed
  int fail_pending_ = 0;           // set by fail_outstanding(), acted on by the completion thread
  std::uint64_t next_serial_ = 1;
  Binding binding_{};
  std::uint64_t generation_ = 0;
  bool attached_ = false;   // the handler serves our generation
  int failing_ = 0;         // nonzero: fail new requests with this errno
  bool stopping_ = false;
  std::thread completion_thread_;
};

}  // namespace cbd::proxy
