//===- QuantGemv.cu - Quantized matrix x vector on the GPU ----------------===//
//
// Part of moec. One warp takes 32 rows (a lane per row) over a slice of
// the columns: all lanes read the same 32 activations (a broadcast from
// L1) while each streams its own row's codes, so there are no shared-memory
// bank conflicts and a row's bytes are read in order. A code block of 32
// weights is decoded in registers from the planar layout, and the group's
// scale and min are applied once per block: scale * sum(x q) + min * sum(x).
// Column slices are summed with atomics when a matrix has too few rows to
// fill the GPU.
//
//===----------------------------------------------------------------------===//

#include "QuantGemv.h"

#include "Check.h"
#include "cuda/Launch.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace moe::cuda {
namespace {

template <bool BF16> __device__ __forceinline__ float scaleValue(uint16_t bits) {
  if constexpr (BF16)
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  else
    return __half2float(__ushort_as_half(bits));
}

/// Code j of a 32-code planar block (kernels/common/QuantFormat.h).
template <int BITS> __device__ __forceinline__ int codeAt(const uint8_t (&b)[32], int j) {
  if constexpr (BITS == 8)
    return b[j];
  else if constexpr (BITS == 4)
    return j < 16 ? (b[j] & 15) : (b[j - 16] >> 4);
  else if constexpr (BITS == 2)
    return (b[j % 8] >> (2 * (j / 8))) & 3;
  else
    return ((b[j % 8] >> (2 * (j / 8))) & 3) | (((b[8 + j / 8] >> (j % 8)) & 1) << 2);
}

template <int BITS, bool SYM, bool BF16>
__global__ void gemvKernel(const uint8_t *__restrict__ weights, int64_t rows, int64_t cols, int group, int64_t rowBytes,
                           int64_t blocksPerSlice, const float *__restrict__ x, float *__restrict__ y,
                           bool accumulate) {
  constexpr int kCodeBytes = 32 * BITS / 8;
  constexpr int kHeader = SYM ? 2 : 4;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t row = warp * 32 + lane;
  const int64_t totalBlocks = (cols + 31) / 32;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * blocksPerSlice;
  const int64_t last = min(totalBlocks, first + blocksPerSlice);
  if (row >= rows || first >= last)
    return;
  const int64_t groupBytes = kHeader + static_cast<int64_t>(group) * BITS / 8;
  static_assert(kCodeBytes % 4 == 0, "code blocks load as 32-bit words");
  const int blocksPerGroup = group / 32;
  const uint8_t *rowData = weights + row * rowBytes;
  // One block: its group's scale and min, and its codes in registers.
  struct Block {
    float scale, minimum;
    uint8_t bytes[32];
  };
  auto load = [&](int64_t block, Block &out) {
    const int64_t g = block / blocksPerGroup;
    const int inGroup = static_cast<int>(block - g * blocksPerGroup);
    const uint8_t *groupData = rowData + g * groupBytes;
    const uint8_t *codes = groupData + kHeader + inGroup * kCodeBytes;
    if constexpr (SYM) {
      // 2-byte headers: groups keep 2-byte alignment only, so the codes are
      // read as aligned 32-bit words and shifted into place.
      out.scale = scaleValue<BF16>(__ldg(reinterpret_cast<const unsigned short *>(groupData)));
      out.minimum = -static_cast<float>(1 << (BITS - 1)) * out.scale;
      const uintptr_t address = reinterpret_cast<uintptr_t>(codes);
      const unsigned *words = reinterpret_cast<const unsigned *>(address & ~uintptr_t(3));
      const unsigned shift = static_cast<unsigned>(address & 3) * 8; // 0 or 16
      // (Never a word past the block: the last may end the matrix.)
      unsigned previous = __ldg(words);
#pragma unroll
      for (int k = 0; k < kCodeBytes / 4; ++k) {
        unsigned word = previous;
        if (shift != 0) {
          // The last word only lends its low half (the block's last bytes).
          const unsigned next = k + 1 < kCodeBytes / 4 ? __ldg(words + k + 1)
                                                       : __ldg(reinterpret_cast<const unsigned short *>(words + k + 1));
          word = __funnelshift_r(previous, next, shift);
          previous = next;
        } else if (k + 1 < kCodeBytes / 4) {
          previous = __ldg(words + k + 1);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
          out.bytes[4 * k + i] = static_cast<uint8_t>((word >> (8 * i)) & 0xFF);
      }
    } else {
      // 4-byte headers and code blocks of 4n bytes: 32-bit loads.
      const unsigned header = __ldg(reinterpret_cast<const unsigned *>(groupData));
      out.scale = scaleValue<BF16>(static_cast<uint16_t>(header & 0xFFFF));
      out.minimum = scaleValue<BF16>(static_cast<uint16_t>(header >> 16));
#pragma unroll
      for (int k = 0; k < kCodeBytes / 4; ++k) {
        const unsigned word = __ldg(reinterpret_cast<const unsigned *>(codes) + k);
#pragma unroll
        for (int i = 0; i < 4; ++i)
          out.bytes[4 * k + i] = static_cast<uint8_t>((word >> (8 * i)) & 0xFF);
      }
    }
  };
  auto apply = [&](int64_t block, const Block &in) {
    const int64_t column = block * 32;
    float dot = 0.0f, sum = 0.0f;
    if (column + 32 <= cols) {
      const float4 *xv = reinterpret_cast<const float4 *>(x + column);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float4 v = __ldg(xv + k);
        dot += v.x * codeAt<BITS>(in.bytes, 4 * k) + v.y * codeAt<BITS>(in.bytes, 4 * k + 1) +
               v.z * codeAt<BITS>(in.bytes, 4 * k + 2) + v.w * codeAt<BITS>(in.bytes, 4 * k + 3);
        sum += (v.x + v.y) + (v.z + v.w);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 32; ++j)
        if (column + j < cols) {
          const float v = __ldg(x + column + j);
          dot += v * codeAt<BITS>(in.bytes, j);
          sum += v;
        }
    }
    return in.scale * dot + in.minimum * sum;
  };
  // Two blocks in flight per step: both loads issue before either is used.
  float acc = 0.0f;
  int64_t block = first;
  for (; block + 1 < last; block += 2) {
    Block a, b;
    load(block, a);
    load(block + 1, b);
    acc += apply(block, a) + apply(block + 1, b);
  }
  if (block < last) {
    Block a;
    load(block, a);
    acc += apply(block, a);
  }
  if (accumulate)
    atomicAdd(y + row, acc);
  else
    y[row] = acc;
}

template <int BITS, bool SYM, bool BF16>
Status launch(const quant::QuantFormat &format, const uint8_t *weights, int64_t rows, int64_t cols, const float *x,
              float *y) {
  const int64_t totalBlocks = (cols + 31) / 32;
  const int64_t rowWarps = (rows + 31) / 32;
  // Enough warps to fill the GPU (about 8K resident on an H100/H200): split
  // the columns when the rows alone do not, down to 8 code blocks a slice.
  int device = 0, multiprocessors = 0;
  MOE_RETURN_IF_ERROR(check(cudaGetDevice(&device), "get device"));
  MOE_RETURN_IF_ERROR(
      check(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device), "device attribute"));
  const int64_t wantWarps = static_cast<int64_t>(multiprocessors) * 32;
  int64_t slices = std::clamp<int64_t>(wantWarps / rowWarps, 1, std::max<int64_t>(1, totalBlocks / 8));
  const int64_t blocksPerSlice = (totalBlocks + slices - 1) / slices;
  slices = (totalBlocks + blocksPerSlice - 1) / blocksPerSlice;
  const bool accumulate = slices > 1;
  if (accumulate)
    MOE_RETURN_IF_ERROR(check(cudaMemsetAsync(y, 0, static_cast<size_t>(rows) * sizeof(float)), "memset"));
  constexpr int kThreads = 128; // 4 warps, 128 rows
  const dim3 grid(static_cast<unsigned>((rowWarps + 3) / 4), static_cast<unsigned>(slices));
  launchKernel(gemvKernel<BITS, SYM, BF16>, grid, kThreads, nullptr, weights, rows, cols, format.group,
               static_cast<int64_t>(format.rowBytes(cols)), blocksPerSlice, x, y, accumulate);
  return check(cudaGetLastError(), "kernel launch");
}

