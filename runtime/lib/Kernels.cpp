//===- Kernels.cpp - f32 building blocks of the forward pass --------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Kernels.h"

#include "moe/Frontend/DType.h"
#include "moe/Runtime/Blas.h"

#include <cblas.h>

#include "moe/Support/Threads.h"

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <limits>
#include <optional>

/// Conversion of bf16 to f32 cannot fail; its Status carries nothing.
#define MOE_RUNTIME_IGNORE(expr) (void)(expr)

namespace moe::kernels {

namespace {

/// The thread count (moe/Support/Threads.h). From the pool's start on,
/// the pool owns the threads and OpenBLAS runs on one (moe/Runtime/Blas.h):
/// its count set to 1 and the workers it started at the library's load,
/// which spin for about 0.1 s, ended.
unsigned computeThreads() {
  static const unsigned count = [] {
    openblas_set_num_threads(1);
    stopBlasWorkers();
    return threadCount();
  }();
  return count;
}

/// Persistent workers, one per thread of the count. A region hands each
/// worker a range through an atomic generation counter; workers spin on it
/// for a short while (decode runs a region every ~100 microseconds, and a
/// futex wake-up costs tens of them) before sleeping on a condition
/// variable, and the caller spins for their completion the same way.
class RowPool {
public:
  RowPool() : threads(computeThreads()) {
    for (unsigned t = 1; t < threads; ++t)
      workers.emplace_back([this, t] { work(t); });
  }
  ~RowPool() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
      generation.fetch_add(1, std::memory_order_release);
    }
    wake.notify_all();
    for (std::thread &worker : workers)
      worker.join();
  }
  /// Runs body(begin, end) over [0, rows) split into one range per thread
  /// (empty ones where rows are fewer than threads); `work` (elements
  /// touched) below a threshold runs inline, where waking the workers would
  /// cost more than it saves.
  void run(int64_t rows, int64_t work, const std::function<void(int64_t, int64_t)> &body) {
    // Inline inside a region too: a task's own products run on its thread.
    if (inRegion || threads == 1 || rows < 2 || work < (int64_t(1) << 18)) {
      body(0, rows);
      return;
    }
    task = &body;
    taskRows = rows;
    pending.store(threads - 1, std::memory_order_relaxed);
    {
      // Under the mutex, so a worker about to sleep sees the new generation.
      std::lock_guard<std::mutex> lock(mutex);
      generation.fetch_add(1, std::memory_order_release);
    }
    if (sleepers.load(std::memory_order_acquire) > 0)
      wake.notify_all();
    {
      // Cleared and the workers waited for however the body ends.
      struct Finish {
        RowPool &pool;
        ~Finish() {
          inRegion = false;
          for (unsigned spins = 0; pool.pending.load(std::memory_order_acquire) != 0; ++spins)
            pause(spins);
          pool.task = nullptr;
        }
      } finish{*this};
      inRegion = true;
      body(0, rangeEnd(0, rows));
    }
  }
  static bool insideRegion() { return inRegion; }

private:
  static void pause(unsigned spins) {
#if defined(__x86_64__)
    if (spins < (1u << 16)) {
      _mm_pause();
      return;
    }
#endif
    std::this_thread::yield();
  }
  int64_t rangeEnd(unsigned t, int64_t rows) const { return rows * (t + 1) / threads; }
  void work(unsigned t) {
    inRegion = true; // a worker only ever runs regions' bodies
    uint64_t seen = 0;
    for (;;) {
      // Spin first (about 100 microseconds), then sleep.
      unsigned spins = 0;
      while (generation.load(std::memory_order_acquire) == seen && spins < (1u << 12)) {
#if defined(__x86_64__)
        _mm_pause();
#endif
        ++spins;
      }
      if (generation.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mutex);
        sleepers.fetch_add(1, std::memory_order_acq_rel);
        wake.wait(lock, [&] { return generation.load(std::memory_order_acquire) != seen; });
        sleepers.fetch_sub(1, std::memory_order_acq_rel);
      }
      if (stopping)
        return;
      seen = generation.load(std::memory_order_acquire);
      (*task)(taskRows * t / threads, rangeEnd(t, taskRows));
      pending.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  /// Whether this thread is running a region's body.
  static thread_local bool inRegion;
  unsigned threads;
  std::vector<std::thread> workers;
  std::mutex mutex;
  std::condition_variable wake;
  const std::function<void(int64_t, int64_t)> *task = nullptr;
  int64_t taskRows = 0;
  std::atomic<unsigned> pending{0}, sleepers{0};
  std::atomic<uint64_t> generation{0};
  bool stopping = false;
};

thread_local bool RowPool::inRegion = false;

RowPool &rowPool() {
  static RowPool pool;
  return pool;
}

float dotBf16Scalar(const uint16_t *w, const float *x, int64_t n) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i)
    sum += bfloat16ToFloat(w[i]) * x[i];
  return sum;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float dotBf16Avx2(const uint16_t *w, const float *x, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + i));
    __m256 low = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(bits)), 16));
    __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(bits, 1)), 16));
    acc0 = _mm256_fmadd_ps(low, _mm256_loadu_ps(x + i), acc0);
    acc1 = _mm256_fmadd_ps(high, _mm256_loadu_ps(x + i + 8), acc1);
  }
  __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  sum4 = _mm_hadd_ps(sum4, sum4);
  sum4 = _mm_hadd_ps(sum4, sum4);
  return _mm_cvtss_f32(sum4) + dotBf16Scalar(w + i, x + i, n - i);
}
#endif

