//===- MatrixProducts.cu - Matrix products of the engine on a GPU ---------===//
//
// Part of moec. Three kernels and their host side:
//   - quantizeKernel: one warp per (token, weight group) rounds the f32
//     activation to int8 with the CPU's arithmetic (absmax / 127, round half
//     away from zero), its scale and the group's sum;
//   - productKernel: one warp per output row of any matrix in a batch of
//     jobs, over up to eight tokens at a time. Group formats: each lane
//     takes 32-code blocks of the row, unpacks the planar codes into four
//     codes per 32-bit word with shifts and masks and dots them with the int8
//     activation by dp4a; f32 and bf16 rows dot the f32 activation. Lanes'
//     sums meet by warp shuffles;
//   - swigluKernel and combineKernel: silu(gate) * up, and the experts'
//     weighted outputs added in order.
// A call stages its activation and job tables in one pinned buffer, copies
// them with one transfer, launches, and copies the results back.
//
//===----------------------------------------------------------------------===//

#include "MatrixProducts.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

namespace moe::cuda {
namespace {

Status check(cudaError_t error, const char *what) {
  if (error == cudaSuccess)
    return Status::success();
  return Status::error("CUDA ", what, ": ", cudaGetErrorString(error));
}

constexpr int kTile = 8;          ///< Tokens per pass over a row.
constexpr int kWarpsPerBlock = 8; ///< 256 threads.

/// Rounds x[t, 0..cols) to int8 per group of `group` (zero-padded).
struct QuantJob {
  const float *x;
  int64_t ldx, cols, groups, tokens;
  int group;
  int8_t *values; ///< [tokens, groups * group]
  float *scales;  ///< [tokens, groups]
  float *sums;    ///< [tokens, groups]
  int64_t first;  ///< Warps before this job.
};

/// y[t * ldy + r] = row r . x_t for r < rows, t < tokens.
struct ProductJob {
  const uint8_t *w;
  int64_t rows, cols;
  int layout; ///< WeightLayout
  int bits, group, symmetric, bf16Scale, signedCodes, vectorized;
  const float *x; ///< Dense layouts: f32 activations, row stride ldx.
  int64_t ldx;
  const int8_t *q; ///< Group layout: quantized activation (QuantJob).
  const float *qScales, *qSums;
  int64_t groups;
  float *y;
  int64_t ldy;
  int64_t first; ///< Rows before this job.
};

__device__ __forceinline__ float warpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float scaleValue(unsigned short bits, int bf16) {
  return bf16 ? __uint_as_float(static_cast<unsigned>(bits) << 16) : __half2float(__ushort_as_half(bits));
}

__global__ void quantizeKernel(const QuantJob *jobs, int count, int64_t total) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= total)
    return;
  int j = 0;
  while (j + 1 < count && jobs[j + 1].first <= warp)
    ++j;
  const QuantJob &job = jobs[j];
  const int64_t k = warp - job.first, t = k / job.groups, g = k - t * job.groups;
  const float *x = job.x + t * job.ldx;
  const int64_t begin = g * job.group;
  const int perLane = job.group / 32;
  float values[4];
  float absMax = 0.0f;
  for (int i = 0; i < 4; ++i) {
    const int64_t c = begin + lane + 32 * i;
    values[i] = i < perLane && c < job.cols ? x[c] : 0.0f;
    absMax = fmaxf(absMax, fabsf(values[i]));
  }
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

__device__ __forceinline__ int dotUnsigned(unsigned codes, int activations, int accumulator) {
  int result;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(result) : "r"(codes), "r"(activations), "r"(accumulator));
  return result;
}

