// Access to fields that live in shared memory.  Every shared field is read
// and written through std::atomic_ref, so the compiler never tears, caches or
// reorders it; memory orders are spelled out at each use.
#pragma once

#include <atomic>
#include <cstdint>

namespace cbd {

static_assert(std::atomic_ref<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic_ref<std::uint32_t>::is_always_lock_free);

template <typename T>
inline T load_acquire(const T& field) {
  return std::atomic_ref<T>(const_cast<T&>(field)).load(std::memory_order_acquire);
}
template <typename T>
inline T load_relaxed(const T& field) {
  return std::atomic_ref<T>(const_cast<T&>(field)).load(std::memory_order_relaxed);
}
template <typename T>
inline void store_release(T& field, T value) {
  std::atomic_ref<T>(field).store(value, std::memory_order_release);
}
template <typename T>
inline void store_relaxed(T& field, T value) {
  std::atomic_ref<T>(field).store(value, std::memory_order_relaxed);
}
template <typename T>
inline bool compare_exchange(T& field, T& expected, T desired) {
  return std::atomic_ref<T>(field).compare_exchange_strong(expected, desired, std::memory_order_acq_rel,
                                                           std::memory_order_acquire);
}
template <typename T>
inline void add_relaxed(T& field, T delta) {
  // Single writer: a plain read-modify-write through atomics is enough.
  store_relaxed(field, static_cast<T>(load_relaxed(field) + delta));
}

}  // namespace cbd
