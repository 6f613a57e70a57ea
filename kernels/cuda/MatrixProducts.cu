//===- MatrixProducts.cu - Matrix products of the engine on a GPU ---------===//
//
// Part of moec. Three kernels and their host side:
//   - quantizeKernel: one warp per (token, weight group) rounds the f32
//     activation to int8 with the CPU's arithmetic (absmax / 127, round half
//     away from zero), its scale and the group's sum;
//   - productKernel: one warp per output row of any matrix in a batch of
//     jobs, over up to eight tokens at a time. Group formats, held as a code
//     plane and a header plane (common/GroupPlanes.h, split at upload): each
//     lane takes 32-code blocks of the row (one 16-byte load for 4 bits,
//     four blocks in flight), unpacks the planar codes into four codes per
//     32-bit word with shifts and masks and dots them with the int8
//     activation by dp4a; f32 and bf16 rows dot the f32 activation. Lanes'
//     sums meet by warp shuffles;
//   - swigluKernel and combineKernel: silu(gate) * up, and the experts'
//     weighted outputs added in order; for a block of tokens (prefill),
//     gatherKernel and weightedSumKernel take each expert's tokens from
//     the block and add its weighted outputs back in the CPU's order.
// Decode (a token with the residual stream on the device) adds the streamed
// product kernel, attention, norms and the routing kernel; in its MoE
// block the products also run SwiGLU and the weighted sum (RoutedFusion:
// the warp that completes a set of rows runs what reads them).
// A call stages its activation and job tables in one pinned buffer, copies
// them with one transfer, launches, and copies the results back.
//
//===----------------------------------------------------------------------===//

#include "MatrixProducts.h"

#include "Check.h"
#include "common/GroupPlanes.h"
#include "cuda/Launch.h"
#include "cuda/TensorTiles.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace moe::cuda {
namespace {

constexpr int kTile = 8;          ///< Tokens per pass over a row (TILE), above one token.
constexpr int kWarpsPerBlock = 8; ///< 256 threads.

static_assert(static_cast<int>(WeightLayout::Group) == kGroupLayout, "ProductJob::layout of group formats");

__device__ __forceinline__ float warpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float scaleValue(unsigned short bits, int bf16) {
  return bf16 ? __uint_as_float(static_cast<unsigned>(bits) << 16) : __half2float(__ushort_as_half(bits));
}

/// silu(g) * u, silu as the CPU engine writes it.
/// Rounded one operation at a time, so that every kernel that inlines it
/// (fused or not: RoutedFusion) gives the same bits whatever nvcc fuses.
__device__ __forceinline__ float swiglu(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

/// One warp's share of `job` (QuantJob): its group `k` of all tokens'
/// groups (k = token * groups + group). FromL2: x and up read past the L1
/// (other warps of the same kernel wrote them: settleRow).
template <bool FromL2 = false> __device__ __forceinline__ void quantizeGroup(const QuantJob &job, int64_t k, int lane) {
  const auto load = [](const float *p) { return FromL2 ? __ldcg(p) : *p; };
  const int64_t t = k / job.groups, g = k - t * job.groups;
  const float *x = job.x + t * job.ldx;
  const int64_t begin = g * job.group;
  const int perLane = job.group / 32;
  float values[4];
  float absMax = 0.0f;
  for (int i = 0; i < 4; ++i) {
    const int64_t c = begin + lane + 32 * i;
    values[i] = 0.0f;
    if (i < perLane && c < job.cols) {
      values[i] = load(x + c);
      if (job.up) {
        values[i] = swiglu(values[i], load(job.up + t * job.ldx + c));
        if (job.h)
          job.h[t * job.ldx + c] = values[i];
      }
    }
    absMax = fmaxf(absMax, fabsf(values[i]));
  }
  if (job.h)
    return; // SwiGLU alone, for a product over floats (the warp's lanes share the job)
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    absMax = fmaxf(absMax, __shfl_xor_sync(0xffffffffu, absMax, offset));
  // quantizeActivationScalar's arithmetic: IEEE division and product, then
  // rounding half away from zero.
  const float scale = __fdiv_rn(absMax, 127.0f);
  const float inverse = absMax > 0.0f ? __fdiv_rn(127.0f, absMax) : 0.0f;
  int sum = 0;
  int8_t *out = job.values + t * job.groups * job.group + begin;
  for (int i = 0; i < perLane; ++i) {
    const int q = static_cast<int>(roundf(__fmul_rn(values[i], inverse)));
    out[lane + 32 * i] = static_cast<int8_t>(q);
    sum += q;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) {
    job.scales[t * job.groups + g] = scale;
    job.sums[t * job.groups + g] = __fmul_rn(static_cast<float>(sum), scale);
  }
}

/// The row counts of a fused launch (countRow, settleRow): an atomic add that
/// releases the thread's earlier writes, returning the count before it;
/// and the fence that acquires what the counts released.
__device__ __forceinline__ unsigned arriveReleasing(unsigned *count) {
#if MOEC_CUDA_EMULATION
  return atomicAdd(count, 1u); // memory is sequentially consistent there
#else
  unsigned before;
  asm volatile("atom.release.gpu.global.add.u32 %0, [%1], 1;" : "=r"(before) : "l"(count) : "memory");
  return before;
#endif
}
__device__ __forceinline__ void acquireFence() {
#if !MOEC_CUDA_EMULATION
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
#endif
}

/// Row r of the weighted sum of `count` outputs of `hidden` rows: added
/// from zero in order, each product and sum rounded on its own (the CPU
/// engine's order; settleRow's fused sum adds the same way).
__device__ __forceinline__ float weightedRow(const float *parts, const float *weights, int count, int64_t hidden,
                                             int64_t r) {
  float total = 0.0f;
  for (int i = 0; i < count; ++i)
    total = addRn(total, mulRn(weights[i], parts[i * hidden + r]));
  return total;
}

/// A row of a fused launch (RoutedFusion) counted: its set, the count that
/// completes the set, and (lane 0) the count its atomic add found before
/// it, used when the row is settled (settleRow). job < 0: none.
struct CountedRow {
  int job = -1;
  int32_t index = 0;
  unsigned target = 0, before = 0;
};

/// Counts row `row` of job `job`, which the warp (every lane) wrote from
/// lane 0: lane 0's release add orders the row before its count. The
/// answer is not waited for here.
__device__ __forceinline__ CountedRow countRow(const RoutedFusion &f, int job, int64_t row, int lane) {
  const Arrival arrival = arrivalOf(f, job, row);
  CountedRow counted{job, static_cast<int32_t>(arrival.index), arrival.target, 0};
  if (lane == 0)
    counted.before = arriveReleasing(f.arrivals + arrival.index);
  return counted;
}

/// Where `c`'s count completed its set, runs what reads the set (every
/// lane): lane 0's acquire fence after the count that saw every other
/// row's, then the warp's barrier, order those rows before every lane's
/// reads (which go to L2); the count goes back to zero for the next launch
/// and a graph's replay.
__device__ __forceinline__ void settleRow(const RoutedFusion &f, const CountedRow &c, int lane) {
  if (c.job < 0)
    return;
  const unsigned last = lane == 0 && c.before == c.target - 1;
  if (!__shfl_sync(0xffffffffu, last, 0))
    return;
  acquireFence();
  __syncwarp();
  if (lane == 0)
    f.arrivals[c.index] = 0;
  if (f.stage == RoutedFusion::kThenSwiglu) {
    const QuantJob &q = f.plan->downJobs[c.job >> 1];
    quantizeGroup<true>(q, c.index - q.first, lane);
    return;
  }
  static_assert(kMaxRouted <= 32, "a lane per expert");
  // An output row (its index): lane i < count takes expert i's product,
  // lane 0 adds them in order (weightedRow's arithmetic, one round trip
  // to L2).
  const int64_t row = c.index;
  const int count = f.plan->count;
  const float product =
      lane < count ? mulRn(f.plan->weights[lane], __ldcg(f.parts + static_cast<int64_t>(lane) * f.hidden + row)) : 0.0f;
  float total = 0.0f;
  for (int i = 0; i < count; ++i)
    total = addRn(total, __shfl_sync(0xffffffffu, product, i));
  if (lane == 0)
    f.residual[row] = addRn(f.residual[row], total);
}

/// A warp per group of `count` jobs' groups (QuantJob::first). `dynamic`,
/// when not null, holds the job count and warps in place of `count` and
/// `total` (a plan the device wrote; the grid covers a bound).
__global__ void quantizeKernel(const QuantJob *jobs, int count, int64_t total, const LaunchSize *dynamic) {
  awaitPreviousKernel();
  if (dynamic) {
    count = dynamic->count;
    total = dynamic->total;
  }
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= total)
    return;
  int j = 0;
  while (j + 1 < count && jobs[j + 1].first <= warp)
    ++j;
  quantizeGroup(jobs[j], warp - jobs[j].first, lane);
}

__device__ __forceinline__ int dotUnsigned(unsigned codes, int activations, int accumulator) {
#if MOEC_CUDA_EMULATION
  for (int i = 0; i < 4; ++i)
    accumulator +=
        static_cast<int>((codes >> (8 * i)) & 0xFFu) * static_cast<int>(static_cast<int8_t>(activations >> (8 * i)));
  return accumulator;
#else
  int result;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(result) : "r"(codes), "r"(activations), "r"(accumulator));
  return result;
#endif
}

/// The 32 codes of a planar block (kernels/common/QuantFormat.h) as eight
/// words of four byte-sized codes: word m holds codes 4m .. 4m + 3.
template <int BITS> __device__ __forceinline__ void unpackBlock(const unsigned (&w)[BITS], unsigned (&c)[8]) {
  if constexpr (BITS == 8) {
#pragma unroll
    for (int m = 0; m < 8; ++m)
      c[m] = w[m];
  } else if constexpr (BITS == 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      c[k] = w[k] & 0x0F0F0F0Fu;
      c[4 + k] = (w[k] >> 4) & 0x0F0F0F0Fu;
    }
  } else {
    // 2 bits: byte i of the first eight holds code i + 8s at bits 2s. 3 bits:
    // the same for the low two bits, and bit (j % 8) of byte 8 + j / 8 is
    // code j's high bit.
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        unsigned value = (w[k] >> (2 * s)) & 0x03030303u;
        if constexpr (BITS == 3) {
          const unsigned n = (w[2] >> (8 * s + 4 * k)) & 0xFu;
          const unsigned spread = (n & 1u) | ((n & 2u) << 7) | ((n & 4u) << 14) | ((n & 8u) << 21);
          value |= spread << 2;
        }
        c[2 * s + k] = value;
      }
  }
}

/// A 32-code block of a row: its group's scale and min and its code words.
template <int BITS> struct CodeBlock {
  float scale, minimum;
  unsigned words[BITS];
};

/// A block's 32 int8 activations (eight words of four), its group's
/// activation scale and, where the block starts a group of codes with a
/// minimum, the group's activation sum.
struct BlockActivations {
  int words[8];
  float scale, sum;
};

/// Loads a block's activations: `a` 16-byte aligned.
__device__ __forceinline__ BlockActivations loadActivations(const int8_t *a, const float *scale, const float *sum,
                                                            bool needSum) {
  const int4 a0 = __ldg(reinterpret_cast<const int4 *>(a)), a1 = __ldg(reinterpret_cast<const int4 *>(a) + 1);
  return BlockActivations{{a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w}, __ldg(scale), needSum ? __ldg(sum) : 0.0f};
}

/// acc += one 32-code block's dot with its activations in the CPU's order:
/// (sum * activation scale) * weight scale, then, at a group's first block,
/// min * the group's activation sum.
template <int BITS>
__device__ __forceinline__ void accumulateBlock(float &acc, const unsigned (&words)[BITS], float scale, float minimum,
                                                bool groupStart, bool signedCodes, const BlockActivations &a) {
  unsigned unpacked[8];
  unpackBlock<BITS>(words, unpacked);
  int sum = 0;
  if (signedCodes) {
#pragma unroll
    for (int m = 0; m < 8; ++m)
      sum = __dp4a(static_cast<int>(unpacked[m]), a.words[m], sum);
  } else {
#pragma unroll
    for (int m = 0; m < 8; ++m)
      sum = dotUnsigned(unpacked[m], a.words[m], sum);
  }
  // Rounded one operation at a time (no fused multiply-add, which nvcc
  // would form where it sees fit): every kernel that calls this gives the
  // same bits on a GPU as on the emulation (built without contraction).
  acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(static_cast<float>(sum), a.scale), scale));
  if (groupStart && !signedCodes)
    acc = __fadd_rn(acc, __fmul_rn(minimum, a.sum));
}

/// Blocks in flight per lane (64 bytes of codes at 4 and 8 bits): all their
/// loads issue before any is used.
template <int BITS> constexpr int kBlocksInFlight = BITS == 8 ? 2 : 4;

/// A row of a matrix in planes (common/GroupPlanes.h): lane l takes blocks
/// l, l + 32, ..., so a warp's loads of a block's codes cover 32 * 4 * BITS
/// contiguous bytes; a block's group header is one broadcast load.
template <int BITS, int TILE> __device__ void groupRow(const ProductJob &job, int64_t row, int lane, int tokens) {
  const int blockShift = job.blockShift; // log2(blocks per group)
  const int blocks = static_cast<int>(job.groups) << blockShift;
  const uint8_t *codes = job.w + row * job.codeRowBytes;
  const uint8_t *headers = job.w + job.headerOffset + row * job.groups * (job.symmetric ? 2 : 4);
  const int64_t activationStride = job.groups * job.group;
  const float symmetricMin = -static_cast<float>(1 << (BITS - 1));
  auto load = [&](int b, CodeBlock<BITS> &out) {
    const int g = b >> blockShift;
    const uint8_t *block = codes + b * (4 * BITS);
    if constexpr (BITS == 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4 *>(block));
      out.words[0] = v.x, out.words[1] = v.y, out.words[2] = v.z, out.words[3] = v.w;
    } else if constexpr (BITS == 8) {
      const uint4 v = __ldg(reinterpret_cast<const uint4 *>(block)),
                  w = __ldg(reinterpret_cast<const uint4 *>(block) + 1);
      out.words[0] = v.x, out.words[1] = v.y, out.words[2] = v.z, out.words[3] = v.w;
      out.words[4] = w.x, out.words[5] = w.y, out.words[6] = w.z, out.words[7] = w.w;
    } else if constexpr (BITS == 2) {
      const uint2 v = __ldg(reinterpret_cast<const uint2 *>(block));
      out.words[0] = v.x, out.words[1] = v.y;
    } else {
#pragma unroll
      for (int k = 0; k < BITS; ++k)
        out.words[k] = __ldg(reinterpret_cast<const unsigned *>(block) + k);
    }
    if (job.symmetric) {
      out.scale = scaleValue(__ldg(reinterpret_cast<const unsigned short *>(headers) + g), job.bf16Scale);
      out.minimum = job.signedCodes ? 0.0f : symmetricMin * out.scale;
    } else {
      const unsigned header = __ldg(reinterpret_cast<const unsigned *>(headers) + g);
      out.scale = scaleValue(static_cast<unsigned short>(header & 0xFFFFu), job.bf16Scale);
      out.minimum = scaleValue(static_cast<unsigned short>(header >> 16), job.bf16Scale);
    }
  };
  for (int t0 = 0; t0 < tokens; t0 += TILE) {
    const int n = min(TILE, tokens - t0);
    float acc[TILE];
#pragma unroll
    for (int t = 0; t < TILE; ++t)
      acc[t] = 0.0f;
    auto apply = [&](int b, const CodeBlock<BITS> &block) {
      const int g = b >> blockShift;
      const bool groupStart = (b & ((1 << blockShift) - 1)) == 0;
#pragma unroll
      for (int t = 0; t < TILE; ++t) {
        if (t >= n)
          break;
        const int64_t token = t0 + t;
        accumulateBlock<BITS>(acc[t], block.words, block.scale, block.minimum, groupStart, job.signedCodes,
                              loadActivations(job.q + token * activationStride + b * 32,
                                              job.qScales + token * job.groups + g, job.qSums + token * job.groups + g,
                                              groupStart && !job.signedCodes));
      }
    };
    for (int base = lane; base < blocks; base += 32 * kBlocksInFlight<BITS>) {
      CodeBlock<BITS> inFlight[kBlocksInFlight<BITS>];
#pragma unroll
      for (int u = 0; u < kBlocksInFlight<BITS>; ++u)
        if (base + 32 * u < blocks)
          load(base + 32 * u, inFlight[u]);
#pragma unroll
      for (int u = 0; u < kBlocksInFlight<BITS>; ++u)
        if (base + 32 * u < blocks)
          apply(base + 32 * u, inFlight[u]);
    }
#pragma unroll
    for (int t = 0; t < TILE; ++t) {
      const float total = warpSum(acc[t]);
      if (lane == 0 && t < n)
        job.y[(t0 + t) * job.ldy + row] = total;
    }
  }
}

template <bool BF16> __device__ __forceinline__ float4 loadFour(const uint8_t *w, int64_t index) {
  if constexpr (BF16) {
    const uint2 bits = __ldg(reinterpret_cast<const uint2 *>(w) + index / 4);
    return make_float4(__uint_as_float(bits.x << 16), __uint_as_float(bits.x & 0xFFFF0000u),
                       __uint_as_float(bits.y << 16), __uint_as_float(bits.y & 0xFFFF0000u));
  } else {
    return __ldg(reinterpret_cast<const float4 *>(w) + index / 4);
  }
}

template <bool BF16> __device__ __forceinline__ float loadOne(const uint8_t *w, int64_t index) {
  if constexpr (BF16)
    return __uint_as_float(static_cast<unsigned>(__ldg(reinterpret_cast<const unsigned short *>(w) + index)) << 16);
  else
    return __ldg(reinterpret_cast<const float *>(w) + index);
}

template <bool BF16, int TILE> __device__ void denseRow(const ProductJob &job, int64_t row, int lane, int tokens) {
  const uint8_t *rowData = job.w + row * job.cols * (BF16 ? 2 : 4);
  for (int t0 = 0; t0 < tokens; t0 += TILE) {
    const int n = min(TILE, tokens - t0);
    float acc[TILE];
#pragma unroll
    for (int t = 0; t < TILE; ++t)
      acc[t] = 0.0f;
    if (job.vectorized) {
      // Unrolled so that a row of few matrices' rows (a router) has several
      // loads in flight per lane.
#pragma unroll 4
      for (int64_t c = 4 * lane; c < job.cols; c += 128) {
        const float4 w = loadFour<BF16>(rowData, c);
#pragma unroll
        for (int t = 0; t < TILE; ++t) {
          if (t >= n)
            break;
          const float4 x = __ldg(reinterpret_cast<const float4 *>(job.x + (t0 + t) * job.ldx + c));
          acc[t] += w.x * x.x + w.y * x.y + w.z * x.z + w.w * x.w;
        }
      }
    } else {
      for (int64_t c = lane; c < job.cols; c += 32) {
        const float w = loadOne<BF16>(rowData, c);
#pragma unroll
        for (int t = 0; t < TILE; ++t) {
          if (t >= n)
            break;
          acc[t] += w * __ldg(job.x + (t0 + t) * job.ldx + c);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < TILE; ++t) {
      const float total = warpSum(acc[t]);
      if (lane == 0 && t < n)
        job.y[(t0 + t) * job.ldy + row] = total;
    }
  }
}

/// The last of `count` jobs whose first warp (`Start`: ProductJob::first
/// for the warp-per-row kernels, firstTile for the tensor kernel) is at or
/// before `warp`. Jobs another kernel takes start where the next job does,
/// so this is always a job of the kernel asking.
template <int64_t ProductJob::*Start>
__device__ __forceinline__ int jobOfWarp(const ProductJob *jobs, int count, int64_t warp) {
  int low = 0, high = count - 1;
  while (low < high) {
    const int middle = (low + high + 1) / 2;
    if (jobs[middle].*Start <= warp)
      low = middle;
    else
      high = middle - 1;
  }
  return low;
}

/// TILE tokens per pass over a row: 1 when every job has one token (decode),
/// whose few registers let more warps wait on memory.
template <int TILE>
__global__ void __launch_bounds__(32 * kWarpsPerBlock, TILE == 1 ? 2 : 1)
    productKernel(const ProductJob *jobs, int count, int64_t totalRows, const LaunchSize *dynamic,
                  RoutedFusion fusion) {
  awaitPreviousKernel();
  if (dynamic) {
    count = dynamic->count;
    totalRows = dynamic->total;
  }
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= totalRows)
    return;
  // In registers: the loops read its fields often.
  const int jobIndex = jobOfWarp<&ProductJob::first>(jobs, count, warp);
  const ProductJob job = jobs[jobIndex];
  const int64_t row = warp - job.first;
  const int tokens = static_cast<int>(job.tokens);
  switch (job.layout) {
  case static_cast<int>(WeightLayout::F32):
    denseRow<false, TILE>(job, row, lane, tokens);
    break;
  case static_cast<int>(WeightLayout::BF16):
    denseRow<true, TILE>(job, row, lane, tokens);
    break;
  default:
    switch (job.bits) {
    case 2:
      groupRow<2, TILE>(job, row, lane, tokens);
      break;
    case 3:
      groupRow<3, TILE>(job, row, lane, tokens);
      break;
    case 4:
      groupRow<4, TILE>(job, row, lane, tokens);
      break;
    default:
      groupRow<8, TILE>(job, row, lane, tokens);
      break;
    }
  }
  if constexpr (TILE == 1)
    if (fusion.stage != RoutedFusion::kNone)
      settleRow(fusion, countRow(fusion, jobIndex, row, lane), lane);
}

/// tensorTile's MMA: mma.sync.m16n8k32 with int8 activations and unsigned
/// (ggml's Q8_0: signed) byte codes, int32 accumulators (sm_80 and later;
/// the host launches tensorKernel only there).
struct DeviceMma {
  __host__ __device__ void operator()(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                      bool signedCodes) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (signedCodes)
      asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                   "{%0,%1,%2,%3};\n"
                   : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
      asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                   "{%0,%1,%2,%3};\n"
                   : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
    __trap();
#elif MOEC_CUDA_EMULATION
    struct Fragments {
      unsigned a[4], b[2];
    } mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
    const unsigned char *all = emulation::warpGather(0xffffffffu, &mine, sizeof mine);
    unsigned allA[32][4], allB[32][2];
    for (int lane = 0; lane < 32; ++lane) {
      std::memcpy(allA[lane], all + 64 * lane, sizeof allA[lane]);
      std::memcpy(allB[lane], all + 64 * lane + sizeof allA[lane], sizeof allB[lane]);
    }
    tensor::referenceMma(d, emulation::laneId(), allA, allB, signedCodes);
#endif
  }
};

constexpr int kTensorWarps = 4; ///< Warps per block of tensorKernel.

/// One warp per tile (TensorTiles.h) of the tensor jobs of a table.
__global__ void __launch_bounds__(32 * kTensorWarps) tensorKernel(const ProductJob *jobs, int count, int64_t tiles) {
  awaitPreviousKernel();
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= tiles)
    return; // The whole warp: mma.sync needs all its lanes.
  const ProductJob job = jobs[jobOfWarp<&ProductJob::firstTile>(jobs, count, warp)];
  const DeviceMma mma;
  switch (job.bits) {
  case 2:
    tensor::tensorTile<2>(job, warp - job.firstTile, lane, mma);
    break;
  case 3:
    tensor::tensorTile<3>(job, warp - job.firstTile, lane, mma);
    break;
  case 4:
    tensor::tensorTile<4>(job, warp - job.firstTile, lane, mma);
    break;
  default:
    tensor::tensorTile<8>(job, warp - job.firstTile, lane, mma);
    break;
  }
}