template <int BITS>
Status dispatchScheme(const quant::QuantFormat &f, const uint8_t *w, int64_t rows, int64_t cols, const float *x,
                      float *y) {
  const bool bf16 = f.scaleType == quant::ScaleType::BF16;
  if (f.symmetric)
    return bf16 ? launch<BITS, true, true>(f, w, rows, cols, x, y) : launch<BITS, true, false>(f, w, rows, cols, x, y);
  return bf16 ? launch<BITS, false, true>(f, w, rows, cols, x, y) : launch<BITS, false, false>(f, w, rows, cols, x, y);
}

/// Device memory freed on scope exit.
template <typename T> struct DeviceBuffer {
  T *data = nullptr;
  Status allocate(size_t count) { return check(cudaMalloc(&data, std::max<size_t>(1, count) * sizeof(T)), "malloc"); }
  ~DeviceBuffer() {
    if (data)
      cudaFree(data);
  }
};

} // namespace

Status gemvQuantizedDevice(const quant::QuantFormat &format, const uint8_t *weights, int64_t rows, int64_t cols,
                           const float *x, float *y) {
  if (std::string problem = quant::validateQuantFormat(format); !problem.empty())
    return Status::error("CUDA GEMV: ", problem);
  if (rows < 0 || cols < 0)
    return Status::error("CUDA GEMV: negative shape ", rows, "x", cols);
  if (rows == 0)
    return Status::success();
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return Status::error("CUDA GEMV: x must be 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(weights) % (format.symmetric ? 2 : 4) != 0)
    return Status::error("CUDA GEMV: the weights must be ", format.symmetric ? 2 : 4, "-byte aligned");
  switch (format.bits) {
  case 2:
    return dispatchScheme<2>(format, weights, rows, cols, x, y);
  case 3:
    return dispatchScheme<3>(format, weights, rows, cols, x, y);
  case 4:
    return dispatchScheme<4>(format, weights, rows, cols, x, y);
  default:
    return dispatchScheme<8>(format, weights, rows, cols, x, y);
  }
}

Status gemvQuantized(const quant::QuantFormat &format, const uint8_t *weights, int64_t rows, int64_t cols,
                     const float *x, float *y) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return Status::error("no CUDA device available");
  }
  const size_t bytes = format.matrixBytes(rows, cols);
  DeviceBuffer<uint8_t> deviceWeights;
  DeviceBuffer<float> deviceX, deviceY;
  MOE_RETURN_IF_ERROR(deviceWeights.allocate(bytes));
  MOE_RETURN_IF_ERROR(deviceX.allocate(static_cast<size_t>(cols)));
  MOE_RETURN_IF_ERROR(deviceY.allocate(static_cast<size_t>(rows)));
  MOE_RETURN_IF_ERROR(check(cudaMemcpy(deviceWeights.data, weights, bytes, cudaMemcpyHostToDevice), "copy"));
  MOE_RETURN_IF_ERROR(
      check(cudaMemcpy(deviceX.data, x, static_cast<size_t>(cols) * sizeof(float), cudaMemcpyHostToDevice), "copy"));
  MOE_RETURN_IF_ERROR(gemvQuantizedDevice(format, deviceWeights.data, rows, cols, deviceX.data, deviceY.data));
  return check(cudaMemcpy(y, deviceY.data, static_cast<size_t>(rows) * sizeof(float), cudaMemcpyDeviceToHost),
               "copy back");
}

} // namespace moe::cuda
