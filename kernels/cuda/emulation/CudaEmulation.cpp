//===- CudaEmulation.cpp - CUDA's threads and runtime on the CPU ----------===//
//
// Part of moec. See CudaEmulation.h. A block's threads are fibers (on
// x86-64 a six-register stack switch, elsewhere ucontext, whose switches
// are system calls) run in turn on the thread that waits for the stream:
// each runs until it meets a barrier (its block's, its warp's, or a warp
// exchange: shuffles and the MMA), makes an atomic, or returns; a barrier
// opens when every thread of its group that has not returned is there.
// Up to eight blocks are resident and take turns (runGrid); a turn ends
// at an atomic, or when each of the block's threads is done or waits. A
// turn that ends with every thread waiting is a deadlock, and fails the
// kernel.
//
//===----------------------------------------------------------------------===//

#include "CudaEmulation.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <sys/mman.h>
#include <unistd.h>

#include <csignal>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores its
// pointer in *save and continues on the stack at `load` (saved the same
// way, or made by newStack).
extern "C" void moe_emulation_switch(void **save, void *load);
asm(R"(
.pushsection .text
.globl moe_emulation_switch
.type moe_emulation_switch,@function
moe_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size moe_emulation_switch,.-moe_emulation_switch
.popsection
)");
#endif

namespace moe::emulation {
namespace {

/// A fiber's or the scheduler's place to continue from.
struct Context {
#if defined(__x86_64__)
  void *sp = nullptr;
#else
  ucontext_t context;
#endif
};

void switchTo(Context &save, Context &load) {
#if defined(__x86_64__)
  moe_emulation_switch(&save.sp, load.sp);
#else
  swapcontext(&save.context, &load.context);
#endif
}

/// Makes `context` start `entry` on `stack`.
void startOn(Context &context, void *stack, size_t bytes, void (*entry)()) {
#if defined(__x86_64__)
  // The top: entry's return address (never used; keeps the ABI's
  // alignment), entry for the switch's ret, six zeroed registers.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15};
  void **frame = reinterpret_cast<void **>(top) - 8;
  for (int i = 0; i < 6; ++i)
    frame[i] = nullptr;
  frame[6] = reinterpret_cast<void *>(entry);
  frame[7] = nullptr;
  context.sp = frame;
#else
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = bytes;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
#endif
}

constexpr size_t kStackBytes = 256 << 10;
/// The guard pages' size: one page.
size_t guardBytes() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}
constexpr int kMaxThreads = 1024;

struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  Context context;
  ThreadIndex index;
  int lane = 0, warp = 0;
  bool done = false;
  bool awaited = false;                ///< Called awaitPreviousGrid.
  const uint64_t *waitingOn = nullptr; ///< A barrier's generation ...
  uint64_t waitingFor = 0;             ///< ... still at this value.
  uint64_t gathers = 0;
  struct Copy {
    void *target;
    const void *source;
    size_t bytes;
  };
  std::vector<Copy> copies;      ///< cp.async copies not yet made.
  std::vector<size_t> groupEnds; ///< Committed groups: ends in `copies`.
};

struct Warp {
  uint64_t generation = 0; ///< Counts the warp-synchronous calls met so far.
  unsigned liveMask = 0;
  unsigned arrived = 0;     ///< Lanes waiting at the warp-synchronous call ...
  unsigned waitingMask = 0; ///< ... of this mask.
  unsigned char slots[2][32][64];
};

/// A resident block of the grid that runs on this host thread (runGrid).
struct BlockRun {
  const std::function<void()> *body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier block;
  int live = 0;
  Fiber *running = nullptr;
  Context scheduler;
  bool trapped = false;
  bool backwards = false; ///< This run takes threads last first, and makes cp.async copies at once.
  bool dependent = false; ///< A programmatic dependent launch: every thread must await the grid before it.
  bool paused = false;    ///< A thread made an atomic in this turn: the turn ends.
  std::string failure;
};

/// The block whose turn it is on this host thread, or null.
thread_local BlockRun *run = nullptr;