// The streamed kernel: one token, group layouts only. Each warp walks its
// rows (warp w of W takes rows w, w + W, ...) in chunks of 32 *
// kLaneBlocks blocks, kLaneBlocks a lane (lane l: blocks l, l + 32, ... of
// the chunk), and copies the chunks ahead of use into a private ring in
// shared memory with cp.async (kStreamStages - 1 chunks in flight per warp,
// held by no register), so a multiprocessor keeps far more bytes in flight
// than warps holding their loads in registers can. Each lane reads back
// only what it copied itself: no barrier between lanes. The arithmetic per
// block, and the order of a lane's blocks (l, l + 32, l + 64, ...), are
// productKernel's: the results are the same bits.
//
// A block a lane: a chunk is at most one row, and the rows auto streams are
// short (OLMoE's down rows are 32 blocks, Qwen3-30B-A3B's 24), so two
// blocks a lane in the same shared memory (four stages of two) would halve
// the rows, and bytes, a warp has in flight there; it would halve the
// loop's own instructions per byte only on rows of 64 blocks or more.
constexpr int kStreamWarps = 4;                ///< Warps per block.
constexpr int kLaneBlocks = 1;                 ///< Blocks a lane takes of a chunk.
constexpr int kStreamStages = 8 / kLaneBlocks; ///< Ring slots per warp (the same shared memory).
constexpr int kChunkBlocks = 32 * kLaneBlocks;
// The ring's static shared memory (36 KB) stays under the 48 KB a block
// may have without opting in.
static_assert(kStreamWarps * kStreamStages * 32 * kLaneBlocks * (32 + 4) <= 48 * 1024, "streamed ring too large");

__device__ __forceinline__ unsigned sharedAddress(const void *p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// cp.async exists from sm_80; older targets (a build for sm_75, say) copy
// synchronously: the same results, nothing in flight.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MOEC_SYNCHRONOUS_COPIES 1
#endif

__device__ __forceinline__ void copyAsync16(void *shared, const void *global) {
#ifdef MOEC_SYNCHRONOUS_COPIES
  *static_cast<uint4 *>(shared) = __ldg(static_cast<const uint4 *>(global));
#elif MOEC_CUDA_EMULATION
  emulation::copyAsync(shared, global, 16);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sharedAddress(shared)), "l"(global) : "memory");
#endif
}
__device__ __forceinline__ void copyAsync8(void *shared, const void *global) {
#ifdef MOEC_SYNCHRONOUS_COPIES
  *static_cast<uint2 *>(shared) = __ldg(static_cast<const uint2 *>(global));
#elif MOEC_CUDA_EMULATION
  emulation::copyAsync(shared, global, 8);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(sharedAddress(shared)), "l"(global) : "memory");
#endif
}
__device__ __forceinline__ void copyAsync4(void *shared, const void *global) {
#ifdef MOEC_SYNCHRONOUS_COPIES
  *static_cast<unsigned *>(shared) = __ldg(static_cast<const unsigned *>(global));
#elif MOEC_CUDA_EMULATION
  emulation::copyAsync(shared, global, 4);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(sharedAddress(shared)), "l"(global) : "memory");
#endif
}
__device__ __forceinline__ void commitCopies() {
#if MOEC_CUDA_EMULATION
  emulation::commitCopies();
#elif !defined(MOEC_SYNCHRONOUS_COPIES)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
/// Waits until at most N of this thread's copy groups are still in flight.
template <int N> __device__ __forceinline__ void waitCopies() {
#if MOEC_CUDA_EMULATION
  emulation::waitCopies(N);
#elif !defined(MOEC_SYNCHRONOUS_COPIES)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

/// One lane's ring slot: its blocks' codes (up to 32 bytes each, as two
/// 16-byte halves) and the 32-bit words that hold their group headers, in
/// two arrays of shared memory laid out lane by lane (a warp's 16-byte
/// reads of one half touch every bank once).
struct StreamSlot {
  uint4 *codes;     ///< Block j's half h at codes[(2 * j + h) * 32].
  unsigned *header; ///< Block j's at header[j * 32].
  __device__ uint4 *half(int j, int h) const { return codes + (2 * j + h) * 32; }
};

/// A warp's place in its rows, with what it reads of the row's job resolved
/// once a row, into registers: the loop over chunks reads no job field from
/// memory and indexes within a row in 32 bits.
struct StreamRow {
  int64_t row; ///< Over all jobs' rows; totalRows or more: past the end.
  int job, chunk, blocks;
  int bits, blockShift, symmetric, signedCodes, bf16Scale;
  /// Symmetric headers are two bytes: whether the row's first sits in the
  /// upper half of its aligned word.
  int headerPhase;
  const uint8_t *codes;   ///< The row's first block.
  const uint8_t *headers; ///< The aligned word holding the row's first header.
  const int8_t *q;        ///< The job's quantized activation (QuantJob).
  const float *qScales, *qSums;
  float *y; ///< The row's output.
};

/// Moves `c` to row `row` (or past the end): finds its job (rows only grow)
/// and reads the fields the chunks use. The jobs' rows cover [0,
/// totalRows) one after another: the streamed kernel runs only where every
/// job has one token, so no tensor job (counted in tiles) is in the table.
__device__ __forceinline__ void seekRow(StreamRow &c, int64_t row, const ProductJob *__restrict__ jobs,
                                        int64_t totalRows) {
  c.row = row;
  c.chunk = 0;
  if (row >= totalRows)
    return;
  while (row >= jobs[c.job].first + jobs[c.job].rows)
    ++c.job;
  const ProductJob &job = jobs[c.job];
  const int64_t r = row - job.first;
  c.blocks = static_cast<int>(job.groups) << job.blockShift;
  c.bits = job.bits;
  c.blockShift = job.blockShift;
  c.symmetric = job.symmetric;
  c.signedCodes = job.signedCodes;
  c.bf16Scale = job.bf16Scale;
  c.codes = job.w + r * job.codeRowBytes;
  // Four-byte headers are aligned (the header plane is padded to 16 bytes).
  const int64_t headerStart = job.headerOffset + r * job.groups * (job.symmetric ? 2 : 4);
  c.headers = job.w + (headerStart & ~int64_t(3));
  c.headerPhase = static_cast<int>((headerStart >> 1) & 1);
  c.q = job.q;
  c.qScales = job.qScales;
  c.qSums = job.qSums;
  c.y = job.y + r;
}

__device__ __forceinline__ void advance(StreamRow &c, int64_t stride, const ProductJob *__restrict__ jobs,
                                        int64_t totalRows) {
  if (++c.chunk * kChunkBlocks >= c.blocks)
    seekRow(c, c.row + stride, jobs, totalRows);
}

/// The aligned word of `c`'s row that holds group g's header.
__device__ __forceinline__ int headerWord(const StreamRow &c, int g) {
  return c.symmetric ? (g + c.headerPhase) >> 1 : g;
}

/// Whether group g's (two-byte, symmetric) header is the upper half of its
/// word.
__device__ __forceinline__ bool headerUpper(const StreamRow &c, int g) { return (g + c.headerPhase) & 1; }

/// Issues the copies of this lane's blocks of the chunk at `c` into `slot`,
/// and commits them as one group (an empty one past the end, so that every
/// iteration commits one group and the waits count alike).
__device__ __forceinline__ void copyChunk(const StreamRow &c, int lane, int64_t totalRows, const StreamSlot &slot) {
  if (c.row < totalRows) {
#pragma unroll
    for (int j = 0; j < kLaneBlocks; ++j) {
      const int b = c.chunk * kChunkBlocks + 32 * j + lane;
      if (b >= c.blocks)
        break;
      const uint8_t *block = c.codes + b * (4 * c.bits);
      switch (c.bits) {
      case 2:
        copyAsync8(slot.half(j, 0), block);
        break;
      case 3:
        for (int k = 0; k < 3; ++k)
          copyAsync4(reinterpret_cast<unsigned *>(slot.half(j, 0)) + k, block + 4 * k);
        break;
      case 4:
        copyAsync16(slot.half(j, 0), block);
        break;
      default:
        copyAsync16(slot.half(j, 0), block);
        copyAsync16(slot.half(j, 1), block + 16);
        break;
      }
      copyAsync4(slot.header + 32 * j, c.headers + 4 * headerWord(c, b >> c.blockShift));
    }
  }
  commitCopies();
}

/// acc += block b of `c`'s row, which the slot holds as the lane's j-th.
template <int BITS>
__device__ __forceinline__ void consumeBlock(float &acc, const StreamRow &c, int b, const StreamSlot &slot, int j,
                                             const BlockActivations &a) {
  unsigned words[BITS];
  if constexpr (BITS == 4 || BITS == 8) {
#pragma unroll
    for (int k = 0; k < BITS / 4; ++k) {
      const uint4 v = *slot.half(j, k);
      words[4 * k] = v.x, words[4 * k + 1] = v.y, words[4 * k + 2] = v.z, words[4 * k + 3] = v.w;
    }
  } else if constexpr (BITS == 2) {
    const uint2 v = *reinterpret_cast<const uint2 *>(slot.half(j, 0));
    words[0] = v.x, words[1] = v.y;
  } else {
    // Three words in a 16-byte half: one read (three of 4 bytes at a lane
    // stride of 16 would take each bank four times).
    const uint4 v = *slot.half(j, 0);
    words[0] = v.x, words[1] = v.y, words[2] = v.z;
  }
  const unsigned header = slot.header[32 * j];
  float scale, minimum;
  if (c.symmetric) {
    const bool upper = headerUpper(c, b >> c.blockShift);
    scale = scaleValue(static_cast<unsigned short>(upper ? header >> 16 : header & 0xFFFFu), c.bf16Scale);
    minimum = c.signedCodes ? 0.0f : -static_cast<float>(1 << (BITS - 1)) * scale;
  } else {
    scale = scaleValue(static_cast<unsigned short>(header & 0xFFFFu), c.bf16Scale);
    minimum = scaleValue(static_cast<unsigned short>(header >> 16), c.bf16Scale);
  }
  const bool groupStart = (b & ((1 << c.blockShift) - 1)) == 0;
  accumulateBlock<BITS>(acc, words, scale, minimum, groupStart, c.signedCodes, a);
}

__global__ void __launch_bounds__(32 * kStreamWarps)
    streamedKernel(const ProductJob *__restrict__ jobs, int64_t totalRows, const LaunchSize *dynamic,
                   RoutedFusion fusion) {
  awaitPreviousKernel();
  if (dynamic)
    totalRows = dynamic->total;
  __shared__ uint4 ringCodes[kStreamWarps][kStreamStages][2 * kLaneBlocks][32];
  __shared__ unsigned ringHeaders[kStreamWarps][kStreamStages][kLaneBlocks][32];
  const int lane = threadIdx.x & 31, warpInBlock = threadIdx.x >> 5;
  // The lane's slots: stage s is s * 2 * kLaneBlocks * 32 uint4s and
  // s * kLaneBlocks * 32 words on.
  uint4 *const myCodes = &ringCodes[warpInBlock][0][0][lane];
  unsigned *const myHeaders = &ringHeaders[warpInBlock][0][0][lane];
  auto slot = [&](int stage) {
    return StreamSlot{myCodes + stage * (2 * kLaneBlocks * 32), myHeaders + stage * (kLaneBlocks * 32)};
  };
  const int64_t stride = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  StreamRow producer{}, consumer{};
  seekRow(producer, first, jobs, totalRows);
  seekRow(consumer, first, jobs, totalRows);
  for (int s = 0; s < kStreamStages - 1; ++s) {
    copyChunk(producer, lane, totalRows, slot(s));
    advance(producer, stride, jobs, totalRows);
  }
  float acc = 0.0f;
  CountedRow counted; // a fused launch's last row counted, not yet settled
  for (unsigned i = 0; consumer.row < totalRows; ++i) {
    // The slot consumed last iteration takes the chunk kStreamStages - 1
    // ahead; then this iteration's chunk is complete.
    copyChunk(producer, lane, totalRows, slot((i + kStreamStages - 1) % kStreamStages));
    advance(producer, stride, jobs, totalRows);
    // The activation's loads go out before the wait for the codes.
    BlockActivations a[kLaneBlocks];
#pragma unroll
    for (int j = 0; j < kLaneBlocks; ++j) {
      const int b = consumer.chunk * kChunkBlocks + 32 * j + lane;
      a[j] = BlockActivations{};
      if (b < consumer.blocks)
        a[j] = loadActivations(consumer.q + b * 32, consumer.qScales + (b >> consumer.blockShift),
                               consumer.qSums + (b >> consumer.blockShift),
                               (b & ((1 << consumer.blockShift) - 1)) == 0 && !consumer.signedCodes);
    }
    waitCopies<kStreamStages - 1>();
    const StreamSlot current = slot(i % kStreamStages);
#pragma unroll
    for (int j = 0; j < kLaneBlocks; ++j) {
      const int b = consumer.chunk * kChunkBlocks + 32 * j + lane;
      if (b >= consumer.blocks)
        break;
      switch (consumer.bits) {
      case 2:
        consumeBlock<2>(acc, consumer, b, current, j, a[j]);
        break;
      case 3:
        consumeBlock<3>(acc, consumer, b, current, j, a[j]);
        break;
      case 4:
        consumeBlock<4>(acc, consumer, b, current, j, a[j]);
        break;
      default:
        consumeBlock<8>(acc, consumer, b, current, j, a[j]);
        break;
      }
    }
    if ((consumer.chunk + 1) * kChunkBlocks >= consumer.blocks) {
      const float total = warpSum(acc);
      if (lane == 0)
        *consumer.y = total;
      acc = 0.0f;
      if (fusion.stage != RoutedFusion::kNone) {
        // This row's count goes out, then the row before is settled, a
        // row after its count: the warp does not wait for an atomic's
        // answer at each row's end.
        const CountedRow now = countRow(fusion, consumer.job, consumer.row - jobs[consumer.job].first, lane);
        settleRow(fusion, counted, lane);
        counted = now;
      }
    }
    advance(consumer, stride, jobs, totalRows);
  }
  if (fusion.stage != RoutedFusion::kNone)
    settleRow(fusion, counted, lane);
  waitCopies<0>();
}

/// h[i] = silu(gate[i]) * up[i], silu as the CPU engine writes it.
__global__ void swigluKernel(const float *gate, const float *up, float *h, int64_t count, const LaunchSize *dynamic) {
  awaitPreviousKernel();
  if (dynamic)
    count = dynamic->total;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) {
    const float g = gate[i];
    h[i] = swiglu(g, up[i]);
  }
}

/// out[r] = sum_i weights[i] * parts[i * hidden + r], added in order of i
/// (or out[r] += that sum when `accumulate`: the residual stream).
__global__ void combineKernel(const float *parts, const float *weights, int count, int64_t hidden, float *out,
                              bool accumulate, const LaunchSize *dynamic) {
  awaitPreviousKernel();
  if (dynamic)
    count = dynamic->count;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= hidden)
    return;
  const float total = weightedRow(parts, weights, count, hidden, r);
  out[r] = accumulate ? addRn(out[r], total) : total;
}

/// gathered[r] = x[rowToken[r]] for the rows of a MoE block's experts.
__global__ void gatherKernel(const float *x, const int32_t *rowToken, int64_t rows, int64_t hidden, float *gathered) {
  awaitPreviousKernel();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * hidden)
    return;
  const int64_t r = i / hidden, c = i - r * hidden;
  gathered[i] = x[static_cast<int64_t>(rowToken[r]) * hidden + c];
}

/// out[t] = token t's weighted sum of its experts' outputs (blockWeightedSum).
__global__ void weightedSumKernel(const float *y, const int32_t *starts, const int32_t *row, const float *weight,
                                  int64_t tokens, int64_t hidden, float *out) {
  awaitPreviousKernel();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= tokens * hidden)
    return;
  const int64_t t = i / hidden;
  out[i] = blockWeightedSum(y, starts, row, weight, hidden, t, i - t * hidden);
}

/// Sum over a block (blockDim a multiple of 32, at most 1024), through
/// `partial` (32 values of shared memory).
template <typename T> __device__ __forceinline__ T blockSumThrough(T value, T *partial) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0)
    partial[warp] = value;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w)
    total += partial[w];
  return total;
}

// Two functions rather than a template: the CPU emulation of CUDA poisons a
// block's shared memory through a linker section that GCC does not honour
// for a template's statics (scripts/check-emulated-shared.py checks it).
__device__ float blockSum(float value) {
  __shared__ float partial[32];
  return blockSumThrough(value, partial);
}
__device__ double blockSum(double value) {
  __shared__ double partial[32];
  return blockSumThrough(value, partial);
}

__device__ float blockMax(float value) {
  __shared__ float partial[32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0)
    partial[warp] = value;
  __syncthreads();
  float most = -INFINITY;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w)
    most = fmaxf(most, partial[w]);
  return most;
}

/// RoPE of pair i of a head, as rope::apply: (i, i + half), or (2i, 2i + 1)
/// when interleaved. One function for every kernel that rotates, so that
/// all contract the products alike.
__device__ __forceinline__ void rotatePair(float *head, int i, int half, int interleaved, float c, float s) {
  if (!interleaved) {
    const float a = head[i], b = head[i + half];
    head[i] = a * c - b * s;
    head[i + half] = b * c + a * s;
  } else {
    const float a = head[2 * i], b = head[2 * i + 1];
    head[2 * i] = a * c - b * s;
    head[2 * i + 1] = a * s + b * c;
  }
}

/// A row's norm by the whole block, in place allowed: RMSNorm (x *
/// rsqrt(mean(x^2) + eps) * weight, in float as the CPU) or LayerNorm
/// (mean and variance in double).
__device__ void normRow(const float *x, float *y, int64_t width, const float *weight, const float *bias, double eps,
                        int layerNorm) {
  if (!layerNorm) {
    float squares = 0.0f;
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x)
      squares += x[i] * x[i];
    squares = blockSum(squares);
    const float scale = 1.0f / sqrtf(squares / static_cast<float>(width) + static_cast<float>(eps));
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x)
      y[i] = weight[i] * (x[i] * scale);
    return;
  }
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x)
    sum += x[i];
  const double mean = blockSum(sum) / static_cast<double>(width);
  double squares = 0.0;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x)
    squares += (x[i] - mean) * (x[i] - mean);
  const double variance = blockSum(squares) / static_cast<double>(width);
  const float scale = static_cast<float>(1.0 / sqrt(variance + eps));
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x)
    y[i] = (x[i] - static_cast<float>(mean)) * scale * weight[i] + (bias ? bias[i] : 0.0f);
}

/// One row per block (normRow): row blockIdx.x of in and out, rows
/// `stride` floats apart (the first `width` of each normed). Then, for
/// the `jobCount` jobs of `jobs` (QuantJob, each reading `out`), the
/// block's warps round its row at each job's group: the products that
/// read the normed rows launch without a rounding launch of their own.
__global__ void normKernel(const float *in, float *out, int64_t width, int64_t stride, const float *weight,
                           const float *bias, double eps, int layerNorm, const QuantJob *jobs, int jobCount) {
  awaitPreviousKernel();
  normRow(in + blockIdx.x * stride, out + blockIdx.x * stride, width, weight, bias, eps, layerNorm);
  if (jobCount == 0)
    return;
  __syncthreads(); // the row every thread wrote, visible to the block
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  for (int j = 0; j < jobCount; ++j)
    for (int64_t g = warp; g < jobs[j].groups; g += warps)
      quantizeGroup(jobs[j], blockIdx.x * jobs[j].groups + g, lane);
}

/// One block per token (row blockIdx.x): x += branch (+ branchBias), the
/// attention's output onto the residual stream, then y = the MLP's norm of
/// x: biasClampKernel, addKernel and normKernel in one launch, with their
/// arithmetic.
__global__ void __launch_bounds__(1024)
    addNormKernel(float *x, const float *branch, const float *branchBias, int64_t width, float *y, const float *weight,
                  const float *bias, double eps, int layerNorm) {
  awaitPreviousKernel();
  x += blockIdx.x * width;
  branch += blockIdx.x * width;
  y += blockIdx.x * width;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x)
    x[i] += branchBias ? branch[i] + branchBias[i] : branch[i];
  __syncthreads();
  normRow(x, y, width, weight, bias, eps, layerNorm);
}

/// q, k and v of tokens after their products (grouped-query attention):
/// token j's rows at y[t] + j * width[t], its angles at cos + j * ropeHalf
/// and its cache row at *position + j.
struct Epilogue {
  float *y[3];             ///< q, k, v (device).
  const float *bias[3];    ///< Or null.
  const float *norm[2];    ///< q's and k's qk-norm weights.
  float *cache[3];         ///< k's and v's KV cache (q: null), rows of width[t].
  const int64_t *position; ///< This token's row of the cache (device memory).
  int64_t width[3];
  int heads[3];        ///< Heads of q, k, v.
  int headDim, qkNorm; ///< qkNorm: 0 none, 1 per head, 2 over the full width.
  float eps, clip;     ///< clip 0: none.
  int ropeHalf, interleaved;
  const float *cos, *sin;
};

/// The steps between q/k/v's products and attention, one block of 1024
/// threads per tensor (blockIdx.x: 0 q, 1 k, 2 v), with the arithmetic of
/// the kernels they replace, in the CPU engine's order: bias
/// (biasClampKernel), qk-norm of q and k (over the full width as
/// normKernel's 1024-thread block; per head by groups of 128 threads that
/// sum as its 128-thread blocks), the clamp, RoPE of q and k (ropeKernel),
/// then k and v into the KV cache's row.
__global__ void __launch_bounds__(1024) epilogueKernel(Epilogue e) {
  awaitPreviousKernel();
  const int t = blockIdx.x, token = blockIdx.y;
  const int64_t width = e.width[t];
  float *y = e.y[t] + token * width;
  const float *cos = e.cos + static_cast<int64_t>(token) * e.ropeHalf,
              *sin = e.sin + static_cast<int64_t>(token) * e.ropeHalf;
  if (e.bias[t]) {
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x)
      y[i] = y[i] + e.bias[t][i];
    __syncthreads();
  }
  if (t < 2 && e.qkNorm == 2) {
    normRow(y, y, width, e.norm[t], nullptr, e.eps, 0);
  } else if (t < 2 && e.qkNorm == 1) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, group = threadIdx.x >> 7, member = threadIdx.x & 127;
    const int groups = blockDim.x >> 7;
    for (int first = 0; first < e.heads[t]; first += groups) {
      const int h = first + group;
      float *head = y + static_cast<int64_t>(h) * e.headDim;
      float squares = 0.0f;
      if (h < e.heads[t])
        for (int i = member; i < e.headDim; i += 128)
          squares += head[i] * head[i];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1)
        squares += __shfl_xor_sync(0xffffffffu, squares, offset);
      __syncthreads();
      if (lane == 0)
        partial[warp] = squares;
      __syncthreads();
      float total = 0.0f;
      for (int w = 0; w < 4; ++w)
        total += partial[group * 4 + w];
      if (h < e.heads[t]) {
        const float scale = 1.0f / sqrtf(total / static_cast<float>(e.headDim) + e.eps);
        for (int i = member; i < e.headDim; i += 128)
          head[i] = e.norm[t][i] * (head[i] * scale);
      }
    }
  }
  __syncthreads();
  if (e.clip > 0)
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x)
      y[i] = fminf(fmaxf(y[i] + 0.0f, -e.clip), e.clip);
  if (t < 2 && e.ropeHalf > 0) {
    __syncthreads();
    const int half = e.ropeHalf;
    for (int index = threadIdx.x; index < e.heads[t] * half; index += blockDim.x) {
      const int h = index / half, i = index - h * half;
      rotatePair(y + static_cast<int64_t>(h) * e.headDim, i, half, e.interleaved, cos[i], sin[i]);
    }
  }
  if (e.cache[t]) {
    __syncthreads();
    float *row = e.cache[t] + (*e.position + token) * width;
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x)
      row[i] = y[i];
  }
}

/// y += b, then (clip > 0) clamp to +-clip.
__global__ void biasClampKernel(float *y, const float *b, int64_t count, float clip) {
  awaitPreviousKernel();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count)
    return;
  float value = y[i] + (b ? b[i] : 0.0f);
  if (clip > 0)
    value = fminf(fmaxf(value, -clip), clip);
  y[i] = value;
}

/// x += y.
__global__ void addKernel(float *x, const float *y, int64_t count) {
  awaitPreviousKernel();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count)
    x[i] += y[i];
}