float dotBf16(const uint16_t *w, const float *x, int64_t n) {
#if defined(__x86_64__)
  static const bool hasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (hasAvx2)
    return dotBf16Avx2(w, x, n);
#endif
  return dotBf16Scalar(w, x, n);
}

} // namespace

void DecodeInput::reset(const float *values, int64_t count) {
  x = values;
  cols = count;
  std::fill(std::begin(ready), std::end(ready), false);
}

void DecodeInput::prepareFor(const Matrix &weight) {
  const std::optional<quant::QuantMatrixView> view = weight.groupView();
  if (!view)
    return;
  const int group = view->format.group, index = slot(group);
  if (!ready[index]) {
    quant::quantizeActivation(x, cols, group, byGroup[index]);
    ready[index] = true;
  }
}

void gemvRange(const Matrix &weight, const DecodeInput &input, int64_t begin, int64_t end, float *y) {
  if (const std::optional<quant::QuantMatrixView> view = weight.groupView()) {
    // Integer dot products over the packed codes.
    quant::gemvRows(*view, input.quantized(view->format.group), begin, end, y);
  } else if (weight.ggmlType) {
    // The other ggml blocks (K-quants, Q5_*), decoded in registers.
    quant::ggmlGemvRows(*weight.ggmlType, weight.quantData, weight.cols, input.values(), begin, end, y);
  } else if (weight.isBf16()) {
    // bf16: each weight read once, widened in registers.
    for (int64_t o = begin; o < end; ++o)
      y[o - begin] = dotBf16(weight.bf16.data() + o * weight.cols, input.values(), weight.cols);
  } else {
    for (int64_t o = begin; o < end; ++o)
      y[o - begin] = quant::dotF32(weight.data.data() + o * weight.cols, input.values(), weight.cols);
  }
}

void parallelRows(int64_t rows, int64_t work, const std::function<void(int64_t, int64_t)> &body) {
  rowPool().run(rows, work, body);
}

unsigned poolThreads() { return computeThreads(); }

void parallelBlasRows(int64_t rows, int64_t work, const std::function<void(int64_t, int64_t)> &body) {
  RowPool &pool = rowPool(); // first: its start sets OpenBLAS's count
  // One BLAS thread (already, unless a caller asked for more), set by the
  // thread that starts the region: inside one (a task's products) the
  // region's starter has set it, and workers never touch OpenBLAS's globals.
  std::optional<SingleThreadedBlas> oneBlasThread;
  if (!RowPool::insideRegion())
    oneBlasThread.emplace();
  pool.run(rows, work, body);
}

void parallelTasks(int64_t count, int64_t work, const std::function<void(int64_t)> &task) {
  // One range per thread, each taking tasks until none is left; tasks call
  // BLAS on their own threads.
  std::atomic<int64_t> next{0};
  parallelBlasRows(static_cast<int64_t>(computeThreads()), work, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
         i = next.fetch_add(1, std::memory_order_relaxed))
      task(i);
  });
}