/// Fiber stacks, mapped once per host thread and reused.
struct Stacks {
  std::vector<void *> stacks;
  void *at(size_t i) {
    while (stacks.size() <= i) {
      // A guard page below each stack: an overflow faults rather than
      // writing over the next fiber's stack.
      char *p = static_cast<char *>(mmap(nullptr, kStackBytes + guardBytes(), PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
      if (p == MAP_FAILED || mprotect(p, guardBytes(), PROT_NONE) != 0) {
        std::fprintf(stderr, "moec CUDA emulation: cannot map a fiber stack\n");
        std::abort();
      }
      stacks.push_back(p + guardBytes());
    }
    return stacks[i];
  }
};
thread_local Stacks &stacks = *new Stacks(); // never destroyed, as Residents

Fiber &self() {
  if (!run || !run->running) {
    std::fprintf(stderr, "moec CUDA emulation: a device function was called outside a kernel\n");
    std::abort();
  }
  return *run->running;
}

void yield() {
  Fiber &f = self();
  switchTo(f.context, run->scheduler);
}

/// Stops the calling fiber for good: the kernel has failed.
[[noreturn]] void fail(std::string why) {
  if (run->failure.empty())
    run->failure = std::move(why);
  run->trapped = true;
  Fiber &f = self();
  f.done = true;
  --run->live;
  switchTo(f.context, run->scheduler); // never resumed
  std::abort();
}

void waitAt(Barrier &barrier, int expected) {
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived >= expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  Fiber &f = self();
  f.waitingOn = &barrier.generation;
  f.waitingFor = generation;
  yield();
}

/// The calling lane meets the lanes of `mask` (each must still run, and
/// any lane waiting already must have given the same mask); the last to
/// arrive opens the barrier.
void meetWarp(unsigned mask) {
  Fiber &f = self();
  Warp &w = run->warps[f.warp];
  if (!(mask >> f.lane & 1u))
    fail("a warp-synchronous call whose mask leaves out its own lane");
  if ((mask & ~w.liveMask) != 0)
    fail("a warp-synchronous call (shuffle, __syncwarp or MMA) whose mask names a lane that has returned or does "
         "not exist");
  if (w.arrived != 0 && mask != w.waitingMask)
    fail("lanes of a warp meet with different masks (the emulation runs one warp-synchronous call of a warp at a "
         "time)");
  w.waitingMask = mask;
  w.arrived |= 1u << f.lane;
  if (w.arrived == mask) {
    w.arrived = 0;
    ++w.generation;
    return;
  }
  f.waitingOn = &w.generation;
  f.waitingFor = w.generation;
  yield();
}

void release(Barrier &barrier, int expected) {
  if (barrier.arrived > 0 && barrier.arrived >= expected) {
    barrier.arrived = 0;
    ++barrier.generation;
  }
}

void fiberEntry() {
  Fiber &f = self();
  (*run->body)();
  Warp &w = run->warps[f.warp];
  if (w.arrived != 0 && (w.waitingMask >> f.lane & 1u))
    fail("a lane returned while its warp waited for it at a shuffle, __syncwarp or MMA");
  // On a GPU such a thread may run before the kernel ahead of it ends, and
  // its kernel may end first and release the next one early.
  if (run->dependent && !f.awaited)
    fail("a thread of a dependent launch ended without awaiting the kernel before it (awaitPreviousKernel)");
  f.done = true;
  --run->live;
  w.liveMask &= ~(1u << f.lane);
  // A block barrier waiting only for this thread opens now (a warp's
  // cannot be waiting for it: that failed above).
  release(run->block, run->live);
  switchTo(f.context, run->scheduler); // never resumed
  std::abort();
}

// The bounds of the section all __shared__ variables lie in (the linker
// names them; null where no kernel has shared memory).
extern "C" char __start_moec_emulated_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_moec_emulated_shared[] __attribute__((weak, visibility("hidden")));

/// Fills every block's shared memory with 0xFF bytes: undefined at a
/// block's start, as on a GPU.
void poisonSharedMemory() {
  char *begin = __start_moec_emulated_shared, *end = __stop_moec_emulated_shared;
  if (begin && end > begin)
    std::memset(begin, 0xFF, static_cast<size_t>(end - begin));
}

/// How many blocks of a grid are resident at once: each runs its turns in
/// round robin with the others, a turn ending at an atomic (runGrid).
constexpr int kResidentBlocks = 8;

/// The resident blocks of the grid that runs now on this host thread, and
/// which of them the shared-memory section holds now (-1: none). Never
/// destroyed: a context destroyed at exit may still run kernels.
struct Residents {
  BlockRun slots[kResidentBlocks];
  std::vector<unsigned char> saved[kResidentBlocks]; ///< A slot's shared memory while another's is in the section.
  bool occupied[kResidentBlocks] = {};
  bool fresh[kResidentBlocks] = {};   ///< Admitted a block that has not had its turn yet.
  int stackSet[kResidentBlocks] = {}; ///< The slot's block's fibers' stacks (takeStacks).
  std::vector<int> freeStackSets;     ///< Sets of stacks a block that ended gave back ...
  int stackSets = 0;                  ///< ... of the grid's sets so far.
  int owner = -1;
};
thread_local Residents &residents = *new Residents();

size_t sharedBytes() {
  char *begin = __start_moec_emulated_shared, *end = __stop_moec_emulated_shared;
  return begin && end > begin ? static_cast<size_t>(end - begin) : 0;
}

/// Puts slot `s`'s shared memory in the section: the poison for a block
/// admitted since its slot last had it, else what it held when another
/// slot took the section; the section's owner before keeps its contents
/// aside. A grid without atomics runs each block in one turn, so only
/// poisons, as when blocks ran one at a time.
void activate(int s) {
  Residents &r = residents;
  if (r.owner == s && !r.fresh[s])
    return;
  const size_t bytes = sharedBytes();
  if (r.owner >= 0 && r.occupied[r.owner]) {
    r.saved[r.owner].resize(bytes);
    if (bytes)
      std::memcpy(r.saved[r.owner].data(), __start_moec_emulated_shared, bytes);
  }
  if (r.fresh[s])
    poisonSharedMemory();
  else if (bytes) {
    if (r.saved[s].size() != bytes) {
      std::fprintf(stderr, "moec CUDA emulation: a resident block's shared memory was never set aside\n");
      std::abort();
    }
    std::memcpy(__start_moec_emulated_shared, r.saved[s].data(), bytes);
  }
  r.fresh[s] = false;
  r.owner = s;
}

/// Starts slot `s`'s block's fibers at its first turn, on a set of stacks
/// (one a block that ended gave back, else a new one): a grid whose blocks
/// each end in one turn, having made no atomic, uses one set.
void startFibers(int s) {
  Residents &r = residents;
  BlockRun &state = r.slots[s];
  int set = r.stackSets;
  if (r.freeStackSets.empty())
    ++r.stackSets;
  else {
    set = r.freeStackSets.back();
    r.freeStackSets.pop_back();
  }
  r.stackSet[s] = set;
  const size_t threads = state.fibers.size();
  for (size_t i = 0; i < threads; ++i)
    startOn(state.fibers[i].context, stacks.at(static_cast<size_t>(set) * threads + i), kStackBytes, fiberEntry);
}

/// Makes slot `s` run block `blockIndex` of `body` from its start (its
/// fibers start at its first turn: startFibers).
void admit(int s, const std::function<void()> &body, dim3 grid, dim3 block, uint3 blockIndex, bool backwards,
           bool dependent) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  BlockRun &state = residents.slots[s];
  state.body = &body;
  state.fibers.resize(threads);
  state.warps.resize((threads + 31) / 32);
  for (Warp &w : state.warps) {
    w.generation = 0;
    w.arrived = 0;
    w.liveMask = 0;
  }
  state.block = {};
  state.live = threads;
  state.trapped = false;
  state.backwards = backwards;
  state.dependent = dependent;
  state.failure.clear();
  for (int i = 0; i < threads; ++i) {
    Fiber &f = state.fibers[i];
    f.done = false;
    f.awaited = false;
    f.waitingOn = nullptr;
    f.gathers = 0;
    f.copies.clear();
    f.groupEnds.clear();
    f.index.thread = {static_cast<unsigned>(i) % block.x, static_cast<unsigned>(i) / block.x % block.y,
                      static_cast<unsigned>(i) / (block.x * block.y)};
    f.index.block = blockIndex;
    f.index.blockSize = block;
    f.index.gridSize = grid;
    f.lane = i % 32;
    f.warp = i / 32;
    state.warps[f.warp].liveMask |= 1u << f.lane;
  }
  residents.occupied[s] = true;
  residents.fresh[s] = true;
  if (residents.owner == s)
    residents.owner = -1; // the block before's, which has ended
}

/// One turn of a resident block: its threads run, a warp at a time, until
/// one makes an atomic (the rest stay where they are), or each is done or
/// waits at a barrier. False where the block trapped, or can never go on
/// (a deadlock: every thread waits, and none made an atomic).
bool runTurn(BlockRun &state) {
  run = &state;
  state.paused = false;
  const int threads = static_cast<int>(state.fibers.size());
  const int warps = (threads + 31) / 32;
  for (bool progressed = true; progressed && state.live > 0 && !state.trapped && !state.paused;) {
    // A warp at a time, until each of its lanes is done or waits for the
    // rest of the block: 32 stacks in the cache rather than the block's.
    progressed = false;
    for (int k = 0; k < warps && !state.trapped && !state.paused; ++k) {
      const int first = 32 * (state.backwards ? warps - 1 - k : k), last = std::min(threads, first + 32);
      for (bool ran = true; ran && !state.trapped && !state.paused;) {
        ran = false;
        for (int j = first; j < last && !state.trapped && !state.paused; ++j) {
          Fiber &f = state.fibers[state.backwards ? first + last - 1 - j : j];
          if (f.done || (f.waitingOn && *f.waitingOn == f.waitingFor))
            continue;
          f.waitingOn = nullptr;
          state.running = &f;
          switchTo(state.scheduler, f.context);
          state.running = nullptr;
          ran = progressed = true;
        }
      }
    }
  }
  run = nullptr;
  if (state.trapped)
    return false;
  if (state.live > 0 && !state.paused) {
    state.failure = "deadlock: every thread of the block waits at a barrier that cannot open";
    state.trapped = true;
    return false;
  }
  return true;
}

/// Runs every block of `body` over `grid`, up to kResidentBlocks at once
/// as on a GPU: the resident blocks take turns, and a block's turn ends
/// at any of its threads' atomics, so the other blocks run on in between
/// (a block that counts its arrival before writing what the count stands
/// for is read unwritten by the last to arrive). False (with `why` and the
/// failed block) where a block trapped or deadlocked. `backwards`:
/// blocks, warps and lanes in a warp run last first (a grid without
/// atomics runs its blocks one at a time, in that order).
bool runGrid(const std::function<void()> &body, dim3 grid, dim3 block, bool backwards, bool dependent, std::string &why,
             uint3 &failed) {
  const uint64_t total = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  uint64_t next = 0;
  // The grid's next block in this run's order.
  const auto blockAt = [&](uint64_t i) {
    const uint64_t k = backwards ? total - 1 - i : i;
    return uint3{static_cast<unsigned>(k % grid.x), static_cast<unsigned>(k / grid.x % grid.y),
                 static_cast<unsigned>(k / (static_cast<uint64_t>(grid.x) * grid.y))};
  };
  Residents &r = residents;
  int resident = 0;
  for (int s = 0; s < kResidentBlocks; ++s)
    r.occupied[s] = false;
  r.owner = -1;
  r.freeStackSets.clear();
  r.stackSets = 0;
  for (int s = 0; s < kResidentBlocks && next < total; ++s, ++resident)
    admit(s, body, grid, block, blockAt(next++), backwards, dependent);
  // A round after one in which a turn ended at an atomic takes the slots
  // in the other order, so the block that paused last goes first: the
  // last to arrive at a count goes on before the blocks that arrived
  // earlier. Rounds without atomics keep their order, and so the run's.
  for (bool reverse = false, paused = false; resident > 0; reverse ^= paused) {
    paused = false;
    for (int k = 0; k < kResidentBlocks; ++k) {
      const int s = reverse ? kResidentBlocks - 1 - k : k;
      if (!r.occupied[s])
        continue;
      BlockRun &state = r.slots[s];
      if (r.fresh[s])
        startFibers(s);
      activate(s);
      if (!runTurn(state)) {
        why = state.failure;
        failed = state.fibers.front().index.block;
        for (bool &o : r.occupied)
          o = false;
        return false;
      }
      paused |= state.paused;
      if (state.live > 0)
        continue;
      r.freeStackSets.push_back(r.stackSet[s]);
      r.occupied[s] = false;
      if (r.owner == s)
        r.owner = -1;
      if (next < total)
        admit(s, body, grid, block, blockAt(next++), backwards, dependent);
      else
        --resident;
    }
  }
  return true;
}

// --- Memory, streams and graphs ---------------------------------------------

struct Allocation {
  size_t bytes;
  bool host;     ///< cudaMallocHost (pinned) rather than device memory.
  char *mapping; ///< Its pages, the guard page after them included ...
  size_t mapped; ///< ... and their bytes.
};

struct Operation {
  std::function<cudaError_t()> run;
};

struct Runtime {
  std::recursive_mutex mutex;
  std::map<uintptr_t, Allocation> allocations;
  size_t deviceBytes = 0, limit = 0;
  cudaError_t lastError = cudaSuccess;
  cudaError_t sticky = cudaSuccess; ///< A kernel trapped: every later call fails.
  std::string stickyWhy;
  std::set<StreamState *> streams;
  Counters counters; ///< Its kernelRuns also alternates the order of threads.
};

Runtime &runtime() {
  static Runtime *r = new Runtime(); // never destroyed: contexts may outlive static destruction
  return *r;
}

} // namespace