/// RoPE of token blockIdx.y: head blockIdx.x of x + token * stride (heads
/// headDim apart), pairs (i, i + half) or (2i, 2i + 1), as rope::apply, with
/// the token's angles (cos and sin + token * half).
__global__ void ropeKernel(float *x, int64_t stride, int headDim, int half, int interleaved, const float *cos,
                           const float *sin) {
  awaitPreviousKernel();
  const int64_t token = blockIdx.y;
  float *head = x + token * stride + static_cast<int64_t>(blockIdx.x) * headDim;
  for (int i = threadIdx.x; i < half; i += blockDim.x)
    rotatePair(head, i, half, interleaved, cos[token * half + i], sin[token * half + i]);
}

/// MLA's keys and values (one head of one token per block, token
/// blockIdx.y): key h is head h's nope columns of kvUp's output [heads,
/// nope + dv] then the shared rope columns (`ropeStride` floats apart from
/// token to token); value h is its dv columns. Each goes to `k` and `v`
/// (the host's copy) and to the KV cache's row *position + token (read on
/// the device, so that a graph replays at every position).
__global__ void latentKeysKernel(const float *expanded, const float *sharedRope, int64_t ropeStride, int heads,
                                 int nope, int rope, int dv, float *k, float *v, float *cacheKeys, float *cacheValues,
                                 const int64_t *position) {
  awaitPreviousKernel();
  const int h = blockIdx.x;
  const int64_t token = blockIdx.y, keyWidth = static_cast<int64_t>(heads) * (nope + rope),
                valueWidth = static_cast<int64_t>(heads) * dv;
  expanded += token * heads * (nope + dv);
  sharedRope += token * ropeStride;
  k += token * keyWidth;
  v += token * valueWidth;
  cacheKeys += (*position + token) * keyWidth;
  cacheValues += (*position + token) * valueWidth;
  const float *source = expanded + static_cast<int64_t>(h) * (nope + dv);
  const int64_t keyAt = static_cast<int64_t>(h) * (nope + rope), valueAt = static_cast<int64_t>(h) * dv;
  for (int i = threadIdx.x; i < nope + rope; i += blockDim.x)
    k[keyAt + i] = cacheKeys[keyAt + i] = i < nope ? source[i] : sharedRope[i - nope];
  for (int i = threadIdx.x; i < dv; i += blockDim.x)
    v[valueAt + i] = cacheValues[valueAt + i] = source[nope + i];
}

/// Positions a warp scores at a time in attendKernel (their key loads all
/// in flight before any is used).
constexpr int kScoredTogether = 8;
/// attendKernel's split of a head's positions over blocks (flash-decoding):
/// each block takes a multiple of kSplitPositions of them (its 8 warps'
/// kScoredTogether each, a round), and a head takes at most
/// kMaxAttentionSplits blocks (MatrixProducts.h).
constexpr int kSplitPositions = 64;

/// Where the blocks of a split head meet (attendKernel): a slot of
/// `slotFloats` floats per block of each head of each token (its max score,
/// its sum of exponentials, then its unnormalised weighted values from
/// float 4), and a count of the blocks done per head of each token, zero
/// between launches (the last block sets it back).
struct AttentionSplit {
  float *slots;
  unsigned *arrived;
  int64_t slotFloats;
};

/// Query heads one attendKernel block takes, all of one KV head: the
/// largest power of two up to kMaxHeadsABlock that divides the group
/// (headsABlock).
constexpr int kMaxHeadsABlock = 8;

int headsABlock(int group) {
  int heads = 1;
  while (heads < kMaxHeadsABlock && group % (2 * heads) == 0)
    heads *= 2;
  return heads;
}

/// Where attendKernel's blocks keep their partial sums and the runs'
/// weights (shared memory), for attendHeads.
struct AttendShared {
  float *partial;                          ///< G x 1024 floats, 16-byte aligned.
  float (*runWeight)[kMaxAttentionSplits]; ///< [kMaxHeadsABlock][kMaxAttentionSplits].
  int *last;                               ///< Whether this block adds the runs.
};

// attendKernel<G>'s shared memory: G x 1024 floats of partial sums (plain
// functions, one a size: the CPU emulation poisons the shared memory of
// plain functions only; each kernel that calls one has its own).
__device__ float *attendPartial1() {
  __shared__ float4 partial[256];
  return reinterpret_cast<float *>(partial);
}
__device__ float *attendPartial2() {
  __shared__ float4 partial[2 * 256];
  return reinterpret_cast<float *>(partial);
}
__device__ float *attendPartial4() {
  __shared__ float4 partial[4 * 256];
  return reinterpret_cast<float *>(partial);
}
__device__ float *attendPartial8() {
  __shared__ float4 partial[8 * 256];
  return reinterpret_cast<float *>(partial);
}
__device__ AttendShared attendShared(float *partial) {
  __shared__ float runWeight[kMaxHeadsABlock][kMaxAttentionSplits];
  __shared__ int last;
  return {partial, runWeight, &last};
}
template <int G> __device__ __forceinline__ AttendShared attendSharedOf() {
  static_assert(G == 1 || G == 2 || G == 4 || G == 8, "a power of two up to kMaxHeadsABlock");
  if constexpr (G == 1)
    return attendShared(attendPartial1());
  else if constexpr (G == 2)
    return attendShared(attendPartial2());
  else if constexpr (G == 4)
    return attendShared(attendPartial4());
  else
    return attendShared(attendPartial8());
}

/// attendKernel's work for G query heads of one KV head (G a power of two,
/// at most kMaxHeadsABlock): each key and value row is read once for all
/// of them (grouped-query attention reads a KV head once, not once a query
/// head).
template <int G>
__device__ __forceinline__ void
attendHeads(const float *q, const float *keys, const float *values, const int64_t *position, int group, int qDim,
            int vDim, int64_t keyWidth, int64_t valueWidth, float scale, float *scores, int64_t scoreStride, float *out,
            const AttentionSplit &split, const QuantJob *jobs, int jobCount, const AttendShared &shared) {
  // Positions a warp scores at a time: 8 rows in flight a warp, 4 for
  // eight heads (32 sums a lane either way at most).
  constexpr int P = G <= 4 ? kScoredTogether : kScoredTogether / 2;
  const int64_t token = blockIdx.y, visible = *position + 1 + token;
  const int h0 = static_cast<int>(blockIdx.x) * G, kvHead = h0 / group, heads = static_cast<int>(gridDim.x) * G;
  const int64_t blocks = gridDim.z,
                run = (visible + blocks * kSplitPositions - 1) / (blocks * kSplitPositions) * kSplitPositions;
  const int used = static_cast<int>((visible + run - 1) / run), z = static_cast<int>(blockIdx.z);
  if (z >= used)
    return;
  const int64_t begin = z * run, end = begin + run < visible ? begin + run : visible;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  // The G heads' rows lie one after another: in q, in the scores and in out.
  const int64_t firstHead = token * heads + h0;
  const float *query = q + firstHead * qDim;
  float *score = scores + firstHead * scoreStride;
  const float *headKeys = keys + static_cast<int64_t>(kvHead) * qDim;
  // Rows (and the queries) 16-byte aligned: the cache and q from cudaMalloc.
  const bool keysByFour = qDim % 4 == 0 && keyWidth % 4 == 0;
  float most[G];
#pragma unroll
  for (int g = 0; g < G; ++g)
    most[g] = -INFINITY;
  for (int64_t s0 = begin + static_cast<int64_t>(warp) * P; s0 < end; s0 += static_cast<int64_t>(warps) * P) {
    float dot[P][G];
#pragma unroll
    for (int u = 0; u < P; ++u)
#pragma unroll
      for (int g = 0; g < G; ++g)
        dot[u][g] = 0.0f;
    if (keysByFour) {
      // Four values a lane: a warp's load covers 128 of a key row (a head
      // of 128, all of it), P rows in flight a warp.
      for (int d = lane; d < qDim / 4; d += 32) {
        float4 x[G];
#pragma unroll
        for (int g = 0; g < G; ++g)
          x[g] = reinterpret_cast<const float4 *>(query + g * qDim)[d];
#pragma unroll
        for (int u = 0; u < P; ++u)
          if (s0 + u < end) {
            const float4 k = reinterpret_cast<const float4 *>(headKeys + (s0 + u) * keyWidth)[d];
#pragma unroll
            for (int g = 0; g < G; ++g)
              dot[u][g] += x[g].x * k.x + x[g].y * k.y + x[g].z * k.z + x[g].w * k.w;
          }
      }
    } else {
      for (int d = lane; d < qDim; d += 32) {
#pragma unroll
        for (int u = 0; u < P; ++u)
          if (s0 + u < end) {
            const float k = headKeys[(s0 + u) * keyWidth + d];
#pragma unroll
            for (int g = 0; g < G; ++g)
              dot[u][g] += query[g * qDim + d] * k;
          }
      }
    }
#pragma unroll
    for (int u = 0; u < P; ++u)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float total = warpSum(dot[u][g]) * scale; // every lane: the warp's loop bounds are its own
        if (s0 + u < end) {
          if (lane == 0)
            score[g * scoreStride + s0 + u] = total;
          most[g] = fmaxf(most[g], total);
        }
      }
  }
  float sum[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    most[g] = blockMax(most[g]); // its barriers also publish the scores
    sum[g] = 0.0f;
    for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) {
      const float e = expf(score[g * scoreStride + s] - most[g]);
      score[g * scoreStride + s] = e;
      sum[g] += e;
    }
    sum[g] = blockSum(sum[g]); // and the exponentials
  }
  // Weighted values: a row of vDim values per `perRow` threads (4 values
  // a thread where vDim allows, else 1), rowGroups groups of them striding
  // over the run, each group's sums for head g in a row of g's 1024 floats
  // of `partial` (vDim <= 1024, decodeAttention checks), added in group
  // order.
  float *partial = shared.partial;
  const float *headValues = values + static_cast<int64_t>(kvHead) * vDim;
  const bool byFour = vDim % 4 == 0 && valueWidth % 4 == 0;
  const int perRow = byFour ? vDim / 4 : vDim;
  const int rowGroups = perRow <= static_cast<int>(blockDim.x) ? static_cast<int>(blockDim.x) / perRow : 1;
  const int row = static_cast<int>(threadIdx.x) / perRow;
  if (row < rowGroups)
    for (int c = static_cast<int>(threadIdx.x) % perRow; c < perRow; c += static_cast<int>(blockDim.x)) {
      if (byFour) {
        float4 acc[G];
#pragma unroll
        for (int g = 0; g < G; ++g)
          acc[g] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 2
        for (int64_t s = begin + row; s < end; s += rowGroups) {
          const float4 v = reinterpret_cast<const float4 *>(headValues + s * valueWidth)[c];
#pragma unroll
          for (int g = 0; g < G; ++g) {
            const float p = score[g * scoreStride + s];
            acc[g].x += p * v.x;
            acc[g].y += p * v.y;
            acc[g].z += p * v.z;
            acc[g].w += p * v.w;
          }
        }
#pragma unroll
        for (int g = 0; g < G; ++g)
          reinterpret_cast<float4 *>(partial + g * 1024 + row * vDim)[c] = acc[g];
      } else {
        float acc[G];
#pragma unroll
        for (int g = 0; g < G; ++g)
          acc[g] = 0.0f;
        for (int64_t s = begin + row; s < end; s += rowGroups) {
          const float v = headValues[s * valueWidth + c];
#pragma unroll
          for (int g = 0; g < G; ++g)
            acc[g] += score[g * scoreStride + s] * v;
        }
#pragma unroll
        for (int g = 0; g < G; ++g)
          partial[g * 1024 + row * vDim + c] = acc[g];
      }
    }
  __syncthreads();
  // Head g's weighted value i over the run: its row groups' sums, in order.
  const auto runTotal = [&](int g, int i) {
    float total = 0.0f;
    for (int r = 0; r < rowGroups; ++r)
      total += partial[g * 1024 + r * vDim + i];
    return total;
  };
  float *headOut = out + firstHead * vDim;
  if (used == 1) {
#pragma unroll
    for (int g = 0; g < G; ++g)
      for (int i = threadIdx.x; i < vDim; i += blockDim.x)
        headOut[g * vDim + i] = runTotal(g, i) / sum[g];
  } else {
    // Each head's run in its slot, then the block's count: the last block
    // to arrive sees every run's slots (the fences order the writes before
    // the count, and the count before the reads).
    float *slots = split.slots + firstHead * blocks * split.slotFloats;
    const int64_t headSlots = blocks * split.slotFloats;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float *mine = slots + g * headSlots + z * split.slotFloats;
      for (int i = threadIdx.x; i < vDim; i += blockDim.x)
        mine[4 + i] = runTotal(g, i);
      if (threadIdx.x == 0) {
        mine[0] = most[g];
        mine[1] = sum[g];
      }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
      *shared.last = atomicAdd(split.arrived + firstHead, 1u) == static_cast<unsigned>(used - 1);
    __syncthreads();
    if (!*shared.last)
      return;
    __threadfence();
    if (threadIdx.x < G) {
      // Head g's max over the runs, then each run's weight: exp(its max -
      // the head's) over the scaled sums, added in run order.
      const int g = threadIdx.x;
      const float *headSlot = slots + g * headSlots;
      float headMost = -INFINITY, total = 0.0f;
      for (int r = 0; r < used; ++r)
        headMost = fmaxf(headMost, __ldcg(headSlot + r * split.slotFloats));
      for (int r = 0; r < used; ++r) {
        shared.runWeight[g][r] = expf(__ldcg(headSlot + r * split.slotFloats) - headMost);
        total += __ldcg(headSlot + r * split.slotFloats + 1) * shared.runWeight[g][r];
      }
      for (int r = 0; r < used; ++r)
        shared.runWeight[g][r] /= total;
    }
    if (threadIdx.x == 0)
      split.arrived[firstHead] = 0; // for the next launch (and graph replay)
    __syncthreads();
#pragma unroll
    for (int g = 0; g < G; ++g)
      for (int i = threadIdx.x; i < vDim; i += blockDim.x) {
        float total = 0.0f;
        for (int r = 0; r < used; ++r)
          total += __ldcg(slots + g * headSlots + r * split.slotFloats + 4 + i) * shared.runWeight[g][r];
        headOut[g * vDim + i] = total;
      }
  }
  if (jobCount == 0)
    return;
  __syncthreads(); // the heads' values every thread wrote, visible to the block
  for (int j = 0; j < jobCount; ++j) {
    const int perHead = vDim / jobs[j].group;
    for (int g = warp; g < G * perHead; g += warps)
      quantizeGroup(jobs[j], token * jobs[j].groups + static_cast<int64_t>(h0) * perHead + g, lane);
  }
}

/// Attention of G query heads (headsABlock: a power of two dividing the
/// group; a kernel each, so that each has its own registers) of one token (token blockIdx.y at `position` +
/// blockIdx.y; position in device memory: one graph serves every position)
/// over the cached rows up to it, split over gridDim.z blocks of 256
/// threads: scores, softmax (max-subtracted, as the CPU), weighted values.
/// Decode reads the whole cache here, so the work is spread and the loads
/// are laid for the memory:
/// - the positions are cut in `used` runs of a multiple of kSplitPositions
///   (as even as that allows; blocks past them end at once), a block a run,
///   so that a long context keeps many SMs reading at batch 1;
/// - a block takes several query heads of one KV head (grouped-query
///   attention), reading each key and value row once for all of them;
/// - a warp scores several positions at once, its lanes reading each key
///   row together (coalesced) and meeting in a shuffle;
/// - the weighted values take a row per group of threads (4 values a
///   thread where vDim allows), groups striding over the run, their partial
///   sums added in group order;
/// - a run's max, sum and weighted values go to its slot of `split`; the
///   last block of the heads to arrive (a counter) adds the runs in run
///   order, each scaled by exp(its max - the head's), and divides by the
///   scaled sums (one run: the block divides its own).
/// The result does not depend on which block ends last. Float sums run in
/// another order than the CPU's (tests hold float models' logits to 1e-3 of
/// it; they come within 7e-6). Then, for the `jobCount` jobs of `jobs`
/// (QuantJob over `out`, groups within a head: vDim a multiple of each
/// group), the block that wrote the heads rounds their groups for the
/// output projection.
template <int G>
__global__ void __launch_bounds__(256)
    attendKernel(const float *q, const float *keys, const float *values, const int64_t *position, int group, int qDim,
                 int vDim, int64_t keyWidth, int64_t valueWidth, float scale, float *scores, int64_t scoreStride,
                 float *out, AttentionSplit split, const QuantJob *jobs, int jobCount) {
  awaitPreviousKernel();
  attendHeads<G>(q, keys, values, position, group, qDim, vDim, keyWidth, valueWidth, scale, scores, scoreStride, out,
                 split, jobs, jobCount, attendSharedOf<G>());
}

/// Routing (kernels/common/Routing.h) by the 32 lanes of a warp together:
/// softmax and top-k share the work, the rest runs on every lane alike.
/// The selection is serialTopK's, exactly; sums run in another order than
/// DeviceMath's.
struct WarpMath {
  __device__ void softmax(float *x, int32_t count) const {
    const int lane = threadIdx.x & 31;
    __syncwarp(); // every lane has written x
    float most = -INFINITY;
    for (int32_t i = lane; i < count; i += 32)
      most = most < x[i] ? x[i] : most;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, most, offset);
      most = most < other ? other : most;
    }
    float sum = 0.0f;
    for (int32_t i = lane; i < count; i += 32) {
      x[i] = expf(x[i] - most);
      sum += x[i];
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    sum = __shfl_sync(0xffffffffu, sum, 0); // one value on every lane
    for (int32_t i = lane; i < count; i += 32)
      x[i] /= sum;
    __syncwarp();
  }
  __device__ float sigmoid(float x) const { return 1.0f / (1.0f + expf(-x)); }
  __device__ void topK(const float *values, int32_t count, int32_t k, int32_t *taken, int32_t *out) const {
    const int lane = threadIdx.x & 31;
    __syncwarp(); // earlier reads of `taken` are done
    for (int32_t i = lane; i < count; i += 32)
      taken[i] = 0;
    __syncwarp();
    for (int32_t pick = 0; pick < k; ++pick) {
      // Each lane's candidate, then the warp's (routing::better; the host's
      // tests combine 32 lanes' candidates in this butterfly's order).
      routing::Candidate best = routing::laneCandidate(values, count, taken, lane, 32);
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        routing::Candidate other;
        other.index = __shfl_xor_sync(0xffffffffu, best.index, offset);
        other.value = __shfl_xor_sync(0xffffffffu, best.value, offset);
        best = routing::better(best, other);
      }
      taken[best.index] = 1;
      if (out)
        out[pick] = best.index;
      __syncwarp();
    }
  }
  __device__ void sync() const { __syncwarp(); }
};

/// One block: a token's routing and the job tables of its MoE block. The
/// block sums a gated shared expert's gate; the first warp routes (the
/// router's rows in shared memory), and its first lane plans
/// (RoutedExperts.h) and counts the routed experts it plans into `calls`.
__global__ void __launch_bounds__(256)
    routeKernel(const RoutedLayer *layerPointer, RoutedScratch scratch, RoutedPlan *plan, unsigned long long *calls) {
  awaitPreviousKernel();
  __shared__ float scores[kMaxRouterRows], choice[kMaxRouterRows], groupScores[kMaxRouterRows];
  __shared__ int32_t taken[kMaxRouterRows];
  const RoutedLayer &layer = *layerPointer;
  float sharedWeight = 1.0f;
  if (layer.hasShared && layer.sharedGated) {
    float dot = 0.0f;
    for (int64_t i = threadIdx.x; i < layer.hidden; i += blockDim.x)
      dot += scratch.input[i] * layer.sharedGate[i];
    sharedWeight = WarpMath().sigmoid(blockSum(dot));
  }
  if (threadIdx.x >= 32) {
    // While warp 0 routes, the other warps round the input at each group
    // size the experts' gate and up products read (the plan's inputJobs).
    const int64_t warp = threadIdx.x / 32 - 1, warps = blockDim.x / 32 - 1;
    int64_t first = 0;
    for (int32_t g = 0; g < layer.inputGroups; ++g) {
      const QuantJob job = routedInputQuant(layer, scratch, g, first);
      // This warp's groups of job g: the block's warp-th, warp + warps-th, ...
      // over all the groups of every job.
      for (int64_t k = (warp - first % warps + warps) % warps; k < job.groups; k += warps)
        quantizeGroup(job, k, threadIdx.x & 31);
      first += job.groups;
    }
    return;
  }
  int32_t slots[kMaxRouted];
  float weights[kMaxRouted];
  const routing::Scratch routingScratch{scores, choice, groupScores, taken};
  const int32_t count = selectExperts(layer, scratch.logits, sharedWeight, routingScratch, WarpMath(), slots, weights);
  if (threadIdx.x != 0)
    return;
  planRoutedExperts(layer, scratch, count, slots, weights, *plan);
  atomicAdd(calls, static_cast<unsigned long long>(count - layer.hasShared));
}

unsigned blocksFor(int64_t threads, int perBlock) { return static_cast<unsigned>((threads + perBlock - 1) / perBlock); }

size_t alignUp(size_t value, size_t alignment) { return (value + alignment - 1) / alignment * alignment; }

/// A grow-only buffer in device or pinned host memory: grown by whole MiB
/// and at least doubling, or (`exact`, for many small ones) to the bytes asked.
struct Buffer {
  bool host = false, exact = false;
  void *data = nullptr;
  size_t capacity = 0;
  explicit Buffer(bool host = false, bool exact = false) : host(host), exact(exact) {}
  Buffer(const Buffer &) = delete;
  Buffer &operator=(const Buffer &) = delete;
  ~Buffer() { release(); }
  Status reserve(size_t bytes) {
    if (bytes <= capacity)
      return Status::success();
    release();
    const size_t size = exact ? alignUp(bytes, 256) : std::max(alignUp(bytes, size_t(1) << 20), capacity * 2);
    cudaError_t error = host ? cudaMallocHost(&data, size) : cudaMalloc(&data, size);
    if (error != cudaSuccess) {
      data = nullptr;
      cudaGetLastError();
      return Status::error("CUDA could not allocate ", size, " bytes of ", host ? "pinned host" : "device",
                           " scratch memory: ", cudaGetErrorString(error));
    }
    capacity = size;
    return Status::success();
  }
  void release() {
    if (data && beforeFree)
      beforeFree(freeContext);
    if (data)
      host ? cudaFreeHost(data) : cudaFree(data);
    data = nullptr;
    capacity = 0;
  }
  /// Called before the memory is freed (State: launches the graphs a token
  /// deferred, which may read it).
  void (*beforeFree)(void *) = nullptr;
  void *freeContext = nullptr;
  template <typename T> T *at(size_t offset) const { return reinterpret_cast<T *>(static_cast<char *>(data) + offset); }
};

/// Offsets in a buffer, each aligned to 256 bytes.
struct Layout {
  size_t size = 0;
  size_t take(size_t bytes) {
    const size_t offset = size;
    size = alignUp(size + bytes, 256);
    return offset;
  }
};

bool aligned16(const void *p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

/// Whether gate and up [I, hidden] and down [hidden, I] make an expert.
bool expertFits(const DeviceWeight *gate, const DeviceWeight *up, const DeviceWeight *down, int64_t hidden) {
  return gate && up && down && gate->cols == hidden && up->cols == hidden && up->rows == gate->rows &&
         down->rows == hidden && down->cols == gate->rows;
}

/// The fields of a product job that come from its matrix (`vectorized`:
/// whether an aligned input whose stride is a multiple of 4 may be read
/// four floats at a time).
ProductJob jobTemplate(const DeviceWeight &w) {
  ProductJob job{};
  job.w = static_cast<const uint8_t *>(w.data);
  job.rows = w.rows;
  job.cols = w.cols;
  job.layout = static_cast<int>(w.layout);
  if (w.layout == WeightLayout::Group) {
    job.bits = w.format.bits;
    job.group = w.format.group;
    job.symmetric = w.format.symmetric;
    job.bf16Scale = w.format.scaleType == quant::ScaleType::BF16;
    job.signedCodes = w.signedCodes;
    job.groups = w.format.groupsPerRow(w.cols);
    const quant::GroupPlanes planes = quant::groupPlanes(w.format, w.rows, w.cols);
    job.codeRowBytes = static_cast<int64_t>(planes.codeRowBytes);
    job.headerOffset = static_cast<int64_t>(planes.headerOffset);
    job.blockShift = w.format.group == 128 ? 2 : w.format.group == 64 ? 1 : 0;
  } else {
    job.vectorized = w.cols % 4 == 0 && aligned16(w.data);
  }
  return job;
}

} // namespace

