//===- EmulationTest.cpp - The CPU emulation of CUDA itself ---------------===//
//
// Part of moec. The emulation the GPU tests run on without a GPU
// (kernels/cuda/emulation) must run kernels as a GPU does where a kernel's
// correctness depends on it, and fail where a GPU would fail: threads that
// meet at barriers and shuffles, blocks that run at once and interleave at
// atomics (each with its own shared memory), cp.async copies that land at their wait,
// stream work that runs when the host waits (so a pinned buffer changed
// too early is read changed), copies checked against their allocations,
// bad launches, deadlocks and traps failing the stream, and capture
// refusing a wait. Built only into moec-cuda-emulated-tests.
//
//===----------------------------------------------------------------------===//

#include <cuda_runtime.h>

#include "cuda/Launch.h"
#include "moe/Runtime/Device.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

namespace moe {
Expected<std::shared_ptr<Device>> openEmulatedCudaDevice(bool lenient);
} // namespace moe

namespace {

using moe::cuda::launchKernel;

/// Every thread leaves its index, and after the barrier reads its
/// neighbour's; with the block and grid indices.
__global__ void neighbourKernel(int *out) {
  __shared__ int slots[256];
  const unsigned t = threadIdx.x + blockDim.x * threadIdx.y;
  const unsigned threads = blockDim.x * blockDim.y;
  slots[t] = static_cast<int>(t);
  __syncthreads();
  const unsigned block = blockIdx.x + gridDim.x * blockIdx.y;
  out[block * threads + t] = slots[(t + 1) % threads] + 1000 * static_cast<int>(block);
  // Where CUDA numbers threads: x fastest, then y; lanes of a warp are 32
  // consecutive threads (the warp's own numbering, from its shuffle).
  const int lane0 = __shfl_sync(0xffffffffu, static_cast<int>(t), 0);
  out[6 * 256 + block * threads + t] = static_cast<int>(threadIdx.x) + 100 * static_cast<int>(threadIdx.y) +
                                       10000 * static_cast<int>(blockIdx.x + 10 * blockIdx.y) + 1000000 * (lane0 / 32);
}

__global__ void warpSumKernel(const float *in, float *out) {
  const int lane = threadIdx.x & 31;
  float v = in[threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  const float first = __shfl_sync(0xffffffffu, in[threadIdx.x], 0);
  out[threadIdx.x] = lane == 1 ? first : v;
}

/// Lanes 16..31 return; the rest shuffle over the whole warp (undefined
/// on a GPU).
__global__ void returnedLaneKernel(float *out) {
  if ((threadIdx.x & 31) >= 16)
    return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 16);
}

/// Lane 0 waits for its warp while the others wait for the block.
__global__ void deadlockKernel() {
  if (threadIdx.x == 0)
    __syncwarp();
  else
    __syncthreads();
}

__global__ void trapKernel() { __trap(); }

/// Each lane but the first reads the slot the lane before it writes, with
/// or without the barrier between.
__global__ void previousLaneKernel(int salt, bool barrier, int *out) {
  __shared__ int slots[32];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x) + salt;
  if (barrier)
    __syncwarp();
  out[threadIdx.x] = slots[threadIdx.x == 0 ? 0 : threadIdx.x - 1];
}

__global__ void incrementKernel(int *counter) {
  if (threadIdx.x == 0 && blockIdx.x == 0)
    *counter += 1;
}

/// A value copied into shared memory asynchronously: what the thread sees
/// before and after its wait.
__global__ void asyncCopyKernel(const int *global, int *out) {
  __shared__ int slot[1];
  slot[0] = -1;
  moe::emulation::copyAsync(slot, global, sizeof(int));
  moe::emulation::commitCopies();
  out[0] = slot[0];
  moe::emulation::waitCopies(0);
  out[1] = slot[0];
}

/// `bytes` copied asynchronously from `global` + `offset` bytes.
__global__ void misalignedCopyKernel(const int *global, int offset, int bytes, int *out) {
  __shared__ int4 slot[1];
  moe::emulation::copyAsync(slot, reinterpret_cast<const char *>(global) + offset, static_cast<size_t>(bytes));
  moe::emulation::commitCopies();
  moe::emulation::waitCopies(0);
  out[0] = slot[0].x;
}

/// Thread t reads element `offset` + t.
__global__ void readKernel(const int *in, int offset, int *out) {
  out[threadIdx.x] = in[offset + static_cast<int>(threadIdx.x)];
}

