//===- CudaEmulation.h - The CUDA code of kernels/cuda on the CPU -*- C++ -*-===//
//
// Part of moec. What kernels/cuda's sources use of CUDA, for compiling them
// as plain C++ and running them on the CPU (the GPU tests on machines
// without a GPU). Each block's threads run as fibers on the calling thread
// and meet at __syncthreads, __syncwarp, the warp shuffles and the tensor
// cores' MMA (given by the PTX ISA's fragment layouts), so a kernel runs
// as written, lane by lane. Up to eight blocks of a grid are resident at
// once, each with its own shared memory, and take turns; a block's turn
// ends at any of its threads' atomics on global memory, so the other
// blocks run on in between: a block that counts its arrival before it (or
// another of its threads) writes what the count stands for has its work
// read unwritten. The runtime is as lazy as CUDA allows: a stream's
// launches, copies and memsets run only when the host waits
// (cudaStreamSynchronize, cudaFree, a copy to pageable memory), so a
// host buffer changed or read before its copy is done gives the wrong
// answer here as on a GPU; copies are checked against the allocations they
// name, launches against CUDA's limits, and capture against the calls
// CUDA refuses while capturing; each allocation ends at a guard page, so
// reading past it dies, named. Every other kernel run takes its blocks,
// warps and lanes last first and lands cp.async copies at the call rather
// than the wait, so a result that depends on either changes from run to
// run. What it cannot see: timing, occupancy, a kernel touching host
// memory or reading before its buffer, a missing fence (memory is
// sequentially consistent here), races the two orders and the turns do
// not change, and host code that reads a buffer counting on stream work
// not to have overwritten it yet (stream work always runs late).
//
// Headers named cuda_runtime.h and cuda_fp16.h next to this one include
// it, so sources compile unchanged but for their launches (cuda/Launch.h)
// and their inline PTX (each has a MOEC_CUDA_EMULATION branch).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CUDA_EMULATION_CUDAEMULATION_H
#define MOE_KERNELS_CUDA_EMULATION_CUDAEMULATION_H

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>

#ifndef MOEC_CUDA_EMULATION
#define MOEC_CUDA_EMULATION 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Every block runs on one host thread, so a function-local static is the
// shared memory of the resident block whose turn it is: the emulation
// keeps the others' aside while it runs. All of them lie in one
// section, which every block starts with filled with 0xFF bytes (NaN
// as floats, -1 as integers): on a GPU a block's shared memory starts
// undefined, so a kernel reading it before writing it, or counting on
// what an earlier block left, gets poison here rather than zeros or
// leftovers that may happen to be right. GCC ignores the section for a
// function template's statics: shared memory belongs in kernels and plain
// functions (scripts/check-emulated-shared.py, a test, checks it).
#define __shared__ static __attribute__((section("moec_emulated_shared")))

// CUDA's types, in the emulation's namespace (a binary may link the real
// ones too) and named at global scope as CUDA names them.
namespace moe::emulation {
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct __half {
  unsigned short bits;
};
float __half2float(__half h);
} // namespace moe::emulation
using moe::emulation::__half;
using moe::emulation::__half2float;
using moe::emulation::dim3;
using moe::emulation::float2;
using moe::emulation::float4;
using moe::emulation::int4;
using moe::emulation::uint2;
using moe::emulation::uint3;
using moe::emulation::uint4;