struct StreamState {
  std::deque<Operation> work;
  bool capturing = false, invalidated = false;
  cudaStreamCaptureMode captureMode = cudaStreamCaptureModeGlobal;
  std::thread::id captureThread;
  std::vector<Operation> captured;
};

namespace {

StreamState &legacyStream() {
  static StreamState *s = new StreamState();
  return *s;
}
StreamState &streamOf(cudaStream_t s) { return s ? *s : legacyStream(); }

cudaError_t setError(cudaError_t error) {
  if (error != cudaSuccess)
    runtime().lastError = error;
  return error;
}

/// Device memory is open (readable and writable) only while stream work
/// runs or a synchronous copy is made: host code touching it otherwise, a
/// device pointer used on the host, faults here as it would on a GPU
/// machine (onFault names it). Nested opens count.
void report(const char *what);
std::atomic<int> openDepth{0}; // read by onFault too
void setDeviceAccess(int protection) {
  for (const auto &[start, a] : runtime().allocations)
    if (!a.host && mprotect(a.mapping, a.mapped - guardBytes(), protection) != 0) {
      report("cannot change the protection of device memory (mprotect failed)");
      std::abort();
    }
}
struct DeviceOpen {
  DeviceOpen() {
    if (openDepth++ == 0)
      setDeviceAccess(PROT_READ | PROT_WRITE);
  }
  ~DeviceOpen() {
    if (--openDepth == 0)
      setDeviceAccess(PROT_NONE);
  }
  DeviceOpen(const DeviceOpen &) = delete;
  DeviceOpen &operator=(const DeviceOpen &) = delete;
};

/// Runs a stream's queued work in order; the first failure is sticky.
cudaError_t drain(StreamState &s) {
  Runtime &r = runtime();
  std::optional<DeviceOpen> open;
  if (!s.work.empty())
    open.emplace();
  while (!s.work.empty()) {
    Operation op = std::move(s.work.front());
    s.work.pop_front();
    if (r.sticky != cudaSuccess)
      continue;
    if (cudaError_t error = op.run(); error != cudaSuccess)
      r.sticky = error;
  }
  return r.sticky;
}

cudaError_t drainAll() {
  Runtime &r = runtime();
  // Device memory opened once for every stream with work.
  bool work = !legacyStream().work.empty();
  for (StreamState *s : r.streams)
    work = work || !s->work.empty();
  std::optional<DeviceOpen> open;
  if (work)
    open.emplace();
  drain(legacyStream());
  for (StreamState *s : r.streams)
    drain(*s);
  return r.sticky;
}

/// Enqueues `op` on `s`, or adds it to the graph `s` is capturing.
cudaError_t enqueue(StreamState &s, Operation op) {
  if (runtime().sticky != cudaSuccess)
    return runtime().sticky;
  if (s.capturing) {
    s.captured.push_back(std::move(op));
    ++runtime().counters.captured;
  } else {
    s.work.push_back(std::move(op));
  }
  return cudaSuccess;
}

/// A call CUDA refuses while capturing (a potentially unsafe one: this
/// thread captures in global or thread-local mode, or another in global
/// mode): it fails, and the capture with it.
bool refusedWhileCapturing() {
  Runtime &r = runtime();
  bool refused = false;
  for (StreamState *s : r.streams)
    if (s->capturing &&
        (s->captureMode == cudaStreamCaptureModeGlobal ||
         (s->captureMode == cudaStreamCaptureModeThreadLocal && s->captureThread == std::this_thread::get_id()))) {
      s->invalidated = true;
      refused = true;
    }
  return refused;
}

/// The allocation [p, p + bytes) lies in, or null.
const Allocation *allocationOf(const void *p, size_t bytes) {
  Runtime &r = runtime();
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  auto it = r.allocations.upper_bound(address);
  if (it == r.allocations.begin())
    return nullptr;
  --it;
  if (address + bytes > it->first + it->second.bytes || address < it->first)
    return nullptr;
  return &it->second;
}

bool isDevice(const void *p, size_t bytes) {
  const Allocation *a = allocationOf(p, bytes);
  return a && !a->host;
}
bool isPinned(const void *p, size_t bytes) {
  const Allocation *a = allocationOf(p, bytes);
  return a && a->host;
}
/// Host memory: not a device allocation, nor any part of one.
bool isHost(const void *p, size_t bytes) {
  Runtime &r = runtime();
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  auto it = r.allocations.upper_bound(address + bytes - 1);
  if (it == r.allocations.begin())
    return true;
  --it;
  const bool overlaps = it->first < address + bytes && address < it->first + it->second.bytes;
  return !overlaps || it->second.host;
}

void report(const char *what) { std::fprintf(stderr, "moec CUDA emulation: %s\n", what); }

/// A segmentation fault in the emulation's guard pages is named before the
/// process dies as it would have: past a device allocation's end, or a
/// fiber's stack overflowing.
void onFault(int signal, siginfo_t *info, void *) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(info->si_addr);
  const char *what = nullptr;
  for (const auto &[start, a] : runtime().allocations) {
    const uintptr_t guard = reinterpret_cast<uintptr_t>(a.mapping) + a.mapped - guardBytes();
    if (address >= guard && address < guard + guardBytes()) {
      what = a.host ? "moec CUDA emulation: an access past the end of pinned host memory (cudaMallocHost)\n"
                    : "moec CUDA emulation: an access past the end of a device allocation (cudaMalloc)\n";
      break;
    }
  }
  if (!what && openDepth == 0)
    for (const auto &[start, a] : runtime().allocations) {
      const uintptr_t begin = reinterpret_cast<uintptr_t>(a.mapping);
      if (!a.host && address >= begin && address < begin + a.mapped - guardBytes()) {
        what = "moec CUDA emulation: host code touched device memory (cudaMalloc) outside a kernel or copy: a device "
               "pointer used on the host\n";
        break;
      }
    }
  if (!what && run && run->running)
    what = "moec CUDA emulation: a fault in a kernel (a fiber's stack overflowing, or memory no allocation "
           "holds)\n";
  if (what) {
    const ssize_t ignored = write(2, what, std::strlen(what));
    (void)ignored;
  }
  std::signal(signal, SIG_DFL);
  std::raise(signal);
}