/// What each thread finds in its shared slot before writing it; then it
/// writes it (for the next block or run to find, were it kept).
__global__ void leftoverKernel(int *out) {
  __shared__ int slots[64];
  out[blockIdx.x * blockDim.x + threadIdx.x] = slots[threadIdx.x];
  slots[threadIdx.x] = 7;
}

/// Lane 0 meets the lanes of a mask that leaves it out.
__global__ void ownLaneKernel() {
  if (threadIdx.x == 0)
    __syncwarp(0x2u);
}

/// Lanes 1 and 31 meet with one mask, lane 0 with another (each mask
/// holds its own lane and only lanes that are still there, in either
/// order of the lanes); the other lanes return.
__global__ void disagreeingMasksKernel() {
  if (threadIdx.x == 0)
    __syncwarp(0x3u);
  else if (threadIdx.x == 1 || threadIdx.x == 31)
    __syncwarp(0x80000003u);
}

/// Lanes 0 and 1 shuffle from lane 5, which their mask leaves out.
__global__ void shuffleOutsideMaskKernel(int *out) {
  if (threadIdx.x < 2)
    out[threadIdx.x] = __shfl_sync(0x3u, static_cast<int>(threadIdx.x), 5);
}

/// Each block adds one to `counter` after its threads awaited the kernel
/// before them: all of them, or (everyThread false) thread 0 alone; with
/// `barrierFirst`, after a barrier.
__global__ void dependentKernel(int *counter, bool everyThread, bool barrierFirst) {
  if (barrierFirst)
    __syncthreads();
  if (everyThread || threadIdx.x == 0)
    moe::cuda::awaitPreviousKernel();
  if (threadIdx.x == 0)
    atomicAdd(counter, 1);
}

/// How lastArrivalKernel's blocks count their arrival: after a barrier
/// that follows every thread's write (right), or wrongly: thread 0 counts
/// before its own write, or with no barrier after the others' writes.
enum Arrival { kAfterTheBarrier, kBeforeItsWrite, kWithoutTheBarrier };

/// Each thread writes its part, a block's thread 0 counts the block's
/// arrival, and the last block to arrive sums every part. The wrong
/// arrivals are bugs a GPU shows when blocks run at once.
__global__ void lastArrivalKernel(int *parts, unsigned *count, int *sum, Arrival arrival) {
  __shared__ int last[1];
  const int at = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (threadIdx.x == 0 && arrival == kBeforeItsWrite)
    *last = atomicAdd(count, 1u) + 1 == gridDim.x;
  parts[at] = at + 1;
  __threadfence();
  if (arrival == kAfterTheBarrier)
    __syncthreads();
  if (threadIdx.x == 0 && arrival != kBeforeItsWrite)
    *last = atomicAdd(count, 1u) + 1 == gridDim.x;
  __syncthreads();
  if (threadIdx.x != 0 || !*last)
    return;
  __threadfence();
  int total = 0;
  for (unsigned i = 0; i < gridDim.x * blockDim.x; ++i)
    total += parts[i];
  *sum = total;
}

/// Each block's thread 0 takes two tickets in a row, the other threads
/// one each.
__global__ void ticketKernel(int *counter, int *tickets) {
  const int at = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  tickets[2 * at] = atomicAdd(counter, 1);
  tickets[2 * at + 1] = threadIdx.x == 0 ? atomicAdd(counter, 1) : -1;
}

/// Each thread finds its shared slot undefined, writes it, makes atomics
/// (thread 0 two, so its block's turns end while the other blocks run with
/// shared memory of their own), and after the barrier reads its
/// neighbour's slot: what it found and what it read.
__global__ void sharedAcrossTurnsKernel(int *counter, int *out) {
  __shared__ int slots[64];
  const unsigned t = threadIdx.x;
  const int at = static_cast<int>(blockIdx.x * blockDim.x + t);
  out[2 * at] = slots[t];
  slots[t] = static_cast<int>(blockIdx.x * 1000 + t);
  atomicAdd(counter, 1);
  if (t == 0)
    atomicAdd(counter, 1);
  __syncthreads();
  out[2 * at + 1] = slots[(t + 1) % blockDim.x];
}

/// Every block writes its index to the same word (a race).
__global__ void lastWriterKernel(int *out) {
  if (threadIdx.x == 0)
    *out = static_cast<int>(blockIdx.x);
}