/// What a graph's tables hold of `w` (null: nothing), for its key: the
/// matrix's address, its memory, shape and format, so that a weight freed
/// and another made at the same address cannot replay the old tables.
void appendWeightKey(std::vector<uintptr_t> &key, const DeviceWeight *w) {
  if (!w) {
    key.push_back(0);
    return;
  }
  const quant::QuantFormat &f = w->format;
  for (uintptr_t value :
       {reinterpret_cast<uintptr_t>(w), reinterpret_cast<uintptr_t>(w->data), static_cast<uintptr_t>(w->rows),
        static_cast<uintptr_t>(w->cols), static_cast<uintptr_t>(w->layout), static_cast<uintptr_t>(w->signedCodes),
        static_cast<uintptr_t>(f.bits), static_cast<uintptr_t>(f.group), static_cast<uintptr_t>(f.symmetric),
        static_cast<uintptr_t>(f.scaleType)})
    key.push_back(value);
}

/// Launches captured once as a CUDA graph and replayed while everything
/// they were captured with (addresses, sizes: `key`) holds.
struct DecodeGraph {
  cudaGraphExec_t exec = nullptr;
  /// What `exec` was made from, for a token's graph (State::launchDeferred),
  /// and a number that changes whenever it is made anew (0: none).
  cudaGraph_t captured = nullptr;
  uint64_t generation = 0;
  std::vector<uintptr_t> key;
  bool failed = false; ///< Capture did not work here: plain launches from then on.
  /// Calls so far: a graph is captured at its layer's second token, so a
  /// layer loaded for one token (a cache smaller than the model) pays no
  /// capture.
  int64_t uses = 0;
  Buffer tables{false, true}; ///< The job tables the launches read (device memory, a few KiB).
  DecodeGraph() = default;
  DecodeGraph(const DecodeGraph &) = delete;
  DecodeGraph &operator=(const DecodeGraph &) = delete;
  ~DecodeGraph() { drop(); }
  /// Drops the instance and what it was made from.
  void drop() {
    if (exec)
      cudaGraphExecDestroy(exec);
    if (captured)
      cudaGraphDestroy(captured);
    exec = nullptr;
    captured = nullptr;
    generation = 0;
  }
};

struct KvMirror {
  struct Layer {
    float *keys = nullptr, *values = nullptr;
    int64_t rows = 0, capacity = 0, keyWidth = 0, valueWidth = 0;
  };
  std::vector<Layer> layers;
  ~KvMirror() {
    for (Layer &layer : layers) {
      cudaFree(layer.keys);
      cudaFree(layer.values);
    }
  }
};

struct Context::State {
  std::mutex mutex;
  DeviceFacts facts;
  cudaEvent_t start = nullptr, stop = nullptr;
  Buffer input, scratch, output, hostInput{true}, hostOutput{true};
  std::shared_ptr<std::atomic<size_t>> resident = std::make_shared<std::atomic<size_t>>(0);
  double kernelSeconds = 0;
  std::vector<Buffer *> buffers() {
    return {&input,    &scratch, &output,     &hostInput,   &hostOutput,   &x,          &handover,   &q,
            &attended, &branch,  &scores,     &logits,      &tables,       &rope,       &latent,     &rows,
            &arena,    &routed,  &routedPlan, &routedCalls, &hostHandover, &hostLogits, &splitSlots, &splitCounts};
  }
  State() {
    // A buffer that grows frees its memory, which a deferred graph may read.
    for (Buffer *buffer : buffers()) {
      buffer->beforeFree = &State::launchDeferredBeforeFree;
      buffer->freeContext = this;
    }
  }
  ~State() {
    deferred.clear();
    for (Buffer *buffer : buffers())
      buffer->release();
    if (tokenGraph.exec)
      cudaGraphExecDestroy(tokenGraph.exec);
    if (start)
      cudaEventDestroy(start);
    if (stop)
      cudaEventDestroy(stop);
    if (ownStream)
      cudaStreamDestroy(ownStream);
  }

  /// Job tables for quantizing activations at the groups the products need
  /// and for the products themselves, built on the host.
  struct Plan {
    std::vector<QuantJob> quant;
    std::vector<ProductJob> products;
    int64_t quantWarps = 0, rows = 0;
    int64_t tiles = 0; ///< Of tensor jobs (tensorKernel's warps).
  };

  /// A quantization of `x` (device, [tokens, cols] with stride ldx) at
  /// `group`, its areas placed in scratch; returns the job's index.
  size_t addQuant(Plan &plan, Layout &scratchLayout, const float *x, int64_t ldx, int64_t cols, int64_t tokens,
                  int group) {
    for (size_t i = 0; i < plan.quant.size(); ++i)
      if (plan.quant[i].x == x && plan.quant[i].group == group && plan.quant[i].cols == cols)
        return i;
    QuantJob job{};
    job.x = x;
    job.ldx = ldx;
    job.cols = cols;
    job.group = group;
    job.groups = (cols + group - 1) / group;
    job.tokens = tokens;
    // Offsets for now; made pointers once scratch is allocated.
    job.values = reinterpret_cast<int8_t *>(scratchLayout.take(static_cast<size_t>(tokens * job.groups * group)));
    job.scales = reinterpret_cast<float *>(scratchLayout.take(static_cast<size_t>(tokens * job.groups) * 4));
    job.sums = reinterpret_cast<float *>(scratchLayout.take(static_cast<size_t>(tokens * job.groups) * 4));
    job.first = plan.quantWarps;
    plan.quantWarps += tokens * job.groups;
    plan.quant.push_back(job);
    return plan.quant.size() - 1;
  }

  /// A product job of `w` on activation `x` (device) writing y (device).
  void addProduct(Plan &plan, Layout &scratchLayout, const DeviceWeight &w, const float *x, int64_t ldx, int64_t tokens,
                  float *y, int64_t ldy) {
    ProductJob job = jobTemplate(w);
    job.x = x;
    job.ldx = ldx;
    job.y = y;
    job.ldy = ldy;
    job.tokens = tokens;
    job.first = plan.rows;
    job.firstTile = plan.tiles;
    if (w.layout == WeightLayout::Group)
      // The quantization's index, resolved to pointers later.
      job.q = reinterpret_cast<const int8_t *>(addQuant(plan, scratchLayout, x, ldx, w.cols, tokens, w.format.group));
    else
      job.vectorized = job.vectorized && ldx % 4 == 0 && aligned16(x);
    job.tensor = w.layout == WeightLayout::Group && tokens >= tensor::kMinTokens && tensorCores;
    if (job.tensor)
      plan.tiles += tensor::tileCount(w.rows, tokens);
    else
      plan.rows += w.rows;
    plan.products.push_back(job);
  }

  /// Turns the quantization indices and offsets of `plan` into pointers.
  void resolve(Plan &plan, size_t firstQuant) {
    for (size_t i = firstQuant; i < plan.quant.size(); ++i) {
      QuantJob &job = plan.quant[i];
      if (job.h)
        continue; // SwiGLU into h: nothing rounded
      job.values = scratch.at<int8_t>(reinterpret_cast<size_t>(job.values));
      job.scales = scratch.at<float>(reinterpret_cast<size_t>(job.scales));
      job.sums = scratch.at<float>(reinterpret_cast<size_t>(job.sums));
    }
    for (ProductJob &job : plan.products)
      if (job.layout == static_cast<int>(WeightLayout::Group)) {
        const QuantJob &quant = plan.quant[reinterpret_cast<size_t>(job.q)];
        job.q = quant.values;
        job.qScales = quant.scales;
        job.qSums = quant.sums;
      }
  }

  /// Quantizations of `count` jobs over `warps` warps (with `dynamic`: at
  /// most that many, the sizes read from device memory).
  Status launchQuant(const QuantJob *deviceJobs, size_t count, int64_t warps, const LaunchSize *dynamic = nullptr) {
    if (count == 0 || warps == 0)
      return Status::success();
    launchKernel(quantizeKernel, blocksFor(warps * 32, 32 * kWarpsPerBlock), 32 * kWarpsPerBlock, on(), deviceJobs,
                 static_cast<int>(count), warps, dynamic);
    return check(cudaGetLastError(), "quantize launch");
  }

  /// Whether one token's group-format products of `rows` rows and
  /// `codeBytes` bytes of codes stream. Auto: streamed for rows of under
  /// 2 KiB of codes on average, where a warp per row spends much of its
  /// life finding its job and waiting on its first loads (on the H200:
  /// OLMoE and Qwen3-30B-A3B shapes decode 11-12% faster streamed,
  /// Mixtral's 2-7 KiB rows 7% slower).
  bool streams(int64_t rows, int64_t codeBytes) const {
    return oneTokenKernel == ProductKernel::Streamed ||
           (oneTokenKernel == ProductKernel::Auto && codeBytes < 2048 * rows);
  }

  /// Products of `count` jobs over `rows` rows (with `dynamic`: at most
  /// that many), `single` when every job has one token, `streamed` for the
  /// streamed kernel (group layouts, one token).
  Status launchProducts(const ProductJob *deviceJobs, size_t count, int64_t rows, bool single, bool streamed,
                        const LaunchSize *dynamic = nullptr, const RoutedFusion &fusion = {}) {
    if (count == 0 || rows == 0)
      return Status::success();
    if (single && streamed) {
      // One wave of resident blocks, fewer where the rows are fewer.
      const unsigned blocks = std::min<unsigned>(blocksFor(rows * 32, 32 * kStreamWarps), streamedBlocks);
      launchKernel(streamedKernel, blocks, 32 * kStreamWarps, on(), deviceJobs, rows, dynamic, fusion);
      return check(cudaGetLastError(), "product launch");
    }
    const unsigned blocks = blocksFor(rows * 32, 32 * kWarpsPerBlock);
    if (single)
      launchKernel(productKernel<1>, blocks, 32 * kWarpsPerBlock, on(), deviceJobs, static_cast<int>(count), rows,
                   dynamic, fusion);
    else
      launchKernel(productKernel<kTile>, blocks, 32 * kWarpsPerBlock, on(), deviceJobs, static_cast<int>(count), rows,
                   dynamic, RoutedFusion{});
    return check(cudaGetLastError(), "product launch");
  }

  /// The products of `plan`, whose jobs are at `deviceJobs`: its tensor
  /// jobs on tensor cores, the others a warp per row.
  Status launchProducts(const Plan &plan, const ProductJob *deviceJobs) {
    if (plan.tiles > 0) {
      launchKernel(tensorKernel, blocksFor(plan.tiles * 32, 32 * kTensorWarps), 32 * kTensorWarps, on(), deviceJobs,
                   static_cast<int>(plan.products.size()), plan.tiles);
      MOE_RETURN_IF_ERROR(check(cudaGetLastError(), "tensor product launch"));
    }
    const bool single =
        std::all_of(plan.products.begin(), plan.products.end(), [](const ProductJob &job) { return job.tokens == 1; });
    const bool groups = std::all_of(plan.products.begin(), plan.products.end(), [](const ProductJob &job) {
      return job.layout == static_cast<int>(WeightLayout::Group);
    });
    int64_t codeBytes = 0;
    for (const ProductJob &job : plan.products)
      codeBytes += job.rows * job.codeRowBytes;
    return launchProducts(deviceJobs, plan.products.size(), plan.rows, single, groups && streams(plan.rows, codeBytes));
  }

  ProductKernel oneTokenKernel = ProductKernel::Auto;
  /// Whether group-format products of kMinTokens tokens or more run on
  /// tensor cores (Context::setTensorCores), and whether they can here
  /// (sm_80 and later, and tensorKernel built for it).
  bool tensorCores = false, tensorBuilt = false;
  unsigned streamedBlocks = 1; ///< streamedKernel's blocks resident on the device at once.

  // Decode: the residual stream and a token's intermediates on the device,
  // job tables, and a pinned arena for what the host hands over between
  // two waits (an async copy reads it later, so it is not reused before).
  // `handover` holds the MLP input, then the new key and value rows, so
  // that one copy hands all three to the host.
  Buffer x, handover, q, attended, branch, scores, logits, tables, rope, latent, arena{true};
  /// attendKernel's AttentionSplit: the heads' slots, and their counts
  /// (all zeroed when the buffer is made; the kernel keeps them so).
  Buffer splitSlots, splitCounts;
  /// The most blocks a head's attention takes (Context::setAttentionSplits;
  /// 0: as the multiprocessors call for).
  int attentionSplits = 0;
  /// Pinned: a layer's hand-back and the step's logits (decodeEnd), each
  /// copied and waited for at once.
  Buffer hostHandover{true}, hostLogits{true};
  bool graphs = true; ///< Context::setGraphs.
  /// Launches overlap the kernel before them (Context::setDependentLaunches;
  /// cuda/Launch.h): where the device and the kernels' build have it.
  bool dependent = false, dependentBuilt = false;
  LaunchStream on() { return {stream(), dependent}; }
  /// What a graph's launches were captured with besides addresses and
  /// sizes: the one-token kernel and whether launches overlap.
  uintptr_t launchKey() const {
    return static_cast<uintptr_t>(oneTokenKernel) | static_cast<uintptr_t>(dependent) << 8 |
           static_cast<uintptr_t>(fusedMoe) << 9;
  }
  /// decodeRouted runs SwiGLU and the weighted sum inside the products
  /// (Context::setFusedMoe).
  bool fusedMoe = true;
  GraphStats graphStats;

  /// Drops `graph`'s instance and key (stageTables, before its tables are
  /// staged anew).
  void forget(DecodeGraph &graph) {
    launchDeferred(false); // its instance may wait in `deferred`
    graph.drop();
    graph.key.clear();
  }

  /// A graph that failed (`error`) runs as plain launches from now on.
  void graphFailed(DecodeGraph &graph, cudaError_t error, const char *what) {
    cudaGetLastError();
    graph.drop();
    graph.failed = true;
    if (graphStats.failures++ == 0 && graphStats.firstFailure.empty())
      graphStats.firstFailure = std::string(what) + ": " + cudaGetErrorString(error);
  }

  /// Replays `graph`: deferred where the step may (Context::decodeBegin's
  /// `layersStay`, one token, token graphs on), else launched now; false
  /// (the graph given up) where the launch fails.
  bool replay(DecodeGraph &graph) {
    if (deferring && graph.captured) {
      deferred.push_back({&graph, graph.generation});
      ++graphStats.replays;
      return true;
    }
    if (const cudaError_t error = cudaGraphLaunch(graph.exec, stream()); error != cudaSuccess) {
      graphFailed(graph, error, "graph launch");
      return false;
    }
    ++graphStats.replays;
    return true;
  }

  // A token's graph. A token whose layers stay (every layer resident: none
  // is freed before decodeEnd) replays its per-layer graphs; each replay is
  // deferred, and decodeEnd launches the run of them as one graph (child
  // graphs in a chain, built the second time the same run comes), so the
  // device runs the token without a gap between graphs and the host makes
  // one launch. Anything else that reaches the stream (a copy, a launch, a
  // capture, a wait, a buffer freed) first launches what was deferred, one
  // graph at a time: the stream sees every call in the calls' order.
  struct GraphPart {
    DecodeGraph *graph;
    uint64_t generation;
    bool operator==(const GraphPart &o) const { return graph == o.graph && generation == o.generation; }
  };
  bool deferring = false;   ///< Replays defer (this step).
  bool tokenGraphs = true;  ///< Context::setTokenGraphs.
  uint64_t generations = 0; ///< The last DecodeGraph::generation given.
  /// The graphs deferred now, and the run that ended the last token.
  std::vector<GraphPart> deferred, lastRun;
  struct TokenGraph {
    cudaGraphExec_t exec = nullptr;
    std::vector<GraphPart> parts;
    bool failed = false;
  } tokenGraph;
  /// Why a deferred graph's launch failed (the next wait's error), or "".
  std::string deferredFailure;
  cudaStream_t ownStream = nullptr;

  /// The stream, for anything but a deferred replay: what the token deferred
  /// goes first.
  cudaStream_t stream() {
    launchDeferred(false);
    return ownStream;
  }
  static void launchDeferredBeforeFree(void *state) { static_cast<State *>(state)->launchDeferred(false); }

  /// Launches the graphs deferred so far: where `whole` (the token's end),
  /// as the token's graph when the same run came the time before, else one
  /// by one. A launch that fails is the step's error.
  void launchDeferred(bool whole) {
    if (deferred.empty())
      return;
    std::vector<GraphPart> parts = std::move(deferred);
    deferred.clear();
    if (whole && parts.size() > 1 && tokenGraphs && !tokenGraph.failed) {
      if (!(tokenGraph.exec && tokenGraph.parts == parts) && parts == lastRun)
        buildTokenGraph(parts);
      if (tokenGraph.exec && tokenGraph.parts == parts) {
        const cudaError_t error = cudaGraphLaunch(tokenGraph.exec, ownStream);
        if (error == cudaSuccess) {
          ++graphStats.tokenReplays;
          lastRun = std::move(parts);
          return;
        }
        tokenGraphFailed(error, "token graph launch");
      }
    }
    for (const GraphPart &part : parts)
      if (const cudaError_t error = cudaGraphLaunch(part.graph->exec, ownStream); error != cudaSuccess) {
        // The step fails (at its next wait: what follows would read what
        // this graph did not write); the graph runs as plain launches from
        // the next token on, as a failed replay does.
        graphFailed(*part.graph, error, "graph launch");
        if (deferredFailure.empty())
          deferredFailure = std::string("graph launch: ") + cudaGetErrorString(error);
        break;
      }
    if (whole)
      lastRun = std::move(parts); // the run that ended the token (runs before a launch in the middle do not count)
  }

  /// The token's graph: `parts`' graphs as child graphs, each after the last.
  void buildTokenGraph(const std::vector<GraphPart> &parts) {
    if (tokenGraph.exec)
      cudaGraphExecDestroy(tokenGraph.exec);
    tokenGraph.exec = nullptr;
    tokenGraph.parts.clear();
    cudaGraph_t graph = nullptr;
    cudaError_t error = cudaGraphCreate(&graph, 0);
    cudaGraphNode_t last = nullptr;
    for (size_t i = 0; error == cudaSuccess && i < parts.size(); ++i) {
      cudaGraphNode_t node = nullptr;
      error = cudaGraphAddChildGraphNode(&node, graph, last ? &last : nullptr, last ? 1 : 0, parts[i].graph->captured);
      last = node;
    }
    cudaGraphExec_t exec = nullptr;
    if (error == cudaSuccess)
      error = cudaGraphInstantiate(&exec, graph, 0);
    if (graph)
      cudaGraphDestroy(graph);
    if (error != cudaSuccess || !exec) {
      if (exec)
        cudaGraphExecDestroy(exec);
      tokenGraphFailed(error != cudaSuccess ? error : cudaErrorUnknown, "token graph");
      return;
    }
    tokenGraph.exec = exec;
    tokenGraph.parts = parts;
    ++graphStats.tokenGraphs;
  }

  /// A token's graph that failed: per-layer graphs from now on.
  void tokenGraphFailed(cudaError_t error, const char *what) {
    cudaGetLastError();
    if (tokenGraph.exec)
      cudaGraphExecDestroy(tokenGraph.exec);
    tokenGraph.exec = nullptr;
    tokenGraph.parts.clear();
    tokenGraph.failed = true;
    if (graphStats.tokenFailures++ == 0 && graphStats.firstFailure.empty())
      graphStats.firstFailure = std::string(what) + ": " + cudaGetErrorString(error);
  }
  int64_t hidden = 0;
  int64_t tokens = 1; ///< Tokens of the step decodeBegin started (prefill: more than one).
  /// The position `rope` holds, with the angles of ropeHalfStaged pairs
  /// (this step's), and where `rope` was then (a buffer that grew holds
  /// neither).
  int64_t ropePosition = -1;
  int ropeHalfStaged = -1;
  const void *ropeStagedAt = nullptr;
  float *normedPointer() const { return handover.at<float>(0); }
  size_t arenaUsed = 0;
  /// Copies from the arena to host memory that the next wait makes (the
  /// key and value rows of layers whose MLP stayed on the device).
  struct Pending {
    void *target;
    const void *source;
    size_t bytes;
  };
  std::vector<Pending> pending;
  /// The token's new key and value rows of layers whose MLP stayed on the
  /// device (decodeAttention), a slot a layer, bytes used, and where each
  /// row goes on the host.
  Buffer rows;
  size_t rowsUsed = 0;
  struct RowCopy {
    void *target;
    size_t offset, bytes;
  };
  std::vector<RowCopy> rowCopies;
  /// Hands the rows gathered in `rows` to the host at the next wait: one
  /// copy for every layer's.
  Status flushRows() {
    if (rowsUsed == 0)
      return Status::success();
    Expected<void *> staged = arenaTake(rowsUsed);
    if (!staged)
      return staged.status();
    MOE_RETURN_IF_ERROR(
        check(cudaMemcpyAsync(*staged, rows.data, rowsUsed, cudaMemcpyDeviceToHost, stream()), "copy out"));
    for (const RowCopy &c : rowCopies)
      pending.push_back({c.target, static_cast<char *>(*staged) + c.offset, c.bytes});
    rowCopies.clear();
    rowsUsed = 0;
    return Status::success();
  }
  /// Where the last decodeAttention left the router's logits in `handover`
  /// (-1: none since, so decodeRouted has nothing to route).
  int64_t routerLogitsOffset = -1, routerLogitsRows = 0;

  // Routing on the device: the intermediates of a token's MoE block (sized
  // for every prepared layer), its plan, and the routed experts counted.
  Buffer routed, routedPlan, routedCalls;
  struct RoutedBounds {
    int64_t hidden = 0, count = 0, width = 0, downWidth = 0;
  } routedBounds;

  /// The areas of a token's intermediates for `b` in `base` (device
  /// memory; null: offsets from 0), and their layout (for sizing `routed`).
  static RoutedScratch routedScratch(const RoutedBounds &b, char *base, Layout *layoutOut = nullptr) {
    Layout layout;
    const int64_t H = b.hidden, count = b.count;
    RoutedScratch r;
    r.inputValueStride = static_cast<int64_t>(alignUp(static_cast<size_t>(H) + 128, 256));
    r.inputGroupStride = static_cast<int64_t>(alignUp(static_cast<size_t>((H + 31) / 32), 64));
    r.downValueStride = static_cast<int64_t>(alignUp(static_cast<size_t>(b.downWidth) + 128, 256));
    r.downGroupStride = static_cast<int64_t>(alignUp(static_cast<size_t>((b.downWidth + 31) / 32), 64));
    r.inputValues =
        reinterpret_cast<int8_t *>(base + layout.take(static_cast<size_t>(kMaxInputGroups * r.inputValueStride)));
    r.inputScales =
        reinterpret_cast<float *>(base + layout.take(static_cast<size_t>(kMaxInputGroups * r.inputGroupStride) * 4));
    r.inputSums =
        reinterpret_cast<float *>(base + layout.take(static_cast<size_t>(kMaxInputGroups * r.inputGroupStride) * 4));
    r.gateOut = reinterpret_cast<float *>(base + layout.take(static_cast<size_t>(b.width) * 4));
    r.upOut = reinterpret_cast<float *>(base + layout.take(static_cast<size_t>(b.width) * 4));
    r.h = reinterpret_cast<float *>(base + layout.take(static_cast<size_t>(b.width) * 4));
    r.downValues = reinterpret_cast<int8_t *>(base + layout.take(static_cast<size_t>(count * r.downValueStride)));
    r.downScales = reinterpret_cast<float *>(base + layout.take(static_cast<size_t>(count * r.downGroupStride) * 4));
    r.downSums = reinterpret_cast<float *>(base + layout.take(static_cast<size_t>(count * r.downGroupStride) * 4));
    r.parts = reinterpret_cast<float *>(base + layout.take(static_cast<size_t>(count * H) * 4));
    // The fused block's counts (zeroed where prepareRouted lays them out):
    // a token's experts' down inputs have at most a group a row.
    r.groupArrivals = reinterpret_cast<unsigned *>(base + layout.take(static_cast<size_t>(b.width) * 4));
    r.rowArrivals = reinterpret_cast<unsigned *>(base + layout.take(static_cast<size_t>(H) * 4));
    if (layoutOut)
      *layoutOut = layout;
    return r;
  }