void installFaultReport() {
  static const bool installed = [] {
    struct sigaction action = {};
    action.sa_sigaction = onFault;
    action.sa_flags = SA_SIGINFO | SA_RESETHAND;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, nullptr);
    sigaction(SIGBUS, &action, nullptr);
    return true;
  }();
  (void)installed;
}

} // namespace

const ThreadIndex &current() { return self().index; }

int laneId() { return self().lane; }

/// A dependent launch's thread awaits the kernel before it first (cuda/
/// Launch.h): a barrier, shuffle or copy before that is work done while
/// the kernel before may still run.
void checkAwaited() {
  if (run->dependent && !self().awaited)
    fail("a thread of a dependent launch met a barrier, shuffle or copy before awaiting the kernel before it");
}

void syncThreads() {
  checkAwaited();
  waitAt(run->block, run->live);
}

void syncWarp(unsigned mask) {
  checkAwaited();
  meetWarp(mask);
}

const unsigned char *warpGather(unsigned mask, const void *mine, size_t bytes) {
  checkAwaited();
  Fiber &f = self();
  Warp &w = run->warps[f.warp];
  // Two sets of slots: a lane writes the next gather's only after every
  // lane has met it there, so after all have read this one.
  unsigned char(&slots)[32][64] = w.slots[f.gathers++ & 1];
  std::memcpy(slots[f.lane], mine, bytes);
  meetWarp(mask);
  return &slots[0][0];
}