namespace {

/// Output rows per panel of a float product: about a 32nd of them (so that
/// up to 32 threads share the panels), a multiple of 16, from 16 to 256,
/// and at most 2 MiB of f32 rows where the panel is widened or decoded
/// first (16 rows when a row alone is larger). A function of the shape
/// alone: each panel is one BLAS call on one thread, so y does not depend
/// on the thread count. (Against one call, one thread loses 3-11% in
/// 256-row panels on DeepSeek-V3's shapes: BENCHMARKS.md.)
int64_t panelRows(int64_t out, int64_t in) {
  const int64_t share = ((out + 31) / 32 + 15) / 16 * 16;
  const int64_t fitting = std::max<int64_t>(16, ((int64_t(1) << 19) / std::max<int64_t>(in, 1)) / 16 * 16);
  return std::clamp<int64_t>(std::min(share, fitting), 16, 256);
}

/// y[T, out] = x[T, in] . W^T for a matrix whose rows come as f32 from
/// rowsOf(first, count, scratch) (a pointer to count rows: the matrix's own
/// or written into scratch), in panels of output rows over the pool, each
/// one single-threaded BLAS GEMM into its columns of y.
template <typename RowsOf>
void panelGemm(const float *x, int64_t tokens, int64_t in, int64_t out, float *y, const RowsOf &rowsOf) {
  const int64_t rows = panelRows(out, in), panels = (out + rows - 1) / rows;
  parallelBlasRows(panels, tokens * out * in, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> perThread;
    std::vector<float> &scratch = perThread;
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t first = panel * rows, count = std::min(rows, out - first);
      const float *w = rowsOf(first, count, scratch);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(tokens), static_cast<int>(count),
                  static_cast<int>(in), 1.0f, x, static_cast<int>(in), w, static_cast<int>(in), 0.0f, y + first,
                  static_cast<int>(out));
    }
  });
}

} // namespace

void linear(const float *x, int64_t tokens, const Matrix &weight, const std::vector<float> &bias, float *y) {
  const int64_t out = weight.rows, in = weight.cols;
  if (weight.device) {
    weight.device->device().linear(weight, x, tokens, y);
  } else if (weight.isQuantized() ? tokens <= 4 : tokens == 1) {
    // Decode: rows split across the pool; a quantized matrix's activation
    // goes to int8 once per token. (A thread_local named inside the lambda
    // would be each worker's own: capture this thread's by reference.)
    thread_local DecodeInput perThread;
    DecodeInput &input = perThread;
    for (int64_t t = 0; t < tokens; ++t) {
      input.reset(x + t * in, in);
      input.prepareFor(weight);
      float *row = y + t * out;
      rowPool().run(out, static_cast<int64_t>(weight.bytes()),
                    [&](int64_t begin, int64_t end) { gemvRange(weight, input, begin, end, row + begin); });
    }
  } else if (const std::optional<quant::QuantMatrixView> view = weight.groupView()) {
    // Prefill over group formats: every token's activation to int8 once,
    // then the integer GEMM over rows split across the pool.
    thread_local std::vector<quant::QuantizedActivation> perThread;
    std::vector<quant::QuantizedActivation> &activations = perThread;
    if (activations.size() < static_cast<size_t>(tokens))
      activations.resize(static_cast<size_t>(tokens));
    for (int64_t t = 0; t < tokens; ++t)
      quant::quantizeActivation(x + t * in, in, view->format.group, activations[t]);
    quant::QuantizedActivation *first = activations.data();
    rowPool().run(out, tokens * out * in, [&](int64_t begin, int64_t end) {
      quant::gemmRows(*view, first, tokens, begin, end, y + begin, out);
    });
  } else if (weight.isQuantized()) {
    // ggml's K-quants and Q5_*: each panel decoded to f32 rows first,
    // never the whole matrix.
    panelGemm(x, tokens, in, out, y, [&](int64_t first, int64_t count, std::vector<float> &scratch) {
      scratch.resize(static_cast<size_t>(count * in));
      quant::ggmlDequantizeRows(*weight.ggmlType, weight.quantData, in, first, first + count, scratch.data());
      return static_cast<const float *>(scratch.data());
    });
  } else if (weight.isBf16()) {
    // Each panel widened to f32 rows, then one GEMM for all tokens.
    panelGemm(x, tokens, in, out, y, [&](int64_t first, int64_t count, std::vector<float> &scratch) {
      scratch.resize(static_cast<size_t>(count * in));
      MOE_RUNTIME_IGNORE(convertToF32(DType::BF16, weight.bf16.data() + first * in, scratch.size(), scratch.data()));
      return static_cast<const float *>(scratch.data());
    });
  } else {
    panelGemm(x, tokens, in, out, y, [&](int64_t first, int64_t, std::vector<float> &) {
      return static_cast<const float *>(weight.data.data() + first * in);
    });
  }
  addBias(y, tokens, bias);
}