  Expected<void *> arenaTake(size_t bytes) {
    const size_t offset = alignUp(arenaUsed, 256);
    if (offset + bytes > arena.capacity)
      return Status::error("CUDA decode: ", offset + bytes, " bytes of staging between two waits, more than the ",
                           arena.capacity, " reserved");
    arenaUsed = offset + bytes;
    return static_cast<void *>(arena.at<char>(offset));
  }

  /// Copies `bytes` from host `source` to device `target` through the arena.
  Status stage(void *target, const void *source, size_t bytes) {
    Expected<void *> staged = arenaTake(bytes);
    if (!staged)
      return staged.status();
    std::memcpy(*staged, source, bytes);
    return check(cudaMemcpyAsync(target, *staged, bytes, cudaMemcpyHostToDevice, stream()), "copy in");
  }

  /// Where a plan's job tables lie on the device.
  struct PlanTables {
    const QuantJob *quant = nullptr;
    const ProductJob *products = nullptr;
  };

  /// The jobs of `plan` (placed at `placed`) that round `x` ([tokens]
  /// rows, `stride` floats apart), for the kernel that writes x to run
  /// (normKernel: a block a row; attendKernel: a block a head of a row,
  /// `segment` values, which each job's group must divide): where they lie
  /// one after another in the table and read x's rows as that kernel
  /// writes them (none otherwise).
  struct Rounding {
    const QuantJob *jobs = nullptr;
    int count = 0;
  };
  static Rounding roundingOf(const Plan &plan, const PlanTables &placed, const float *x, int64_t stride, int64_t tokens,
                             int64_t segment = 0) {
    const auto reads = [&](const QuantJob &job) { return job.x == x; };
    size_t first = 0;
    while (first < plan.quant.size() && !reads(plan.quant[first]))
      ++first;
    size_t last = first;
    while (last < plan.quant.size() && reads(plan.quant[last]))
      ++last;
    if (first == last || std::any_of(plan.quant.begin() + static_cast<std::ptrdiff_t>(last), plan.quant.end(), reads) ||
        std::any_of(plan.quant.begin() + static_cast<std::ptrdiff_t>(first),
                    plan.quant.begin() + static_cast<std::ptrdiff_t>(last), [&](const QuantJob &job) {
                      return job.ldx != stride || job.tokens != tokens || job.up || job.h ||
                             (segment > 0 && segment % job.group != 0);
                    }))
      return {};
    return {placed.quant + first, static_cast<int>(last - first)};
  }

  /// The products of `plan` after the kernels that wrote their inputs
  /// rounded `rounded` of its jobs (roundingOf); where they did not round
  /// every job, all its rounding first (the jobs already rounded again,
  /// to the same values).
  Status launchAfterRounding(const Plan &plan, const PlanTables &placed, int rounded) {
    if (static_cast<size_t>(rounded) != plan.quant.size())
      MOE_RETURN_IF_ERROR(launchQuant(placed.quant, plan.quant.size(), plan.quantWarps));
    return launchProducts(plan, placed.products);
  }

  /// Copies the job tables of `count` plans (and `extraBytes` of `extra`,
  /// to `extraTarget`) in one transfer through the arena into `tables`, or
  /// into `graph`'s own tables for a capture (its instance dropped first:
  /// none may read tables being rewritten, even if this fails); the plans'
  /// x and y are device pointers and their quantized areas offsets into
  /// scratch, reserved by the caller. Stream order makes the reuse of
  /// `tables` by a later call safe.
  Status stageTables(Plan *const *plans, size_t count, PlanTables *placed, const void *extra = nullptr,
                     size_t extraBytes = 0, void **extraTarget = nullptr, DecodeGraph *graph = nullptr) {
    if (graph)
      forget(*graph);
    Buffer &tables = graph ? graph->tables : this->tables;
    Layout layout;
    std::vector<std::pair<size_t, size_t>> offsets;
    for (size_t i = 0; i < count; ++i) {
      resolve(*plans[i], 0);
      const size_t quantOffset = layout.take(plans[i]->quant.size() * sizeof(QuantJob));
      offsets.emplace_back(quantOffset, layout.take(plans[i]->products.size() * sizeof(ProductJob)));
    }
    const size_t extraOffset = layout.take(extraBytes);
    MOE_RETURN_IF_ERROR(tables.reserve(std::max<size_t>(layout.size, 256)));
    Expected<void *> staged = arenaTake(layout.size);
    if (!staged)
      return staged.status();
    char *host = static_cast<char *>(*staged);
    for (size_t i = 0; i < count; ++i) {
      std::memcpy(host + offsets[i].first, plans[i]->quant.data(), plans[i]->quant.size() * sizeof(QuantJob));
      std::memcpy(host + offsets[i].second, plans[i]->products.data(), plans[i]->products.size() * sizeof(ProductJob));
      placed[i] = {tables.at<QuantJob>(offsets[i].first), tables.at<ProductJob>(offsets[i].second)};
    }
    if (extraBytes > 0) {
      std::memcpy(host + extraOffset, extra, extraBytes);
      *extraTarget = tables.at<char>(extraOffset);
    }
    return check(cudaMemcpyAsync(tables.data, host, layout.size, cudaMemcpyHostToDevice, stream()), "copy tables");
  }

  /// The quantization and product launches of a staged plan.
  Status launch(const Plan &plan, const PlanTables &placed) {
    MOE_RETURN_IF_ERROR(launchQuant(placed.quant, plan.quant.size(), plan.quantWarps));
    return launchProducts(plan, placed.products);
  }

  /// Routed experts over rows gathered from a block's input (routedExperts,
  /// decodeRoutedExperts): each non-empty expert's rows one after another
  /// (blockSums' order), its gate and up into `gate` and `up`, SwiGLU into
  /// `h`, its down into `y`. Areas are offsets into scratch until placed.
  struct ExpertBlock {
    int64_t rows = 0, width = 0;
    size_t gathered = 0, y = 0, gate = 0, up = 0, h = 0;
    Plan first, second;
  };

  ExpertBlock planExpertBlock(Layout &scratchLayout, const RoutedExpertTokens *experts, size_t count, int64_t hidden) {
    ExpertBlock block;
    for (size_t i = 0; i < count; ++i) {
      block.rows += experts[i].count;
      block.width += experts[i].count * experts[i].gate->rows;
    }
    block.gathered = scratchLayout.take(static_cast<size_t>(block.rows * hidden) * 4);
    block.y = scratchLayout.take(static_cast<size_t>(block.rows * hidden) * 4);
    block.gate = scratchLayout.take(static_cast<size_t>(block.width) * 4);
    block.up = scratchLayout.take(static_cast<size_t>(block.width) * 4);
    block.h = scratchLayout.take(static_cast<size_t>(block.width) * 4);
    auto offset = [](size_t value) { return reinterpret_cast<float *>(value); };
    int64_t row = 0, intermediate = 0;
    for (size_t i = 0; i < count; ++i) {
      const RoutedExpertTokens &e = experts[i];
      if (e.count == 0)
        continue;
      const int64_t I = e.gate->rows;
      const size_t x = block.gathered + static_cast<size_t>(row * hidden) * 4,
                   inner = static_cast<size_t>(intermediate) * 4;
      addProduct(block.first, scratchLayout, *e.gate, offset(x), hidden, e.count, offset(block.gate + inner), I);
      addProduct(block.first, scratchLayout, *e.up, offset(x), hidden, e.count, offset(block.up + inner), I);
      addProduct(block.second, scratchLayout, *e.down, offset(block.h + inner), I, e.count,
                 offset(block.y + static_cast<size_t>(row * hidden) * 4), hidden);
      row += e.count;
      intermediate += e.count * I;
    }
    return block;
  }

  /// The block's offsets into scratch (sized now) become pointers.
  void placeExpertBlock(ExpertBlock &block) {
    for (Plan *plan : {&block.first, &block.second}) {
      for (ProductJob &job : plan->products) {
        job.x = scratch.at<float>(reinterpret_cast<size_t>(job.x));
        job.y = scratch.at<float>(reinterpret_cast<size_t>(job.y));
      }
      for (QuantJob &job : plan->quant)
        job.x = scratch.at<float>(reinterpret_cast<size_t>(job.x));
    }
  }

  /// The block's launches, its tables placed: the gather from x [tokens,
  /// hidden] (device), the products and SwiGLU, then out = each token's
  /// weighted sum (blockWeightedSum; the BlockSums arrays on the device).
  Status launchExpertBlock(const ExpertBlock &block, const PlanTables (&placed)[2], const float *x,
                           const int32_t *rowToken, const int32_t *starts, const int32_t *entryRow,
                           const float *entryWeight, int64_t tokens, int64_t hidden, float *out) {
    launchKernel(gatherKernel, blocksFor(block.rows * hidden, 256), 256, on(), x, rowToken, block.rows, hidden,
                 scratch.at<float>(block.gathered));
    MOE_RETURN_IF_ERROR(check(cudaGetLastError(), "gather launch"));
    MOE_RETURN_IF_ERROR(launch(block.first, placed[0]));
    launchKernel(swigluKernel, blocksFor(block.width, 256), 256, on(), scratch.at<float>(block.gate),
                 scratch.at<float>(block.up), scratch.at<float>(block.h), block.width, nullptr);
    MOE_RETURN_IF_ERROR(check(cudaGetLastError(), "swiglu launch"));
    MOE_RETURN_IF_ERROR(launch(block.second, placed[1]));
    launchKernel(weightedSumKernel, blocksFor(tokens * hidden, 256), 256, on(), scratch.at<float>(block.y), starts,
                 entryRow, entryWeight, tokens, hidden, out);
    return check(cudaGetLastError(), "weighted sum launch");
  }

  /// Stages a plan's tables and launches it.
  Status enqueue(Plan &plan) {
    Plan *plans[] = {&plan};
    PlanTables placed;
    MOE_RETURN_IF_ERROR(stageTables(plans, 1, &placed));
    return launch(plan, placed);
  }

  /// Captures `launches` into `graph` (replacing what it held) and launches
  /// it; where capture fails, runs them as plain launches, now and later.
  template <typename Launches>
  Status captureAndLaunch(DecodeGraph &graph, std::vector<uintptr_t> key, Launches &&launches) {
    launchDeferred(false); // before the graph they may hold is dropped
    graph.drop();
    if (const cudaError_t begun = cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal);
        begun != cudaSuccess) {
      graphFailed(graph, begun, "graph capture");
      return launches();
    }
    const Status captured = launches();
    cudaGraph_t made = nullptr;
    cudaError_t error = cudaStreamEndCapture(ownStream, &made);
    cudaGraphExec_t exec = nullptr;
    if (error == cudaSuccess && made)
      error = cudaGraphInstantiate(&exec, made, 0);
    if (!captured.ok() || error != cudaSuccess || !exec) {
      if (exec)
        cudaGraphExecDestroy(exec);
      if (made)
        cudaGraphDestroy(made);
      graphFailed(graph, error != cudaSuccess ? error : cudaErrorUnknown,
                  captured.ok() ? "graph capture" : "a launch while capturing");
      return launches();
    }
    graph.exec = exec;
    graph.captured = made;
    graph.generation = ++generations;
    graph.key = std::move(key);
    ++graphStats.captures;
    if (!replay(graph))
      return launches();
    --graphStats.replays; // the first launch is the capture's
    return Status::success();
  }

  /// Waits for the stream, makes the pending copies to the host, and
  /// frees the arena.
  Status waitAndReset() {
    const cudaError_t synced = cudaStreamSynchronize(stream());
    const std::string failure = std::exchange(deferredFailure, std::string());
    Status status =
        synced == cudaSuccess && !failure.empty() ? Status::error("CUDA decode: ", failure) : check(synced, "decode");
    if (status.ok())
      for (const Pending &copy : pending)
        std::memcpy(copy.target, copy.source, copy.bytes);
    pending.clear();
    arenaUsed = 0;
    return status;
  }

  /// Leaves `bytes` of device memory at `source` to be copied to host
  /// `target` at the next wait.
  Status copyAtNextWait(void *target, const void *source, size_t bytes) {
    Expected<void *> staged = arenaTake(bytes);
    if (!staged)
      return staged.status();
    MOE_RETURN_IF_ERROR(check(cudaMemcpyAsync(*staged, source, bytes, cudaMemcpyDeviceToHost, stream()), "copy out"));
    pending.push_back({target, *staged, bytes});
    return Status::success();
  }

  Status finish() {
    MOE_RETURN_IF_ERROR(check(cudaEventRecord(stop, stream()), "event"));
    MOE_RETURN_IF_ERROR(check(cudaStreamSynchronize(stream()), "kernels"));
    float milliseconds = 0;
    MOE_RETURN_IF_ERROR(check(cudaEventElapsedTime(&milliseconds, start, stop), "event time"));
    kernelSeconds += milliseconds / 1000.0;
    return Status::success();
  }
};

/// A prepared MoE layer: its RoutedLayer (with the templates, correction
/// bias, remap table and shared gate it points to) in one device
/// allocation, and the bounds its launches are sized for.
struct RoutedLayerHandle {
  void *memory = nullptr;
  const RoutedLayer *device = nullptr;
  int64_t hidden = 0, routerRows = 0;
  int64_t maxCount = 0;  ///< Experts a token can run (top-k, and the shared expert).
  int64_t firstRows = 0; ///< Gate and up rows of the widest such experts.
  int64_t width = 0;     ///< Their intermediate width.
  int64_t downWarps = 0; ///< Warps of their SwiGLU, rounded for their down products (downInputWarps).
  int64_t downWidth = 0; ///< The widest expert's intermediate (its down product's input).
  /// For the one-token kernel's choice (State::streams), over all experts:
  /// whether gate and up (down) are all group formats, their rows and bytes of codes.
  bool firstGroups = true, secondGroups = true;
  int64_t firstAllRows = 0, firstCodeBytes = 0, secondAllRows = 0, secondCodeBytes = 0;
  /// decodeRouted's launches as a graph (Context::setGraphs), and what it
  /// was captured with.
  mutable DecodeGraph graph;
  RoutedLayerHandle() = default;
  RoutedLayerHandle(const RoutedLayerHandle &) = delete;
  RoutedLayerHandle &operator=(const RoutedLayerHandle &) = delete;
  ~RoutedLayerHandle() { cudaFree(memory); }
};

Expected<std::shared_ptr<Context>> Context::open() {
  int count = 0;
  cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess || count == 0) {
    cudaGetLastError();
    return Status::error("no CUDA device is usable",
                         error != cudaSuccess ? std::string(" (") + cudaGetErrorString(error) + ")" : std::string());
  }
  std::shared_ptr<Context> context(new Context());
  context->state = std::make_unique<State>();
  State &s = *context->state;
  MOE_RETURN_IF_ERROR(check(cudaSetDevice(0), "set device"));
  cudaDeviceProp properties{};
  MOE_RETURN_IF_ERROR(check(cudaGetDeviceProperties(&properties, 0), "device properties"));
  s.facts.name = properties.name;
  s.facts.computeCapability = properties.major * 10 + properties.minor;
  s.facts.totalMemory = properties.totalGlobalMem;
  s.facts.multiprocessors = properties.multiProcessorCount;
  // Tensor cores where the device has them and tensorKernel was built for
  // them (a build for an older target, run here from its PTX, traps).
  cudaFuncAttributes tensorAttributes{};
  s.tensorBuilt = cudaFuncGetAttributes(&tensorAttributes, tensorKernel) == cudaSuccess &&
                  tensorAttributes.ptxVersion >= 80 && s.facts.computeCapability >= 80;
  cudaGetLastError();
  s.tensorCores = s.tensorBuilt;
  // Dependent launches where the device has them (sm_90) and the kernels
  // run from code built for it (awaitPreviousKernel waits only there: a
  // kernel JIT-compiled from sm_80's PTX would not).
  cudaFuncAttributes normAttributes{};
  s.dependentBuilt = cudaFuncGetAttributes(&normAttributes, normKernel) == cudaSuccess &&
                     normAttributes.ptxVersion >= 90 && s.facts.computeCapability >= 90;
  cudaGetLastError();
  s.dependent = s.dependentBuilt;
  int streamedPerMultiprocessor = 0;
  MOE_RETURN_IF_ERROR(check(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&streamedPerMultiprocessor, streamedKernel, 32 * kStreamWarps, 0),
      "occupancy"));
  s.streamedBlocks = static_cast<unsigned>(std::max(1, streamedPerMultiprocessor) * properties.multiProcessorCount);
  cudaDriverGetVersion(&s.facts.driverVersion);
  cudaRuntimeGetVersion(&s.facts.runtimeVersion);
  MOE_RETURN_IF_ERROR(check(cudaStreamCreateWithFlags(&s.ownStream, cudaStreamNonBlocking), "stream"));
  MOE_RETURN_IF_ERROR(check(cudaEventCreate(&s.start), "event"));
  MOE_RETURN_IF_ERROR(check(cudaEventCreate(&s.stop), "event"));
  return context;
}

Context::~Context() = default;

const DeviceFacts &Context::facts() const { return state->facts; }

size_t Context::residentBytes() const { return state->resident->load(); }

void Context::setGraphs(bool graphs) {
  std::lock_guard<std::mutex> lock(state->mutex);
  state->graphs = graphs;
}

void Context::setTokenGraphs(bool enabled) {
  std::lock_guard<std::mutex> lock(state->mutex);
  state->tokenGraphs = enabled;
  state->tokenGraph.failed = false; // asked again: a failure before may have been passing
}

void Context::setAttentionSplits(int most) {
  std::lock_guard<std::mutex> lock(state->mutex);
  state->attentionSplits = std::clamp(most, 0, kMaxAttentionSplits);
}

void Context::setFusedMoe(bool enabled) {
  std::lock_guard<std::mutex> lock(state->mutex);
  state->fusedMoe = enabled;
}

void Context::setDependentLaunches(bool enabled) {
  std::lock_guard<std::mutex> lock(state->mutex);
  state->dependent = enabled && state->dependentBuilt;
}

GraphStats Context::graphStats() const {
  std::lock_guard<std::mutex> lock(state->mutex);
  return state->graphStats;
}

void Context::setProductKernel(ProductKernel kernel) {
  std::lock_guard<std::mutex> lock(state->mutex);
  state->oneTokenKernel = kernel;
}

void Context::setTensorCores(bool enabled) {
  std::lock_guard<std::mutex> lock(state->mutex);
  state->tensorCores = enabled && state->tensorBuilt;
}

bool Context::tensorCores() const {
  std::lock_guard<std::mutex> lock(state->mutex);
  return state->tensorCores;
}

double Context::kernelSeconds() const { return state->kernelSeconds; }

void Context::resetKernelSeconds() { state->kernelSeconds = 0; }

Expected<std::shared_ptr<const DeviceWeight>> Context::upload(WeightLayout layout, const quant::QuantFormat &format,
                                                              bool signedCodes, int64_t rows, int64_t cols,
                                                              const void *host, size_t bytes) {
  if (rows <= 0 || cols <= 0)
    return Status::error("CUDA upload: empty matrix ", rows, "x", cols);
  size_t expected = 0;
  switch (layout) {
  case WeightLayout::F32:
    expected = static_cast<size_t>(rows * cols) * 4;
    break;
  case WeightLayout::BF16:
    expected = static_cast<size_t>(rows * cols) * 2;
    break;
  case WeightLayout::Group:
    if (std::string problem = quant::validateQuantFormat(format); !problem.empty())
      return Status::error("CUDA upload: ", problem);
    if (signedCodes && format.bits != 8)
      return Status::error("CUDA upload: signed codes are 8-bit only (ggml's Q8_0)");
    expected = format.matrixBytes(rows, cols);
    break;
  }
  if (bytes != expected)
    return Status::error("CUDA upload: a ", rows, "x", cols, " matrix holds ", expected, " bytes, not ", bytes);
  // Group formats travel as planes (common/GroupPlanes.h), which the
  // product kernel reads with aligned, contiguous loads.
  std::vector<uint8_t> planes;
  if (layout == WeightLayout::Group) {
    planes.resize(quant::groupPlanes(format, rows, cols).totalBytes);
    quant::splitIntoPlanes(format, rows, cols, static_cast<const uint8_t *>(host), planes.data());
    host = planes.data();
    bytes = planes.size();
  }
  std::lock_guard<std::mutex> lock(state->mutex);
  void *device = nullptr;
  if (cudaError_t error = cudaMalloc(&device, bytes); error != cudaSuccess) {
    cudaGetLastError();
    size_t free = 0, total = 0;
    cudaMemGetInfo(&free, &total);
    return Status::error("CUDA out of memory: ", bytes, " bytes for a ", rows, "x", cols, " matrix with ", free, " of ",
                         total, " bytes free (", cudaGetErrorString(error), ")");
  }
  // On the context's stream (not the legacy one, which a non-blocking stream
  // does not wait for), so every later kernel sees the bytes; from pageable
  // memory the call returns once the host bytes are staged.
  if (cudaError_t error = cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, state->stream());
      error != cudaSuccess) {
    cudaFree(device);
    return check(error, "upload copy");
  }
  state->resident->fetch_add(bytes);
  auto weight = new DeviceWeight{layout, format, signedCodes, rows, cols, device, bytes};
  std::shared_ptr<std::atomic<size_t>> resident = state->resident;
  return std::shared_ptr<const DeviceWeight>(weight, [resident](const DeviceWeight *w) {
    cudaFree(const_cast<void *>(w->data));
    resident->fetch_sub(w->bytes);
    delete w;
  });
}

Status Context::multiply(const float *x, int64_t tokens, int64_t cols,
                         const std::pair<const DeviceWeight *, float *> *productArray, size_t productCount) {
  if (tokens <= 0 || productCount == 0)
    return Status::success();
  const std::vector<std::pair<const DeviceWeight *, float *>> products(productArray, productArray + productCount);
  for (const auto &[w, y] : products)
    if (!w || w->cols != cols)
      return Status::error("CUDA multiply: a matrix of ", w ? w->cols : 0, " columns for an input of ", cols);
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  Layout in, scratch, out;
  const size_t xOffset = in.take(static_cast<size_t>(tokens * cols) * 4);
  // Device pointers are offsets until the buffers exist; the input goes first.
  const float *deviceX = nullptr;
  State::Plan plan;
  std::vector<size_t> yOffsets;
  for (const auto &[w, y] : products)
    yOffsets.push_back(out.take(static_cast<size_t>(tokens * w->rows) * 4));
  // Plan with the real x pointer: reserve input first.
  MOE_RETURN_IF_ERROR(s.input.reserve(in.size));
  deviceX = s.input.at<float>(xOffset);
  for (size_t i = 0; i < products.size(); ++i)
    s.addProduct(plan, scratch, *products[i].first, deviceX, cols, tokens, reinterpret_cast<float *>(yOffsets[i]),
                 products[i].first->rows);
  const size_t quantOffset = in.take(plan.quant.size() * sizeof(QuantJob));
  const size_t productOffset = in.take(plan.products.size() * sizeof(ProductJob));
  MOE_RETURN_IF_ERROR(s.input.reserve(in.size));
  MOE_RETURN_IF_ERROR(s.scratch.reserve(std::max<size_t>(scratch.size, 256)));
  MOE_RETURN_IF_ERROR(s.output.reserve(out.size));
  MOE_RETURN_IF_ERROR(s.hostInput.reserve(in.size));
  MOE_RETURN_IF_ERROR(s.hostOutput.reserve(out.size));
  deviceX = s.input.at<float>(xOffset);
  for (ProductJob &job : plan.products) {
    job.y = s.output.at<float>(reinterpret_cast<size_t>(job.y));
    job.x = deviceX;
  }
  for (QuantJob &job : plan.quant)
    job.x = deviceX;
  s.resolve(plan, 0);
  std::memcpy(s.hostInput.at<char>(xOffset), x, static_cast<size_t>(tokens * cols) * 4);
  std::memcpy(s.hostInput.at<char>(quantOffset), plan.quant.data(), plan.quant.size() * sizeof(QuantJob));
  std::memcpy(s.hostInput.at<char>(productOffset), plan.products.data(), plan.products.size() * sizeof(ProductJob));
  MOE_RETURN_IF_ERROR(check(cudaEventRecord(s.start, s.stream()), "event"));
  MOE_RETURN_IF_ERROR(
      check(cudaMemcpyAsync(s.input.data, s.hostInput.data, in.size, cudaMemcpyHostToDevice, s.stream()), "copy in"));
  MOE_RETURN_IF_ERROR(s.launchQuant(s.input.at<QuantJob>(quantOffset), plan.quant.size(), plan.quantWarps));
  MOE_RETURN_IF_ERROR(s.launchProducts(plan, s.input.at<ProductJob>(productOffset)));
  MOE_RETURN_IF_ERROR(check(
      cudaMemcpyAsync(s.hostOutput.data, s.output.data, out.size, cudaMemcpyDeviceToHost, s.stream()), "copy out"));
  MOE_RETURN_IF_ERROR(s.finish());
  for (size_t i = 0; i < products.size(); ++i)
    std::memcpy(products[i].second, s.hostOutput.at<char>(yOffsets[i]),
                static_cast<size_t>(tokens * products[i].first->rows) * 4);
  return Status::success();
}