/// Device memory with `count` ints, freed at the end of the scope.
struct DeviceInts {
  int *data = nullptr;
  explicit DeviceInts(size_t count) { EXPECT_EQ(cudaMalloc(&data, count * sizeof(int)), cudaSuccess); }
  ~DeviceInts() { cudaFree(data); }
};

/// Clears a test's deliberate failures for the next test.
struct Recover {
  ~Recover() { moe::emulation::clearErrors(); }
};

TEST(Emulation, ThreadsMeetAtBlockBarriers) {
  const dim3 grid(3, 2), block(32, 8);
  const size_t count = 6 * 256;
  DeviceInts out(2 * count);
  launchKernel(neighbourKernel, grid, block, nullptr, out.data);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  std::vector<int> host(2 * count);
  ASSERT_EQ(cudaMemcpy(host.data(), out.data, 2 * count * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int by = 0; by < 2; ++by)
    for (int bx = 0; bx < 3; ++bx)
      for (int ty = 0; ty < 8; ++ty)
        for (int tx = 0; tx < 32; ++tx) {
          const int b = bx + 3 * by, t = tx + 32 * ty;
          ASSERT_EQ(host[b * 256 + t], (t + 1) % 256 + 1000 * b) << b << " " << t;
          ASSERT_EQ(host[count + b * 256 + t], tx + 100 * ty + 10000 * (bx + 10 * by) + 1000000 * ty)
              << "block (" << bx << ", " << by << "), thread (" << tx << ", " << ty << ")";
        }
}

TEST(Emulation, ShufflesMoveValuesBetweenLanes) {
  std::vector<float> in(64);
  std::iota(in.begin(), in.end(), 1.0f);
  float *deviceIn = nullptr, *deviceOut = nullptr;
  ASSERT_EQ(cudaMalloc(&deviceIn, 64 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&deviceOut, 64 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(deviceIn, in.data(), 64 * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  launchKernel(warpSumKernel, 1, 64, nullptr, deviceIn, deviceOut);
  std::vector<float> out(64);
  ASSERT_EQ(cudaMemcpy(out.data(), deviceOut, 64 * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int t = 0; t < 64; ++t) {
    const int warp = t / 32;
    const float sum = 32.0f * (32 * warp) + 32.0f * 33.0f / 2.0f; // 1 + 32w .. 32 + 32w
    EXPECT_EQ(out[t], (t & 31) == 1 ? static_cast<float>(32 * warp + 1) : sum) << t;
  }
  cudaFree(deviceIn);
  cudaFree(deviceOut);
}

TEST(Emulation, AsyncCopiesLandBetweenTheCallAndTheWait) {
  DeviceInts global(1), out(2);
  const int value = 42;
  ASSERT_EQ(cudaMemcpy(global.data, &value, sizeof value, cudaMemcpyHostToDevice), cudaSuccess);
  // Two runs in a row: the copy lands at the wait in one, at the call in
  // the other (a GPU may do either); after the wait it is there in both.
  int before[2] = {};
  for (int run = 0; run < 2; ++run) {
    launchKernel(asyncCopyKernel, 1, 32, nullptr, static_cast<const int *>(global.data), out.data);
    int host[2] = {};
    ASSERT_EQ(cudaMemcpy(host, out.data, sizeof host, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(host[1], 42);
    before[run] = host[0];
  }
  EXPECT_EQ(std::min(before[0], before[1]), -1) << "one run reads the slot before the copy lands";
  EXPECT_EQ(std::max(before[0], before[1]), 42) << "one run has it at once";
}

TEST(Emulation, AMisalignedAsyncCopyFailsTheKernel) {
  // cp.async takes addresses aligned to its size; a GPU faults on others.
  Recover recover;
  DeviceInts global(8), out(1);
  const int *source = static_cast<const int *>(global.data);
  launchKernel(misalignedCopyKernel, 1, 32, nullptr, source, 16, 16, out.data);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  launchKernel(misalignedCopyKernel, 1, 32, nullptr, source, 4, 16, out.data);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  EXPECT_NE(moe::emulation::lastFailure().find("not aligned"), std::string::npos) << moe::emulation::lastFailure();
  moe::emulation::clearErrors();
  launchKernel(misalignedCopyKernel, 1, 32, nullptr, source, 0, 12, out.data);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  EXPECT_NE(moe::emulation::lastFailure().find("it copies 4, 8 or 16"), std::string::npos)
      << moe::emulation::lastFailure();
}

TEST(Emulation, StreamWorkRunsWhenTheHostWaits) {
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  DeviceInts device(2);
  int *pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, 2 * sizeof(int)), cudaSuccess);
  int pageable = 1;
  pinned[0] = 1;
  pinned[1] = 7;
  ASSERT_EQ(cudaMemcpyAsync(device.data, pinned, sizeof(int), cudaMemcpyHostToDevice, stream), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(device.data + 1, &pageable, sizeof(int), cudaMemcpyHostToDevice, stream), cudaSuccess);
  // Changed before the wait: a pinned buffer is read when the copy runs,
  // a pageable one was staged by the call.
  pinned[0] = 2;
  pageable = 2;
  ASSERT_EQ(cudaMemcpyAsync(pinned, device.data, 2 * sizeof(int), cudaMemcpyDeviceToHost, stream), cudaSuccess);
  EXPECT_EQ(pinned[1], 7) << "nothing has run before the wait";
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(pinned[0], 2);
  EXPECT_EQ(pinned[1], 1);
  cudaFreeHost(pinned);
  cudaStreamDestroy(stream);
}

TEST(Emulation, CopiesAreCheckedAgainstAllocations) {
  DeviceInts device(4);
  std::vector<int> host(8);
  EXPECT_EQ(cudaMemcpy(device.data, host.data(), 8 * sizeof(int), cudaMemcpyHostToDevice), cudaErrorInvalidValue)
      << "past the allocation's end";
  EXPECT_EQ(cudaMemcpy(host.data(), host.data() + 4, 4 * sizeof(int), cudaMemcpyDeviceToHost), cudaErrorInvalidValue)
      << "host memory named as the device's";
  EXPECT_EQ(cudaMemcpy(device.data, device.data, 4 * sizeof(int), cudaMemcpyHostToDevice), cudaErrorInvalidValue)
      << "device memory named as the host's";
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << "not sticky";
}

TEST(Emulation, AKernelReadingPastItsAllocationDies) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  DeviceInts in(64), out(32);
  // The last 32 of 64 elements: fine.
  launchKernel(readKernel, 1, 32, nullptr, static_cast<const int *>(in.data), 32, out.data);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // One element past the end (64 ints fill 256 bytes: the guard page).
  EXPECT_DEATH(
      {
        launchKernel(readKernel, 1, 32, nullptr, static_cast<const int *>(in.data), 33, out.data);
        cudaDeviceSynchronize();
      },
      "past the end of a device allocation");
}

TEST(Emulation, HostCodeTouchingDeviceMemoryDies) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  DeviceInts device(4);
  const int value = 3;
  ASSERT_EQ(cudaMemcpy(device.data, &value, sizeof value, cudaMemcpyHostToDevice), cudaSuccess);
  int back = 0;
  ASSERT_EQ(cudaMemcpy(&back, device.data, sizeof back, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, 3) << "copies reach it";
  // A device pointer dereferenced on the host: on a GPU machine a fault.
  EXPECT_DEATH(
      {
        volatile int *p = device.data;
        back = *p;
      },
      "host code touched device memory");
}

TEST(Emulation, BadLaunchesAreTheNextError) {
  DeviceInts counter(1);
  launchKernel(incrementKernel, 0, 32, nullptr, counter.data);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration) << "an empty grid";
  launchKernel(incrementKernel, 1, 2048, nullptr, counter.data);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration) << "over 1024 threads a block";
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST(Emulation, DeadlocksTrapsAndReturnedLanesFailTheStream) {
  Recover recover;
  launchKernel(deadlockKernel, 1, 64, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  EXPECT_NE(moe::emulation::lastFailure().find("deadlock"), std::string::npos) << moe::emulation::lastFailure();
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure) << "sticky, as on a GPU";
  moe::emulation::clearErrors();
  launchKernel(trapKernel, 2, 32, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  EXPECT_NE(moe::emulation::lastFailure().find("trapped"), std::string::npos) << moe::emulation::lastFailure();
  moe::emulation::clearErrors();
  DeviceInts out(32);
  launchKernel(returnedLaneKernel, 1, 32, nullptr, reinterpret_cast<float *>(out.data));
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  // Lanes 0-15 wait at the shuffle when 16-31 return, or (lanes last
  // first) the shuffle names lanes that have returned: either way a lane
  // the shuffle needs has returned.
  EXPECT_NE(moe::emulation::lastFailure().find("returned"), std::string::npos) << moe::emulation::lastFailure();
}

TEST(Emulation, AMissingBarrierShowsInOneOfTwoRuns) {
  DeviceInts out(32);
  const auto allRight = [&](int salt, bool barrier) {
    launchKernel(previousLaneKernel, 1, 32, nullptr, salt, barrier, out.data);
    std::vector<int> host(32);
    EXPECT_EQ(cudaMemcpy(host.data(), out.data, 32 * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
    for (int t = 0; t < 32; ++t)
      if (host[t] != (t == 0 ? 0 : t - 1) + salt)
        return false;
    return true;
  };
  EXPECT_TRUE(allRight(100, true));
  EXPECT_TRUE(allRight(200, true));
  // Two runs in a row, one taking the lanes first to last (each reads a
  // slot already written), the other last to first (each reads a slot of
  // the run before).
  const bool first = allRight(300, false), second = allRight(400, false);
  EXPECT_NE(first, second);
}

TEST(Emulation, SharedMemoryStartsUndefinedInEveryBlock) {
  DeviceInts out(2 * 64);
  // Two blocks a run, two runs (one of them backwards): no block finds
  // what an earlier one left, nor zeros; every one finds the poison.
  for (int run = 0; run < 2; ++run) {
    launchKernel(leftoverKernel, 2, 64, nullptr, out.data);
    std::vector<int> host(2 * 64);
    ASSERT_EQ(cudaMemcpy(host.data(), out.data, host.size() * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < host.size(); ++i)
      ASSERT_EQ(host[i], -1) << "run " << run << ", thread " << i;
  }
}

TEST(Emulation, WarpCallsWithBadMasksFailTheKernel) {
  Recover recover;
  const auto failure = [](auto kernel, auto... args) {
    // Both orders of the lanes: two runs.
    std::string why[2];
    for (std::string &w : why) {
      moe::emulation::clearErrors();
      launchKernel(kernel, 1, 32, nullptr, args...);
      EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
      w = moe::emulation::lastFailure();
    }
    EXPECT_EQ(why[0], why[1]) << "the same failure in either order";
    return why[0];
  };
  EXPECT_NE(failure(ownLaneKernel).find("leaves out its own lane"), std::string::npos);
  EXPECT_NE(failure(disagreeingMasksKernel).find("different masks"), std::string::npos);
  DeviceInts out(2);
  EXPECT_NE(failure(shuffleOutsideMaskKernel, out.data).find("reads a lane its mask leaves out"), std::string::npos);
}

TEST(Emulation, FreeingMemoryTheEmulationDidNotGiveFails) {
  int local = 0;
  EXPECT_EQ(cudaFree(&local), cudaErrorInvalidValue) << "host memory";
  DeviceInts device(4);
  EXPECT_EQ(cudaFree(device.data + 1), cudaErrorInvalidValue) << "inside an allocation";
  EXPECT_EQ(cudaFreeHost(device.data), cudaErrorInvalidValue) << "device memory freed as pinned";
  int *pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, sizeof(int)), cudaSuccess);
  EXPECT_EQ(cudaFree(pinned), cudaErrorInvalidValue) << "pinned memory freed as the device's";
  EXPECT_EQ(cudaFreeHost(pinned), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << "not sticky";
}

TEST(Emulation, CaptureRefusesCopiesOfPageableMemory) {
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  DeviceInts device(1);
  int pageable = 5;
  for (const cudaMemcpyKind kind : {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost}) {
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    if (kind == cudaMemcpyHostToDevice)
      EXPECT_EQ(cudaMemcpyAsync(device.data, &pageable, sizeof(int), kind, stream), cudaErrorStreamCaptureUnsupported);
    else
      EXPECT_EQ(cudaMemcpyAsync(&pageable, device.data, sizeof(int), kind, stream), cudaErrorStreamCaptureUnsupported);
    cudaGraph_t graph = nullptr;
    EXPECT_EQ(cudaStreamEndCapture(stream, &graph), cudaErrorStreamCaptureInvalidated) << kind;
    EXPECT_EQ(graph, nullptr);
  }
  cudaGetLastError();
  cudaStreamDestroy(stream);
}

TEST(Emulation, ANullOpenerGivesBackTheBuildsOwnDevice) {
  // The emulated device again at the end, whatever fails: later tests open it.
  struct Restore {
    ~Restore() { moe::setCudaDeviceOpener(&moe::openEmulatedCudaDevice); }
  } restore;
  ASSERT_EQ(moe::setCudaDeviceOpener(nullptr), &moe::openEmulatedCudaDevice) << "installed by EmulatedDevice.cpp";
  moe::Expected<std::shared_ptr<moe::Device>> device = moe::openDevice(moe::DeviceChoice::Cuda);
  // The build's CUDA device: a real GPU, or an error where there is none
  // (or no CUDA was built); never the emulation's.
  if (device)
    EXPECT_EQ((*device)->description().find("emulation"), std::string::npos) << (*device)->description();
  else
    EXPECT_FALSE(device.status().message().empty());
  moe::setCudaDeviceOpener(&moe::openEmulatedCudaDevice);
  moe::Expected<std::shared_ptr<moe::Device>> emulated = moe::openDevice(moe::DeviceChoice::Cuda);
  ASSERT_TRUE(emulated) << emulated.status().message();
  EXPECT_NE((*emulated)->description().find("emulation"), std::string::npos) << (*emulated)->description();
}

TEST(Emulation, CaptureRefusesWaitsAndGraphsReplayTheirLaunches) {
  Recover recover;
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  DeviceInts counter(1);
  ASSERT_EQ(cudaMemsetAsync(counter.data, 0, sizeof(int), stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);

  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  launchKernel(incrementKernel, 1, 32, stream, counter.data);
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaErrorStreamCaptureUnsupported);
  cudaGraph_t graph = nullptr;
  EXPECT_EQ(cudaStreamEndCapture(stream, &graph), cudaErrorStreamCaptureInvalidated);
  EXPECT_EQ(graph, nullptr);

  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  launchKernel(incrementKernel, 1, 32, stream, counter.data);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int i = 0; i < 3; ++i)
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  int value = -1;
  ASSERT_EQ(cudaMemcpyAsync(&value, counter.data, sizeof value, cudaMemcpyDeviceToHost, stream), cudaSuccess);
  EXPECT_EQ(value, 3) << "three replays; the captured launches themselves did not run";
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

} // namespace

TEST(Emulation, ADependentLaunchFailsWhereAThreadDoesNotAwaitFirst) {
  // A kernel launched to overlap the one before it (programmatic dependent
  // launch) must await it in every thread before anything else: a thread
  // that ends without awaiting, or meets a barrier first, could run while
  // the kernel before it still runs.
  Recover recover;
  DeviceInts counter(1);
  const int zero = 0;
  ASSERT_EQ(cudaMemcpy(counter.data, &zero, sizeof zero, cudaMemcpyHostToDevice), cudaSuccess);
  const moe::cuda::LaunchStream dependent{nullptr, true};
  launchKernel(dependentKernel, 2, 64, dependent, counter.data, true, false);
  launchKernel(dependentKernel, 2, 64, nullptr, counter.data, false, true); // a plain launch need not await
  int host = 0;
  ASSERT_EQ(cudaMemcpy(&host, counter.data, sizeof host, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(host, 4);
  launchKernel(dependentKernel, 2, 64, dependent, counter.data, false, false);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  EXPECT_NE(moe::emulation::lastFailure().find("ended without awaiting"), std::string::npos)
      << moe::emulation::lastFailure();
  moe::emulation::clearErrors();
  launchKernel(dependentKernel, 2, 64, dependent, counter.data, true, true);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  EXPECT_NE(moe::emulation::lastFailure().find("barrier, shuffle or copy before awaiting"), std::string::npos)
      << moe::emulation::lastFailure();
}

TEST(Emulation, BlocksRunAtOnceAndInterleaveAtAtomics) {
  // 20 blocks of 64 threads, eight resident at a time: every ticket is
  // taken once, and some block's two tickets are not in a row (another
  // block ran between its atomics), in both orders of the blocks.
  const int blocks = 20, threads = 64, takers = blocks * threads;
  DeviceInts counter(1), tickets(2 * takers);
  for (int run = 0; run < 2; ++run) {
    const int zero = 0;
    ASSERT_EQ(cudaMemcpy(counter.data, &zero, sizeof zero, cudaMemcpyHostToDevice), cudaSuccess);
    launchKernel(ticketKernel, blocks, threads, nullptr, counter.data, tickets.data);
    std::vector<int> host(2 * takers);
    ASSERT_EQ(cudaMemcpy(host.data(), tickets.data, host.size() * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
    std::vector<int> taken;
    int apart = 0;
    for (int t = 0; t < takers; ++t) {
      taken.push_back(host[2 * t]);
      if (t % threads == 0) {
        taken.push_back(host[2 * t + 1]);
        apart += host[2 * t + 1] != host[2 * t] + 1;
      }
    }
    std::sort(taken.begin(), taken.end());
    std::vector<int> expected(takers + blocks);
    std::iota(expected.begin(), expected.end(), 0);
    EXPECT_EQ(taken, expected) << "run " << run;
    EXPECT_GT(apart, 0) << "run " << run << ": every block took its tickets with no other block between";
  }
}

TEST(Emulation, ACountBeforeItsWriteIsReadUnwritten) {
  // The last block to arrive sums every thread's part. Counted after the
  // block's writes, every run sums 1 + ... + 768; counted before (as on a
  // GPU, the last block goes on before the others have written) the sum
  // falls short: in both runs where thread 0 counts before its own write,
  // in one of two (the run that takes warp 0 first) where it counts with
  // no barrier after its block's other warps' writes.
  const int blocks = 12, threads = 64, poison = -1000;
  DeviceInts parts(blocks * threads), count(1), sum(1);
  const auto summed = [&](Arrival arrival) {
    const std::vector<int> unwritten(blocks * threads, poison);
    const int zero = 0;
    EXPECT_EQ(cudaMemcpy(parts.data, unwritten.data(), unwritten.size() * sizeof(int), cudaMemcpyHostToDevice),
              cudaSuccess);
    EXPECT_EQ(cudaMemcpy(count.data, &zero, sizeof zero, cudaMemcpyHostToDevice), cudaSuccess);
    launchKernel(lastArrivalKernel, blocks, threads, nullptr, parts.data, reinterpret_cast<unsigned *>(count.data),
                 sum.data, arrival);
    int host = 0;
    EXPECT_EQ(cudaMemcpy(&host, sum.data, sizeof host, cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  };
  const int right = blocks * threads * (blocks * threads + 1) / 2;
  EXPECT_EQ(summed(kAfterTheBarrier), right);
  EXPECT_EQ(summed(kAfterTheBarrier), right);
  EXPECT_NE(summed(kBeforeItsWrite), right);
  EXPECT_NE(summed(kBeforeItsWrite), right);
  const int first = summed(kWithoutTheBarrier), second = summed(kWithoutTheBarrier);
  EXPECT_TRUE(first != right || second != right) << "both runs summed every part";
}

TEST(Emulation, ResidentBlocksKeepTheirOwnSharedMemory) {
  // 20 blocks, eight resident at a time, each pausing at its atomics while
  // the others run: every block starts with its shared memory undefined,
  // and finds in it after the pauses what it wrote, not another block's.
  const int blocks = 20, threads = 64;
  DeviceInts counter(1), out(2 * blocks * threads);
  for (int run = 0; run < 2; ++run) {
    launchKernel(sharedAcrossTurnsKernel, blocks, threads, nullptr, counter.data, out.data);
    std::vector<int> host(2 * blocks * threads);
    ASSERT_EQ(cudaMemcpy(host.data(), out.data, host.size() * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
    for (int b = 0; b < blocks; ++b)
      for (int t = 0; t < threads; ++t) {
        const int at = b * threads + t;
        ASSERT_EQ(host[2 * at], -1) << "run " << run << ", block " << b << ", thread " << t;
        ASSERT_EQ(host[2 * at + 1], b * 1000 + (t + 1) % threads)
            << "run " << run << ", block " << b << ", thread " << t;
      }
  }
}

TEST(Emulation, BlocksWithoutAtomicsRunInEitherOrder) {
  // More blocks than are resident, none making an atomic: one run takes
  // them first to last, the next last to first, so a race between any two
  // of them (here every block writing one word) gives two answers.
  DeviceInts out(1);
  int last[2] = {};
  for (int run = 0; run < 2; ++run) {
    launchKernel(lastWriterKernel, 20, 32, nullptr, out.data);
    ASSERT_EQ(cudaMemcpy(&last[run], out.data, sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
  }
  EXPECT_EQ(std::min(last[0], last[1]), 0);
  EXPECT_EQ(std::max(last[0], last[1]), 19);
}