void addBias(float *y, int64_t tokens, const std::vector<float> &bias) {
  const int64_t width = static_cast<int64_t>(bias.size());
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t o = 0; o < width; ++o)
      y[t * width + o] += bias[o];
}

void rmsNorm(float *x, int64_t rows, int64_t width, const std::vector<float> &weight, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float *row = x + r * width;
    float sumSquares = 0.0f;
    for (int64_t i = 0; i < width; ++i)
      sumSquares += row[i] * row[i];
    float scale = 1.0f / std::sqrt(sumSquares / static_cast<float>(width) + static_cast<float>(eps));
    for (int64_t i = 0; i < width; ++i)
      row[i] = weight[i] * (row[i] * scale);
  }
}

void layerNorm(float *x, int64_t rows, int64_t width, const std::vector<float> &weight, const std::vector<float> &bias,
               double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float *row = x + r * width;
    double mean = 0.0;
    for (int64_t i = 0; i < width; ++i)
      mean += row[i];
    mean /= static_cast<double>(width);
    double variance = 0.0;
    for (int64_t i = 0; i < width; ++i)
      variance += (row[i] - mean) * (row[i] - mean);
    variance /= static_cast<double>(width);
    float scale = static_cast<float>(1.0 / std::sqrt(variance + eps));
    for (int64_t i = 0; i < width; ++i)
      row[i] = (row[i] - static_cast<float>(mean)) * scale * weight[i] + (bias.empty() ? 0.0f : bias[i]);
  }
}

void softmaxScalar(float *x, int64_t count) {
  float maximum = *std::max_element(x, x + count);
  float sum = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    x[i] = std::exp(x[i] - maximum);
    sum += x[i];
  }
  for (int64_t i = 0; i < count; ++i)
    x[i] /= sum;
}

#if defined(__x86_64__)
namespace {

/// e^x in 16 lanes: x = n ln2 + r with |r| <= ln2 / 2 (Cody and Waite's
/// two-part ln2, so r is exact to a few ulps), e^r by its degree-7 Taylor
/// polynomial (truncation below 5e-9 relative), times 2^n by vscalefps
/// (denormal results included). Lanes below -104, where f32 e^x is 0, are 0.
__attribute__((target("avx512f"))) __m512 exp16(__m512 x) {
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x); // a NaN lane stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  for (float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_scalef_ps(p, n));
}

/// The softmax 16 lanes at a time (the tail masked): the same steps as the
/// scalar one, with exp16 for expf and the sum in 16 partial sums.
__attribute__((target("avx512f"))) void softmaxAvx512(float *x, int64_t count) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 maxima = lowest;
  __mmask16 nan = 0;
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 lanes = count - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m512 v = _mm512_mask_loadu_ps(lowest, lanes, x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    maxima = _mm512_max_ps(maxima, v);
  }
  if (nan) { // as the scalar softmax: a NaN anywhere makes the row NaN
    std::fill(x, x + count, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const __m512 maximum = _mm512_set1_ps(_mm512_reduce_max_ps(maxima));
  __m512 sums = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 lanes = count - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + i), maximum));
    _mm512_mask_storeu_ps(x + i, lanes, e);
    sums = _mm512_mask_add_ps(sums, lanes, sums, e);
  }
  const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(sums));
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 lanes = count - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (count - i)) - 1);
    _mm512_mask_storeu_ps(x + i, lanes, _mm512_div_ps(_mm512_maskz_loadu_ps(lanes, x + i), sum));
  }
}

} // namespace
#endif