/// The 32 codes of a planar block (kernels/common/QuantFormat.h) as eight
/// words of four byte-sized codes: word m holds codes 4m .. 4m + 3.
template <int BITS> __device__ __forceinline__ void unpackBlock(const unsigned short *p, unsigned (&c)[8]) {
  unsigned w[BITS];
#pragma unroll
  for (int k = 0; k < BITS; ++k)
    w[k] = static_cast<unsigned>(__ldg(p + 2 * k)) | (static_cast<unsigned>(__ldg(p + 2 * k + 1)) << 16);
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

template <int BITS> __device__ void groupRow(const ProductJob &job, int64_t row, int lane, int tokens) {
  const int headerBytes = job.symmetric ? 2 : 4;
  const int64_t groupBytes = headerBytes + static_cast<int64_t>(job.group) * BITS / 8;
  const int blocksPerGroup = job.group / 32;
  const int64_t blocks = job.groups * blocksPerGroup;
  const uint8_t *rowData = job.w + row * job.groups * groupBytes;
  const int64_t activationStride = job.groups * job.group;
  for (int t0 = 0; t0 < tokens; t0 += kTile) {
    const int n = min(kTile, tokens - t0);
    float acc[kTile];
#pragma unroll
    for (int t = 0; t < kTile; ++t)
      acc[t] = 0.0f;
    for (int64_t b = lane; b < blocks; b += 32) {
      const int64_t g = b / blocksPerGroup;
      const int inGroup = static_cast<int>(b - g * blocksPerGroup);
      const uint8_t *groupData = rowData + g * groupBytes;
      const unsigned short *header = reinterpret_cast<const unsigned short *>(groupData);
      const float scale = scaleValue(__ldg(header), job.bf16Scale);
      float minimum = 0.0f;
      if (!job.signedCodes)
        minimum = job.symmetric ? -static_cast<float>(1 << (BITS - 1)) * scale : scaleValue(__ldg(header + 1), job.bf16Scale);
      unsigned codes[8];
      unpackBlock<BITS>(reinterpret_cast<const unsigned short *>(groupData + headerBytes + inGroup * 4 * BITS), codes);
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        if (t >= n)
          break;
        const int64_t token = t0 + t;
        const int4 *a = reinterpret_cast<const int4 *>(job.q + token * activationStride + g * job.group + inGroup * 32);
        const int4 a0 = __ldg(a), a1 = __ldg(a + 1);
        const int activations[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        int sum = 0;
        if (job.signedCodes) {
#pragma unroll
          for (int m = 0; m < 8; ++m)
            sum = __dp4a(static_cast<int>(codes[m]), activations[m], sum);
        } else {
#pragma unroll
          for (int m = 0; m < 8; ++m)
            sum = dotUnsigned(codes[m], activations[m], sum);
        }
        // The CPU's order: (sum * activation scale) * weight scale.
        acc[t] += static_cast<float>(sum) * __ldg(job.qScales + token * job.groups + g) * scale;
        if (inGroup == 0 && !job.signedCodes)
          acc[t] += minimum * __ldg(job.qSums + token * job.groups + g);
      }
    }
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
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

template <bool BF16> __device__ void denseRow(const ProductJob &job, int64_t row, int lane, int tokens) {
  const uint8_t *rowData = job.w + row * job.cols * (BF16 ? 2 : 4);
  for (int t0 = 0; t0 < tokens; t0 += kTile) {
    const int n = min(kTile, tokens - t0);
    float acc[kTile];
#pragma unroll
    for (int t = 0; t < kTile; ++t)
      acc[t] = 0.0f;
    if (job.vectorized) {
      for (int64_t c = 4 * lane; c < job.cols; c += 128) {
        const float4 w = loadFour<BF16>(rowData, c);
#pragma unroll
        for (int t = 0; t < kTile; ++t) {
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
        for (int t = 0; t < kTile; ++t) {
          if (t >= n)
            break;
          acc[t] += w * __ldg(job.x + (t0 + t) * job.ldx + c);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      const float total = warpSum(acc[t]);
      if (lane == 0 && t < n)
        job.y[(t0 + t) * job.ldy + row] = total;
    }
  }
}

__global__ void productKernel(const ProductJob *jobs, int count, int64_t totalRows, int tokens) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= totalRows)
    return;
  int low = 0, high = count - 1; // the last job whose first row <= warp
  while (low < high) {
    const int middle = (low + high + 1) / 2;
    if (jobs[middle].first <= warp)
      low = middle;
    else
      high = middle - 1;
  }
  const ProductJob &job = jobs[low];
  const int64_t row = warp - job.first;
  switch (job.layout) {
  case static_cast<int>(WeightLayout::F32):
    denseRow<false>(job, row, lane, tokens);
    break;
  case static_cast<int>(WeightLayout::BF16):
    denseRow<true>(job, row, lane, tokens);
    break;
  default:
    switch (job.bits) {
    case 2:
      groupRow<2>(job, row, lane, tokens);
      break;
    case 3:
      groupRow<3>(job, row, lane, tokens);
      break;
    case 4:
      groupRow<4>(job, row, lane, tokens);
      break;
    default:
      groupRow<8>(job, row, lane, tokens);
      break;
    }
  }
}

/// h[i] = silu(gate[i]) * up[i], silu as the CPU engine writes it.
__global__ void swigluKernel(const float *gate, const float *up, float *h, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) {
    const float g = gate[i];
    h[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

/// out[r] = sum_i weights[i] * parts[i * hidden + r], added in order of i.
__global__ void combineKernel(const float *parts, const float *weights, int count, int64_t hidden, float *out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= hidden)
    return;
  float total = 0.0f;
  for (int i = 0; i < count; ++i)
    total += weights[i] * parts[i * hidden + r];
  out[r] = total;
}

unsigned blocksFor(int64_t threads, int perBlock) { return static_cast<unsigned>((threads + perBlock - 1) / perBlock); }

size_t alignUp(size_t value, size_t alignment) { return (value + alignment - 1) / alignment * alignment; }

/// A grow-only buffer in device or pinned host memory.
struct Buffer {
  bool host = false;
  void *data = nullptr;
  size_t capacity = 0;
  Status reserve(size_t bytes) {
    if (bytes <= capacity)
      return Status::success();
    release();
    const size_t size = std::max(alignUp(bytes, size_t(1) << 20), capacity * 2);
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
    if (data)
      host ? cudaFreeHost(data) : cudaFree(data);
    data = nullptr;
    capacity = 0;
  }
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

} // namespace

struct Context::State {
  std::mutex mutex;
  DeviceFacts facts;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  Buffer input, scratch, output, hostInput{true}, hostOutput{true};
  std::shared_ptr<std::atomic<size_t>> resident = std::make_shared<std::atomic<size_t>>(0);
  double kernelSeconds = 0;

  ~State() {
    for (Buffer *buffer : {&input, &scratch, &output, &hostInput, &hostOutput})
      buffer->release();
    if (start)
      cudaEventDestroy(start);
    if (stop)
      cudaEventDestroy(stop);
    if (stream)
      cudaStreamDestroy(stream);
  }

  /// Job tables for quantizing activations at the groups the products need
  /// and for the products themselves, built on the host.
  struct Plan {
    std::vector<QuantJob> quant;
    std::vector<ProductJob> products;
    int64_t quantWarps = 0, rows = 0;
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
  void addProduct(Plan &plan, Layout &scratchLayout, const DeviceWeight &w, const float *x, int64_t ldx,
                  int64_t tokens, float *y, int64_t ldy) {
    ProductJob job{};
    job.w = static_cast<const uint8_t *>(w.data);
    job.rows = w.rows;
    job.cols = w.cols;
    job.layout = static_cast<int>(w.layout);
    job.x = x;
    job.ldx = ldx;
    job.y = y;
    job.ldy = ldy;
    job.first = plan.rows;
    if (w.layout == WeightLayout::Group) {
      job.bits = w.format.bits;
      job.group = w.format.group;
      job.symmetric = w.format.symmetric;
      job.bf16Scale = w.format.scaleType == quant::ScaleType::BF16;
      job.signedCodes = w.signedCodes;
      job.groups = w.format.groupsPerRow(w.cols);
      // The quantization's index, resolved to pointers later.
      job.q = reinterpret_cast<const int8_t *>(addQuant(plan, scratchLayout, x, ldx, w.cols, tokens, w.format.group));
    } else {
      job.vectorized = w.cols % 4 == 0 && ldx % 4 == 0 && aligned16(x) && aligned16(w.data);
    }
    plan.rows += w.rows;
    plan.products.push_back(job);
  }

  /// Turns the quantization indices and offsets of `plan` into pointers.
  void resolve(Plan &plan, size_t firstQuant) {
    for (size_t i = firstQuant; i < plan.quant.size(); ++i) {
      QuantJob &job = plan.quant[i];
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

  Status launchQuant(const QuantJob *deviceJobs, size_t count, int64_t warps) {
    if (count == 0)
      return Status::success();
    quantizeKernel<<<blocksFor(warps * 32, 32 * kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
        deviceJobs, static_cast<int>(count), warps);
    return check(cudaGetLastError(), "quantize launch");
  }

  Status launchProducts(const ProductJob *deviceJobs, size_t count, int64_t rows, int64_t tokens) {
    if (count == 0)
      return Status::success();
    productKernel<<<blocksFor(rows * 32, 32 * kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
        deviceJobs, static_cast<int>(count), rows, static_cast<int>(tokens));
    return check(cudaGetLastError(), "product launch");
  }

  Status finish() {
    MOE_RETURN_IF_ERROR(check(cudaEventRecord(stop, stream), "event"));
    MOE_RETURN_IF_ERROR(check(cudaStreamSynchronize(stream), "kernels"));
    float milliseconds = 0;
    MOE_RETURN_IF_ERROR(check(cudaEventElapsedTime(&milliseconds, start, stop), "event time"));
    kernelSeconds += milliseconds / 1000.0;
    return Status::success();
  }
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
  cudaDriverGetVersion(&s.facts.driverVersion);
  cudaRuntimeGetVersion(&s.facts.runtimeVersion);
  MOE_RETURN_IF_ERROR(check(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking), "stream"));
  MOE_RETURN_IF_ERROR(check(cudaEventCreate(&s.start), "event"));
  MOE_RETURN_IF_ERROR(check(cudaEventCreate(&s.stop), "event"));
  return context;
}

Context::~Context() = default;

const DeviceFacts &Context::facts() const { return state->facts; }

size_t Context::residentBytes() const { return state->resident->load(); }

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
  std::lock_guard<std::mutex> lock(state->mutex);
  void *device = nullptr;
  if (cudaError_t error = cudaMalloc(&device, bytes); error != cudaSuccess) {
    cudaGetLastError();
    size_t free = 0, total = 0;
    cudaMemGetInfo(&free, &total);
    return Status::error("CUDA out of memory: ", bytes, " bytes for a ", rows, "x", cols, " matrix with ", free,
                         " of ", total, " bytes free (", cudaGetErrorString(error), ")");
  }
  if (cudaError_t error = cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice); error != cudaSuccess) {
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
    s.addProduct(plan, scratch, *products[i].first, deviceX, cols, tokens,
                 reinterpret_cast<float *>(yOffsets[i]), products[i].first->rows);
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
  MOE_RETURN_IF_ERROR(check(cudaEventRecord(s.start, s.stream), "event"));
  MOE_RETURN_IF_ERROR(
      check(cudaMemcpyAsync(s.input.data, s.hostInput.data, in.size, cudaMemcpyHostToDevice, s.stream), "copy in"));
  MOE_RETURN_IF_ERROR(s.launchQuant(s.input.at<QuantJob>(quantOffset), plan.quant.size(), plan.quantWarps));
  MOE_RETURN_IF_ERROR(s.launchProducts(s.input.at<ProductJob>(productOffset), plan.products.size(), plan.rows, tokens));
  MOE_RETURN_IF_ERROR(
      check(cudaMemcpyAsync(s.hostOutput.data, s.output.data, out.size, cudaMemcpyDeviceToHost, s.stream), "copy out"));
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
    if (!e.gate || !e.up || !e.down || e.gate->cols != hidden || e.up->cols != hidden || e.down->rows != hidden ||
        e.up->rows != e.gate->rows || e.down->cols != e.gate->rows)
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
  MOE_RETURN_IF_ERROR(check(cudaEventRecord(s.start, s.stream), "event"));
  MOE_RETURN_IF_ERROR(
      check(cudaMemcpyAsync(s.input.data, s.hostInput.data, in.size, cudaMemcpyHostToDevice, s.stream), "copy in"));
  MOE_RETURN_IF_ERROR(s.launchQuant(s.input.at<QuantJob>(quantFirstOffset), first.quant.size(), first.quantWarps));
  MOE_RETURN_IF_ERROR(
      s.launchProducts(s.input.at<ProductJob>(productFirstOffset), first.products.size(), first.rows, 1));
  swigluKernel<<<blocksFor(width, 256), 256, 0, s.stream>>>(s.scratch.at<float>(gateOffset),
                                                            s.scratch.at<float>(upOffset),
                                                            s.scratch.at<float>(hOffset), width);
  MOE_RETURN_IF_ERROR(check(cudaGetLastError(), "swiglu launch"));
  MOE_RETURN_IF_ERROR(s.launchQuant(s.input.at<QuantJob>(quantSecondOffset), second.quant.size(), second.quantWarps));
  MOE_RETURN_IF_ERROR(
      s.launchProducts(s.input.at<ProductJob>(productSecondOffset), second.products.size(), second.rows, 1));
  combineKernel<<<blocksFor(hidden, 256), 256, 0, s.stream>>>(s.scratch.at<float>(partsOffset),
                                                              s.input.at<float>(weightOffset),
                                                              static_cast<int>(count), hidden,
                                                              s.output.at<float>(outOffset));
  MOE_RETURN_IF_ERROR(check(cudaGetLastError(), "combine launch"));
  MOE_RETURN_IF_ERROR(
      check(cudaMemcpyAsync(s.hostOutput.data, s.output.data, out.size, cudaMemcpyDeviceToHost, s.stream), "copy out"));
  MOE_RETURN_IF_ERROR(s.finish());
  std::memcpy(result, s.hostOutput.at<char>(outOffset), static_cast<size_t>(hidden) * 4);
  return Status::success();
}

Expected<double> Context::copyBandwidth(size_t bytes, int repeats) {
  std::lock_guard<std::mutex> lock(state->mutex);
  State &s = *state;
  Buffer source, target;
  MOE_RETURN_IF_ERROR(source.reserve(bytes));
  MOE_RETURN_IF_ERROR(target.reserve(bytes));
  MOE_RETURN_IF_ERROR(check(cudaMemsetAsync(source.data, 1, bytes, s.stream), "memset"));
  MOE_RETURN_IF_ERROR(check(cudaMemcpyAsync(target.data, source.data, bytes, cudaMemcpyDeviceToDevice, s.stream), "copy"));
  MOE_RETURN_IF_ERROR(check(cudaEventRecord(s.start, s.stream), "event"));
  for (int i = 0; i < repeats; ++i)
    MOE_RETURN_IF_ERROR(
        check(cudaMemcpyAsync(target.data, source.data, bytes, cudaMemcpyDeviceToDevice, s.stream), "copy"));
  MOE_RETURN_IF_ERROR(check(cudaEventRecord(s.stop, s.stream), "event"));
  MOE_RETURN_IF_ERROR(check(cudaStreamSynchronize(s.stream), "copy"));
  float milliseconds = 0;
  MOE_RETURN_IF_ERROR(check(cudaEventElapsedTime(&milliseconds, s.start, s.stop), "event time"));
  source.release();
  target.release();
  return 2.0 * static_cast<double>(bytes) * repeats / (milliseconds / 1000.0);
}

} // namespace moe::cuda