void trap() { fail("the kernel trapped (__trap)"); }

void atomicPoint(const void *address) {
  if (!run || !run->running)
    return; // host code
  const char *at = static_cast<const char *>(address);
  if (at >= __start_moec_emulated_shared && at < __stop_moec_emulated_shared)
    return; // shared memory: no other block sees it
  run->paused = true;
  yield();
}

void failKernel(const char *why) { fail(why); }

void awaitPreviousGrid() {
  // Kernels run one after another here: the one before has ended.
  self().awaited = true;
}

void copyAsync(void *shared, const void *global, size_t bytes) {
  checkAwaited();
  // cp.async copies 4, 8 or 16 bytes between addresses aligned to the size.
  if (bytes != 4 && bytes != 8 && bytes != 16)
    fail("cp.async of " + std::to_string(bytes) + " bytes (it copies 4, 8 or 16)");
  if (reinterpret_cast<uintptr_t>(shared) % bytes != 0 || reinterpret_cast<uintptr_t>(global) % bytes != 0)
    fail("cp.async of " + std::to_string(bytes) + " bytes between addresses not aligned to it");
  // A GPU lands the copy anywhere between the call and the wait: at the
  // wait in one run, at the call in the next.
  if (run->backwards)
    std::memcpy(shared, global, bytes);
  else
    self().copies.push_back({shared, global, bytes});
}

void commitCopies() {
  Fiber &f = self();
  f.groupEnds.push_back(f.copies.size());
}