Status Context::experts(const float *x, int64_t hidden, const ExpertProduct *expertArray, size_t expertCount,
                        float *result) {
  const std::vector<ExpertProduct> experts(expertArray, expertArray + expertCount);
  if (experts.empty()) {
    std::fill(result, result + hidden, 0.0f);
    return Status::success();
  }
  std::vector<int64_t> offsets{0};
  for (const ExpertProduct &e : experts) {
    if (!expertFits(e.gate, e.up, e.down, hidden))
      return Status::error("CUDA experts: an expert's gate, up and down do not fit a hidden size of ", hidden);
    offsets.push_back(offsets.back() + e.gate->rows);
  }
  const int64_t width = offsets.back(), count = static_cast<int64_t>(experts.size());
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  Layout in, scratch, out;
  const size_t xOffset = in.take(static_cast<size_t>(hidden) * 4);
  const size_t weightOffset = in.take(static_cast<size_t>(count) * 4);
  const size_t gateOffset = scratch.take(static_cast<size_t>(width) * 4);
  const size_t upOffset = scratch.take(static_cast<size_t>(width) * 4);
  const size_t hOffset = scratch.take(static_cast<size_t>(width) * 4);
  const size_t partsOffset = scratch.take(static_cast<size_t>(count * hidden) * 4);
  const size_t outOffset = out.take(static_cast<size_t>(hidden) * 4);
  // Two plans (gate/up, then down) whose pointers are offsets until the
  // buffers are sized; the device's x and h are known once input and
  // scratch are reserved, so reserve with an estimate first.
  State::Plan first, second;
  Layout scratchFinal = scratch;
  MOE_RETURN_IF_ERROR(s.input.reserve(in.size + (3 * count + 4) * sizeof(ProductJob) + 4 * sizeof(QuantJob) +
                                      count * sizeof(QuantJob) + 4096));
  // Quantized areas come after the fixed scratch areas.
  const float *deviceX = s.input.at<float>(xOffset);
  for (int64_t i = 0; i < count; ++i) {
    s.addProduct(first, scratchFinal, *experts[i].gate, deviceX, hidden, 1,
                 reinterpret_cast<float *>(gateOffset + offsets[i] * 4), experts[i].gate->rows);
    s.addProduct(first, scratchFinal, *experts[i].up, deviceX, hidden, 1,
                 reinterpret_cast<float *>(upOffset + offsets[i] * 4), experts[i].up->rows);
  }
  MOE_RETURN_IF_ERROR(s.scratch.reserve(scratchFinal.size + static_cast<size_t>(width) * 2 + count * 1024 + 4096));
  // The down projections read h = silu(gate) * up, segment i at offsets[i].
  for (int64_t i = 0; i < count; ++i) {
    const float *h = s.scratch.at<float>(hOffset + offsets[i] * 4);
    s.addProduct(second, scratchFinal, *experts[i].down, h, experts[i].down->cols, 1,
                 reinterpret_cast<float *>(partsOffset + i * hidden * 4), hidden);
  }
  const size_t quantFirstOffset = in.take(first.quant.size() * sizeof(QuantJob));
  const size_t productFirstOffset = in.take(first.products.size() * sizeof(ProductJob));
  const size_t quantSecondOffset = in.take(second.quant.size() * sizeof(QuantJob));
  const size_t productSecondOffset = in.take(second.products.size() * sizeof(ProductJob));
  if (in.size > s.input.capacity || scratchFinal.size > s.scratch.capacity)
    return Status::error("CUDA experts: internal scratch estimate too small");
  MOE_RETURN_IF_ERROR(s.output.reserve(out.size));
  MOE_RETURN_IF_ERROR(s.hostInput.reserve(in.size));
  MOE_RETURN_IF_ERROR(s.hostOutput.reserve(out.size));
  for (State::Plan *plan : {&first, &second}) {
    for (ProductJob &job : plan->products)
      job.y = s.scratch.at<float>(reinterpret_cast<size_t>(job.y));
    s.resolve(*plan, 0);
  }
  float *weights = s.hostInput.at<float>(weightOffset);
  for (int64_t i = 0; i < count; ++i)
    weights[i] = experts[i].weight;
  std::memcpy(s.hostInput.at<char>(xOffset), x, static_cast<size_t>(hidden) * 4);
  std::memcpy(s.hostInput.at<char>(quantFirstOffset), first.quant.data(), first.quant.size() * sizeof(QuantJob));
  std::memcpy(s.hostInput.at<char>(productFirstOffset), first.products.data(),
              first.products.size() * sizeof(ProductJob));
  std::memcpy(s.hostInput.at<char>(quantSecondOffset), second.quant.data(), second.quant.size() * sizeof(QuantJob));
  std::memcpy(s.hostInput.at<char>(productSecondOffset), second.products.data(),
              second.products.size() * sizeof(ProductJob));
  MOE_RETURN_IF_ERROR(check(cudaEventRecord(s.start, s.stream()), "event"));
  MOE_RETURN_IF_ERROR(
      check(cudaMemcpyAsync(s.input.data, s.hostInput.data, in.size, cudaMemcpyHostToDevice, s.stream()), "copy in"));
  MOE_RETURN_IF_ERROR(s.launchQuant(s.input.at<QuantJob>(quantFirstOffset), first.quant.size(), first.quantWarps));
  MOE_RETURN_IF_ERROR(s.launchProducts(first, s.input.at<ProductJob>(productFirstOffset)));
  launchKernel(swigluKernel, blocksFor(width, 256), 256, s.on(), s.scratch.at<float>(gateOffset),
               s.scratch.at<float>(upOffset), s.scratch.at<float>(hOffset), width, nullptr);
  MOE_RETURN_IF_ERROR(check(cudaGetLastError(), "swiglu launch"));
  MOE_RETURN_IF_ERROR(s.launchQuant(s.input.at<QuantJob>(quantSecondOffset), second.quant.size(), second.quantWarps));
  MOE_RETURN_IF_ERROR(s.launchProducts(second, s.input.at<ProductJob>(productSecondOffset)));
  launchKernel(combineKernel, blocksFor(hidden, 256), 256, s.on(), s.scratch.at<float>(partsOffset),
               s.input.at<float>(weightOffset), static_cast<int>(count), hidden, s.output.at<float>(outOffset), false,
               nullptr);
  MOE_RETURN_IF_ERROR(check(cudaGetLastError(), "combine launch"));
  MOE_RETURN_IF_ERROR(check(
      cudaMemcpyAsync(s.hostOutput.data, s.output.data, out.size, cudaMemcpyDeviceToHost, s.stream()), "copy out"));
  MOE_RETURN_IF_ERROR(s.finish());
  std::memcpy(result, s.hostOutput.at<char>(outOffset), static_cast<size_t>(hidden) * 4);
  return Status::success();
}

namespace {

/// Why `count` experts do not fit a block of `tokens` tokens of `hidden`
/// (`who` names the caller), or success.
Status checkRoutedExperts(const RoutedExpertTokens *experts, size_t count, int64_t tokens, int64_t hidden,
                          const char *who) {
  for (size_t i = 0; i < count; ++i) {
    const RoutedExpertTokens &e = experts[i];
    if (!expertFits(e.gate, e.up, e.down, hidden) || e.count < 0 || (e.count > 0 && (!e.tokens || !e.weights)))
      return Status::error(who, ": an expert's gate, up and down do not fit a hidden size of ", hidden);
    for (int64_t r = 0; r < e.count; ++r)
      if (e.tokens[r] < 0 || e.tokens[r] >= tokens)
        return Status::error(who, ": token ", e.tokens[r], " of a block of ", tokens);
  }
  return Status::success();
}

/// The BlockSums of `count` experts.
BlockSums blockSumsOf(const RoutedExpertTokens *experts, size_t count, int64_t tokens) {
  std::vector<ExpertRows> rows;
  for (size_t i = 0; i < count; ++i)
    rows.push_back({experts[i].tokens, experts[i].weights, experts[i].count});
  return blockSums(tokens, rows.data(), rows.size());
}

} // namespace

Status Context::routedExperts(const float *x, int64_t tokens, int64_t hidden, const RoutedExpertTokens *experts,
                              size_t count, float *result) {
  MOE_RETURN_IF_ERROR(checkRoutedExperts(experts, count, tokens, hidden, "CUDA routed experts"));
  if (tokens <= 0)
    return Status::success();
  const BlockSums sums = blockSumsOf(experts, count, tokens);
  const int64_t rows = static_cast<int64_t>(sums.rowToken.size());
  if (rows == 0) {
    std::fill(result, result + tokens * hidden, 0.0f);
    return Status::success();
  }
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  // Inputs in `input` (x, the BlockSums arrays, the job tables), the
  // block's areas in `scratch`, its output in `output`: one copy each way.
  Layout in, scratch, out;
  const size_t xOffset = in.take(static_cast<size_t>(tokens * hidden) * 4);
  const size_t rowTokenOffset = in.take(sums.rowToken.size() * 4);
  const size_t startsOffset = in.take(sums.starts.size() * 4);
  const size_t entryRowOffset = in.take(sums.entryRow.size() * 4);
  const size_t entryWeightOffset = in.take(sums.entryWeight.size() * 4);
  const size_t outOffset = out.take(static_cast<size_t>(tokens * hidden) * 4);
  State::ExpertBlock block = s.planExpertBlock(scratch, experts, count, hidden);
  const size_t quantFirst = in.take(block.first.quant.size() * sizeof(QuantJob));
  const size_t productFirst = in.take(block.first.products.size() * sizeof(ProductJob));
  const size_t quantSecond = in.take(block.second.quant.size() * sizeof(QuantJob));
  const size_t productSecond = in.take(block.second.products.size() * sizeof(ProductJob));
  MOE_RETURN_IF_ERROR(s.input.reserve(in.size));
  MOE_RETURN_IF_ERROR(s.scratch.reserve(scratch.size));
  MOE_RETURN_IF_ERROR(s.output.reserve(out.size));
  MOE_RETURN_IF_ERROR(s.hostInput.reserve(in.size));
  MOE_RETURN_IF_ERROR(s.hostOutput.reserve(out.size));
  s.placeExpertBlock(block);
  s.resolve(block.first, 0);
  s.resolve(block.second, 0);
  auto copyIn = [&](size_t offset, const void *data, size_t bytes) {
    std::memcpy(s.hostInput.at<char>(offset), data, bytes);
  };
  copyIn(xOffset, x, static_cast<size_t>(tokens * hidden) * 4);
  copyIn(rowTokenOffset, sums.rowToken.data(), sums.rowToken.size() * 4);
  copyIn(startsOffset, sums.starts.data(), sums.starts.size() * 4);
  copyIn(entryRowOffset, sums.entryRow.data(), sums.entryRow.size() * 4);
  copyIn(entryWeightOffset, sums.entryWeight.data(), sums.entryWeight.size() * 4);
  copyIn(quantFirst, block.first.quant.data(), block.first.quant.size() * sizeof(QuantJob));
  copyIn(productFirst, block.first.products.data(), block.first.products.size() * sizeof(ProductJob));
  copyIn(quantSecond, block.second.quant.data(), block.second.quant.size() * sizeof(QuantJob));
  copyIn(productSecond, block.second.products.data(), block.second.products.size() * sizeof(ProductJob));
  MOE_RETURN_IF_ERROR(check(cudaEventRecord(s.start, s.stream()), "event"));
  MOE_RETURN_IF_ERROR(
      check(cudaMemcpyAsync(s.input.data, s.hostInput.data, in.size, cudaMemcpyHostToDevice, s.stream()), "copy in"));
  const State::PlanTables placed[2] = {{s.input.at<QuantJob>(quantFirst), s.input.at<ProductJob>(productFirst)},
                                       {s.input.at<QuantJob>(quantSecond), s.input.at<ProductJob>(productSecond)}};
  MOE_RETURN_IF_ERROR(s.launchExpertBlock(block, placed, s.input.at<float>(xOffset),
                                          s.input.at<int32_t>(rowTokenOffset), s.input.at<int32_t>(startsOffset),
                                          s.input.at<int32_t>(entryRowOffset), s.input.at<float>(entryWeightOffset),
                                          tokens, hidden, s.output.at<float>(outOffset)));
  MOE_RETURN_IF_ERROR(check(
      cudaMemcpyAsync(s.hostOutput.data, s.output.data, out.size, cudaMemcpyDeviceToHost, s.stream()), "copy out"));
  MOE_RETURN_IF_ERROR(s.finish());
  std::memcpy(result, s.hostOutput.at<char>(outOffset), static_cast<size_t>(tokens * hidden) * 4);
  return Status::success();
}

Expected<std::shared_ptr<const DeviceWeight>> Context::uploadVector(const float *values, int64_t count) {
  return upload(WeightLayout::F32, {}, false, 1, count, values, static_cast<size_t>(count) * 4);
}

std::shared_ptr<DecodeGraph> Context::newDecodeGraph() { return std::make_shared<DecodeGraph>(); }

std::shared_ptr<KvMirror> Context::newKvMirror(int64_t layers) {
  auto mirror = std::make_shared<KvMirror>();
  mirror->layers.resize(static_cast<size_t>(layers));
  return mirror;
}

Status Context::decodeBegin(const float *x, int64_t hidden, int64_t tokens, bool layersStay) {
  if (hidden <= 0 || tokens <= 0)
    return Status::error("CUDA decode: hidden size ", hidden, " over ", tokens, " tokens");
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  // A step ends with decodeEnd or decodeDiscard, each after a wait: a rows
  // slot still to copy means neither came, and its host rows would be lost.
  if (!s.rowCopies.empty())
    return Status::error("CUDA decode: a step began before the last one ended or was discarded");
  // The arena is empty only after a wait (waitAndReset, decodeDiscard), so
  // no copy in flight reads or writes it then; work still in flight (a
  // step's launches after its last wait) is ordered before this step's on
  // the stream, and the buffers grown below are freed with cudaFree, which
  // waits for the device. Only staging left in the arena needs the wait.
  if (s.arenaUsed > 0 || !s.pending.empty())
    MOE_RETURN_IF_ERROR(s.waitAndReset());
  s.rowsUsed = 0;
  // Staging between two waits: the tokens, job tables, a token's key and
  // value rows (a layer's hand-back and the logits have their own buffers).
  MOE_RETURN_IF_ERROR(
      s.arena.reserve(std::max<size_t>(size_t(16) << 20, static_cast<size_t>(tokens * hidden) * 4 + (8 << 20))));
  s.hidden = hidden;
  s.tokens = tokens;
  s.launchDeferred(false); // (none: the last step ended with a wait)
  s.deferring = layersStay && tokens == 1 && s.graphs && s.tokenGraphs;
  s.ropePosition = -1;
  s.routerLogitsOffset = -1;
  for (Buffer *buffer : {&s.x, &s.handover, &s.branch})
    MOE_RETURN_IF_ERROR(buffer->reserve(static_cast<size_t>(tokens * hidden) * 4));
  if (s.routedCalls.data)
    MOE_RETURN_IF_ERROR(check(cudaMemsetAsync(s.routedCalls.data, 0, 8, s.stream()), "memset"));
  return s.stage(s.x.data, x, static_cast<size_t>(tokens * hidden) * 4);
}

Status Context::decodeSyncCache(KvMirror &mirror, int64_t layerIndex, const float *keys, const float *values,
                                int64_t rows, int64_t keyWidth, int64_t valueWidth, int64_t room) {
  if (layerIndex < 0 || layerIndex >= static_cast<int64_t>(mirror.layers.size()))
    return Status::error("CUDA decode: no layer ", layerIndex, " in the KV mirror");
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  KvMirror::Layer &layer = mirror.layers[static_cast<size_t>(layerIndex)];
  if (layer.capacity > 0 && (layer.keyWidth != keyWidth || layer.valueWidth != valueWidth))
    return Status::error("CUDA decode: the KV cache's widths changed");
  if (layer.rows > rows)
    layer.rows = 0; // Not this cache's rows: upload them again.
  if (rows + room > layer.capacity) {
    // Grow by doubling, keeping the rows already there.
    const int64_t capacity = std::max<int64_t>(rows + room, std::max<int64_t>(256, 2 * layer.capacity));
    float *newKeys = nullptr, *newValues = nullptr;
    if (cudaMalloc(&newKeys, static_cast<size_t>(capacity * keyWidth) * 4) != cudaSuccess ||
        cudaMalloc(&newValues, static_cast<size_t>(capacity * valueWidth) * 4) != cudaSuccess) {
      cudaGetLastError();
      cudaFree(newKeys);
      return Status::error("CUDA out of memory for a KV cache of ", capacity, " positions");
    }
    MOE_RETURN_IF_ERROR(s.waitAndReset());
    // On the context's stream, which the legacy stream's copies would not
    // be ordered with; the old buffers are freed only once they are done.
    if (layer.rows > 0) {
      MOE_RETURN_IF_ERROR(check(cudaMemcpyAsync(newKeys, layer.keys, static_cast<size_t>(layer.rows * keyWidth) * 4,
                                                cudaMemcpyDeviceToDevice, s.stream()),
                                "KV copy"));
      MOE_RETURN_IF_ERROR(
          check(cudaMemcpyAsync(newValues, layer.values, static_cast<size_t>(layer.rows * valueWidth) * 4,
                                cudaMemcpyDeviceToDevice, s.stream()),
                "KV copy"));
      MOE_RETURN_IF_ERROR(s.waitAndReset());
    }
    cudaFree(layer.keys);
    cudaFree(layer.values);
    layer.keys = newKeys;
    layer.values = newValues;
    layer.capacity = capacity;
    layer.keyWidth = keyWidth;
    layer.valueWidth = valueWidth;
  }
  if (layer.rows < rows) {
    // Rows the host wrote (a prefill on the host): copied once.
    MOE_RETURN_IF_ERROR(s.waitAndReset());
    MOE_RETURN_IF_ERROR(check(cudaMemcpyAsync(layer.keys + layer.rows * keyWidth, keys + layer.rows * keyWidth,
                                              static_cast<size_t>((rows - layer.rows) * keyWidth) * 4,
                                              cudaMemcpyHostToDevice, s.stream()),
                              "KV upload"));
    MOE_RETURN_IF_ERROR(check(cudaMemcpyAsync(layer.values + layer.rows * valueWidth, values + layer.rows * valueWidth,
                                              static_cast<size_t>((rows - layer.rows) * valueWidth) * 4,
                                              cudaMemcpyHostToDevice, s.stream()),
                              "KV upload"));
    MOE_RETURN_IF_ERROR(s.waitAndReset());
    layer.rows = rows;
  }
  return Status::success();
}