namespace moe::emulation {

/// The emulated thread that runs now.
struct ThreadIndex {
  uint3 thread, block;
  dim3 blockSize, gridSize;
};
const ThreadIndex &current();

void syncThreads();
/// Every lane of `mask` (each must not have exited) meets here.
void syncWarp(unsigned mask);
/// The warp's lanes of `mask` each give `bytes` (at most 64) and get every
/// lane's: [32][64] bytes, lane by lane, valid until the lane's next call.
const unsigned char *warpGather(unsigned mask, const void *mine, size_t bytes);
/// The calling lane's index in its warp.
int laneId();
/// A trap: the kernel stops and the stream's next wait fails (sticky).
[[noreturn]] void trap();
/// The kernel stops for `why` (a misuse a GPU leaves undefined).
[[noreturn]] void failKernel(const char *why);
/// After an atomic on `address`: the calling block's turn ends, so the
/// grid's other resident blocks run on first (nothing on the host, nor
/// for shared memory, which no other block sees).
void atomicPoint(const void *address);

/// cp.async: the copy is made when the thread waits for its group.
void copyAsync(void *shared, const void *global, size_t bytes);
void commitCopies();
/// Makes all but the `pending` most recently committed groups.
void waitCopies(int pending);

/// griddepcontrol.wait and .launch_dependents (cuda/Launch.h's
/// awaitPreviousKernel): kernels run one at a time here, so it only notes
/// that the calling thread awaited.
void awaitPreviousGrid();

/// A kernel's threads over `grid` x `block` run `body`: enqueued on the
/// stream (or its capture); a bad configuration is the next
/// cudaGetLastError. `dependent`: a programmatic dependent launch, which
/// fails where a thread ends without awaitPreviousGrid.
struct StreamState;
void launch(dim3 grid, dim3 block, StreamState *stream, std::function<void()> body, bool dependent = false);

/// What the host has asked of the emulated device since the process began:
/// the host's share of a step's cost on a GPU, which tests can count where
/// they cannot time it (a decoded token's launches, copies and waits).
struct Counters {
  uint64_t launches = 0;      ///< Kernels launched on a stream (not captured).
  uint64_t graphLaunches = 0; ///< cudaGraphLaunch calls ...
  uint64_t graphNodes = 0;    ///< ... and the operations they replayed.
  uint64_t copies = 0;        ///< cudaMemcpy and cudaMemcpyAsync calls (not captured).
  uint64_t memsets = 0;       ///< cudaMemsetAsync calls (not captured).
  uint64_t captured = 0;      ///< Launches, copies and memsets recorded into graphs.
  uint64_t waits = 0;         ///< Calls the host waits in for the device: syncs, blocking copies, frees.
  uint64_t allocations = 0;   ///< Allocations made (cudaMalloc, cudaMallocHost) ...
  uint64_t frees = 0;         ///< ... and freed (cudaFree, cudaFreeHost).
  uint64_t kernelRuns = 0;    ///< Kernels run, graphs' included.
};
Counters counters();

/// Device memory the emulated device has allocated now, in bytes.
size_t allocatedBytes();
/// Limits device memory (0: none), to test allocation failures.
void setMemoryLimit(size_t bytes);
/// Why the last failed kernel failed (a deadlock, a trap, ...), or "".
std::string lastFailure();
/// Drops every stream's queued work and clears the errors, a trap's sticky
/// one included (tests of failures; on a GPU only a reset recovers, and it
/// also frees every allocation, which this keeps).
void clearErrors();

} // namespace moe::emulation

#define threadIdx (::moe::emulation::current().thread)
#define blockIdx (::moe::emulation::current().block)
#define blockDim (::moe::emulation::current().blockSize)
#define gridDim (::moe::emulation::current().gridSize)