namespace {

void scoresScalar(const float *q, const float *keysT, int64_t stride, int64_t dim, int64_t visible, float scale,
                  float *scores) {
  for (int64_t s = 0; s < visible; ++s) {
    float sum = 0.0f;
    for (int64_t d = 0; d < dim; ++d)
      sum += q[d] * keysT[d * stride + s];
    scores[s] = sum * scale;
  }
}

#if defined(__x86_64__)
/// One query: four blocks of sixteen keys in flight (independent FMA
/// chains), then single blocks, then a masked tail.
__attribute__((target("avx512f"))) void scoresAvx512(const float *q, const float *keysT, int64_t stride, int64_t dim,
                                                     int64_t visible, float scale, float *scores) {
  const __m512 scaled = _mm512_set1_ps(scale);
  int64_t s = 0;
  for (; s + 64 <= visible; s += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; ++d) {
      const __m512 x = _mm512_set1_ps(q[d]);
      const float *row = keysT + d * stride + s;
      a0 = _mm512_fmadd_ps(x, _mm512_loadu_ps(row), a0);
      a1 = _mm512_fmadd_ps(x, _mm512_loadu_ps(row + 16), a1);
      a2 = _mm512_fmadd_ps(x, _mm512_loadu_ps(row + 32), a2);
      a3 = _mm512_fmadd_ps(x, _mm512_loadu_ps(row + 48), a3);
    }
    _mm512_storeu_ps(scores + s, _mm512_mul_ps(a0, scaled));
    _mm512_storeu_ps(scores + s + 16, _mm512_mul_ps(a1, scaled));
    _mm512_storeu_ps(scores + s + 32, _mm512_mul_ps(a2, scaled));
    _mm512_storeu_ps(scores + s + 48, _mm512_mul_ps(a3, scaled));
  }
  for (; s < visible; s += 16) {
    const __mmask16 mask =
        visible - s >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (visible - s)) - 1);
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; ++d)
      a = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), _mm512_maskz_loadu_ps(mask, keysT + d * stride + s), a);
    _mm512_mask_storeu_ps(scores + s, mask, _mm512_mul_ps(a, scaled));
  }
}

/// Q queries (2 to 4): blocks of 32 keys, each key vector loaded once and
/// multiplied by every query's broadcast element (2Q FMA chains), then
/// masked blocks of sixteen. Per lane the same chain as scoresAvx512.
template <int Q>
__attribute__((target("avx512f"))) void scoresManyAvx512(const float *q, int64_t qStride, const float *keysT,
                                                         int64_t stride, int64_t dim, int64_t visible, float scale,
                                                         float *scores, int64_t scoreStride) {
  const __m512 scaled = _mm512_set1_ps(scale);
  int64_t s = 0;
  for (; s + 32 <= visible; s += 32) {
    __m512 a[Q][2];
    for (int i = 0; i < Q; ++i)
      a[i][0] = a[i][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; ++d) {
      const float *row = keysT + d * stride + s;
      const __m512 k0 = _mm512_loadu_ps(row), k1 = _mm512_loadu_ps(row + 16);
      for (int i = 0; i < Q; ++i) {
        const __m512 x = _mm512_set1_ps(q[i * qStride + d]);
        a[i][0] = _mm512_fmadd_ps(x, k0, a[i][0]);
        a[i][1] = _mm512_fmadd_ps(x, k1, a[i][1]);
      }
    }
    for (int i = 0; i < Q; ++i) {
      _mm512_storeu_ps(scores + i * scoreStride + s, _mm512_mul_ps(a[i][0], scaled));
      _mm512_storeu_ps(scores + i * scoreStride + s + 16, _mm512_mul_ps(a[i][1], scaled));
    }
  }
  for (; s < visible; s += 16) {
    const __mmask16 mask =
        visible - s >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (visible - s)) - 1);
    __m512 a[Q];
    for (int i = 0; i < Q; ++i)
      a[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; ++d) {
      const __m512 k = _mm512_maskz_loadu_ps(mask, keysT + d * stride + s);
      for (int i = 0; i < Q; ++i)
        a[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * qStride + d]), k, a[i]);
    }
    for (int i = 0; i < Q; ++i)
      _mm512_mask_storeu_ps(scores + i * scoreStride + s, mask, _mm512_mul_ps(a[i], scaled));
  }
}

/// Q queries, K vectors of sixteen outputs (columns [c, c + 16K) of at
/// most `width`): each value row loaded once for the positions all Q
/// queries see, then each query's own later positions; positions in order.
template <int Q, int K>
__attribute__((target("avx512f"))) void weightedManyAvx512(const float *weights, int64_t weightStride,
                                                           const int64_t *visible, const float *values, int64_t stride,
                                                           int64_t width, float *out, int64_t outStride) {
  __mmask16 masks[K];
  for (int k = 0; k < K; ++k) {
    const int64_t left = std::clamp<int64_t>(width - 16 * k, 0, 16);
    masks[k] = left == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
  }
  __m512 a[Q][K];
  for (int i = 0; i < Q; ++i)
    for (int k = 0; k < K; ++k)
      a[i][k] = _mm512_setzero_ps();
  const int64_t common = visible[0];
  for (int64_t s = 0; s < common; ++s) {
    const float *row = values + s * stride;
    __m512 v[K];
    for (int k = 0; k < K; ++k)
      v[k] = _mm512_maskz_loadu_ps(masks[k], row + 16 * k);
    for (int i = 0; i < Q; ++i) {
      const __m512 w = _mm512_set1_ps(weights[i * weightStride + s]);
      for (int k = 0; k < K; ++k)
        a[i][k] = _mm512_fmadd_ps(w, v[k], a[i][k]);
    }
  }
  for (int i = 0; i < Q; ++i) {
    for (int64_t s = common; s < visible[i]; ++s) {
      const __m512 w = _mm512_set1_ps(weights[i * weightStride + s]);
      for (int k = 0; k < K; ++k)
        a[i][k] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(masks[k], values + s * stride + 16 * k), a[i][k]);
    }
    for (int k = 0; k < K; ++k)
      _mm512_mask_storeu_ps(out + i * outStride + 16 * k, masks[k], a[i][k]);
  }
}