Status Context::decodeAttention(const DecodeAttention &a, KvMirror &mirror, int64_t layerIndex, int64_t position,
                                float *mlpInput, float *keyRow, float *valueRow, float *routerLogits,
                                DecodeGraph *graph) {
  const bool mla = a.latent;
  if (!a.output || !a.attentionNorm || !a.mlpNorm || (!mla && (!a.query || !a.key || !a.value)) ||
      (mla && ((!a.query && !(a.queryDown && a.queryUp && a.queryDownNorm)) || !a.kvDown || !a.kvUp || !a.kvDownNorm)))
    return Status::error("CUDA decode: a layer without its attention weights on the device");
  if (!mlpInput && routerLogits)
    return Status::error("CUDA decode: router logits for the host without the MLP input");
  // Without mlpInput the MLP stays on the device: the router's logits too.
  const bool handBack = mlpInput != nullptr, router = a.router && (routerLogits || !handBack);
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  const int64_t H = s.hidden, T = s.tokens;
  const int64_t qWidth = static_cast<int64_t>(a.heads) * a.headDim,
                kWidth = static_cast<int64_t>(a.kvHeads) * a.headDim,
                vWidth = static_cast<int64_t>(a.kvHeads) * a.valueDim,
                attendedWidth = static_cast<int64_t>(a.heads) * a.valueDim;
  KvMirror::Layer &cache = mirror.layers[static_cast<size_t>(layerIndex)];
  const bool projectionsFit =
      mla ? a.kvHeads == a.heads && a.nopeDim + a.ropeDim == a.headDim && 2 * a.ropeHalf <= a.ropeDim &&
                (a.query
                     ? a.query->cols == H && a.query->rows == qWidth
                     : a.queryDown->cols == H && a.queryUp->cols == a.queryDown->rows && a.queryUp->rows == qWidth) &&
                a.kvDown->cols == H && a.kvDown->rows == a.kvLora + a.ropeDim && a.kvUp->cols == a.kvLora &&
                a.kvUp->rows == static_cast<int64_t>(a.heads) * (a.nopeDim + a.valueDim)
          : a.query->cols == H && a.query->rows == qWidth && a.key->rows == kWidth && a.value->rows == vWidth;
  if (!projectionsFit || a.output->cols != attendedWidth || a.output->rows != H || cache.keyWidth != kWidth ||
      cache.valueWidth != vWidth || cache.rows != position || position + T > cache.capacity ||
      (routerLogits && !a.router) || (router && a.router->cols != H) || a.valueDim > 1024)
    return Status::error("CUDA decode: layer ", layerIndex, "'s attention shapes or KV cache do not fit");
  const int64_t routerRows = router ? a.router->rows : 0;
  // `handover`: the tokens' MLP inputs [T, H], new keys [T, kWidth] and
  // values [T, vWidth] and router logits [T, routerRows], so that one copy
  // hands them all to the host.
  const size_t kOffset = alignUp(static_cast<size_t>(T * H) * 4, 256);
  const size_t vOffset = kOffset + alignUp(static_cast<size_t>(T * kWidth) * 4, 256);
  const size_t rOffset = vOffset + alignUp(static_cast<size_t>(T * vWidth) * 4, 256);
  const size_t handoverBytes = rOffset + static_cast<size_t>(T * routerRows) * 4;
  MOE_RETURN_IF_ERROR(s.q.reserve(static_cast<size_t>(T * qWidth) * 4));
  MOE_RETURN_IF_ERROR(s.handover.reserve(handoverBytes));
  MOE_RETURN_IF_ERROR(s.attended.reserve(static_cast<size_t>(T * attendedWidth) * 4));
  // Scores of every head (of every token) over the cache's capacity: one
  // stride for all of this cache's positions (a graph captured at one
  // replays at the next).
  MOE_RETURN_IF_ERROR(s.scores.reserve(static_cast<size_t>(T * a.heads * cache.capacity) * 4));
  // Blocks a head (attendKernel): about two per multiprocessor over the
  // step's blocks of heads (a block takes headsAtOnce query heads of one
  // KV head), or as set for one token (a prompt's chunk has heads enough,
  // and its slots would be many); no more than the cache's capacity can
  // ever use.
  const int headsAtOnce = headsABlock(a.heads / a.kvHeads);
  const int64_t headBlocks = T * (a.heads / headsAtOnce);
  const int64_t wantedSplits = s.attentionSplits > 0 && T == 1
                                   ? s.attentionSplits
                                   : (2 * static_cast<int64_t>(s.facts.multiprocessors) + headBlocks - 1) / headBlocks;
  const int splits = static_cast<int>(
      std::clamp<int64_t>(std::min<int64_t>(wantedSplits, (cache.capacity + kSplitPositions - 1) / kSplitPositions), 1,
                          kMaxAttentionSplits));
  AttentionSplit split{};
  if (splits > 1) {
    split.slotFloats = 4 + static_cast<int64_t>(alignUp(static_cast<size_t>(a.valueDim), 4));
    MOE_RETURN_IF_ERROR(s.splitSlots.reserve(static_cast<size_t>(T * a.heads * splits * split.slotFloats) * 4));
    const size_t countBytes = static_cast<size_t>(T * a.heads) * 4;
    if (countBytes > s.splitCounts.capacity) {
      MOE_RETURN_IF_ERROR(s.splitCounts.reserve(countBytes));
      // Every count the buffer holds, zero (or no buffer: the next call
      // tries again).
      if (const cudaError_t error = cudaMemsetAsync(s.splitCounts.data, 0, s.splitCounts.capacity, s.stream());
          error != cudaSuccess) {
        s.splitCounts.release();
        return check(error, "zero attention counts");
      }
    }
    split.arrived = s.splitCounts.at<unsigned>(0);
    split.slots = s.splitSlots.at<float>(0);
  }
  // `rope`: the position, then the RoPE angles from kAnglesAt (below).
  constexpr size_t kAnglesAt = 256;
  MOE_RETURN_IF_ERROR(s.rope.reserve(kAnglesAt + static_cast<size_t>(2 * T * std::max(a.ropeHalf, 1)) * 4));
  float *x = s.x.at<float>(0), *normed = s.normedPointer(), *q = s.q.at<float>(0), *k = s.handover.at<float>(kOffset),
        *v = s.handover.at<float>(vOffset), *attended = s.attended.at<float>(0), *branch = s.branch.at<float>(0);
  // Where the MLP stays on the device, the new key and value rows go to
  // this layer's slot of `rows`, which the token's last wait hands to the
  // host with one copy for every layer (decodeEnd); the slots are taken in
  // layer order, so a layer's slot is the same from token to token.
  size_t rowSlot = 0;
  const size_t keyBytes = alignUp(static_cast<size_t>(T * kWidth) * 4, 256),
               slotBytes = keyBytes + alignUp(static_cast<size_t>(T * vWidth) * 4, 256);
  if (!handBack) {
    if (s.rowsUsed + slotBytes > s.rows.capacity) {
      // Room for every layer's slot (a slot each for the mirror's layers, or
      // twice what was there). Growing frees the buffer (cudaFree waits for
      // the device): the slots taken so far go to the host first.
      MOE_RETURN_IF_ERROR(s.flushRows());
      MOE_RETURN_IF_ERROR(s.rows.reserve(std::max(mirror.layers.size() * slotBytes, 2 * s.rows.capacity)));
    }
    rowSlot = s.rowsUsed;
    k = s.rows.at<float>(rowSlot);
    v = s.rows.at<float>(rowSlot + keyBytes);
  }
  // MLA's intermediates: the query's and the keys' low-rank columns (the
  // latter with the shared rope columns after them), and kvUp's output.
  const int64_t queryRank = mla && !a.query ? a.queryDown->rows : 0, kvColumns = a.kvLora + a.ropeDim;
  const size_t kvcOffset = alignUp(static_cast<size_t>(T * queryRank) * 4, 256);
  const size_t expandedOffset = kvcOffset + alignUp(static_cast<size_t>(T * kvColumns) * 4, 256);
  if (mla)
    MOE_RETURN_IF_ERROR(s.latent.reserve(expandedOffset + static_cast<size_t>(T * a.heads) *
                                                              static_cast<size_t>(a.nopeDim + a.valueDim) * 4));
  const double eps = a.eps;
  // What every layer of a step reads from device memory, in one copy once
  // per step: the position, then the RoPE angles ([T, half] cosines, then
  // sines) from kAnglesAt.
  if (s.ropePosition != position || s.ropeHalfStaged != a.ropeHalf || s.ropeStagedAt != s.rope.data) {
    std::vector<char> staged(kAnglesAt + static_cast<size_t>(2 * T * a.ropeHalf) * 4);
    std::memcpy(staged.data(), &position, sizeof position);
    if (a.ropeHalf > 0) {
      std::memcpy(staged.data() + kAnglesAt, a.cos, static_cast<size_t>(T * a.ropeHalf) * 4);
      std::memcpy(staged.data() + kAnglesAt + static_cast<size_t>(T * a.ropeHalf) * 4, a.sin,
                  static_cast<size_t>(T * a.ropeHalf) * 4);
    }
    MOE_RETURN_IF_ERROR(s.stage(s.rope.data, staged.data(), staged.size()));
    s.ropePosition = position;
    s.ropeHalfStaged = a.ropeHalf;
    s.ropeStagedAt = s.rope.data;
  }
  const float *cos = s.rope.at<float>(kAnglesAt),
              *sin = s.rope.at<float>(kAnglesAt + static_cast<size_t>(T * a.ropeHalf) * 4);
  const int64_t *devicePosition = s.rope.at<int64_t>(0);
  // A layer whose MLP stays on the device runs as a graph of its launches
  // (each reads the position from device memory), captured at its second
  // token and replayed while everything it was captured with holds
  // (`key`): no plans, tables or dozen launches on the host.
  bool graphed = graph && T == 1 && !handBack && s.graphs && !graph->failed && graph->uses++ > 0;
  std::vector<uintptr_t> key;
  // The scratch areas' base, first: planning below may move it.
  constexpr size_t kScratchKey = 0;
  if (graphed) {
    key.push_back(reinterpret_cast<uintptr_t>(s.scratch.data));
    for (const void *p : {static_cast<const void *>(x),
                          static_cast<const void *>(s.handover.data),
                          static_cast<const void *>(q),
                          static_cast<const void *>(attended),
                          static_cast<const void *>(branch),
                          static_cast<const void *>(s.scores.data),
                          static_cast<const void *>(split.slots),
                          static_cast<const void *>(split.arrived),
                          static_cast<const void *>(s.rope.data),
                          static_cast<const void *>(devicePosition),
                          static_cast<const void *>(cache.keys),
                          static_cast<const void *>(cache.values),
                          static_cast<const void *>(a.attentionNorm),
                          static_cast<const void *>(a.attentionNormBias),
                          static_cast<const void *>(a.mlpNorm),
                          static_cast<const void *>(a.mlpNormBias),
                          static_cast<const void *>(a.queryBias),
                          static_cast<const void *>(a.keyBias),
                          static_cast<const void *>(a.valueBias),
                          static_cast<const void *>(a.outputBias),
                          static_cast<const void *>(a.queryNorm),
                          static_cast<const void *>(a.keyNorm),
                          static_cast<const void *>(k),
                          static_cast<const void *>(v),
                          static_cast<const void *>(s.latent.data),
                          static_cast<const void *>(a.queryDownNorm),
                          static_cast<const void *>(a.kvDownNorm)})
      key.push_back(reinterpret_cast<uintptr_t>(p));
    for (const DeviceWeight *w :
         {a.query, a.key, a.value, a.output, a.router, a.queryDown, a.queryUp, a.kvDown, a.kvUp})
      appendWeightKey(key, w);
    for (int64_t value : {H, cache.capacity, routerRows, static_cast<int64_t>(splits)})
      key.push_back(static_cast<uintptr_t>(value));
    key.push_back(s.launchKey());
  }
  bool replayed = false;
  if (graphed && graph->exec && graph->key == key) {
    replayed = s.replay(*graph);
    graphed = replayed; // a failed launch gives the graph up: plain launches below
  }
  if (!replayed) {
    float *qc = s.latent.at<float>(0), *kvc = s.latent.at<float>(kvcOffset),
          *expanded = s.latent.at<float>(expandedOffset);
    // The layer's plans (the projections from the normed input; for MLA the
    // up-projections of the normed low-rank columns; the output projection;
    // the router), their tables in one transfer, scratch areas apart.
    State::Plan projections, expansions, output, routing;
    Layout scratchLayout;
    if (!mla) {
      s.addProduct(projections, scratchLayout, *a.query, normed, H, T, q, qWidth);
      s.addProduct(projections, scratchLayout, *a.key, normed, H, T, k, kWidth);
      s.addProduct(projections, scratchLayout, *a.value, normed, H, T, v, vWidth);
    } else {
      if (a.query)
        s.addProduct(projections, scratchLayout, *a.query, normed, H, T, q, qWidth);
      else
        s.addProduct(projections, scratchLayout, *a.queryDown, normed, H, T, qc, queryRank);
      s.addProduct(projections, scratchLayout, *a.kvDown, normed, H, T, kvc, kvColumns);
      // The up-projections read the low-rank columns of each token (kvc's
      // rows hold the shared rope columns after them).
      if (!a.query)
        s.addProduct(expansions, scratchLayout, *a.queryUp, qc, queryRank, T, q, qWidth);
      s.addProduct(expansions, scratchLayout, *a.kvUp, kvc, kvColumns, T, expanded,
                   static_cast<int64_t>(a.heads) * (a.nopeDim + a.valueDim));
    }
    s.addProduct(output, scratchLayout, *a.output, attended, attendedWidth, T, branch, H);
    if (router)
      s.addProduct(routing, scratchLayout, *a.router, normed, H, T, s.handover.at<float>(rOffset), routerRows);
    // A graph's scratch must not move after its capture: the key holds it.
    MOE_RETURN_IF_ERROR(s.scratch.reserve(std::max<size_t>(scratchLayout.size, 256)));
    if (graphed)
      key[kScratchKey] = reinterpret_cast<uintptr_t>(s.scratch.data);
    State::Plan *plans[] = {&projections, &output, &routing, &expansions};
    State::PlanTables placed[4];
    MOE_RETURN_IF_ERROR(s.stageTables(plans,
                                      mla      ? 4
                                      : router ? 3
                                               : 2,
                                      placed, nullptr, 0, nullptr, graphed ? graph : nullptr));
    auto launches = [&]() -> Status {
      const unsigned tokens = static_cast<unsigned>(T);
      // The norm rounds its rows for the projections too (every rounding
      // of theirs reads them).
      const State::Rounding ofNormed = State::roundingOf(projections, placed[0], normed, H, T);
      launchKernel(normKernel, tokens, 1024, s.on(), x, normed, H, H, a.attentionNorm, a.attentionNormBias, eps,
                   a.layerNorm, ofNormed.jobs, ofNormed.count);
      MOE_RETURN_IF_ERROR(s.launchAfterRounding(projections, placed[0], ofNormed.count));
      if (mla) {
        // As the CPU engine's latentAttention: the low-rank columns' norms,
        // the up-projections, RoPE on each query head's rope columns and on
        // the shared ones, then full keys and values.
        // Each norm rounds its columns for its up-projection (without a
        // query low rank, qc is empty and lies where kvc does).
        const State::Rounding ofQuery = a.query ? State::Rounding{}
                                                : State::roundingOf(expansions, placed[3], qc, queryRank, T),
                              ofKv = State::roundingOf(expansions, placed[3], kvc, kvColumns, T);
        if (!a.query)
          launchKernel(normKernel, tokens, 1024, s.on(), qc, qc, queryRank, queryRank, a.queryDownNorm, nullptr, eps, 0,
                       ofQuery.jobs, ofQuery.count);
        launchKernel(normKernel, tokens, 1024, s.on(), kvc, kvc, a.kvLora, kvColumns, a.kvDownNorm, nullptr, eps, 0,
                     ofKv.jobs, ofKv.count);
        MOE_RETURN_IF_ERROR(s.launchAfterRounding(expansions, placed[3], ofQuery.count + ofKv.count));
        if (a.ropeHalf > 0) {
          launchKernel(ropeKernel, dim3(a.heads, tokens), 64, s.on(), q + a.nopeDim, qWidth, a.headDim, a.ropeHalf,
                       a.ropeInterleaved, cos, sin);
          launchKernel(ropeKernel, dim3(1, tokens), 64, s.on(), kvc + a.kvLora, kvColumns, a.ropeDim, a.ropeHalf,
                       a.ropeInterleaved, cos, sin);
        }
        launchKernel(latentKeysKernel, dim3(a.heads, tokens), 128, s.on(), expanded, kvc + a.kvLora, kvColumns, a.heads,
                     a.nopeDim, a.ropeDim, a.valueDim, k, v, cache.keys, cache.values, devicePosition);
      } else {
        // As the CPU engine: biases, then qk-norm, then the clamp, then
        // RoPE; then k and v into the cache. One launch.
        Epilogue e{};
        e.y[0] = q;
        e.y[1] = k;
        e.y[2] = v;
        e.bias[0] = a.queryBias;
        e.bias[1] = a.keyBias;
        e.bias[2] = a.valueBias;
        e.norm[0] = a.queryNorm;
        e.norm[1] = a.keyNorm;
        e.cache[1] = cache.keys;
        e.cache[2] = cache.values;
        e.position = devicePosition;
        e.width[0] = qWidth;
        e.width[1] = kWidth;
        e.width[2] = vWidth;
        e.heads[0] = a.heads;
        e.heads[1] = a.kvHeads;
        e.heads[2] = a.kvHeads;
        e.headDim = a.headDim;
        e.qkNorm = a.qkNorm;
        e.eps = a.eps;
        e.clip = a.clip;
        e.ropeHalf = a.ropeHalf;
        e.interleaved = a.ropeInterleaved;
        e.cos = cos;
        e.sin = sin;
        launchKernel(epilogueKernel, dim3(3, tokens), 1024, s.on(), e);
      }
      // Attention rounds each head's values for the output projection too.
      const State::Rounding ofAttended = State::roundingOf(output, placed[1], attended, attendedWidth, T, a.valueDim);
      auto *attend = headsAtOnce == 1   ? attendKernel<1>
                     : headsAtOnce == 2 ? attendKernel<2>
                     : headsAtOnce == 4 ? attendKernel<4>
                                        : attendKernel<8>;
      launchKernel(attend, dim3(a.heads / headsAtOnce, tokens, splits), 256, s.on(), q, cache.keys, cache.values,
                   devicePosition, a.heads / a.kvHeads, a.headDim, a.valueDim, kWidth, vWidth, a.softmaxScale,
                   s.scores.at<float>(0), cache.capacity, attended, split, ofAttended.jobs, ofAttended.count);
      MOE_RETURN_IF_ERROR(s.launchAfterRounding(output, placed[1], ofAttended.count));
      launchKernel(addNormKernel, tokens, 1024, s.on(), x, branch, a.outputBias, H, normed, a.mlpNorm, a.mlpNormBias,
                   eps, a.layerNorm);
      if (router)
        MOE_RETURN_IF_ERROR(s.launch(routing, placed[2]));
      return check(cudaGetLastError(), "decode launch");
    };
    if (graphed)
      MOE_RETURN_IF_ERROR(s.captureAndLaunch(*graph, std::move(key), launches));
    else
      MOE_RETURN_IF_ERROR(launches());
  }
  cache.rows = position + T;
  MOE_RETURN_IF_ERROR(check(cudaGetLastError(), "decode launch"));
  if (!handBack) {
    // The MLP runs on the device next; the host's cache rows come at the
    // token's last wait, from the layer's slot of `rows`.
    s.routerLogitsOffset = router ? static_cast<int64_t>(rOffset) : -1;
    s.routerLogitsRows = routerRows;
    s.rowCopies.push_back({keyRow, rowSlot, static_cast<size_t>(T * kWidth) * 4});
    s.rowCopies.push_back({valueRow, rowSlot + keyBytes, static_cast<size_t>(T * vWidth) * 4});
    s.rowsUsed = rowSlot + slotBytes;
    return Status::success();
  }
  s.routerLogitsOffset = -1;
  // The host's share: the MLP input (routing) and the new cache rows, in a
  // pinned buffer of their own (sized by the step; the copy is waited for
  // here, so nothing is in flight to it when it grows).
  MOE_RETURN_IF_ERROR(s.hostHandover.reserve(handoverBytes));
  char *host = s.hostHandover.at<char>(0);
  MOE_RETURN_IF_ERROR(
      check(cudaMemcpyAsync(host, s.handover.data, handoverBytes, cudaMemcpyDeviceToHost, s.stream()), "copy out"));
  MOE_RETURN_IF_ERROR(s.waitAndReset());
  std::memcpy(mlpInput, host, static_cast<size_t>(T * H) * 4);
  std::memcpy(keyRow, host + kOffset, static_cast<size_t>(T * kWidth) * 4);
  std::memcpy(valueRow, host + vOffset, static_cast<size_t>(T * vWidth) * 4);
  if (routerLogits)
    std::memcpy(routerLogits, host + rOffset, static_cast<size_t>(T * routerRows) * 4);
  return Status::success();
}

Status Context::decodeExperts(const ExpertProduct *expertArray, size_t count, DecodeGraph *graph) {
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  const int64_t hidden = s.hidden;
  if (count == 0)
    return Status::success();
  // With `graph` (the same experts and weights every token: a dense MLP),
  // the launches run as a graph from the second token on, as a layer's
  // attention does.
  bool graphed = graph && s.tokens == 1 && s.graphs && !graph->failed && graph->uses++ > 0;
  std::vector<uintptr_t> key;
  constexpr size_t kScratchKey = 0;
  if (graphed) {
    key.push_back(reinterpret_cast<uintptr_t>(s.scratch.data));
    key.push_back(reinterpret_cast<uintptr_t>(s.normedPointer()));
    key.push_back(reinterpret_cast<uintptr_t>(s.x.data));
    key.push_back(static_cast<uintptr_t>(hidden));
    key.push_back(s.launchKey());
    for (size_t i = 0; i < count; ++i) {
      const ExpertProduct &e = expertArray[i];
      for (const DeviceWeight *w : {e.gate, e.up, e.down})
        appendWeightKey(key, w);
      uint32_t weightBits = 0;
      std::memcpy(&weightBits, &e.weight, sizeof weightBits);
      key.push_back(weightBits);
    }
    if (graph->exec && graph->key == key) {
      if (s.replay(*graph))
        return Status::success();
      graphed = false; // given up: plain launches below
    }
  }
  std::vector<int64_t> offsets{0};
  for (size_t i = 0; i < count; ++i) {
    const ExpertProduct &e = expertArray[i];
    if (!expertFits(e.gate, e.up, e.down, hidden))
      return Status::error("CUDA decode: an expert's gate, up and down do not fit a hidden size of ", hidden);
    offsets.push_back(offsets.back() + e.gate->rows);
  }
  const int64_t width = offsets.back();
  Layout scratchLayout;
  const size_t gateOffset = scratchLayout.take(static_cast<size_t>(width) * 4);
  const size_t upOffset = scratchLayout.take(static_cast<size_t>(width) * 4);
  const size_t hOffset = scratchLayout.take(static_cast<size_t>(width) * 4);
  const size_t partsOffset = scratchLayout.take(static_cast<size_t>(count) * hidden * 4);
  // Outputs and the down projections' inputs are scratch offsets until
  // scratch is sized for every quantized area too.
  auto offset = [](size_t value) { return reinterpret_cast<float *>(value); };
  State::Plan first, second;
  const float *normed = s.normedPointer();
  for (size_t i = 0; i < count; ++i) {
    s.addProduct(first, scratchLayout, *expertArray[i].gate, normed, hidden, 1, offset(gateOffset + offsets[i] * 4),
                 expertArray[i].gate->rows);
    s.addProduct(first, scratchLayout, *expertArray[i].up, normed, hidden, 1, offset(upOffset + offsets[i] * 4),
                 expertArray[i].up->rows);
  }
  for (size_t i = 0; i < count; ++i)
    s.addProduct(second, scratchLayout, *expertArray[i].down, offset(hOffset + offsets[i] * 4),
                 expertArray[i].down->cols, 1, offset(partsOffset + i * hidden * 4), hidden);
  // SwiGLU in the down products' rounding (QuantJob::up): each expert's
  // rounding of h computes it from gate and up, and a down over floats
  // gets a job that writes its slice of h, so no launch of its own.
  for (size_t i = 0; i < count; ++i) {
    const int64_t w = offsets[i + 1] - offsets[i];
    float *gate = offset(gateOffset + offsets[i] * 4), *up = offset(upOffset + offsets[i] * 4),
          *h = offset(hOffset + offsets[i] * 4);
    if (expertArray[i].down->layout == WeightLayout::Group) {
      for (QuantJob &job : second.quant)
        if (job.x == h) {
          job.x = gate;
          job.up = up;
        }
      continue;
    }
    QuantJob job{};
    job.x = gate;
    job.up = up;
    job.h = h;
    job.ldx = job.cols = w;
    job.group = kSwigluChunk;
    job.groups = (w + kSwigluChunk - 1) / kSwigluChunk;
    job.tokens = 1;
    job.first = second.quantWarps;
    second.quantWarps += job.groups;
    second.quant.push_back(job);
  }
  MOE_RETURN_IF_ERROR(s.scratch.reserve(scratchLayout.size));
  for (ProductJob &job : first.products)
    job.y = s.scratch.at<float>(reinterpret_cast<size_t>(job.y));
  for (ProductJob &job : second.products) {
    job.x = s.scratch.at<float>(reinterpret_cast<size_t>(job.x));
    job.y = s.scratch.at<float>(reinterpret_cast<size_t>(job.y));
  }
  for (QuantJob &job : second.quant) {
    job.x = s.scratch.at<float>(reinterpret_cast<size_t>(job.x));
    job.up = s.scratch.at<float>(reinterpret_cast<size_t>(job.up));
    if (job.h)
      job.h = s.scratch.at<float>(reinterpret_cast<size_t>(job.h));
  }
  std::vector<float> weights(count);
  for (size_t i = 0; i < count; ++i)
    weights[i] = expertArray[i].weight;
  if (graphed)
    key[kScratchKey] = reinterpret_cast<uintptr_t>(s.scratch.data);
  // Both plans' tables and the weights in one transfer (into the graph's
  // own tables when graphed).
  State::Plan *plans[] = {&first, &second};
  State::PlanTables placed[2];
  void *deviceWeights = nullptr;
  MOE_RETURN_IF_ERROR(
      s.stageTables(plans, 2, placed, weights.data(), count * 4, &deviceWeights, graphed ? graph : nullptr));
  auto launches = [&]() -> Status {
    MOE_RETURN_IF_ERROR(s.launch(first, placed[0]));
    MOE_RETURN_IF_ERROR(s.launch(second, placed[1])); // SwiGLU, its rounding, down
    launchKernel(combineKernel, blocksFor(hidden, 256), 256, s.on(), s.scratch.at<float>(partsOffset),
                 static_cast<const float *>(deviceWeights), static_cast<int>(count), hidden, s.x.at<float>(0), true,
                 nullptr);
    return check(cudaGetLastError(), "decode experts launch");
  };
  return graphed ? s.captureAndLaunch(*graph, std::move(key), launches) : launches();
}

Status Context::decodeAddBranch(const float *branch) {
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  const int64_t count = s.tokens * s.hidden;
  MOE_RETURN_IF_ERROR(s.stage(s.branch.data, branch, static_cast<size_t>(count) * 4));
  launchKernel(addKernel, blocksFor(count, 256), 256, s.on(), s.x.at<float>(0), s.branch.at<float>(0), count);
  return check(cudaGetLastError(), "decode launch");
}

