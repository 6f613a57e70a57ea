//===- RoutedExperts.h - A decoded token's MoE block, planned on the GPU -*- C++ -*-===//
//
// Part of moec. The job tables of the CUDA products (MatrixProducts.cu)
// and what lets one decoded token's MoE block run without the host: a
// layer's router settings and its experts' product templates live in
// device memory (RoutedLayer); a one-block kernel routes the token from
// the router's logits (kernels/common/Routing.h, the CPU engine's
// arithmetic) and writes the job tables of the block's launches
// (RoutedPlan), whose sizes the launches read from device memory. The
// selection and the planning are plain functions of their inputs, built
// for the host too, so the CPU's tests check them against the engine's
// own routing (tests/unit/RoutedExpertsTest.cpp).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CUDA_ROUTEDEXPERTS_H
#define MOE_KERNELS_CUDA_ROUTEDEXPERTS_H

#include "common/Routing.h"

#include <cstdint>
#include <vector>

namespace moe::cuda {

/// The size of a launch that a kernel reads from device memory: its jobs
/// and its warps (rows, elements) in all; the grid covers an upper bound.
struct LaunchSize {
  int32_t count = 0;
  int64_t total = 0;
};

/// Rounds x[t, 0..cols) to int8 per group of `group` (zero-padded). With
/// `up`, the values are SwiGLU's silu(x) * up (x holds the gate; up has
/// x's strides): rounded, or, where `h` is set, written to h (x's strides)
/// and not rounded (values, scales and sums unused; a warp per `group`
/// values).
struct QuantJob {
  const float *x;
  int64_t ldx, cols, groups, tokens;
  int group;
  int8_t *values; ///< [tokens, groups * group]
  float *scales;  ///< [tokens, groups]
  float *sums;    ///< [tokens, groups]
  int64_t first;  ///< Warps before this job.
  const float *up = nullptr;
  float *h = nullptr;
};

/// Values of SwiGLU a warp computes for a down product that reads floats
/// (QuantJob without values).
constexpr int kSwigluChunk = 128;

/// y[t * ldy + r] = row r . x_t for r < rows, t < tokens.
struct ProductJob {
  const uint8_t *w;
  int64_t rows, cols;
  int layout; ///< WeightLayout: 0 f32, 1 bf16, 2 group.
  int bits, group, symmetric, bf16Scale, signedCodes, vectorized;
  int blockShift;                     ///< Group layout: log2(blocks of 32 codes per group).
  int64_t codeRowBytes, headerOffset; ///< Group layout: the planes (common/GroupPlanes.h).
  const float *x;                     ///< Dense layouts: f32 activations, row stride ldx.
  int64_t ldx;
  const int8_t *q; ///< Group layout: quantized activation (QuantJob).
  const float *qScales, *qSums;
  int64_t groups;
  float *y;
  int64_t ldy;
  int64_t tokens; ///< Rows of x and y.
  int64_t first;  ///< Rows before this job (the warp-per-row kernels' warps; none for a tensor job).
  /// Group layout over many tokens: whether the tensor-core kernel
  /// (TensorTiles.h) runs the job, and its tiles before this job.
  int tensor;
  int64_t firstTile;
};

constexpr int kGroupLayout = 2;                ///< ProductJob::layout of moec's group formats.
constexpr int kMaxRoutedTopK = 16;             ///< Experts per token the device routes (more: the host routes).
constexpr int kMaxRouted = kMaxRoutedTopK + 1; ///< And a shared expert.
constexpr int kMaxRouterRows = 1024;           ///< Router rows the device routes.
constexpr int kMaxInputGroups = 3;             ///< Group sizes 32, 64, 128.

/// One expert's three products with the weights' fields filled (w .. headerOffset,
/// groups; `vectorized`: whether a 16-byte-aligned input of ldx = cols may
/// be read four floats at a time); a token's plan fills the rest.
struct ExpertTemplate {
  ProductJob gate, up, down;
  int32_t gateInput = 0, upInput = 0; ///< Group layouts: which of the layer's input quantizations they read.
};

/// A MoE layer as the device routes it (device memory, one per layer).
struct RoutedLayer {
  routing::RouterParams router;
  double skipThreshold = 0; ///< NAEE's dynamic skipping (0: none).
  int32_t slots = 0;        ///< Expert slots (fewer than router rows after merging).
  int32_t hasShared = 0, sharedGated = 0;
  int64_t hidden = 0;
  const float *correctionBias = nullptr;   ///< [router rows] or null.
  const int32_t *remap = nullptr;          ///< Router row -> slot, or null (the identity).
  const float *sharedGate = nullptr;       ///< [hidden]: a gated shared expert's gate vector.
  const ExpertTemplate *experts = nullptr; ///< [slots + hasShared], the shared expert last.
  int32_t inputGroups = 0;                 ///< Group sizes the gate and up products quantize the input at.
  int32_t inputGroupSize[kMaxInputGroups] = {0, 0, 0};
};

/// Where a token's intermediates lie (device memory), given to the kernels
/// by value: every area is 256-byte aligned, strides included.
struct RoutedScratch {
  const float *input = nullptr;                       ///< The MLP input [hidden].
  const float *logits = nullptr;                      ///< The router's logits of it [router rows].
  float *residual = nullptr;                          ///< The residual stream: += the block's output.
  int8_t *inputValues = nullptr;                      ///< Per input group size: [inputValueStride] bytes.
  float *inputScales = nullptr, *inputSums = nullptr; ///< Per input group size: [inputGroupStride].
  int64_t inputValueStride = 0, inputGroupStride = 0;
  float *gateOut = nullptr, *upOut = nullptr, *h = nullptr; ///< The experts' intermediates, one after another.
  int8_t *downValues = nullptr;                             ///< Per expert run: [downValueStride] bytes.
  float *downScales = nullptr, *downSums = nullptr;         ///< Per expert run: [downGroupStride].
  int64_t downValueStride = 0, downGroupStride = 0;
  float *parts = nullptr; ///< Per expert run: its output [hidden].
  /// The counts of RoutedFusion: one per group of the experts' down inputs
  /// (as many as the widest experts' rows), one per row of the output
  /// [hidden]; zero between launches.
  unsigned *groupArrivals = nullptr, *rowArrivals = nullptr;
};

/// A token's MoE block as launches read it (device memory). The routing
/// kernel rounds the input itself (routedInputQuant); downJobs compute
/// SwiGLU and round it for each down product (downQuant).
struct RoutedPlan {
  LaunchSize first, downQuant, second, combine;
  int32_t count = 0;              ///< Experts run (the shared one included).
  int32_t slots[kMaxRouted] = {}; ///< Their slots (the shared expert: RoutedLayer::slots).
  float weights[kMaxRouted] = {};
  QuantJob inputJobs[kMaxInputGroups];
  ProductJob firstJobs[2 * kMaxRouted]; ///< Gate, up, gate, up, ...
  QuantJob downJobs[kMaxRouted];
  ProductJob secondJobs[kMaxRouted];
};

/// A product launch of a token's MoE block (RoutedPlan) that also runs
/// what follows it, so that the block is three launches, not five: the
/// gate and up products (kThenSwiglu) each expert's SwiGLU and its
/// rounding (plan->downJobs), the down products (kThenSum) the weighted
/// sum onto the residual stream. The warp that writes a row counts it
/// (arrivalOf), and the warp whose count completes a set of rows runs what
/// reads them and sets the count back to zero for the next launch. A
/// launch parameter: the routing kernel's plan is the same either way.
struct RoutedFusion {
  enum Stage : int32_t { kNone, kThenSwiglu, kThenSum };
  int32_t stage = kNone;
  const RoutedPlan *plan = nullptr;
  unsigned *arrivals = nullptr; ///< RoutedScratch::groupArrivals (kThenSwiglu), rowArrivals (kThenSum).
  const float *parts = nullptr; ///< kThenSum: RoutedScratch::parts, residual, and the hidden size.
  float *residual = nullptr;
  int64_t hidden = 0;
};

/// Where row `row` of job `job` of a fused launch counts, and the count
/// that completes its set: a group of an expert's down input has its rows
/// of gate and of up (fewer in a last, short group; the expert's groups
/// follow the SwiGLU warps before it); a row of the block's output, that
/// row of each expert's down product.
struct Arrival {
  int64_t index;
  unsigned target;
};
MOE_HOST_DEVICE inline Arrival arrivalOf(const RoutedFusion &f, int job, int64_t row) {
  if (f.stage == RoutedFusion::kThenSwiglu) {
    const QuantJob &q = f.plan->downJobs[job >> 1];
    const int32_t r = static_cast<int32_t>(row), k = r / q.group, left = static_cast<int32_t>(q.cols) - k * q.group;
    return {q.first + k, static_cast<unsigned>(2 * (left < q.group ? left : q.group))};
  }
  return {row, static_cast<unsigned>(f.plan->count)};
}

/// The GPU's exponentials for routing (kernels/common/Routing.h), one
/// thread: the CPU's scalar softmax (max-subtracted, summed in order) with
/// expf. The routing kernel runs a warp's version of it (WarpMath in
/// MatrixProducts.cu: the same selection, sums in another order).
struct DeviceMath {
  MOE_HOST_DEVICE void softmax(float *x, int32_t count) const {
    float most = x[0];
    for (int32_t i = 1; i < count; ++i)
      most = most < x[i] ? x[i] : most;
    float sum = 0.0f;
    for (int32_t i = 0; i < count; ++i) {
      x[i] = expf(x[i] - most);
      sum += x[i];
    }
    for (int32_t i = 0; i < count; ++i)
      x[i] /= sum;
  }
  MOE_HOST_DEVICE float sigmoid(float x) const { return 1.0f / (1.0f + expf(-x)); }
  MOE_HOST_DEVICE void topK(const float *values, int32_t count, int32_t k, int32_t *taken, int32_t *out) const {
    routing::serialTopK(values, count, k, taken, out);
  }
  MOE_HOST_DEVICE void sync() const {}
};

/// The experts one token runs, in the order the engine's host decode runs
/// them: routed slots ascending (choices of one slot, merged experts, run
/// once with their weights added in choice order; choices that dynamic
/// skipping zeroed, not at all), then the shared expert with
/// `sharedWeight`. Returns how many.
template <class Math>
MOE_HOST_DEVICE int32_t selectExperts(const RoutedLayer &layer, const float *logits, float sharedWeight,
                                      const routing::Scratch &scratch, const Math &math, int32_t *slots,
                                      float *weights) {
  int32_t chosen[kMaxRoutedTopK];
  float chosenWeights[kMaxRoutedTopK];
  const int32_t k = layer.router.topK;
  routing::route(layer.router, logits, layer.correctionBias, scratch, chosen, chosenWeights, math);
  routing::skipWeakChoices(layer.skipThreshold, k, chosenWeights);
  int32_t count = 0;
  for (int32_t i = 0; i < k; ++i) {
    if (layer.skipThreshold > 0 && chosenWeights[i] == 0)
      continue;
    const int32_t slot = layer.remap ? layer.remap[chosen[i]] : chosen[i];
    int32_t j = 0;
    while (j < count && slots[j] != slot)
      ++j;
    if (j < count) {
      weights[j] += chosenWeights[i];
      continue;
    }
    // Inserted in slot order.
    while (j > 0 && slots[j - 1] > slot) {
      slots[j] = slots[j - 1];
      weights[j] = weights[j - 1];
      --j;
    }
    slots[j] = slot;
    weights[j] = chosenWeights[i];
    ++count;
  }
  if (layer.hasShared) {
    slots[count] = layer.slots;
    weights[count] = sharedWeight;
    ++count;
  }
  return count;
}

/// The rounding of one token's x[0..cols) to int8 per group of `group`
/// into the given areas, after `first` warps of earlier jobs.
MOE_HOST_DEVICE inline QuantJob oneTokenQuant(const float *x, int64_t cols, int group, int8_t *values, float *scales,
                                              float *sums, int64_t first) {
  QuantJob job;
  job.x = x;
  job.ldx = cols;
  job.cols = cols;
  job.group = group;
  job.groups = (cols + group - 1) / group;
  job.tokens = 1;
  job.values = values;
  job.scales = scales;
  job.sums = sums;
  job.first = first;
  return job;
}

/// Warps of an expert's SwiGLU and its rounding for the down product
/// (planRoutedExperts' downJobs): a warp per group of a group format, per
/// kSwigluChunk values of a float one.
MOE_HOST_DEVICE inline int64_t downInputWarps(const ExpertTemplate &e) {
  return e.down.layout == kGroupLayout ? e.down.groups : (e.down.cols + kSwigluChunk - 1) / kSwigluChunk;
}

/// The rounding of a token's MoE input at the layer's `g`th input group
/// size (the routing kernel runs it; the gate and up products read it).
MOE_HOST_DEVICE inline QuantJob routedInputQuant(const RoutedLayer &layer, const RoutedScratch &scratch, int32_t g,
                                                 int64_t first) {
  return oneTokenQuant(
      scratch.input, layer.hidden, layer.inputGroupSize[g], scratch.inputValues + g * scratch.inputValueStride,
      scratch.inputScales + g * scratch.inputGroupStride, scratch.inputSums + g * scratch.inputGroupStride, first);
}

/// The job tables and launch sizes of `count` experts (selectExperts) over
/// the areas of `scratch`: the input quantized at each group size the gate
/// and up products read (routedInputQuant), gate and up of every expert,
/// their intermediates laid one after another, each expert's silu(gate) *
/// up, rounded at its down product's group where that is a group format
/// and written to h where it reads floats, the down products into
/// `parts`, and the weighted sum onto the residual stream.
MOE_HOST_DEVICE inline void planRoutedExperts(const RoutedLayer &layer, const RoutedScratch &scratch, int32_t count,
                                              const int32_t *slots, const float *weights, RoutedPlan &plan) {
  const int64_t hidden = layer.hidden;
  plan.count = count;
  for (int32_t i = 0; i < count; ++i) {
    plan.slots[i] = slots[i];
    plan.weights[i] = weights[i];
  }
  int64_t warps = 0;
  for (int32_t g = 0; g < layer.inputGroups; ++g) {
    plan.inputJobs[g] = routedInputQuant(layer, scratch, g, warps);
    warps += plan.inputJobs[g].groups;
  }

  // Gate and up, each expert's intermediates after the last one's.
  int64_t offset = 0, rows = 0;
  for (int32_t i = 0; i < count; ++i) {
    const ExpertTemplate &e = layer.experts[slots[i]];
    const int64_t width = e.gate.rows;
    for (int32_t which = 0; which < 2; ++which) {
      ProductJob &job = plan.firstJobs[2 * i + which];
      job = which == 0 ? e.gate : e.up;
      job.x = scratch.input;
      job.ldx = hidden;
      job.tokens = 1;
      job.y = (which == 0 ? scratch.gateOut : scratch.upOut) + offset;
      job.ldy = width;
      job.first = rows;
      if (job.layout == kGroupLayout) {
        const QuantJob &input = plan.inputJobs[which == 0 ? e.gateInput : e.upInput];
        job.q = input.values;
        job.qScales = input.scales;
        job.qSums = input.sums;
      }
      rows += width;
    }
    offset += width;
  }
  plan.first = {2 * count, rows};

  // Down, each from its expert's silu(gate) * up: rounded at its group
  // (a group format) or written to its slice of h (floats).
  offset = 0;
  rows = 0;
  warps = 0;
  for (int32_t i = 0; i < count; ++i) {
    const ExpertTemplate &e = layer.experts[slots[i]];
    const int64_t width = e.gate.rows;
    ProductJob &job = plan.secondJobs[i];
    job = e.down;
    job.x = scratch.h + offset;
    job.ldx = width;
    job.tokens = 1;
    job.y = scratch.parts + i * hidden;
    job.ldy = hidden;
    job.first = rows;
    QuantJob &quant = plan.downJobs[i];
    if (job.layout == kGroupLayout) {
      quant = oneTokenQuant(
          scratch.gateOut + offset, width, job.group, scratch.downValues + i * scratch.downValueStride,
          scratch.downScales + i * scratch.downGroupStride, scratch.downSums + i * scratch.downGroupStride, warps);
      job.q = quant.values;
      job.qScales = quant.scales;
      job.qSums = quant.sums;
    } else {
      quant = oneTokenQuant(scratch.gateOut + offset, width, kSwigluChunk, nullptr, nullptr, nullptr, warps);
      quant.h = scratch.h + offset;
      job.vectorized = job.vectorized && offset % 4 == 0;
    }
    quant.up = scratch.upOut + offset;
    warps += quant.groups;
    rows += hidden;
    offset += width;
  }
  plan.downQuant = {count, warps};
  plan.second = {count, rows};
  plan.combine = {count, hidden};
}

/// a * b and a + b each rounded once: no fused multiply-add on the device,
/// as on the CPU (Engine.cpp builds with -ffp-contract=off; the scalar
/// quant kernels fuse none on x86-64's baseline, which has no FMA), so
/// that a kernel adds as the CPU engine does.
MOE_HOST_DEVICE inline float mulRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MOE_HOST_DEVICE inline float addRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

/// One routed expert of a MoE block over a block of tokens: the tokens
/// routed to it and their routing weights (host memory).
struct ExpertRows {
  const int32_t *tokens = nullptr;
  const float *weights = nullptr;
  int64_t count = 0;
};

/// How a MoE block's prefill on the device (Context::routedExperts) moves
/// rows: the experts' rows are gathered one expert after another (row r
/// is token rowToken[r]), and token t's outputs are the entries
/// starts[t] .. starts[t + 1] (a row of the experts' outputs and its
/// weight), in expert order.
struct BlockSums {
  std::vector<int32_t> rowToken, starts, entryRow;
  std::vector<float> entryWeight;
};

/// The BlockSums of `count` experts over a block of `tokens` tokens; every
/// token index in [0, tokens).
inline BlockSums blockSums(int64_t tokens, const ExpertRows *experts, size_t count) {
  BlockSums sums;
  sums.starts.assign(static_cast<size_t>(tokens) + 1, 0);
  for (size_t i = 0; i < count; ++i)
    for (int64_t r = 0; r < experts[i].count; ++r)
      ++sums.starts[static_cast<size_t>(experts[i].tokens[r]) + 1];
  for (int64_t t = 0; t < tokens; ++t)
    sums.starts[t + 1] += sums.starts[t];
  const size_t rows = static_cast<size_t>(sums.starts.back());
  sums.rowToken.resize(rows);
  sums.entryRow.resize(rows);
  sums.entryWeight.resize(rows);
  std::vector<int32_t> next(sums.starts.begin(), sums.starts.end() - 1);
  int32_t row = 0;
  for (size_t i = 0; i < count; ++i)
    for (int64_t r = 0; r < experts[i].count; ++r, ++row) {
      const int32_t token = experts[i].tokens[r], at = next[token]++;
      sums.rowToken[row] = token;
      sums.entryRow[at] = row;
      sums.entryWeight[at] = experts[i].weights[r];
    }
  return sums;
}

/// Column c of token t's block output: its experts' outputs y[row] (rows of
/// `hidden`) times their weights, added from zero in order, each product
/// and sum rounded on its own (the CPU engine's addRoutedOutputs).
MOE_HOST_DEVICE inline float blockWeightedSum(const float *y, const int32_t *starts, const int32_t *entryRow,
                                              const float *entryWeight, int64_t hidden, int64_t t, int64_t c) {
  float total = 0.0f;
  for (int32_t j = starts[t]; j < starts[t + 1]; ++j)
    total = addRn(total, mulRn(entryWeight[j], y[static_cast<int64_t>(entryRow[j]) * hidden + c]));
  return total;
}

} // namespace moe::cuda

#endif // MOE_KERNELS_CUDA_ROUTEDEXPERTS_H