void waitCopies(int pending) {
  Fiber &f = self();
  const size_t groups = f.groupEnds.size();
  if (groups <= static_cast<size_t>(pending))
    return;
  const size_t end = f.groupEnds[groups - pending - 1];
  for (size_t i = 0; i < end; ++i)
    std::memcpy(f.copies[i].target, f.copies[i].source, f.copies[i].bytes);
  f.copies.erase(f.copies.begin(), f.copies.begin() + static_cast<std::ptrdiff_t>(end));
  f.groupEnds.erase(f.groupEnds.begin(), f.groupEnds.begin() + static_cast<std::ptrdiff_t>(groups - pending));
  for (size_t &e : f.groupEnds)
    e -= end;
}

void launch(dim3 grid, dim3 block, StreamState *stream, std::function<void()> body, bool dependent) {
  std::lock_guard<std::recursive_mutex> lock(runtime().mutex);
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > kMaxThreads || grid.y > 65535 ||
      grid.z > 65535 || block.z > 64) {
    setError(cudaErrorInvalidConfiguration);
    if (StreamState &s = streamOf(stream); s.capturing)
      s.invalidated = true; // the graph would lack the launch
    return;
  }
  if (!streamOf(stream).capturing)
    ++runtime().counters.launches;
  enqueue(streamOf(stream), {[grid, block, dependent, body = std::move(body)]() -> cudaError_t {
            // Every other kernel run takes its threads in the opposite
            // order: a kernel whose result depends on which thread runs
            // first (a missing barrier) differs from run to run.
            const bool backwards = runtime().counters.kernelRuns++ & 1;
            std::string why;
            uint3 failed;
            if (!runGrid(body, grid, block, backwards, dependent, why, failed)) {
              Runtime &r = runtime();
              r.stickyWhy = why;
              char text[160];
              std::snprintf(text, sizeof text, "a kernel failed in block (%u, %u, %u) of (%u, %u, %u): ", failed.x,
                            failed.y, failed.z, grid.x, grid.y, grid.z);
              report((text + why).c_str());
              return cudaErrorLaunchFailure;
            }
            return cudaSuccess;
          }});
}

Counters counters() {
  std::lock_guard<std::recursive_mutex> lock(runtime().mutex);
  return runtime().counters;
}

size_t allocatedBytes() {
  std::lock_guard<std::recursive_mutex> lock(runtime().mutex);
  return runtime().deviceBytes;
}

void setMemoryLimit(size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(runtime().mutex);
  runtime().limit = bytes;
}

std::string lastFailure() {
  std::lock_guard<std::recursive_mutex> lock(runtime().mutex);
  return runtime().stickyWhy;
}

void clearErrors() {
  std::lock_guard<std::recursive_mutex> lock(runtime().mutex);
  Runtime &r = runtime();
  legacyStream().work.clear();
  for (StreamState *s : r.streams)
    s->work.clear();
  r.sticky = r.lastError = cudaSuccess;
  r.stickyWhy.clear();
}

} // namespace moe::emulation

using namespace moe::emulation;

float moe::emulation::__half2float(__half h) {
  const unsigned sign = (h.bits >> 15) & 1u, exponent = (h.bits >> 10) & 0x1Fu, mantissa = h.bits & 0x3FFu;
  float value;
  if (exponent == 0)
    value = std::ldexp(static_cast<float>(mantissa), -24);
  else if (exponent == 31)
    value = mantissa ? std::nanf("") : INFINITY;
  else
    value = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  return sign ? -value : value;
}

#define LOCKED std::lock_guard<std::recursive_mutex> lock(runtime().mutex)

const char *cudaGetErrorString(cudaError_t error) {
  switch (error) {
  case cudaSuccess:
    return "no error";
  case cudaErrorInvalidValue:
    return "invalid argument";
  case cudaErrorMemoryAllocation:
    return "out of memory";
  case cudaErrorInvalidConfiguration:
    return "invalid configuration argument";
  case cudaErrorInvalidResourceHandle:
    return "invalid resource handle";
  case cudaErrorIllegalAddress:
    return "an illegal memory access was encountered";
  case cudaErrorLaunchFailure:
    return "unspecified launch failure";
  case cudaErrorStreamCaptureUnsupported:
    return "operation not permitted when stream is capturing";
  case cudaErrorStreamCaptureInvalidated:
    return "operation failed due to a previous error during capture";
  case cudaErrorStreamCaptureWrongThread:
    return "attempt to terminate a thread-local capture sequence from another thread";
  default:
    return "unknown error";
  }
}

cudaError_t cudaGetLastError() {
  LOCKED;
  Runtime &r = runtime();
  if (r.sticky != cudaSuccess)
    return r.sticky;
  const cudaError_t e = r.lastError;
  r.lastError = cudaSuccess;
  return e;
}

cudaError_t cudaGetDeviceCount(int *count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : setError(cudaErrorInvalidValue); }
cudaError_t cudaGetDevice(int *device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int device) {
  if (device != 0)
    return setError(cudaErrorInvalidValue);
  *p = {};
  std::snprintf(p->name, sizeof p->name, "CPU emulation of an sm_90 device");
  p->totalGlobalMem = size_t{80} << 30;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 4;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attribute, int) {
  if (attribute != cudaDevAttrMultiProcessorCount)
    return setError(cudaErrorInvalidValue);
  *value = 4;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int *version) {
  *version = 13000;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int *version) {
  *version = 13000;
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t *free, size_t *total) {
  LOCKED;
  Runtime &r = runtime();
  *total = r.limit ? r.limit : size_t{80} << 30;
  *free = *total > r.deviceBytes ? *total - r.deviceBytes : 0;
  return cudaSuccess;
}

