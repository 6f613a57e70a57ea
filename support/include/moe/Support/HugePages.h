//===- HugePages.h - Large fresh buffers backed by huge pages ---*- C++ -*-===//
//
// Part of moec. A fresh buffer's first write faults in one page at a time;
// on the project's machines (Linux guests whose transparent huge pages are
// in "madvise" mode, as on many cloud kernels) that runs at 1-2.5 GB/s
// against about 25 GB/s for memory already touched, and sequential GPTQ of
// a DeepSeek-V3 layer allocates tens of GB of fresh Hessians, moments and
// matrices. Advised for huge pages, the same first write runs about 3.7x
// faster (bench/first_touch, BENCHMARKS.md). Where transparent huge pages
// are "always" or "never" the advice changes nothing.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_HUGEPAGES_H
#define MOE_SUPPORT_HUGEPAGES_H

#include <cstddef>
#include <optional>
#include <vector>

namespace moe {

/// Buffers smaller than this are left alone: they hold at most one whole
/// 2 MiB page.
inline constexpr size_t kHugePageAdviceBytes = size_t{4} << 20;

/// Advises the kernel to back the whole 2 MiB pages within
/// [data, data + bytes) with transparent huge pages when they are first
/// touched (madvise MADV_HUGEPAGE). Call it on freshly allocated memory
/// before its first write; pages already touched keep their size. Ranges
/// under kHugePageAdviceBytes, and systems without the advice, are left
/// as they are: it is advice, and never fails.
void adviseHugePages(void *data, size_t bytes);

namespace detail {
/// When `values` must grow to a large `count`: an empty vector with room
/// for it, advised before anything is written; otherwise none (the
/// vector's own storage serves).
template <typename T> std::optional<std::vector<T>> advisedRoom(const std::vector<T> &values, size_t count) {
  if (count <= values.capacity() || count * sizeof(T) < kHugePageAdviceBytes)
    return std::nullopt;
  std::vector<T> room;
  room.reserve(count); // allocated, not yet written
  adviseHugePages(room.data(), count * sizeof(T));
  return room;
}
} // namespace detail

/// `values` resized to `count` elements, new storage (when it must grow)
/// advised for huge pages before the elements are written. Like
/// std::vector::resize: the elements kept keep their values, new ones are
/// value-initialised.
template <typename T> void resizeLarge(std::vector<T> &values, size_t count) {
  if (std::optional<std::vector<T>> room = detail::advisedRoom(values, count)) {
    room->assign(values.begin(), values.end());
    values.swap(*room);
  }
  values.resize(count);
}

/// `values` as `count` copies of `fill` (std::vector::assign), new storage
/// advised as resizeLarge's.
template <typename T> void assignLarge(std::vector<T> &values, size_t count, const T &fill) {
  if (std::optional<std::vector<T>> room = detail::advisedRoom(values, count)) {
    room->assign(count, fill); // (`fill` may be one of `values`: read before they go)
    values.swap(*room);
    return;
  }
  values.assign(count, fill);
}

/// `values` as a copy of the `count` elements at `first`
/// (std::vector::assign), new storage advised as resizeLarge's.
template <typename T> void copyLarge(std::vector<T> &values, const T *first, size_t count) {
  if (std::optional<std::vector<T>> room = detail::advisedRoom(values, count)) {
    room->assign(first, first + count);
    values.swap(*room);
    return;
  }
  values.assign(first, first + count);
}

} // namespace moe

#endif // MOE_SUPPORT_HUGEPAGES_H