Status Context::decodeRoutedExperts(const RoutedExpertTokens *experts, size_t count) {
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  const int64_t hidden = s.hidden, tokens = s.tokens;
  MOE_RETURN_IF_ERROR(checkRoutedExperts(experts, count, tokens, hidden, "CUDA decode"));
  const BlockSums sums = blockSumsOf(experts, count, tokens);
  if (sums.rowToken.empty())
    return Status::success(); // x += 0
  Layout scratchLayout;
  State::ExpertBlock block = s.planExpertBlock(scratchLayout, experts, count, hidden);
  MOE_RETURN_IF_ERROR(s.scratch.reserve(scratchLayout.size));
  s.placeExpertBlock(block);
  // The BlockSums arrays travel with the job tables (stageTables resolves
  // the plans).
  Layout extraLayout;
  const size_t rowTokenAt = extraLayout.take(sums.rowToken.size() * 4);
  const size_t startsAt = extraLayout.take(sums.starts.size() * 4);
  const size_t entryRowAt = extraLayout.take(sums.entryRow.size() * 4);
  const size_t entryWeightAt = extraLayout.take(sums.entryWeight.size() * 4);
  std::vector<char> extra(extraLayout.size);
  std::memcpy(extra.data() + rowTokenAt, sums.rowToken.data(), sums.rowToken.size() * 4);
  std::memcpy(extra.data() + startsAt, sums.starts.data(), sums.starts.size() * 4);
  std::memcpy(extra.data() + entryRowAt, sums.entryRow.data(), sums.entryRow.size() * 4);
  std::memcpy(extra.data() + entryWeightAt, sums.entryWeight.data(), sums.entryWeight.size() * 4);
  State::Plan *plans[] = {&block.first, &block.second};
  State::PlanTables placed[2];
  void *deviceExtra = nullptr;
  MOE_RETURN_IF_ERROR(s.stageTables(plans, 2, placed, extra.data(), extra.size(), &deviceExtra));
  const char *tables = static_cast<const char *>(deviceExtra);
  // The block's output into `branch`, then onto the residual stream (the
  // engine: branch, then x += branch).
  MOE_RETURN_IF_ERROR(s.launchExpertBlock(
      block, placed, s.normedPointer(), reinterpret_cast<const int32_t *>(tables + rowTokenAt),
      reinterpret_cast<const int32_t *>(tables + startsAt), reinterpret_cast<const int32_t *>(tables + entryRowAt),
      reinterpret_cast<const float *>(tables + entryWeightAt), tokens, hidden, s.branch.at<float>(0)));
  launchKernel(addKernel, blocksFor(tokens * hidden, 256), 256, s.on(), s.x.at<float>(0), s.branch.at<float>(0),
               tokens * hidden);
  return check(cudaGetLastError(), "decode routed experts launch");
}

Status Context::decodeEnd(const float *norm, const float *normBias, bool layerNorm, float eps, const DeviceWeight &head,
                          const float *headBias, float *logits, int64_t *expertCalls, int64_t rows,
                          DecodeGraph *graph) {
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  if (head.cols != s.hidden)
    return Status::error("CUDA decode: an output projection of ", head.cols, " columns for a hidden size of ",
                         s.hidden);
  if (rows < 1 || rows > s.tokens)
    return Status::error("CUDA decode: logits of ", rows, " rows of a step of ", s.tokens, " tokens");
  // The last `rows` tokens' logits.
  const int64_t V = head.rows, H = s.hidden, first = s.tokens - rows;
  MOE_RETURN_IF_ERROR(s.logits.reserve(static_cast<size_t>(rows * V) * 4));
  // One token's final norm, output projection and bias run as a graph, as a
  // layer's attention does (captured at the second token, replayed while
  // its key holds).
  bool graphed = graph && s.graphs && s.tokens == 1 && !graph->failed && graph->uses++ > 0;
  std::vector<uintptr_t> key;
  constexpr size_t kScratchKey = 0;
  if (graphed) {
    key.push_back(reinterpret_cast<uintptr_t>(s.scratch.data));
    for (const void *p : {static_cast<const void *>(s.x.data), static_cast<const void *>(s.normedPointer()),
                          static_cast<const void *>(s.logits.data), static_cast<const void *>(norm),
                          static_cast<const void *>(normBias), static_cast<const void *>(headBias)})
      key.push_back(reinterpret_cast<uintptr_t>(p));
    appendWeightKey(key, &head);
    for (int64_t value : {H, V, static_cast<int64_t>(layerNorm)})
      key.push_back(static_cast<uintptr_t>(value));
    key.push_back(s.launchKey());
    uint32_t epsBits = 0;
    std::memcpy(&epsBits, &eps, sizeof epsBits);
    key.push_back(epsBits);
  }
  bool replayed = false;
  if (graphed && graph->exec && graph->key == key) {
    replayed = s.replay(*graph);
    graphed = replayed; // a failed launch gives the graph up: plain launches below
  }
  if (!replayed) {
    State::Plan plan;
    Layout scratchLayout;
    s.addProduct(plan, scratchLayout, head, s.normedPointer(), H, rows, s.logits.at<float>(0), V);
    MOE_RETURN_IF_ERROR(s.scratch.reserve(std::max<size_t>(scratchLayout.size, 256)));
    if (graphed)
      key[kScratchKey] = reinterpret_cast<uintptr_t>(s.scratch.data);
    State::Plan *plans[] = {&plan};
    State::PlanTables placed;
    MOE_RETURN_IF_ERROR(s.stageTables(plans, 1, &placed, nullptr, 0, nullptr, graphed ? graph : nullptr));
    auto launches = [&]() -> Status {
      const State::Rounding ofNormed = State::roundingOf(plan, placed, s.normedPointer(), H, rows);
      launchKernel(normKernel, static_cast<unsigned>(rows), 1024, s.on(),
                   s.x.at<float>(static_cast<size_t>(first * H) * 4), s.normedPointer(), H, H, norm, normBias, eps,
                   layerNorm, ofNormed.jobs, ofNormed.count);
      MOE_RETURN_IF_ERROR(s.launchAfterRounding(plan, placed, ofNormed.count));
      if (headBias)
        for (int64_t r = 0; r < rows; ++r)
          launchKernel(biasClampKernel, blocksFor(V, 256), 256, s.on(),
                       s.logits.at<float>(static_cast<size_t>(r * V) * 4), headBias, V, 0.0f);
      return check(cudaGetLastError(), "decode launch");
    };
    if (graphed)
      MOE_RETURN_IF_ERROR(s.captureAndLaunch(*graph, std::move(key), launches));
    else
      MOE_RETURN_IF_ERROR(launches());
  }
  MOE_RETURN_IF_ERROR(check(cudaGetLastError(), "decode launch"));
  // The token's graphs, deferred (State::launchDeferred): as one where the
  // same ones came the token before.
  s.deferring = false;
  s.launchDeferred(true); // a failed launch is the wait's error below
  // The logits in a pinned buffer of their own (rows of a large vocabulary
  // outgrow the arena; nothing is in flight to it: every copy to it is
  // waited for below).
  MOE_RETURN_IF_ERROR(s.hostLogits.reserve(static_cast<size_t>(rows * V) * 4));
  void *const staged = s.hostLogits.data;
  MOE_RETURN_IF_ERROR(check(
      cudaMemcpyAsync(staged, s.logits.data, static_cast<size_t>(rows * V) * 4, cudaMemcpyDeviceToHost, s.stream()),
      "copy out"));
  unsigned long long calls = 0;
  if (expertCalls && s.routedCalls.data)
    MOE_RETURN_IF_ERROR(s.copyAtNextWait(&calls, s.routedCalls.data, sizeof calls));
  MOE_RETURN_IF_ERROR(s.flushRows());
  MOE_RETURN_IF_ERROR(s.waitAndReset());
  std::memcpy(logits, staged, static_cast<size_t>(rows * V) * 4);
  if (expertCalls)
    *expertCalls = static_cast<int64_t>(calls);
  return Status::success();
}

void Context::decodeDiscard() {
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  // What the step deferred runs, as its launches would have.
  s.deferring = false;
  s.launchDeferred(false);
  s.deferredFailure.clear();
  cudaStreamSynchronize(s.stream());
  cudaGetLastError();
  s.pending.clear();
  s.arenaUsed = 0;
  s.rowsUsed = 0;
  s.rowCopies.clear();
  s.routerLogitsOffset = -1;
}

namespace {

/// Why the device cannot route `d` (empty: it can).
std::string unroutable(const RoutedLayerDescription &d) {
  const routing::RouterParams &p = d.router;
  const int64_t H = d.hidden, slots = static_cast<int64_t>(d.experts.size());
  std::ostringstream why;
  if (p.rows < 1 || p.rows > kMaxRouterRows)
    why << p.rows << " router rows (the device routes 1.." << kMaxRouterRows << ")";
  else if (p.topK < 1 || p.topK > kMaxRoutedTopK || p.topK > p.rows)
    why << "top-" << p.topK << " of " << p.rows << " rows (the device routes 1.." << kMaxRoutedTopK
        << " experts a token)";
  else if (p.scoring < routing::kSoftmax || p.scoring > routing::kSparseMixer ||
           (p.scoring == routing::kSparseMixer && p.topK != 2))
    why << "scoring " << p.scoring << " with top-" << p.topK;
  else if (p.selection < routing::kTopK || p.selection > routing::kGroupLimitedTopTwoSum ||
           (p.selection != routing::kTopK &&
            (p.groups < 1 || p.rows % p.groups != 0 || p.topKGroups < 1 || p.topKGroups > p.groups)))
    why << "selection " << p.selection << " over " << p.groups << " groups (" << p.topKGroups << " kept) of " << p.rows
        << " rows";
  else if (H <= 0 || slots < 1 || (!d.remap && slots < p.rows))
    why << slots << " expert slots for " << p.rows << " router rows, hidden size " << H;
  if (why.tellp() > 0)
    return why.str();
  if (d.remap)
    for (int32_t r = 0; r < p.rows; ++r)
      if (d.remap[r] < 0 || d.remap[r] >= slots)
        return "router row " + std::to_string(r) + " maps to slot " + std::to_string(d.remap[r]);
  std::vector<int> groupSizes;
  for (int64_t e = 0; e < slots + (d.shared != nullptr); ++e) {
    const ExpertProduct &x = e < slots ? d.experts[static_cast<size_t>(e)] : *d.shared;
    if (!expertFits(x.gate, x.up, x.down, H))
      return "expert " + std::to_string(e) + "'s gate, up and down do not fit a hidden size of " + std::to_string(H);
    for (const DeviceWeight *w : {x.gate, x.up})
      if (w->layout == WeightLayout::Group &&
          std::find(groupSizes.begin(), groupSizes.end(), w->format.group) == groupSizes.end())
        groupSizes.push_back(w->format.group);
  }
  if (groupSizes.size() > static_cast<size_t>(kMaxInputGroups))
    return "more than " + std::to_string(kMaxInputGroups) + " group sizes in one layer";
  return {};
}

} // namespace

Expected<std::shared_ptr<const RoutedLayerHandle>> Context::prepareRouted(const RoutedLayerDescription &d,
                                                                          std::string *why) {
  if (std::string problem = unroutable(d); !problem.empty()) {
    if (why)
      *why = "CUDA routing: " + problem;
    return std::shared_ptr<const RoutedLayerHandle>();
  }
  const routing::RouterParams &p = d.router;
  const int64_t H = d.hidden, slots = static_cast<int64_t>(d.experts.size());
  auto handle = std::make_shared<RoutedLayerHandle>();
  handle->hidden = H;
  handle->routerRows = p.rows;
  RoutedLayer layer;
  layer.router = p;
  layer.skipThreshold = d.skipThreshold;
  layer.slots = static_cast<int32_t>(slots);
  layer.hasShared = d.shared != nullptr;
  layer.sharedGated = d.shared && d.sharedGate;
  layer.hidden = H;
  std::vector<ExpertTemplate> templates;
  std::vector<int64_t> widths, downWarps;
  for (int64_t e = 0; e < slots + layer.hasShared; ++e) {
    const ExpertProduct &x = e < slots ? d.experts[static_cast<size_t>(e)] : *d.shared;
    ExpertTemplate t;
    t.gate = jobTemplate(*x.gate);
    t.up = jobTemplate(*x.up);
    t.down = jobTemplate(*x.down);
    int32_t *inputs[] = {&t.gateInput, &t.upInput};
    const DeviceWeight *matrices[] = {x.gate, x.up};
    for (int which = 0; which < 2; ++which) {
      const DeviceWeight &w = *matrices[which];
      handle->firstGroups = handle->firstGroups && w.layout == WeightLayout::Group;
      if (w.layout != WeightLayout::Group)
        continue;
      handle->firstCodeBytes += w.rows * jobTemplate(w).codeRowBytes;
      int32_t g = 0;
      while (g < layer.inputGroups && layer.inputGroupSize[g] != w.format.group)
        ++g;
      if (g == layer.inputGroups)
        layer.inputGroupSize[layer.inputGroups++] = w.format.group; // at most kMaxInputGroups (unroutable)
      *inputs[which] = g;
    }
    handle->firstAllRows += 2 * x.gate->rows;
    handle->secondGroups = handle->secondGroups && x.down->layout == WeightLayout::Group;
    if (x.down->layout == WeightLayout::Group)
      handle->secondCodeBytes += H * t.down.codeRowBytes;
    handle->secondAllRows += H;
    if (e < slots) {
      widths.push_back(x.gate->rows);
      downWarps.push_back(downInputWarps(t));
    }
    templates.push_back(t);
  }
  // Bounds: the top-k widest routed experts, and the shared one.
  std::sort(widths.begin(), widths.end(), std::greater<int64_t>());
  std::sort(downWarps.begin(), downWarps.end(), std::greater<int64_t>());
  const size_t k = std::min<size_t>(static_cast<size_t>(p.topK), widths.size());
  handle->width = std::accumulate(widths.begin(), widths.begin() + static_cast<std::ptrdiff_t>(k), int64_t(0));
  handle->downWarps =
      std::accumulate(downWarps.begin(), downWarps.begin() + static_cast<std::ptrdiff_t>(k), int64_t(0));
  if (d.shared) {
    handle->width += d.shared->gate->rows;
    handle->downWarps += downInputWarps(templates.back());
  }
  handle->maxCount = static_cast<int64_t>(k) + layer.hasShared;
  handle->firstRows = 2 * handle->width;

  // One allocation: the layer, its templates, bias, remap table and gate.
  Layout layout;
  const size_t layerOffset = layout.take(sizeof(RoutedLayer));
  const size_t templatesOffset = layout.take(templates.size() * sizeof(ExpertTemplate));
  const size_t biasOffset = layout.take(d.correctionBias ? static_cast<size_t>(p.rows) * 4 : 0);
  const size_t remapOffset = layout.take(d.remap ? static_cast<size_t>(p.rows) * 4 : 0);
  const size_t gateOffset = layout.take(layer.sharedGated ? static_cast<size_t>(H) * 4 : 0);
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  // Prepared at a layer's first decoded token, while earlier layers'
  // launches may be queued: nothing below frees what they read.
  MOE_RETURN_IF_ERROR(check(cudaStreamSynchronize(s.stream()), "routing"));
  if (cudaError_t error = cudaMalloc(&handle->memory, layout.size); error != cudaSuccess) {
    cudaGetLastError();
    handle->memory = nullptr;
    return Status::error("CUDA out of memory for a routed layer: ", cudaGetErrorString(error));
  }
  char *base = static_cast<char *>(handle->memory);
  layer.experts = reinterpret_cast<const ExpertTemplate *>(base + templatesOffset);
  layer.correctionBias = d.correctionBias ? reinterpret_cast<const float *>(base + biasOffset) : nullptr;
  layer.remap = d.remap ? reinterpret_cast<const int32_t *>(base + remapOffset) : nullptr;
  layer.sharedGate = layer.sharedGated ? reinterpret_cast<const float *>(base + gateOffset) : nullptr;
  handle->device = reinterpret_cast<const RoutedLayer *>(base + layerOffset);
  std::vector<char> staged(layout.size);
  std::memcpy(staged.data() + layerOffset, &layer, sizeof layer);
  std::memcpy(staged.data() + templatesOffset, templates.data(), templates.size() * sizeof(ExpertTemplate));
  if (d.correctionBias)
    std::memcpy(staged.data() + biasOffset, d.correctionBias, static_cast<size_t>(p.rows) * 4);
  if (d.remap)
    std::memcpy(staged.data() + remapOffset, d.remap, static_cast<size_t>(p.rows) * 4);
  if (layer.sharedGated)
    std::memcpy(staged.data() + gateOffset, d.sharedGate, static_cast<size_t>(H) * 4);
  MOE_RETURN_IF_ERROR(check(
      cudaMemcpyAsync(handle->memory, staged.data(), layout.size, cudaMemcpyHostToDevice, s.stream()), "routing copy"));
  // The intermediates of a token's block, sized for every layer so far;
  // the bounds change only once the buffers that hold them exist.
  for (const ExpertTemplate &t : templates)
    handle->downWidth = std::max(handle->downWidth, t.gate.rows);
  State::RoutedBounds bounds = s.routedBounds;
  bounds.hidden = std::max(bounds.hidden, H);
  bounds.count = std::max(bounds.count, handle->maxCount);
  bounds.width = std::max(bounds.width, handle->width);
  bounds.downWidth = std::max(bounds.downWidth, handle->downWidth);
  Layout scratchLayout;
  State::routedScratch(bounds, nullptr, &scratchLayout);
  const size_t scratchBytes = scratchLayout.size;
  if (!s.routedCalls.data) {
    MOE_RETURN_IF_ERROR(s.routedCalls.reserve(sizeof(unsigned long long)));
    MOE_RETURN_IF_ERROR(
        check(cudaMemsetAsync(s.routedCalls.data, 0, sizeof(unsigned long long), s.stream()), "memset"));
  }
  MOE_RETURN_IF_ERROR(s.routedPlan.reserve(sizeof(RoutedPlan)));
  if (Status reserved = s.routed.reserve(scratchBytes); !reserved.ok()) {
    // The buffer is gone: decodeRouted refuses the layers prepared before.
    s.routedBounds = {};
    return reserved;
  }
  s.routedBounds = bounds;
  // The fused block's counts start at zero wherever the bounds put them
  // (each launch leaves them so).
  const RoutedScratch laid = State::routedScratch(bounds, s.routed.at<char>(0));
  MOE_RETURN_IF_ERROR(
      check(cudaMemsetAsync(laid.groupArrivals, 0,
                            static_cast<size_t>(reinterpret_cast<char *>(laid.rowArrivals + bounds.hidden) -
                                                reinterpret_cast<char *>(laid.groupArrivals)),
                            s.stream()),
            "memset"));
  // `staged` is pageable: the copy has read it once the stream is done.
  MOE_RETURN_IF_ERROR(check(cudaStreamSynchronize(s.stream()), "routing copy"));
  return std::shared_ptr<const RoutedLayerHandle>(std::move(handle));
}

namespace {

/// Whether the routed scratch of `s` holds `layer`'s intermediates.
bool fits(const Context::State &s, const RoutedLayerHandle &layer) {
  const auto &b = s.routedBounds;
  Layout scratchLayout;
  Context::State::routedScratch(b, nullptr, &scratchLayout);
  return layer.hidden <= b.hidden && layer.maxCount <= b.count && layer.width <= b.width &&
         layer.downWidth <= b.downWidth && scratchLayout.size <= s.routed.capacity && s.routedPlan.data &&
         s.routedCalls.data;
}

} // namespace

bool Context::routedReady(const RoutedLayerHandle &layer) const {
  std::lock_guard<std::mutex> lock(state->mutex);
  return fits(*state, layer);
}

Status Context::decodeRouted(const RoutedLayerHandle &layer) {
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  if (layer.hidden != s.hidden || !fits(s, layer))
    return Status::error("CUDA decode: no room for a routed layer of hidden size ", layer.hidden,
                         " (a device allocation failed before)");
  RoutedScratch scratch = State::routedScratch(s.routedBounds, s.routed.at<char>(0));
  const bool fused = s.fusedMoe;
  if (s.routerLogitsOffset < 0 || s.routerLogitsRows != layer.routerRows)
    return Status::error("CUDA decode: no router logits of ", layer.routerRows,
                         " rows from the attention before this routed layer");
  const int64_t hidden = layer.hidden, count = layer.maxCount;
  scratch.input = s.normedPointer();
  scratch.logits = s.handover.at<float>(static_cast<size_t>(s.routerLogitsOffset));
  scratch.residual = s.x.at<float>(0);
  s.routerLogitsOffset = -1;
  RoutedPlan *plan = s.routedPlan.at<RoutedPlan>(0);
  unsigned long long *calls = s.routedCalls.at<unsigned long long>(0);
  const bool firstStreamed = layer.firstGroups && s.streams(layer.firstAllRows, layer.firstCodeBytes);
  const bool secondStreamed = layer.secondGroups && s.streams(layer.secondAllRows, layer.secondCodeBytes);
  auto enqueue = [&]() -> Status {
    // Routing and the input's rounding, gate and up, SwiGLU and its
    // rounding, down, the weighted sum: five launches, or three where
    // SwiGLU and the sum run in the products (fused: the warp that writes
    // the last row of a group or of an output row runs them).
    launchKernel(routeKernel, 1, 256, s.on(), layer.device, scratch, plan, calls);
    MOE_RETURN_IF_ERROR(check(cudaGetLastError(), "routing launch"));
    RoutedFusion thenSwiglu, thenSum;
    if (fused) {
      thenSwiglu = {RoutedFusion::kThenSwiglu, plan, scratch.groupArrivals};
      thenSum = {RoutedFusion::kThenSum, plan, scratch.rowArrivals, scratch.parts, scratch.residual, hidden};
    }
    MOE_RETURN_IF_ERROR(
        s.launchProducts(plan->firstJobs, 2 * count, layer.firstRows, true, firstStreamed, &plan->first, thenSwiglu));
    if (!fused)
      MOE_RETURN_IF_ERROR(s.launchQuant(plan->downJobs, count, layer.downWarps, &plan->downQuant));
    MOE_RETURN_IF_ERROR(
        s.launchProducts(plan->secondJobs, count, count * hidden, true, secondStreamed, &plan->second, thenSum));
    if (!fused)
      launchKernel(combineKernel, blocksFor(hidden, 256), 256, s.on(), scratch.parts, plan->weights,
                   static_cast<int>(count), hidden, scratch.residual, true, &plan->combine);
    return check(cudaGetLastError(), "routed experts launch");
  };
  if (!s.graphs || layer.graph.failed || layer.graph.uses++ == 0)
    return enqueue();
  // The launches as one CUDA graph, captured at the layer's second token
  // and replayed while every address and size they were captured with
  // holds: one launch for the host instead of three or five.
  const State::RoutedBounds &b = s.routedBounds;
  std::vector<uintptr_t> key;
  for (const void *p : {static_cast<const void *>(scratch.input), static_cast<const void *>(scratch.logits),
                        static_cast<const void *>(scratch.residual), static_cast<const void *>(s.routed.data),
                        static_cast<const void *>(plan), static_cast<const void *>(calls)})
    key.push_back(reinterpret_cast<uintptr_t>(p));
  for (int64_t value : {b.hidden, b.count, b.width, b.downWidth, static_cast<int64_t>(firstStreamed),
                        static_cast<int64_t>(secondStreamed)})
    key.push_back(static_cast<uintptr_t>(value));
  key.push_back(s.launchKey());
  if (layer.graph.exec && layer.graph.key == key)
    return s.replay(layer.graph) ? Status::success() : enqueue();
  return s.captureAndLaunch(layer.graph, std::move(key), enqueue);
}

Expected<double> Context::copyBandwidth(size_t bytes, int repeats) {
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  Buffer source, target;
  MOE_RETURN_IF_ERROR(source.reserve(bytes));
  MOE_RETURN_IF_ERROR(target.reserve(bytes));
  MOE_RETURN_IF_ERROR(check(cudaMemsetAsync(source.data, 1, bytes, s.stream()), "memset"));
  MOE_RETURN_IF_ERROR(
      check(cudaMemcpyAsync(target.data, source.data, bytes, cudaMemcpyDeviceToDevice, s.stream()), "copy"));
  MOE_RETURN_IF_ERROR(check(cudaEventRecord(s.start, s.stream()), "event"));
  for (int i = 0; i < repeats; ++i)
    MOE_RETURN_IF_ERROR(
        check(cudaMemcpyAsync(target.data, source.data, bytes, cudaMemcpyDeviceToDevice, s.stream()), "copy"));
  MOE_RETURN_IF_ERROR(check(cudaEventRecord(s.stop, s.stream()), "event"));
  MOE_RETURN_IF_ERROR(check(cudaStreamSynchronize(s.stream()), "copy"));
  float milliseconds = 0;
  MOE_RETURN_IF_ERROR(check(cudaEventElapsedTime(&milliseconds, s.start, s.stop), "event time"));
  source.release();
  target.release();
  return 2.0 * static_cast<double>(bytes) * repeats / (milliseconds / 1000.0);
}

} // namespace moe::cuda