template <int Q>
void weightedManyAvx512(const float *weights, int64_t weightStride, const int64_t *visible, const float *values,
                        int64_t stride, int64_t dim, float *out, int64_t outStride) {
  for (int64_t c = 0; c < dim; c += 64) {
    const int64_t width = std::min<int64_t>(64, dim - c);
    switch ((width + 15) / 16) {
    case 1:
      weightedManyAvx512<Q, 1>(weights, weightStride, visible, values + c, stride, width, out + c, outStride);
      break;
    case 2:
      weightedManyAvx512<Q, 2>(weights, weightStride, visible, values + c, stride, width, out + c, outStride);
      break;
    case 3:
      weightedManyAvx512<Q, 3>(weights, weightStride, visible, values + c, stride, width, out + c, outStride);
      break;
    default:
      weightedManyAvx512<Q, 4>(weights, weightStride, visible, values + c, stride, width, out + c, outStride);
    }
  }
}
#endif

} // namespace

void scoresOfTransposedKeys(const float *q, int64_t qStride, int count, const float *keysT, int64_t stride, int64_t dim,
                            int64_t visible, float scale, float *scores, int64_t scoreStride) {
#if defined(__x86_64__)
  static const bool hasAvx512 = __builtin_cpu_supports("avx512f");
  if (hasAvx512) {
    switch (count) {
    case 1:
      return scoresAvx512(q, keysT, stride, dim, visible, scale, scores);
    case 2:
      return scoresManyAvx512<2>(q, qStride, keysT, stride, dim, visible, scale, scores, scoreStride);
    case 3:
      return scoresManyAvx512<3>(q, qStride, keysT, stride, dim, visible, scale, scores, scoreStride);
    case 4:
      return scoresManyAvx512<4>(q, qStride, keysT, stride, dim, visible, scale, scores, scoreStride);
    }
  }
#endif
  for (int i = 0; i < count; ++i)
    scoresScalar(q + i * qStride, keysT, stride, dim, visible, scale, scores + i * scoreStride);
}

void weightedRows(const float *weights, int64_t weightStride, const int64_t *visible, int count, const float *values,
                  int64_t stride, int64_t dim, float *out, int64_t outStride) {
#if defined(__x86_64__)
  static const bool hasAvx512 = __builtin_cpu_supports("avx512f");
  if (hasAvx512) {
    switch (count) {
    case 1:
      return weightedManyAvx512<1>(weights, weightStride, visible, values, stride, dim, out, outStride);
    case 2:
      return weightedManyAvx512<2>(weights, weightStride, visible, values, stride, dim, out, outStride);
    case 3:
      return weightedManyAvx512<3>(weights, weightStride, visible, values, stride, dim, out, outStride);
    case 4:
      return weightedManyAvx512<4>(weights, weightStride, visible, values, stride, dim, out, outStride);
    }
  }
#endif
  for (int i = 0; i < count; ++i) {
    float *target = out + i * outStride;
    std::fill(target, target + dim, 0.0f);
    for (int64_t s = 0; s < visible[i]; ++s)
      for (int64_t d = 0; d < dim; ++d)
        target[d] += weights[i * weightStride + s] * values[s * stride + d];
  }
}

void softmax(float *x, int64_t count) {
#if defined(__x86_64__)
  static const bool hasAvx512 = __builtin_cpu_supports("avx512f");
  if (hasAvx512 && count > 0)
    return softmaxAvx512(x, count);
#endif
  softmaxScalar(x, count);
}

} // namespace moe::kernels