inline void __syncthreads() { moe::emulation::syncThreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { moe::emulation::syncWarp(mask); }
template <typename T> T __shfl_sync(unsigned mask, T value, int source, int width = 32) {
  static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
  const int lane = moe::emulation::laneId();
  const unsigned char *all = moe::emulation::warpGather(mask, &value, sizeof(T));
  const int from = (lane & ~(width - 1)) + (source & (width - 1));
  if (!(mask >> from & 1u))
    moe::emulation::failKernel("a shuffle reads a lane its mask leaves out");
  T out;
  std::memcpy(&out, all + 64 * from, sizeof(T));
  return out;
}
template <typename T> T __shfl_xor_sync(unsigned mask, T value, int laneMask, int width = 32) {
  const int lane = moe::emulation::laneId();
  // A lane of a later segment of `width` lanes is out of reach: the
  // caller's own value.
  const int target = lane ^ laneMask;
  return __shfl_sync(mask, value, target >= (lane / width + 1) * width ? lane : target, width);
}
template <typename T> T __ldg(const T *p) { return *p; }
template <typename T> T __ldcg(const T *p) { return *p; }
// One host thread runs every block: memory is sequentially consistent, and
// every write is seen at once (the fences' ordering is not checked).
inline void __threadfence() {}
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i)
    c += static_cast<int>(static_cast<int8_t>(a >> (8 * i))) * static_cast<int>(static_cast<int8_t>(b >> (8 * i)));
  return c;
}
inline float __uint_as_float(unsigned bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned __funnelshift_r(unsigned low, unsigned high, unsigned shift) {
  return static_cast<unsigned>(((static_cast<uint64_t>(high) << 32) | low) >> (shift & 31));
}
inline size_t __cvta_generic_to_shared(const void *p) { return reinterpret_cast<size_t>(p); }
[[noreturn]] inline void __trap() { moe::emulation::trap(); }
inline int min(int a, int b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
// Threads run one at a time: an atomic is a plain read-modify-write, after
// which the grid's other resident blocks run before its block goes on.
template <typename T> T atomicAdd(T *address, T value) {
  const T old = *address;
  *address = old + value;
  moe::emulation::atomicPoint(address);
  return old;
}

// --- The runtime API, as far as kernels/cuda calls it -----------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
  cudaErrorStreamCaptureWrongThread = 908,
  cudaErrorUnknown = 999,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
};
enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2,
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
constexpr unsigned cudaStreamNonBlocking = 1;

using cudaStream_t = moe::emulation::StreamState *;
using cudaEvent_t = struct EmulatedEvent *;
using cudaGraph_t = struct EmulatedGraph *;
using cudaGraphExec_t = struct EmulatedGraph *;
using cudaGraphNode_t = struct EmulatedGraphNode *;

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  int major, minor;
  int multiProcessorCount;
};
struct cudaFuncAttributes {
  int ptxVersion, binaryVersion, numRegs, maxThreadsPerBlock;
  size_t sharedSizeBytes, localSizeBytes;
};

const char *cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *properties, int device);
cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attribute, int device);
cudaError_t cudaDriverGetVersion(int *version);
cudaError_t cudaRuntimeGetVersion(int *version);
cudaError_t cudaMemGetInfo(size_t *free, size_t *total);
template <typename F> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *attributes, F *) {
  *attributes = {90, 90, 64, 1024, 0, 0};
  return cudaSuccess;
}
template <typename F> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *blocks, F *, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void **pointer, size_t bytes);
template <typename T> cudaError_t cudaMalloc(T **pointer, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void **>(pointer), bytes);
}
cudaError_t cudaFree(void *pointer);
cudaError_t cudaMallocHost(void **pointer, size_t bytes);
template <typename T> cudaError_t cudaMallocHost(T **pointer, size_t bytes) {
  return cudaMallocHost(reinterpret_cast<void **>(pointer), bytes);
}
cudaError_t cudaFreeHost(void *pointer);
cudaError_t cudaMemcpy(void *target, const void *source, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *target, const void *source, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemsetAsync(void *target, int value, size_t bytes, cudaStream_t stream = nullptr);

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaEventCreate(cudaEvent_t *event);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventElapsedTime(float *milliseconds, cudaEvent_t start, cudaEvent_t stop);

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph);
cudaError_t cudaGraphCreate(cudaGraph_t *graph, unsigned flags);
/// A child graph's operations, cloned; the emulation builds chains only:
/// each node after the graph's last (or none, the first).
cudaError_t cudaGraphAddChildGraphNode(cudaGraphNode_t *node, cudaGraph_t graph, const cudaGraphNode_t *dependencies,
                                       size_t count, cudaGraph_t child);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);

#endif // MOE_KERNELS_CUDA_EMULATION_CUDAEMULATION_H
