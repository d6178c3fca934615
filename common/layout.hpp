// The on-media format of a cbd transport.
//
// This header is the specification of what lives in the shared region.  Every
// struct here is fixed-width, little-endian, standard-layout and trivially
// copyable; positions are offsets from the start of the region, never
// pointers.  Each field says which side writes it ("writer:"); no field has two
// writers, so no lock is needed beyond compare-and-swap on slot state words.
//
// Region map (all offsets and sizes come from the superblock, none is a
// compile-time constant of a reader):
//
//   0                      superblock (one 4 KiB page)
//   hosts.offset           host slots     [hosts.count]     each hosts.slot_size
//   backends.offset        backend slots  [backends.count]  each backends.slot_size
//   blkdevs.offset         blkdev slots   [blkdevs.count]   each blkdevs.slot_size
//   channels.offset        channels       [channels.count]  each channels.slot_size
//
// A channel is:
//   +0                     control block (ChannelControl)
//   +channel.sq_offset     submission ring: sq_entries  x SubmissionEntry
//   +channel.cq_offset     completion ring: cq_entries  x CompletionEntry
//   +channel.data_offset   data area:       data_size bytes
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace cbd {

// Every shared layout uses a fixed 64-byte line so that two binaries built
// for different CPUs agree (std::hardware_destructive_interference_size may
// differ between them).
inline constexpr std::size_t kLineSize = 64;
inline constexpr std::size_t kPageSize = 4096;

inline constexpr std::uint64_t kSuperblockMagic = 0x534e415254444243ull;  // the bytes "CBDTRANS"
inline constexpr std::uint16_t kVersionMajor = 1;
inline constexpr std::uint16_t kVersionMinor = 1;  // 1: doorbells and wake-ups (docs/design.md, Polling and doorbells)

// Incompatible features: a reader that does not know one must refuse the
// transport, because it would misread entries.
inline constexpr std::uint64_t kFeatureChecksum = 1ull << 0;  // CRC32C over entries and data
inline constexpr std::uint64_t kFeatureFlush = 1ull << 1;     // write back / invalidate cache lines (non-coherent memory, best effort)
inline constexpr std::uint64_t kKnownIncompatFeatures = kFeatureChecksum | kFeatureFlush;

inline constexpr std::uint32_t kNameSize = 64;  // host names, export names (NUL padded, not necessarily terminated)
inline constexpr std::uint32_t kNoSlot = 0xffffffffu;

// ---------------------------------------------------------------------------
// Superblock
// ---------------------------------------------------------------------------

struct AreaGeometry {
  std::uint64_t offset;     // byte offset of slot 0 from the start of the region
  std::uint32_t slot_size;  // bytes per slot (multiple of kLineSize)
  std::uint32_t count;      // number of slots
};
static_assert(sizeof(AreaGeometry) == 16);

struct ChannelGeometry {
  std::uint32_t sq_offset;   // submission ring, from the start of the channel
  std::uint32_t sq_entries;  // power of two
  std::uint32_t cq_offset;   // completion ring, from the start of the channel
  std::uint32_t cq_entries;  // power of two
  std::uint64_t data_offset; // data area, from the start of the channel
  std::uint64_t data_size;   // bytes; extents are addressed with 32-bit offsets, so < 4 GiB
};
static_assert(sizeof(ChannelGeometry) == 32);

struct Superblock {
  std::uint64_t magic;              // kSuperblockMagic
  std::uint16_t version_major;      // a reader refuses a major it does not know
  std::uint16_t version_minor;      // compatible additions
  std::uint32_t superblock_size;    // sizeof(Superblock) when formatted
  std::uint64_t features_compat;    // safe to ignore when unknown
  std::uint64_t features_incompat;  // refuse when unknown bits are set
  std::uint8_t uuid[16];            // format UUID: identifies this formatting of the region
  std::uint64_t region_size;        // bytes covered by this format (<= mapping size)
  AreaGeometry hosts;
  AreaGeometry backends;
  AreaGeometry blkdevs;
  AreaGeometry channels;            // slot_size = whole channel (control + rings + data)
  ChannelGeometry channel;
  std::uint32_t heartbeat_interval_ms;  // how often owners bump their heartbeat
  std::uint32_t dead_after_ms;          // observers judge a slot dead after this long without a bump
  std::uint8_t reserved[152];   // zero; room for compatible additions
  std::uint32_t reserved_tail;
  std::uint32_t checksum;           // CRC32C of the struct with this field zero
};
static_assert(sizeof(Superblock) == 320);
static_assert(offsetof(Superblock, uuid) == 32);
static_assert(offsetof(Superblock, hosts) == 56);
static_assert(offsetof(Superblock, channel) == 120);
static_assert(offsetof(Superblock, checksum) == 316);

// ---------------------------------------------------------------------------
// Slots
// ---------------------------------------------------------------------------

// A slot's state word packs an epoch (generation, upper 56 bits) and a state
// (lower 8 bits).  Every claim increments the epoch, so a former owner
// holding the old word can never act on a slot that was reclaimed: all its
// compare-and-swaps fail.
enum class SlotState : std::uint8_t {
  Free = 0,      // claimable
  Live = 1,      // owned, heartbeat running
  Stopping = 2,  // owner is shutting down cleanly; no new work
};

struct SlotHeader {
  std::uint64_t state;        // writer: CAS by claimer / owner / reclaimer (epoch << 8 | SlotState)
  std::uint64_t heartbeat;    // writer: owner; claim epoch << 32 at claim, then +1 every heartbeat_interval_ms by CAS (fenced, see slot.hpp)
  std::uint32_t owner_host;   // writer: owner at claim; host slot index of the owner (kNoSlot for a host slot)
  std::uint32_t owner_pid;    // writer: owner at claim; informative only
  std::uint8_t reserved[40];
};
static_assert(sizeof(SlotHeader) == kLineSize);

struct HostSlot {
  SlotHeader header;
  char hostname[kNameSize];   // writer: owner at claim
  std::uint8_t boot_id[16];   // writer: owner at claim; its kernel's boot id (common/kernel_identity.hpp), 0 = unknown
  std::uint8_t reserved[112];
};
static_assert(sizeof(HostSlot) == 256);
static_assert(offsetof(HostSlot, boot_id) == 2 * kLineSize);

// Capability bits a backend publishes; the proxy advertises exactly these.
inline constexpr std::uint32_t kCapReadOnly = 1u << 0;
inline constexpr std::uint32_t kCapFlush = 1u << 1;
inline constexpr std::uint32_t kCapFua = 1u << 2;
inline constexpr std::uint32_t kCapTrim = 1u << 3;
inline constexpr std::uint32_t kCapZero = 1u << 4;
inline constexpr std::uint32_t kCapFastZero = 1u << 5;
inline constexpr std::uint32_t kCapExtents = 1u << 6;
inline constexpr std::uint32_t kCapCache = 1u << 7;
inline constexpr std::uint32_t kCapMultiConn = 1u << 8;
inline constexpr std::uint32_t kCapRotational = 1u << 9;

struct BackendSlot {
  SlotHeader header;
  char export_name[kNameSize];  // writer: owner before publishing Live
  std::uint64_t export_size;    // writer: owner; bytes
  std::uint32_t block_min;      // writer: owner; power of two
  std::uint32_t block_preferred;// writer: owner
  std::uint32_t block_max;      // writer: owner; largest single request the handler accepts
  std::uint32_t caps;           // writer: owner; kCap* bits
  std::uint8_t reserved[40];
  // Doorbell words (common/doorbell.hpp), one per handler thread of the
  // backend; a channel names its handler's in handler_doorbell.  The only
  // field with two writers: the handler sets the waiter bit, queue sides
  // clear it when they publish.
  std::uint32_t doorbell[16];
};
static_assert(sizeof(BackendSlot::doorbell) / sizeof(std::uint32_t) == 16);
static_assert(sizeof(BackendSlot) == 256);
static_assert(offsetof(BackendSlot, export_size) == 128);
static_assert(offsetof(BackendSlot, doorbell) == 3 * kLineSize);
inline constexpr std::uint32_t kBackendDoorbells = 16;

struct BlkdevSlot {
  SlotHeader header;
  std::uint32_t backend_id;     // writer: owner; backend slot this blkdev is bound to
  std::uint32_t queue_count;    // writer: owner; number of channels it claimed
  std::uint64_t backend_epoch;  // writer: owner; epoch of the backend slot it last bound to
  std::uint32_t kernel_device;  // writer: owner; 1 + N while it serves the kernel's /dev/nbdN, 0 = none
  std::uint8_t reserved[172];
};
static_assert(sizeof(BlkdevSlot) == 256);
static_assert(offsetof(BlkdevSlot, kernel_device) == 80);

// ---------------------------------------------------------------------------
// Channels
// ---------------------------------------------------------------------------

// Operations in a submission entry.  0 is never valid, so a zeroed entry is
// rejected.
enum class Op : std::uint16_t {
  Read = 1,
  Write = 2,
  Flush = 3,
  Trim = 4,
  WriteZeroes = 5,
  BlockStatus = 6,
  Cache = 7,
};
inline constexpr std::uint16_t kOpMax = 7;

inline constexpr std::uint16_t kFlagFua = 1u << 0;
inline constexpr std::uint16_t kFlagNoHole = 1u << 1;    // write-zeroes: keep the range allocated
inline constexpr std::uint16_t kFlagFastZero = 1u << 2;  // write-zeroes: fail with ENOTSUP unless cheap
inline constexpr std::uint16_t kFlagReqOne = 1u << 3;    // block status: one extent is enough
inline constexpr std::uint16_t kKnownFlags = kFlagFua | kFlagNoHole | kFlagFastZero | kFlagReqOne;

// Writer: queue side (proxy).
struct SubmissionEntry {
  std::uint32_t seq;          // producer index at publish: detects stale entries
  std::uint16_t op;           // Op
  std::uint16_t flags;        // kFlag*
  std::uint64_t tag;          // opaque to the handler, echoed in the completion
  std::uint64_t offset;       // export byte offset
  std::uint32_t length;       // export byte count
  std::uint32_t data_offset;  // data extent: byte offset inside the channel's data area
  std::uint32_t data_length;  // data extent length (read/write: == length; block status: capacity)
  std::uint32_t data_crc;     // checksum mode: CRC32C of a write's data extent
  std::uint32_t generation;   // low 32 bits of the channel generation it was produced for; other generations are dropped
  std::uint8_t reserved[16];
  std::uint32_t entry_crc;    // checksum mode: CRC32C of bytes [0, 60)
};
static_assert(sizeof(SubmissionEntry) == 64);
static_assert(offsetof(SubmissionEntry, generation) == 40);
static_assert(offsetof(SubmissionEntry, tag) == 8);
static_assert(offsetof(SubmissionEntry, data_offset) == 28);
static_assert(offsetof(SubmissionEntry, entry_crc) == 60);

// Writer: handler side (backend).
struct CompletionEntry {
  std::uint32_t seq;           // producer index at publish
  std::int32_t status;         // 0, or a positive errno (EIO, EINVAL, ENOSPC, EPERM, ENOTSUP, ...)
  std::uint64_t tag;           // copied from the submission
  std::uint32_t result_length; // bytes the handler wrote into the data extent
  std::uint32_t data_crc;      // checksum mode: CRC32C of those bytes
  std::uint32_t generation;    // copied from the submission; the queue accepts only its current generation's
  std::uint32_t entry_crc;     // checksum mode: CRC32C of bytes [0, 28)
};
static_assert(sizeof(CompletionEntry) == 32);
static_assert(offsetof(CompletionEntry, generation) == 24);
static_assert(offsetof(CompletionEntry, entry_crc) == 28);

// Block status results: a packed array of these in the data extent.
inline constexpr std::uint32_t kExtentHole = 1u << 0;  // NBD_STATE_HOLE
inline constexpr std::uint32_t kExtentZero = 1u << 1;  // NBD_STATE_ZERO
struct ExtentDescriptor {
  std::uint32_t length;  // bytes, non-zero
  std::uint32_t flags;   // kExtent*
};
static_assert(sizeof(ExtentDescriptor) == 8);

// A ring index lives alone on its line so producer and consumer never share
// a cache line.
struct alignas(kLineSize) RingIndex {
  std::uint32_t value;
  std::uint8_t reserved[kLineSize - 4];
};
static_assert(sizeof(RingIndex) == kLineSize);

// The control block at the start of every channel.
//
// Attach protocol:
//  1. The queue side claims the channel slot (CAS on header.state), writes
//     backend_id/blkdev_id/backend_epoch, sets sq_head and cq_head (its own
//     indices) to 0, then stores a new `generation` with release.
//  2. A handler of that backend seeing a generation it has not attached to
//     sets sq_tail and cq_tail (its own indices) to 0 and stores
//     `attached_generation` with release.
//  3. The queue side submits only once attached_generation == generation.
// A re-initialisation (after a backend restart) repeats 1-3 with a new
// generation; each index still has exactly one writer.
struct ChannelControl {
  SlotHeader header;                 // writer: queue side (claim, heartbeat)
  // line 1 — writer: queue side, before publishing `generation`
  std::uint32_t backend_id;
  std::uint32_t blkdev_id;
  std::uint64_t backend_epoch;       // epoch of the backend slot this channel is bound to
  std::uint64_t generation;          // release-stored last; 0 = not set up
  std::uint32_t queue_rings;         // generation (low 32 bits, never 0) when the queue side rings handler_doorbell after each publish; older ones leave 0
  std::uint32_t queue_sleeping;      // 1 while the queue loop waits in epoll for a wake from the handler (docs/design.md, Polling and doorbells)
  std::uint8_t reserved1[32];
  RingIndex sq_head;                 // writer: queue side (producer)
  RingIndex sq_tail;                 // writer: handler side (consumer)
  RingIndex cq_tail;                 // writer: handler side (producer)
  RingIndex cq_head;                 // writer: queue side (consumer)
  // line 6 — writer: handler side
  std::uint64_t attached_generation; // generation the handler serves
  std::uint64_t handler_heartbeat;   // bumped by the handler while attached
  std::uint64_t handler_backend_epoch;
  std::uint64_t handler_completed;   // entries completed (statistics)
  std::uint64_t handler_errors;      // entries completed with an error (statistics)
  std::uint32_t handler_doorbell;    // 1 + the index in BackendSlot::doorbell the handler sleeps on; 0 = none (poll)
  std::uint32_t handler_wakes_queue; // generation (low 32 bits, never 0) whose queue loop the handler wakes through its wake socket; 0 = none
  std::uint8_t reserved6[16];
  // line 7 — writer: queue side (statistics)
  std::uint64_t requests;
  std::uint64_t bytes;
  std::uint64_t errors;
  std::uint64_t in_flight;
  std::uint8_t reserved7[32];
};
static_assert(sizeof(ChannelControl) == 8 * kLineSize);
static_assert(offsetof(ChannelControl, sq_head) == 2 * kLineSize);
static_assert(offsetof(ChannelControl, sq_tail) == 3 * kLineSize);
static_assert(offsetof(ChannelControl, cq_tail) == 4 * kLineSize);
static_assert(offsetof(ChannelControl, cq_head) == 5 * kLineSize);
static_assert(offsetof(ChannelControl, attached_generation) == 6 * kLineSize);
static_assert(offsetof(ChannelControl, requests) == 7 * kLineSize);
static_assert(offsetof(ChannelControl, queue_rings) == kLineSize + 24);
static_assert(offsetof(ChannelControl, queue_sleeping) == kLineSize + 28);
static_assert(offsetof(ChannelControl, handler_doorbell) == 6 * kLineSize + 40);
static_assert(offsetof(ChannelControl, handler_wakes_queue) == 6 * kLineSize + 44);

template <typename T>
inline constexpr bool kOnMedia = std::is_standard_layout_v<T> && std::is_trivially_copyable_v<T>;
static_assert(kOnMedia<Superblock> && kOnMedia<SlotHeader> && kOnMedia<HostSlot> &&
              kOnMedia<BackendSlot> && kOnMedia<BlkdevSlot> && kOnMedia<ChannelControl> &&
              kOnMedia<SubmissionEntry> && kOnMedia<CompletionEntry> && kOnMedia<ExtentDescriptor>);

// The format is little-endian; we only build for little-endian hosts.
static_assert(std::endian::native == std::endian::little, "cbd's on-media format is little-endian");

}  // namespace cbd