namespace {
cudaError_t allocate(void **pointer, size_t bytes, bool host) {
  Runtime &r = runtime();
  *pointer = nullptr;
  if (refusedWhileCapturing())
    return setError(cudaErrorStreamCaptureUnsupported);
  if (bytes == 0)
    return cudaSuccess; // null, as CUDA gives
  if (!host && r.limit && r.deviceBytes + bytes > r.limit)
    return setError(cudaErrorMemoryAllocation);
  // Each allocation ends where a guard page begins (256-byte aligned, as
  // CUDA's), so a kernel or copy reading past its end faults
  // (installFaultReport says where).
  installFaultReport();
  const size_t rounded = (bytes + 255) / 256 * 256, page = guardBytes();
  const size_t mapped = (rounded + page - 1) / page * page + page;
  char *mapping = static_cast<char *>(
      mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (mapping == MAP_FAILED)
    return setError(cudaErrorMemoryAllocation);
  if (mprotect(mapping + mapped - page, page, PROT_NONE) != 0) {
    munmap(mapping, mapped);
    return setError(cudaErrorMemoryAllocation);
  }
  char *p = mapping + mapped - page - rounded;
  // Fresh device memory holds garbage on a GPU: NaN bits here. Closed to
  // the host but while stream work runs (DeviceOpen).
  std::memset(p, 0xFF, bytes);
  if (!host && openDepth == 0 && mprotect(mapping, mapped - page, PROT_NONE) != 0) {
    munmap(mapping, mapped);
    return setError(cudaErrorMemoryAllocation);
  }
  r.allocations[reinterpret_cast<uintptr_t>(p)] = {bytes, host, mapping, mapped};
  ++r.counters.allocations;
  if (!host)
    r.deviceBytes += bytes;
  *pointer = p;
  return cudaSuccess;
}

cudaError_t release(void *pointer, bool host) {
  if (!pointer)
    return cudaSuccess;
  Runtime &r = runtime();
  if (refusedWhileCapturing())
    return setError(cudaErrorStreamCaptureUnsupported);
  drainAll(); // cudaFree waits for the device
  ++r.counters.waits;
  auto it = r.allocations.find(reinterpret_cast<uintptr_t>(pointer));
  if (it == r.allocations.end() || it->second.host != host) {
    report(host ? "cudaFreeHost of memory cudaMallocHost did not give" : "cudaFree of memory cudaMalloc did not give");
    return setError(cudaErrorInvalidValue);
  }
  if (!host)
    r.deviceBytes -= it->second.bytes;
  ++r.counters.frees;
  munmap(it->second.mapping, it->second.mapped);
  r.allocations.erase(it);
  return r.sticky;
}

/// Checks a copy's ends against its kind.
cudaError_t checkCopy(void *target, const void *source, size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0)
    return cudaSuccess;
  const bool sourceDevice = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  const bool targetDevice = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  if ((sourceDevice && !isDevice(source, bytes)) || (!sourceDevice && !isHost(source, bytes))) {
    report(sourceDevice ? "a copy reads past or outside a device allocation"
                        : "a copy from the host reads device memory");
    return setError(cudaErrorInvalidValue);
  }
  if ((targetDevice && !isDevice(target, bytes)) || (!targetDevice && !isHost(target, bytes))) {
    report(targetDevice ? "a copy writes past or outside a device allocation"
                        : "a copy to the host writes device memory");
    return setError(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}
} // namespace

cudaError_t cudaMalloc(void **pointer, size_t bytes) {
  LOCKED;
  return allocate(pointer, bytes, false);
}
cudaError_t cudaFree(void *pointer) {
  LOCKED;
  return release(pointer, false);
}
cudaError_t cudaMallocHost(void **pointer, size_t bytes) {
  LOCKED;
  return allocate(pointer, bytes, true);
}
cudaError_t cudaFreeHost(void *pointer) {
  LOCKED;
  return release(pointer, true);
}

cudaError_t cudaMemcpy(void *target, const void *source, size_t bytes, cudaMemcpyKind kind) {
  LOCKED;
  if (refusedWhileCapturing())
    return setError(cudaErrorStreamCaptureUnsupported);
  if (cudaError_t e = checkCopy(target, source, bytes, kind); e != cudaSuccess)
    return e;
  ++runtime().counters.copies;
  ++runtime().counters.waits;
  // The legacy stream: waits for its own work (the library's streams are
  // non-blocking, so not for theirs). Device memory open once for both.
  DeviceOpen open;
  if (cudaError_t e = drain(legacyStream()); e != cudaSuccess)
    return e;
  std::memmove(target, source, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *target, const void *source, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  LOCKED;
  if (cudaError_t e = checkCopy(target, source, bytes, kind); e != cudaSuccess)
    return e;
  StreamState &s = streamOf(stream);
  if (bytes == 0)
    return cudaSuccess;
  if (!s.capturing)
    ++runtime().counters.copies;
  if (kind == cudaMemcpyHostToDevice && !isPinned(source, bytes)) {
    if (s.capturing) {
      s.invalidated = true;
      report("a captured copy from pageable host memory");
      return setError(cudaErrorStreamCaptureUnsupported);
    }
    // From pageable memory the source is staged before the call returns.
    auto staged = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char *>(source),
                                                               static_cast<const unsigned char *>(source) + bytes);
    return enqueue(s, {[target, staged] {
                     std::memcpy(target, staged->data(), staged->size());
                     return cudaSuccess;
                   }});
  }
  if (kind == cudaMemcpyDeviceToHost && !isPinned(target, bytes)) {
    if (s.capturing) {
      s.invalidated = true;
      report("a captured copy to pageable host memory");
      return setError(cudaErrorStreamCaptureUnsupported);
    }
    // To pageable memory the call returns once the copy is done.
    ++runtime().counters.waits;
    DeviceOpen open;
    if (cudaError_t e = drain(s); e != cudaSuccess)
      return e;
    std::memcpy(target, source, bytes);
    return cudaSuccess;
  }
  return enqueue(s, {[target, source, bytes] {
                   std::memmove(target, source, bytes);
                   return cudaSuccess;
                 }});
}

cudaError_t cudaMemsetAsync(void *target, int value, size_t bytes, cudaStream_t stream) {
  LOCKED;
  if (bytes && !isDevice(target, bytes)) {
    report("a memset outside a device allocation");
    return setError(cudaErrorInvalidValue);
  }
  if (!streamOf(stream).capturing)
    ++runtime().counters.memsets;
  return enqueue(streamOf(stream), {[target, value, bytes] {
                   std::memset(target, value, bytes);
                   return cudaSuccess;
                 }});
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned) {
  LOCKED;
  *stream = new StreamState();
  runtime().streams.insert(*stream);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  LOCKED;
  if (!stream || !runtime().streams.count(stream))
    return setError(cudaErrorInvalidResourceHandle);
  drain(*stream);
  runtime().streams.erase(stream);
  delete stream;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  LOCKED;
  StreamState &s = streamOf(stream);
  if (s.capturing) {
    s.invalidated = true;
    return setError(cudaErrorStreamCaptureUnsupported);
  }
  ++runtime().counters.waits;
  return drain(s);
}
cudaError_t cudaDeviceSynchronize() {
  LOCKED;
  if (refusedWhileCapturing())
    return setError(cudaErrorStreamCaptureUnsupported);
  ++runtime().counters.waits;
  return drainAll();
}

struct EmulatedEvent {
  std::chrono::steady_clock::time_point at;
  bool recorded = false;
};

cudaError_t cudaEventCreate(cudaEvent_t *event) {
  *event = new EmulatedEvent();
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  LOCKED;
  drainAll(); // a record still queued would write it
  delete event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  LOCKED;
  StreamState &s = streamOf(stream);
  if (s.capturing)
    return cudaSuccess; // a dependency inside the graph, no time
  event->recorded = false;
  return enqueue(s, {[event] {
                   event->at = std::chrono::steady_clock::now();
                   event->recorded = true;
                   return cudaSuccess;
                 }});
}
cudaError_t cudaEventElapsedTime(float *milliseconds, cudaEvent_t start, cudaEvent_t stop) {
  LOCKED;
  if (!start->recorded || !stop->recorded)
    return setError(cudaErrorInvalidResourceHandle);
  *milliseconds = std::chrono::duration<float, std::milli>(stop->at - start->at).count();
  return cudaSuccess;
}

struct EmulatedGraph {
  std::vector<Operation> operations;
  /// Child graph nodes added (cudaGraphAddChildGraphNode), the last one's
  /// handle.
  std::vector<std::unique_ptr<EmulatedGraphNode>> nodes;
  EmulatedGraph() = default;
  explicit EmulatedGraph(std::vector<Operation> operations) : operations(std::move(operations)) {}
  EmulatedGraph(const EmulatedGraph &other) : operations(other.operations) {}
};
struct EmulatedGraphNode {};

cudaError_t cudaGraphCreate(cudaGraph_t *graph, unsigned flags) {
  if (!graph || flags != 0)
    return setError(cudaErrorInvalidValue);
  *graph = new EmulatedGraph();
  return cudaSuccess;
}
cudaError_t cudaGraphAddChildGraphNode(cudaGraphNode_t *node, cudaGraph_t graph, const cudaGraphNode_t *dependencies,
                                       size_t count, cudaGraph_t child) {
  if (!node || !graph || !child)
    return setError(cudaErrorInvalidValue);
  // A chain: the first node depends on nothing, each later one on the last.
  const bool chained =
      graph->nodes.empty() ? count == 0 : count == 1 && dependencies && dependencies[0] == graph->nodes.back().get();
  if (!chained)
    return setError(cudaErrorInvalidValue);
  graph->operations.insert(graph->operations.end(), child->operations.begin(), child->operations.end());
  graph->nodes.push_back(std::make_unique<EmulatedGraphNode>());
  *node = graph->nodes.back().get();
  return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  LOCKED;
  StreamState &s = streamOf(stream);
  if (!stream || s.capturing)
    return setError(cudaErrorStreamCaptureUnsupported);
  s.capturing = true;
  s.invalidated = false;
  s.captureMode = mode;
  s.captureThread = std::this_thread::get_id();
  s.captured.clear();
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph) {
  LOCKED;
  StreamState &s = streamOf(stream);
  *graph = nullptr;
  if (!s.capturing)
    return setError(cudaErrorInvalidValue);
  s.capturing = false;
  if (s.invalidated) {
    s.captured.clear();
    return setError(cudaErrorStreamCaptureInvalidated);
  }
  *graph = new EmulatedGraph(std::move(s.captured));
  s.captured.clear();
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long) {
  *exec = new EmulatedGraph(*graph);
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  LOCKED;
  StreamState &s = streamOf(stream);
  Counters &c = runtime().counters;
  if (!s.capturing) { // captured, each operation counts as one (enqueue)
    ++c.graphLaunches;
    c.graphNodes += exec->operations.size();
  }
  for (const Operation &op : exec->operations)
    if (cudaError_t e = enqueue(s, op); e != cudaSuccess)
      return e;
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}
