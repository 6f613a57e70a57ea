//===- Engine.cpp - The one forward pass of moec --------------------------===//
//
// Part of moec. Pre-norm decoder layers: h = x + Attn(Norm1(x)), then
// out = h + Mlp(Norm2(h)); final norm and lm_head. Attention is GQA (with
// optional qk-norm per head or over the full projection, q/k/v clamping,
// biases) or DeepSeek's MLA; the MLP is dense SwiGLU or a routed MoE block
// with optional shared expert. Computed in f32.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Engine.h"

#include "EngineParts.h"
#include "Kernels.h"
#include "Rope.h"
#include "Router.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <unistd.h>

namespace moe {

using namespace kernels;
using detail::normalize;
using detail::sharedExpertGate;

void detail::normalize(const ModelSpec &spec, float *x, int64_t tokens, const std::vector<float> &weight,
                       const std::vector<float> &bias) {
  if (spec.normKind == NormKind::LayerNorm)
    layerNorm(x, tokens, spec.hiddenSize, weight, bias, spec.normEps);
  else
    rmsNorm(x, tokens, spec.hiddenSize, weight, spec.normEps);
}

float detail::sharedExpertGate(const LayerSpec &layer, const LayerWeights &w, const float *x, int64_t H) {
  if (!layer.shared.gated)
    return 1.0f;
  float dot = 0.0f;
  for (int64_t i = 0; i < H; ++i)
    dot += x[i] * w.sharedExpertGate[i];
  return sigmoid(dot);
}

void detail::routeBlock(const ModelSpec &spec, const LayerWeights &w, const float *x, int64_t tokens,
                        const std::set<int64_t> *maskedRows, BlockRouting &routing, const float *logits) {
  const RouterSpec &routerSpec = w.routing.router ? *w.routing.router : spec.router;
  // E router rows choose among the expert slots (fewer after merging).
  const int64_t E = w.router.rows, K = routerSpec.topK;
  const int64_t slots = static_cast<int64_t>(w.experts.size());
  routing.logits.resize(static_cast<size_t>(tokens * E));
  if (logits)
    std::copy_n(logits, tokens * E, routing.logits.data());
  else
    linear(x, tokens, w.router, routing.logits.data());
  if (maskedRows)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t e : *maskedRows)
        routing.logits[t * E + e] = -std::numeric_limits<float>::infinity();
  routing.chosen.resize(static_cast<size_t>(tokens * K));
  routing.weights.resize(static_cast<size_t>(tokens * K));
  const float *bias = w.routerCorrectionBias.empty() ? nullptr : w.routerCorrectionBias.data();
  for (int64_t t = 0; t < tokens; ++t)
    router::route(routerSpec, E, routing.logits.data() + t * E, bias, routing.chosen.data() + t * K,
                  routing.weights.data() + t * K);

  // Group tokens by expert slot: one GEMM per expert, slots in order. A
  // token whose choices share a slot (merged experts) runs it once with
  // the summed weight; skipped experts are not run.
  routing.tokensOf.resize(static_cast<size_t>(slots));
  routing.weightsOf.resize(static_cast<size_t>(slots));
  for (int64_t e = 0; e < slots; ++e) {
    routing.tokensOf[e].clear();
    routing.weightsOf[e].clear();
  }
  routing.skipped.assign(routing.weights.begin(), routing.weights.end());
  routing.slotOfChoice.assign(static_cast<size_t>(tokens * K), -1);
  const double threshold = w.routing.skipThreshold;
  for (int64_t t = 0; t < tokens; ++t) {
    float *tokenWeights = routing.skipped.data() + t * K;
    router::skipWeakChoices(threshold, K, tokenWeights);
    for (int64_t i = 0; i < K; ++i) {
      if (threshold > 0 && tokenWeights[i] == 0)
        continue;
      int32_t row = routing.chosen[t * K + i];
      // A masked row chosen anyway (group-limited routing whose chosen
      // groups hold fewer than top-k live rows) has weight 0: not run.
      if (maskedRows && maskedRows->count(row))
        continue;
      int32_t slot = w.routing.remap.empty() ? row : w.routing.remap[static_cast<size_t>(row)];
      routing.slotOfChoice[t * K + i] = slot;
      std::vector<int32_t> &slotTokens = routing.tokensOf[static_cast<size_t>(slot)];
      if (!slotTokens.empty() && slotTokens.back() == static_cast<int32_t>(t)) {
        routing.weightsOf[static_cast<size_t>(slot)].back() += tokenWeights[i];
        continue;
      }
      slotTokens.push_back(static_cast<int32_t>(t));
      routing.weightsOf[static_cast<size_t>(slot)].push_back(tokenWeights[i]);
    }
  }
}

namespace {

size_t defaultBudget() {
  long pages = sysconf(_SC_PHYS_PAGES), pageSize = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || pageSize <= 0)
    return size_t(8) << 30;
  return static_cast<size_t>(pages) * static_cast<size_t>(pageSize) / 4 * 3;
}

int64_t keyWidth(const ModelSpec &spec) {
  const AttentionSpec &a = spec.attention;
  return a.kind == AttentionKind::MultiHeadLatent ? a.numHeads * a.headDim : a.numKeyValueHeads * a.headDim;
}

int64_t valueWidth(const ModelSpec &spec) {
  const AttentionSpec &a = spec.attention;
  return a.kind == AttentionKind::MultiHeadLatent ? a.numHeads * a.valueHeadDim : a.numKeyValueHeads * a.valueHeadDim;
}

/// A cache this engine made, with room for `tokens` more positions (RoPE
/// tables, and what the model was trained on, end at the context).
Status checkCache(const ModelSpec &spec, const KvCache &cache, int64_t tokens) {
  if (cache.keys.size() != static_cast<size_t>(spec.numLayers))
    return Status::error("forward: the KV cache was not made by this engine");
  if (cache.length + tokens > spec.maxPositions)
    return Status::error("forward: positions ", cache.length, "..", cache.length + tokens - 1,
                         " run past the model's context of ", spec.maxPositions,
                         " tokens (config.json max_position_embeddings); use a shorter prompt or --seq-len");
  return Status::success();
}

/// `buffer` resized to `count` values (its capacity kept between calls).
template <typename T> std::vector<T> &sized(std::vector<T> &buffer, int64_t count) {
  buffer.resize(static_cast<size_t>(count));
  return buffer;
}

/// Per-head score GEMMs (queries x keys x head dimension) up to this size
/// run in the pool's own kernel; larger ones as single-threaded BLAS GEMMs
/// over the pool. Measured when the larger ones used OpenBLAS's threads
/// (BENCHMARKS.md, "Prefill attention in the pool"): on the fixtures (4
/// heads of 40, 512 tokens: 10.5 M) the own kernel is faster; on OLMoE's
/// shapes (16 heads of 128: 33.5 M) BLAS was 5-8% faster.
constexpr int64_t kPoolAttentionWork = int64_t(1) << 24;

/// Causal attention of `tokens` new queries over the cache (which already
/// holds their keys and values). q is [T, heads * qDim], output
/// [T, heads * vDim]; query head h reads key/value head h / group.
void attend(const ModelSpec &spec, const float *q, int64_t tokens, const KvCache &cache, int64_t layer,
            int64_t firstPosition, float *out) {
  const AttentionSpec &a = spec.attention;
  const int64_t heads = a.numHeads;
  const int64_t kvHeads = a.kind == AttentionKind::MultiHeadLatent ? heads : a.numKeyValueHeads;
  const int64_t group = heads / kvHeads;
  const int64_t qDim = a.headDim, vDim = a.valueHeadDim;
  const int64_t kWidth = keyWidth(spec), vWidth = valueWidth(spec);
  const float *keys = cache.keys[static_cast<size_t>(layer)].data();
  const float *values = cache.values[static_cast<size_t>(layer)].data();
  const float scale = static_cast<float>(a.softmaxScale);
  const int64_t total = firstPosition + tokens;
  if (tokens > 1 && tokens * total * qDim <= kPoolAttentionWork) {
    // Small prefill in the worker pool: the keys transposed per key/value
    // head (so sixteen scores come from one vector per dimension), then
    // tasks of (head, block of queries), each query's scores, causal
    // softmax and weighted values. Blocks are ordered short-long-short-long
    // so that the pool's even split of tasks is an even split of work.
    thread_local std::vector<float> transposedBuffer;
    std::vector<float> &transposed = transposedBuffer;
    transposed.resize(static_cast<size_t>(kvHeads * qDim * total));
    // Sixteen positions at a time: their key rows stay in L1 while each
    // dimension's sixteen values are written as one run.
    for (int64_t kv = 0; kv < kvHeads; ++kv)
      for (int64_t first = 0; first < total; first += 16) {
        const int64_t last = std::min(total, first + 16);
        for (int64_t d = 0; d < qDim; ++d) {
          float *target = transposed.data() + (kv * qDim + d) * total;
          for (int64_t s = first; s < last; ++s)
            target[s] = keys[s * kWidth + kv * qDim + d];
        }
      }
    constexpr int64_t kBlock = 16;
    const int64_t blocks = (tokens + kBlock - 1) / kBlock;
    const float *keysT = transposed.data();
    parallelRows(heads * blocks, heads * tokens * total * (qDim + vDim) / 2, [&](int64_t begin, int64_t end) {
      // Four queries at a time: their keys and values read once.
      constexpr int kQueries = 4;
      thread_local std::vector<float> perThread;
      std::vector<float> &scores = perThread;
      scores.resize(static_cast<size_t>(kQueries * total));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t h = task / blocks, i = task % blocks;
        const int64_t block = i % 2 == 0 ? i / 2 : blocks - 1 - i / 2;
        const int64_t kvHead = h / group;
        const int64_t last = std::min(tokens, (block + 1) * kBlock);
        for (int64_t t = block * kBlock; t < last; t += kQueries) {
          const int count = static_cast<int>(std::min<int64_t>(kQueries, last - t));
          int64_t visible[kQueries];
          for (int j = 0; j < count; ++j)
            visible[j] = firstPosition + t + j + 1;
          scoresOfTransposedKeys(q + t * heads * qDim + h * qDim, heads * qDim, count, keysT + kvHead * qDim * total,
                                 total, qDim, visible[count - 1], scale, scores.data(), total);
          for (int j = 0; j < count; ++j)
            softmax(scores.data() + j * total, visible[j]);
          weightedRows(scores.data(), total, visible, count, values + kvHead * vDim, vWidth, vDim,
                       out + t * heads * vDim + h * vDim, heads * vDim);
        }
      }
    });
    return;
  }
  if (tokens > 1) {
    // Prefill, tasks of (head, 256 queries) over the pool, the longest
    // first: per task, the queries' scores against the keys the last of
    // them sees as one single-threaded GEMM, the causal softmax row by row
    // (later keys weighted 0), then the weighted values as a second GEMM.
    constexpr int64_t kRows = 256;
    const int64_t blocks = (tokens + kRows - 1) / kRows;
    parallelTasks(heads * blocks, heads * tokens * total * (qDim + vDim), [&](int64_t index) {
      const int64_t block = blocks - 1 - index / heads, h = index % heads, kvHead = h / group;
      const int64_t first = block * kRows, rows = std::min(kRows, tokens - first);
      const int64_t seen = firstPosition + first + rows; // keys the block's last query sees
      thread_local std::vector<float> perThread;
      std::vector<float> &scores = perThread;
      scores.resize(static_cast<size_t>(rows * seen));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(seen),
                  static_cast<int>(qDim), scale, q + first * heads * qDim + h * qDim, static_cast<int>(heads * qDim),
                  keys + kvHead * qDim, static_cast<int>(kWidth), 0.0f, scores.data(), static_cast<int>(seen));
      for (int64_t r = 0; r < rows; ++r) {
        float *row = scores.data() + r * seen;
        const int64_t visible = firstPosition + first + r + 1;
        softmax(row, visible);
        std::fill(row + visible, row + seen, 0.0f);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows), static_cast<int>(vDim),
                  static_cast<int>(seen), 1.0f, scores.data(), static_cast<int>(seen), values + kvHead * vDim,
                  static_cast<int>(vWidth), 0.0f, out + first * heads * vDim + h * vDim,
                  static_cast<int>(heads * vDim));
      releaseIfLarge(scores);
    });
    return;
  }
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t visible = firstPosition + t + 1;
    // Heads split across the pool (each head's sums stay on one thread).
    // Positions outer, heads inner: the cache is read once, row after row
    // (head by head it was read in strides of a row per position); each
    // head's weighted values still add up in position order.
    parallelRows(heads, heads * visible * (qDim + vDim), [&](int64_t headBegin, int64_t headEnd) {
      thread_local std::vector<float> perThread;
      std::vector<float> &scores = perThread;
      const int64_t count = headEnd - headBegin;
      scores.resize(static_cast<size_t>(count * visible));
      const float *query = q + t * heads * qDim;
      for (int64_t s = 0; s < visible; ++s) {
        const float *keyRow = keys + s * kWidth;
        for (int64_t h = headBegin; h < headEnd; ++h)
          // The vector dot of f32 rows (a plain loop stays one scalar chain).
          scores[static_cast<size_t>((h - headBegin) * visible + s)] =
              quant::dotF32(query + h * qDim, keyRow + (h / group) * qDim, qDim) * scale;
      }
      for (int64_t h = 0; h < count; ++h)
        softmax(scores.data() + h * visible, visible);
      float *result = out + t * heads * vDim;
      std::fill(result + headBegin * vDim, result + headEnd * vDim, 0.0f);
      for (int64_t s = 0; s < visible; ++s) {
        const float *valueRow = values + s * vWidth;
        for (int64_t h = headBegin; h < headEnd; ++h) {
          const float weight = scores[static_cast<size_t>((h - headBegin) * visible + s)];
          const float *value = valueRow + (h / group) * vDim;
          float *target = result + h * vDim;
          for (int64_t i = 0; i < vDim; ++i)
            target[i] += weight * value[i];
        }
      }
    });
  }
}

/// Matrices that read the same input x[tokens, in] (q, k and v; no bias):
/// on a device that holds them all, one call (x and the results cross
/// once); one token on the host, one parallel region over their
/// concatenated rows; else each its own product.
void linearTogether(const float *x, int64_t tokens, int64_t in,
                    std::initializer_list<std::pair<const Matrix *, float *>> jobs) {
  if (std::all_of(jobs.begin(), jobs.end(), [](const auto &job) { return job.first->device != nullptr; })) {
    jobs.begin()->first->device->device().linearTogether(x, tokens, in, std::span(jobs.begin(), jobs.size()));
    return;
  }
  if (tokens > 1) {
    for (const auto &[matrix, y] : jobs)
      linear(x, tokens, *matrix, y);
    return;
  }
  int64_t rows = 0, bytes = 0;
  thread_local DecodeInput perThread;
  DecodeInput &input = perThread;
  input.reset(x, in);
  for (const auto &[matrix, y] : jobs) {
    input.prepareFor(*matrix);
    rows += matrix->rows;
    bytes += static_cast<int64_t>(matrix->bytes());
  }
  parallelRows(rows, bytes, [&](int64_t begin, int64_t end) {
    int64_t offset = 0;
    for (const auto &[matrix, y] : jobs) {
      const int64_t low = std::max(begin, offset), high = std::min(end, offset + matrix->rows);
      if (low < high)
        gemvRange(*matrix, input, low - offset, high - offset, y + (low - offset));
      offset += matrix->rows;
    }
  });
}

/// Grouped-query attention; appends keys/values to the cache.
void groupedQueryAttention(const ModelSpec &spec, const LayerWeights &w, const float *x, int64_t tokens, int64_t layer,
                           const rope::Angles &angles, KvCache &cache, float *out, EngineObserver *observer) {
  const AttentionSpec &a = spec.attention;
  const int64_t hd = a.headDim, qWidth = a.numHeads * hd, kvWidth = a.numKeyValueHeads * hd;
  // Buffers reused from call to call (no allocation per decoded token).
  thread_local std::vector<float> qBuffer, kBuffer, vBuffer, attendedBuffer;
  std::vector<float> &q = sized(qBuffer, tokens * qWidth), &k = sized(kBuffer, tokens * kvWidth),
                     &v = sized(vBuffer, tokens * kvWidth);
  // Each product, then its bias (as linear adds it).
  linearTogether(x, tokens, spec.hiddenSize, {{&w.query, q.data()}, {&w.key, k.data()}, {&w.value, v.data()}});
  addBias(q.data(), tokens, w.queryBias);
  addBias(k.data(), tokens, w.keyBias);
  addBias(v.data(), tokens, w.valueBias);
  if (a.qkNorm == QkNormKind::FullWidth) {
    rmsNorm(q.data(), tokens, qWidth, w.queryNorm, spec.normEps);
    rmsNorm(k.data(), tokens, kvWidth, w.keyNorm, spec.normEps);
  } else if (a.qkNorm == QkNormKind::PerHead) {
    rmsNorm(q.data(), tokens * a.numHeads, hd, w.queryNorm, spec.normEps);
    rmsNorm(k.data(), tokens * a.numKeyValueHeads, hd, w.keyNorm, spec.normEps);
  }
  if (a.clipQkv > 0) {
    const float clip = static_cast<float>(a.clipQkv);
    for (std::vector<float> *values : {&q, &k, &v})
      for (float &value : *values)
        value = std::clamp(value, -clip, clip);
  }
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < a.numHeads; ++h)
      rope::apply(q.data() + t * qWidth + h * hd, spec.rope.layout, angles, t);
    for (int64_t h = 0; h < a.numKeyValueHeads; ++h)
      rope::apply(k.data() + t * kvWidth + h * hd, spec.rope.layout, angles, t);
  }
  const int64_t firstPosition = cache.length;
  auto &keys = cache.keys[static_cast<size_t>(layer)];
  auto &values = cache.values[static_cast<size_t>(layer)];
  keys.insert(keys.end(), k.begin(), k.end());
  values.insert(values.end(), v.begin(), v.end());
  std::vector<float> &attended = sized(attendedBuffer, tokens * a.numHeads * a.valueHeadDim);
  attend(spec, q.data(), tokens, cache, layer, firstPosition, attended.data());
  if (observer)
    observer->onAttention(layer, tokens, std::span<const float>(x, tokens * spec.hiddenSize), attended);
  linear(attended.data(), tokens, w.output, w.outputBias, out);
}

/// DeepSeek multi-head latent attention, caching full per-head keys and values.
void latentAttention(const ModelSpec &spec, const LayerWeights &w, const float *x, int64_t tokens, int64_t layer,
                     const rope::Angles &angles, KvCache &cache, float *out, EngineObserver *observer) {
  const AttentionSpec &a = spec.attention;
  const int64_t heads = a.numHeads, dn = a.qkNopeHeadDim, dr = a.qkRopeHeadDim, dv = a.valueHeadDim, qDim = dn + dr,
                lora = a.kvLoraRank;
  std::vector<float> q(static_cast<size_t>(tokens * heads * qDim));
  std::vector<float> kvCompressed(static_cast<size_t>(tokens * (lora + dr)));
  // The products of x together: the query (or its low-rank columns) and
  // the keys' low-rank columns.
  if (a.queryLoraRank > 0) {
    std::vector<float> compressed(static_cast<size_t>(tokens * a.queryLoraRank));
    linearTogether(x, tokens, spec.hiddenSize, {{&w.queryDown, compressed.data()}, {&w.kvDown, kvCompressed.data()}});
    rmsNorm(compressed.data(), tokens, a.queryLoraRank, w.queryDownNorm, spec.normEps);
    linear(compressed.data(), tokens, w.queryUp, q.data());
  } else {
    linearTogether(x, tokens, spec.hiddenSize, {{&w.query, q.data()}, {&w.kvDown, kvCompressed.data()}});
  }
  std::vector<float> latent(static_cast<size_t>(tokens * lora)), keyRope(static_cast<size_t>(tokens * dr));
  for (int64_t t = 0; t < tokens; ++t) {
    std::copy_n(kvCompressed.data() + t * (lora + dr), lora, latent.data() + t * lora);
    std::copy_n(kvCompressed.data() + t * (lora + dr) + lora, dr, keyRope.data() + t * dr);
  }
  rmsNorm(latent.data(), tokens, lora, w.kvDownNorm, spec.normEps);
  std::vector<float> kv(static_cast<size_t>(tokens * heads * (dn + dv)));
  linear(latent.data(), tokens, w.kvUp, kv.data());

  std::vector<float> k(static_cast<size_t>(tokens * heads * qDim)), v(static_cast<size_t>(tokens * heads * dv));
  for (int64_t t = 0; t < tokens; ++t) {
    float *sharedRope = keyRope.data() + t * dr;
    rope::apply(sharedRope, spec.rope.layout, angles, t);
    for (int64_t h = 0; h < heads; ++h) {
      rope::apply(q.data() + (t * heads + h) * qDim + dn, spec.rope.layout, angles, t);
      const float *source = kv.data() + (t * heads + h) * (dn + dv);
      float *key = k.data() + (t * heads + h) * qDim;
      std::copy_n(source, dn, key);
      std::copy_n(sharedRope, dr, key + dn);
      std::copy_n(source + dn, dv, v.data() + (t * heads + h) * dv);
    }
  }
  const int64_t firstPosition = cache.length;
  auto &keys = cache.keys[static_cast<size_t>(layer)];
  auto &values = cache.values[static_cast<size_t>(layer)];
  keys.insert(keys.end(), k.begin(), k.end());
  values.insert(values.end(), v.begin(), v.end());
  std::vector<float> attended(static_cast<size_t>(tokens * heads * dv));
  attend(spec, q.data(), tokens, cache, layer, firstPosition, attended.data());
  if (observer)
    observer->onAttention(layer, tokens, std::span<const float>(x, tokens * spec.hiddenSize), attended);
  linear(attended.data(), tokens, w.output, out);
}

/// out[n, H] = SwiGLU MLP of x[n, H]; `intermediate` receives silu(gate)*up.
void swiglu(const MlpWeights &mlp, const float *x, int64_t n, std::vector<float> &intermediate, float *out) {
  const int64_t width = mlp.gate.rows;
  intermediate.resize(static_cast<size_t>(n * width));
  thread_local std::vector<float> upBuffer;
  std::vector<float> &up = upBuffer;
  up.resize(static_cast<size_t>(n * width));
  linear(x, n, mlp.gate, intermediate.data());
  linear(x, n, mlp.up, up.data());
  for (size_t i = 0; i < up.size(); ++i)
    intermediate[i] = silu(intermediate[i]) * up[i];
  linear(intermediate.data(), n, mlp.down, out);
  releaseIfLarge(up);
  if (mlp.moreParts.empty())
    return;
  // An expert split into parts: sum the parts' outputs, and concatenate
  // their intermediates (the expert's neurons in part order).
  const int64_t H = mlp.down.rows;
  int64_t total = width;
  for (const MlpWeights &part : mlp.moreParts)
    total += part.gate.rows;
  std::vector<float> joined(static_cast<size_t>(n * total)), partIntermediate, partOut(static_cast<size_t>(n * H));
  int64_t offset = 0;
  auto place = [&](const std::vector<float> &values, int64_t w) {
    for (int64_t t = 0; t < n; ++t)
      std::copy(values.begin() + t * w, values.begin() + (t + 1) * w, joined.begin() + t * total + offset);
    offset += w;
  };
  place(intermediate, width);
  for (const MlpWeights &part : mlp.moreParts) {
    swiglu(part, x, n, partIntermediate, partOut.data());
    for (size_t i = 0; i < partOut.size(); ++i)
      out[i] += partOut[i];
    place(partIntermediate, part.gate.rows);
  }
  intermediate = std::move(joined);
}

/// out[n, Out] = a b in[n, In] (a: [Out, rank], b: [rank, In]), through
/// `low` ([n, rank]).
void lowRankProduct(const Matrix &a, const Matrix &b, const float *in, int64_t n, std::vector<float> &low, float *out) {
  low.resize(static_cast<size_t>(n * b.rows));
  linear(in, n, b, low.data());
  linear(low.data(), n, a, out);
}

/// out[n, H] = a factored expert (moe-factor-experts: the layer's `base`
/// plus the expert's low-rank deltas) on x[n, H]; `intermediate` receives
/// silu(gate)*up. The path for observers, which see each expert whole.
void factoredSwiglu(const MlpWeights &base, const MlpWeights &expert, const float *x, int64_t n,
                    std::vector<float> &intermediate, float *out) {
  const int64_t width = base.gate.rows, H = base.down.rows;
  std::vector<float> up(static_cast<size_t>(n * width)), delta(static_cast<size_t>(n * std::max(width, H))), low;
  intermediate.resize(static_cast<size_t>(n * width));
  auto add = [&](const Matrix &a, const Matrix &b, const float *in, float *target, int64_t count) {
    lowRankProduct(a, b, in, n, low, delta.data());
    for (int64_t i = 0; i < count; ++i)
      target[i] += delta[static_cast<size_t>(i)];
  };
  linear(x, n, base.gate, intermediate.data());
  add(expert.lowRank[0], expert.lowRank[1], x, intermediate.data(), n * width);
  linear(x, n, base.up, up.data());
  add(expert.lowRank[2], expert.lowRank[3], x, up.data(), n * width);
  for (size_t i = 0; i < up.size(); ++i)
    intermediate[i] = silu(intermediate[i]) * up[i];
  linear(intermediate.data(), n, base.down, out);
  add(expert.lowRank[4], expert.lowRank[5], intermediate.data(), out, n * H);
}

/// One token's routed experts (slots in order, each with its summed
/// routing weight) and the shared expert (weight: its gate), in two
/// parallel regions: gate and up of every expert over the concatenated
/// neurons with SiLU-and-multiply fused, then every down projection over
/// split output rows, each thread summing the experts' weighted outputs for
/// its rows in slot order. The same kernels and order of additions as the
/// expert-by-expert path, so the same result, with two hand-offs instead of
/// three per expert. False (nothing done) when an expert is split into
/// parts.
bool decodeExperts(const std::vector<std::pair<const MlpWeights *, float>> &mlps, const float *x, int64_t H,
                   float *out) {
  struct Scratch {
    std::vector<int64_t> offsets;
    std::vector<float> gate, up;
    std::vector<DecodeInput> downInputs;
    DecodeInput input;
  };
  // On a device: the same sum there, when it holds every expert.
  if (!mlps.empty() && std::all_of(mlps.begin(), mlps.end(), [](const auto &mlp) { return deviceHolds(*mlp.first); })) {
    mlps.front().first->gate.device->device().experts(mlps, x, H, out);
    return true;
  }
  thread_local Scratch scratch;
  Scratch &s = scratch;
  s.offsets.assign(1, 0);
  s.input.reset(x, H);
  int64_t firstBytes = 0, secondBytes = 0;
  for (const auto &[mlp, weight] : mlps) {
    if (!mlp->moreParts.empty() || mlp->factored())
      return false;
    s.input.prepareFor(mlp->gate);
    s.input.prepareFor(mlp->up);
    s.offsets.push_back(s.offsets.back() + mlp->gate.rows);
    firstBytes += static_cast<int64_t>(mlp->gate.bytes() + mlp->up.bytes());
    secondBytes += static_cast<int64_t>(mlp->down.bytes());
  }
  const size_t count = mlps.size();
  s.gate.resize(static_cast<size_t>(s.offsets.back()));
  s.up.resize(static_cast<size_t>(s.offsets.back()));
  parallelRows(s.offsets.back(), firstBytes, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < count; ++i) {
      const int64_t offset = s.offsets[i], low = std::max(begin, offset), high = std::min(end, s.offsets[i + 1]);
      if (low >= high)
        continue;
      const MlpWeights &mlp = *mlps[i].first;
      gemvRange(mlp.gate, s.input, low - offset, high - offset, s.gate.data() + low);
      gemvRange(mlp.up, s.input, low - offset, high - offset, s.up.data() + low);
      for (int64_t j = low; j < high; ++j)
        s.gate[j] = silu(s.gate[j]) * s.up[j];
    }
  });
  if (s.downInputs.size() < count)
    s.downInputs.resize(count);
  for (size_t i = 0; i < count; ++i) {
    s.downInputs[i].reset(s.gate.data() + s.offsets[i], s.offsets[i + 1] - s.offsets[i]);
    s.downInputs[i].prepareFor(mlps[i].first->down);
  }
  parallelRows(H, secondBytes, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> perThread;
    std::vector<float> &part = perThread;
    part.resize(static_cast<size_t>(end - begin));
    std::fill(out + begin, out + end, 0.0f);
    for (size_t i = 0; i < count; ++i) {
      gemvRange(mlps[i].first->down, s.downInputs[i], begin, end, part.data());
      const float weight = mlps[i].second;
      for (int64_t j = begin; j < end; ++j)
        out[j] += weight * part[j - begin];
    }
  });
  return true;
}

} // namespace

void addSharedExpert(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &w, const float *x,
                     int64_t tokens, float *out, EngineObserver *observer) {
  if (layer.shared.intermediateSize <= 0)
    return;
  const int64_t H = spec.hiddenSize;
  std::vector<float> shared(static_cast<size_t>(tokens * H)), intermediate;
  swiglu(w.shared, x, tokens, intermediate, shared.data());
  if (observer)
    observer->onSharedExpert(layer.index, tokens, std::span<const float>(x, tokens * H), intermediate, shared);
  for (int64_t t = 0; t < tokens; ++t) {
    const float gate = sharedExpertGate(layer, w, x + t * H, H);
    for (int64_t i = 0; i < H; ++i)
      out[t * H + i] += gate * shared[t * H + i];
  }
}

namespace {

/// A MoE block whose experts are factored (moe-factor-experts), without
/// observers: the base's gate and up once for every token, each expert's
/// low-rank deltas over its own tokens, and the base's down once over the
/// routing-weighted sum of the experts' intermediates (down is linear, so
/// that adds the base's share of every expert's output). `expert`, `take`
/// and `release` are moeBlock's (masks, the expert cache, fallbacks).
template <typename Expert, typename Take, typename Release>
Status factoredBlock(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &w, const float *x,
                     int64_t tokens, float *out, const std::vector<std::vector<int32_t>> &tokensOf,
                     const std::vector<std::vector<float>> &weightsOf, Expert &expert, Take &take, Release &release) {
  const int64_t H = spec.hiddenSize;
  const MlpWeights &base = w.expertBase;
  const int64_t W = base.gate.rows;
  thread_local std::vector<float> baseGate, baseUp, mixed, input, low, gate, up, output;
  baseGate.resize(static_cast<size_t>(tokens * W));
  baseUp.resize(static_cast<size_t>(tokens * W));
  linear(x, tokens, base.gate, baseGate.data());
  linear(x, tokens, base.up, baseUp.data());
  mixed.assign(static_cast<size_t>(tokens * W), 0.0f);
  std::fill(out, out + tokens * H, 0.0f);
  for (size_t e = 0; e < tokensOf.size(); ++e) {
    const std::vector<int32_t> &routed = tokensOf[e];
    if (routed.empty())
      continue;
    const int64_t n = static_cast<int64_t>(routed.size());
    input.resize(static_cast<size_t>(n * H));
    for (int64_t r = 0; r < n; ++r)
      std::copy_n(x + routed[r] * H, H, input.data() + r * H);
    MOE_RETURN_IF_ERROR(take(static_cast<int64_t>(e)));
    const MlpWeights &m = expert(static_cast<int64_t>(e));
    if (!m.factored() || m.lowRank[0].rows != W)
      return Status::error("layer ", layer.index, " expert slot ", e,
                           " is not factored like its layer's base (moe-factor-experts)");
    gate.resize(static_cast<size_t>(n * W));
    up.resize(static_cast<size_t>(n * W));
    output.resize(static_cast<size_t>(n * H));
    lowRankProduct(m.lowRank[0], m.lowRank[1], input.data(), n, low, gate.data());
    lowRankProduct(m.lowRank[2], m.lowRank[3], input.data(), n, low, up.data());
    for (int64_t r = 0; r < n; ++r) {
      const float *g = baseGate.data() + routed[r] * W, *u = baseUp.data() + routed[r] * W;
      for (int64_t j = 0; j < W; ++j)
        gate[r * W + j] = silu(g[j] + gate[r * W + j]) * (u[j] + up[r * W + j]);
    }
    lowRankProduct(m.lowRank[4], m.lowRank[5], gate.data(), n, low, output.data());
    release(static_cast<int64_t>(e));
    for (int64_t r = 0; r < n; ++r) {
      const float weight = weightsOf[e][static_cast<size_t>(r)];
      float *target = out + routed[r] * H, *sum = mixed.data() + routed[r] * W;
      for (int64_t i = 0; i < H; ++i)
        target[i] += weight * output[r * H + i];
      for (int64_t j = 0; j < W; ++j)
        sum[j] += weight * gate[r * W + j];
    }
  }
  output.resize(static_cast<size_t>(tokens * H));
  linear(mixed.data(), tokens, base.down, output.data());
  for (int64_t i = 0; i < tokens * H; ++i)
    out[i] += output[static_cast<size_t>(i)];
  addSharedExpert(spec, layer, w, x, tokens, out, nullptr);
  return Status::success();
}

} // namespace

void detail::addRoutedOutputs(const std::vector<std::vector<int32_t>> &tokensOf,
                              const std::vector<std::vector<float>> &weightsOf, const float *outputs, int64_t tokens,
                              int64_t H, float *out) {
  std::fill(out, out + tokens * H, 0.0f);
  const float *source = outputs;
  for (size_t e = 0; e < tokensOf.size(); ++e)
    for (size_t r = 0; r < tokensOf[e].size(); ++r, source += H) {
      const float weight = weightsOf[e][r];
      float *target = out + tokensOf[e][r] * H;
      for (int64_t i = 0; i < H; ++i)
        target[i] += weight * source[i];
    }
}

void moeBlockForward(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &w, const float *x,
                     int64_t tokens, float *out, const MoeBlockHooks &hooks) {
  // Without an expert cache nothing is loaded, so nothing can fail.
  Status done = detail::moeBlock(spec, layer, w, x, tokens, out, hooks, nullptr);
  (void)done;
}

Status detail::moeBlock(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &w, const float *x,
                        int64_t tokens, float *out, const MoeBlockHooks &hooks, ExpertCache *cache) {
  EngineObserver *observer = hooks.observer;
  const int64_t H = spec.hiddenSize;
  const int64_t slots = static_cast<int64_t>(w.experts.size());
  thread_local detail::BlockRouting perThreadRouting;
  detail::BlockRouting &routing = perThreadRouting;
  detail::routeBlock(spec, w, x, tokens, hooks.maskedRows, routing);
  if (observer)
    observer->onRouter(layer.index, tokens, routing.logits, routing.chosen, routing.weights, w.routing.remap);
  const std::vector<std::vector<int32_t>> &tokensOf = routing.tokensOf;
  const std::vector<std::vector<float>> &weightsOf = routing.weightsOf;
  // Offloaded experts: the ones this block runs, from the cache. Decode
  // (one token) holds its few until the block is done; longer blocks take
  // each one as its turn comes and let it go after, so a block never holds
  // more than the cache (plus the expert running) however many it routes to.
  const bool allExperts = observer && observer->computeAllExperts();
  const bool decode = tokens == 1 && !observer;
  auto runs = [&](int64_t e) { return !observer || observer->runsExpert(layer.index, e); };
  std::vector<std::shared_ptr<const MlpWeights>> held;
  std::vector<bool> toLoad;
  if (cache) {
    held.resize(static_cast<size_t>(slots));
    toLoad.assign(static_cast<size_t>(slots), false);
    // HOBBIT: a missing expert that no token leans on (its share of each
    // token's routing weight below the threshold) runs from its low-bit
    // copy instead of being loaded.
    std::vector<float> tokenWeight;
    if (cache->hasFallbacks() && !allExperts) {
      const int64_t K = static_cast<int64_t>(routing.weights.size()) / std::max<int64_t>(tokens, 1);
      tokenWeight.assign(static_cast<size_t>(tokens), 0.0f);
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t k = 0; k < K; ++k)
          tokenWeight[t] += routing.weights[t * K + k];
    }
    for (int64_t e = 0; e < slots; ++e)
      if ((allExperts || !tokensOf[static_cast<size_t>(e)].empty()) && runs(e)) {
        if (!tokenWeight.empty() && !cache->contains(layer.index, e)) {
          double most = 0;
          for (size_t r = 0; r < tokensOf[e].size(); ++r) {
            const float total = tokenWeight[tokensOf[e][r]];
            most = std::max(most, total > 0 ? static_cast<double>(weightsOf[e][r]) / total : 1.0);
          }
          if (most < cache->fallbackBelow() || cache->fallbackBelow() >= 1) {
            held[static_cast<size_t>(e)] = cache->fallback(layer.index, e);
            continue;
          }
        }
        toLoad[static_cast<size_t>(e)] = true;
        if (!decode)
          continue;
        Expected<std::shared_ptr<const MlpWeights>> loaded = cache->get(layer.index, e);
        if (!loaded)
          return loaded.status();
        held[static_cast<size_t>(e)] = loaded.take();
      }
  }
  // A longer block's expert `e`, loaded for its turn; release() after.
  auto take = [&](int64_t e) -> Status {
    if (!cache || !toLoad[static_cast<size_t>(e)] || held[static_cast<size_t>(e)])
      return Status::success();
    Expected<std::shared_ptr<const MlpWeights>> loaded = cache->get(layer.index, e);
    if (!loaded)
      return loaded.status();
    held[static_cast<size_t>(e)] = loaded.take();
    return Status::success();
  };
  auto release = [&](int64_t e) {
    if (cache)
      held[static_cast<size_t>(e)].reset();
  };
  auto expert = [&](int64_t e) -> const MlpWeights & {
    if (hooks.replacedExperts)
      if (auto found = hooks.replacedExperts->find(e); found != hooks.replacedExperts->end())
        return *found->second;
    return cache ? *held[static_cast<size_t>(e)] : w.experts[static_cast<size_t>(e)];
  };
  int64_t calls = 0;
  for (const std::vector<int32_t> &slotTokens : tokensOf)
    calls += static_cast<int64_t>(slotTokens.size());
  if (hooks.counters) {
    hooks.counters->routedTokens += tokens;
    hooks.counters->expertCalls += calls;
  }
  const bool factored = !w.expertBase.gate.empty();
  if (factored && !observer)
    return factoredBlock(spec, layer, w, x, tokens, out, tokensOf, weightsOf, expert, take, release);
  if (decode) {
    // Decode: the chosen experts and the shared expert together.
    thread_local std::vector<std::pair<const MlpWeights *, float>> perThread;
    std::vector<std::pair<const MlpWeights *, float>> &mlps = perThread;
    mlps.clear();
    for (int64_t e = 0; e < slots; ++e)
      if (!tokensOf[e].empty())
        mlps.emplace_back(&expert(e), weightsOf[e][0]);
    if (layer.shared.intermediateSize > 0)
      mlps.emplace_back(&w.shared, sharedExpertGate(layer, w, x, H));
    if (decodeExperts(mlps, x, H, out))
      return Status::success();
  }
  // On a device that holds every routed expert this block runs: all of
  // them in one call, the weighted sums too, in the order of the loop
  // below (the device gathers each expert's tokens from x and adds its
  // outputs back, so x and out cross once each).
  if (!observer && !cache && !allExperts && !hooks.replacedExperts) {
    bool onDevice = true;
    int64_t rows = 0;
    for (int64_t e = 0; e < slots && onDevice; ++e)
      if (!tokensOf[e].empty()) {
        onDevice = deviceHolds(w.experts[static_cast<size_t>(e)]);
        rows += static_cast<int64_t>(tokensOf[e].size());
      }
    if (onDevice && rows > 0) {
      thread_local std::vector<DeviceRoutedExpert> routed;
      routed.clear();
      for (int64_t e = 0; e < slots; ++e)
        if (!tokensOf[e].empty())
          routed.push_back({&w.experts[static_cast<size_t>(e)], tokensOf[e].data(), weightsOf[e].data(),
                            static_cast<int64_t>(tokensOf[e].size())});
      routed.front().mlp->gate.device->device().routedExperts(routed, x, tokens, H, out);
      addSharedExpert(spec, layer, w, x, tokens, out, observer);
      return Status::success();
    }
  }
  if (!observer && !cache && tokens > 1 && poolThreads() > 1 &&
      std::none_of(w.experts.begin(), w.experts.end(),
                   [](const MlpWeights &mlp) { return mlp.gate.device || mlp.up.device || mlp.down.device; })) {
    // Prefill on the host: the routed experts as tasks over the pool, the
    // most tokens first, each expert's products inline on its thread (one
    // hand-off a block, not three per expert); then the weighted sums in
    // expert order, as the loop below adds them, so the result is the same.
    // (Factored blocks without an observer returned above. Experts with a
    // matrix on a device, which is not called from several threads, take
    // the loop.)
    std::vector<int64_t> order, offsets(static_cast<size_t>(slots) + 1, 0);
    for (int64_t e = 0; e < slots; ++e) {
      offsets[e + 1] = offsets[e] + static_cast<int64_t>(tokensOf[e].size());
      if (!tokensOf[e].empty())
        order.push_back(e);
    }
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return tokensOf[a].size() > tokensOf[b].size(); });
    const int64_t rows = offsets.back();
    thread_local std::vector<float> inputBuffer, outputBuffer; // (kept: fresh pages cost a fault each)
    std::vector<float> &inputs = inputBuffer, &outputs = outputBuffer;
    inputs.resize(static_cast<size_t>(rows * H));
    outputs.resize(static_cast<size_t>(rows * H));
    int64_t work = 0;
    for (int64_t e : order)
      work += static_cast<int64_t>(tokensOf[e].size()) * static_cast<int64_t>(expert(e).bytes());
    parallelTasks(static_cast<int64_t>(order.size()), work, [&](int64_t i) {
      const int64_t e = order[static_cast<size_t>(i)];
      const std::vector<int32_t> &routed = tokensOf[e];
      float *input = inputs.data() + offsets[e] * H;
      for (size_t r = 0; r < routed.size(); ++r)
        std::copy_n(x + routed[r] * H, H, input + static_cast<int64_t>(r) * H);
      thread_local std::vector<float> intermediate;
      swiglu(expert(e), input, static_cast<int64_t>(routed.size()), intermediate, outputs.data() + offsets[e] * H);
    });
    detail::addRoutedOutputs(tokensOf, weightsOf, outputs.data(), tokens, H, out);
    releaseIfLarge(inputs);
    releaseIfLarge(outputs);
    addSharedExpert(spec, layer, w, x, tokens, out, observer);
    return Status::success();
  }
  std::fill(out, out + tokens * H, 0.0f);
  std::vector<float> input, intermediate, output;
  // Statistics of every expert on every token (llm-compressor's
  // calibrate-all-experts): each expert runs on the whole block input and
  // the observer sees all of it, while the block output below still adds
  // only the routed tokens.
  std::vector<int32_t> everyToken;
  if (allExperts)
    for (int64_t t = 0; t < tokens; ++t)
      everyToken.push_back(static_cast<int32_t>(t));
  for (int64_t e = 0; e < slots; ++e) {
    const std::vector<int32_t> &routed = tokensOf[e];
    if (!runs(e))
      continue;
    if (allExperts) {
      MOE_RETURN_IF_ERROR(take(e));
      output.resize(static_cast<size_t>(tokens * H));
      if (factored)
        factoredSwiglu(w.expertBase, expert(e), x, tokens, intermediate, output.data());
      else
        swiglu(expert(e), x, tokens, intermediate, output.data());
      release(e);
      observer->onExpert(layer.index, e, everyToken, std::span<const float>(x, tokens * H), intermediate, output);
      for (size_t r = 0; r < routed.size(); ++r) {
        float weight = weightsOf[e][r];
        float *target = out + routed[r] * H;
        const float *source = output.data() + routed[r] * H;
        for (int64_t i = 0; i < H; ++i)
          target[i] += weight * source[i];
      }
      continue;
    }
    if (routed.empty())
      continue;
    const int64_t n = static_cast<int64_t>(routed.size());
    input.resize(static_cast<size_t>(n * H));
    for (int64_t r = 0; r < n; ++r)
      std::copy_n(x + routed[r] * H, H, input.data() + r * H);
    output.resize(static_cast<size_t>(n * H));
    MOE_RETURN_IF_ERROR(take(e));
    if (factored)
      factoredSwiglu(w.expertBase, expert(e), input.data(), n, intermediate, output.data());
    else
      swiglu(expert(e), input.data(), n, intermediate, output.data());
    release(e);
    if (observer)
      observer->onExpert(layer.index, e, routed, input, intermediate, output);
    for (int64_t r = 0; r < n; ++r) {
      float weight = weightsOf[e][r];
      float *target = out + routed[r] * H;
      const float *source = output.data() + r * H;
      for (int64_t i = 0; i < H; ++i)
        target[i] += weight * source[i];
    }
  }

  if (observer && hooks.residual)
    observer->onMoeResidual(layer.index, tokens, std::span<const float>(hooks.residual, tokens * H),
                            std::span<const float>(out, tokens * H));
  addSharedExpert(spec, layer, w, x, tokens, out, observer);
  if (observer)
    observer->onMoeBlock(layer.index, tokens, std::span<const float>(x, tokens * H),
                         std::span<const float>(out, tokens * H));
  return Status::success();
}

Status Engine::setMaskedExperts(const std::map<int64_t, std::set<int64_t>> &masked) {
  const ModelSpec &spec = modelSpec;
  for (const auto &[layer, experts] : masked) {
    if (layer < 0 || layer >= spec.numLayers || spec.layers[static_cast<size_t>(layer)].mlp != MlpKind::Moe)
      return Status::error("masked experts: layer ", layer, " is not an MoE layer");
    const LayerSpec &layerSpec = spec.layers[static_cast<size_t>(layer)];
    for (int64_t e : experts)
      if (e < 0 || e >= layerSpec.numExperts)
        return Status::error("masked experts: layer ", layer, " has no expert ", e);
    if (layerSpec.numExperts - static_cast<int64_t>(experts.size()) < spec.router.topK)
      return Status::error("masked experts: layer ", layer, " would keep fewer experts than top-k");
  }
  for (const auto &[layer, experts] : unloadedExperts) {
    auto kept = masked.find(layer);
    for (int64_t e : experts)
      if (kept == masked.end() || !kept->second.count(e))
        return Status::error("masked experts: expert ", e, " of layer ", layer,
                             " was not loaded (the task set chosen at load leaves it out)");
  }
  maskedExperts = masked;
  return Status::success();
}

Status Engine::setReplacedExperts(std::map<int64_t, std::map<int64_t, std::shared_ptr<const MlpWeights>>> replaced) {
  const ModelSpec &spec = modelSpec;
  if (!replaced.empty() && (onDevice || experts))
    return Status::error("replaced experts: the engine runs with ", onDevice ? "a device" : "an expert cache",
                         ", which would not see them");
  const int64_t H = spec.hiddenSize;
  for (const auto &[layer, slots] : replaced) {
    if (layer < 0 || layer >= spec.numLayers || spec.layers[static_cast<size_t>(layer)].mlp != MlpKind::Moe)
      return Status::error("replaced experts: layer ", layer, " is not an MoE layer");
    Expected<std::shared_ptr<const LayerWeights>> loaded = layers->get(layer);
    if (!loaded)
      return loaded.status();
    if (!(*loaded)->expertBase.gate.empty())
      return Status::error("replaced experts: layer ", layer,
                           "'s experts are factored (moe-factor-experts); replace experts before factoring");
    const int64_t slotCount = static_cast<int64_t>((*loaded)->experts.size());
    auto filled = [](const Matrix &m) {
      const size_t count = static_cast<size_t>(m.rows * m.cols);
      return m.isQuantized() || m.data.size() == count || m.bf16.size() == count;
    };
    for (const auto &[slot, weights] : slots) {
      if (slot < 0 || slot >= slotCount)
        return Status::error("replaced experts: layer ", layer, " has no expert ", slot);
      const int64_t width = weights ? weights->gate.rows : 0;
      if (!weights || width <= 0 || !weights->moreParts.empty() || weights->gate.cols != H ||
          weights->up.rows != width || weights->up.cols != H || weights->down.rows != H ||
          weights->down.cols != width || !filled(weights->gate) || !filled(weights->up) || !filled(weights->down))
        return Status::error("replaced experts: expert ", slot, " of layer ", layer, " is not one gate [I, ", H,
                             "], up [I, ", H, "] and down [", H, ", I] with its values");
    }
  }
  replacedExperts = std::move(replaced);
  return Status::success();
}

Expected<std::shared_ptr<const LayerWeights>> Engine::layerWeights(int64_t layer) {
  if (layer < 0 || layer >= modelSpec.numLayers)
    return Status::error("no layer ", layer, " (the model has ", modelSpec.numLayers, ")");
  return layers->get(layer);
}

Expected<std::unique_ptr<Engine>> Engine::create(const ModelSpec &spec, std::unique_ptr<WeightProvider> provider,
                                                 EngineOptions options) {
  std::unique_ptr<Engine> engine(new Engine());
  engine->modelSpec = spec;
  engine->provider = std::move(provider);
  MOE_RETURN_IF_ERROR(engine->setMaskedExperts(options.maskedExperts));
  MOE_RETURN_IF_ERROR(engine->provider->loadGlobals(engine->globals));
  engine->onDevice = options.device;
  if (engine->onDevice)
    MOE_RETURN_IF_ERROR(engine->onDevice->uploadGlobals(engine->globals));
  else if (options.rowTiles)
    makeRowTiles(engine->globals.lmHead.empty() ? engine->globals.embedding : engine->globals.lmHead);
  engine->rowTiles = options.rowTiles;
  size_t budget = options.maxMemoryBytes ? options.maxMemoryBytes : defaultBudget();
  engine->layerBudget = budget;
  if (!options.loadMaskedExperts)
    engine->unloadedExperts = options.maskedExperts;
  engine->layers = std::make_unique<LayerCache>(*engine->provider, spec.numLayers, budget,
                                                options.expertCacheBytes == 0, &engine->unloadedExperts);
  engine->layers->setDevice(engine->onDevice);
  engine->layers->setRowTiles(options.rowTiles);
  engine->expertCacheBytes = options.expertCacheBytes;
  engine->expertCachePolicy = options.expertCachePolicy;
  if (options.expertCacheBytes > 0)
    engine->experts = std::make_unique<ExpertCache>(*engine->provider, options.expertCacheBytes,
                                                    options.expertCachePolicy, options.rowTiles);
  if (options.expertFallbackFormat && options.expertFallbackNested)
    return Status::error("--expert-fallback: one low-bit copy, a format or the nested low part, not both");
  if (options.expertFallbackFormat || options.expertFallbackNested) {
    if (!engine->experts)
      return Status::error("--expert-fallback needs --expert-cache (the low-bit copies stand in for missing experts)");
    if (!(options.expertFallbackBelow >= 0 && options.expertFallbackBelow <= 1))
      return Status::error("--expert-fallback-below ", options.expertFallbackBelow,
                           ": a share of a token's routing weight lies in [0, 1]");
    std::map<int64_t, int64_t> slots;
    for (int64_t l = 0; l < spec.numLayers; ++l) {
      if (spec.layers[static_cast<size_t>(l)].mlp != MlpKind::Moe)
        continue;
      Expected<std::shared_ptr<const LayerWeights>> layer = engine->layers->get(l);
      if (!layer)
        return layer.status();
      slots[l] = static_cast<int64_t>((*layer)->experts.size());
    }
    MOE_RETURN_IF_ERROR(engine->experts->buildFallbacks(slots, engine->unloadedExperts, options.expertFallbackFormat,
                                                        options.expertFallbackBelow));
  }
  return engine;
}

Engine::~Engine() = default;

KvCache Engine::newCache() const {
  KvCache cache;
  cache.keys.resize(static_cast<size_t>(modelSpec.numLayers));
  cache.values.resize(static_cast<size_t>(modelSpec.numLayers));
  return cache;
}

Status Engine::forward(std::span<const int32_t> tokens, KvCache &cache, std::vector<float> &logits, bool lastOnly) {
  const ModelSpec &spec = modelSpec;
  const int64_t T = static_cast<int64_t>(tokens.size()), H = spec.hiddenSize, V = spec.vocabSize;
  if (T == 0)
    return Status::error("forward: no tokens");
  if ((T == 1 || (onDevice && onDevice->prefillsOnDevice())) && onDevice && !observer && devicePathReady())
    return decodeOnDevice(tokens, cache, logits, lastOnly);
  std::vector<float> x;
  MOE_RETURN_IF_ERROR(embed(tokens, x));
  for (int64_t l = 0; l < spec.numLayers; ++l)
    MOE_RETURN_IF_ERROR(forwardLayer(l, x.data(), T, cache));
  cache.length += T;

  const int64_t first = lastOnly ? T - 1 : 0, rows = T - first;
  std::vector<float> normed(x.begin() + first * H, x.end());
  normalize(spec, normed.data(), rows, globals.finalNorm, globals.finalNormBias);
  logits.resize(static_cast<size_t>(rows * V));
  linear(normed.data(), rows, globals.outputProjection(), globals.lmHeadBias, logits.data());
  if (onDevice)
    MOE_RETURN_IF_ERROR(onDevice->takeError());
  return Status::success();
}

bool Engine::devicePathReady() {
  if (!deviceDecodes) {
    // Every layer's attention (grouped-query or latent) and the output
    // projection on the device, and no expert cache (whose experts the
    // device does not hold); the MLPs may stay on the host (decodeAddBranch).
    bool ready = onDevice->decodesOnDevice() && !experts && globals.outputProjection().device != nullptr &&
                 globals.deviceVectors != nullptr;
    for (int64_t l = 0; ready && l < modelSpec.numLayers; ++l) {
      Expected<std::shared_ptr<const LayerWeights>> layer = layers->get(l);
      ready = layer && onDevice->holdsAttention(**layer);
    }
    deviceDecodes = ready;
  }
  return *deviceDecodes;
}

Status Engine::decodeOnDevice(std::span<const int32_t> tokens, KvCache &cache, std::vector<float> &logits,
                              bool lastOnly) {
  const ModelSpec &spec = modelSpec;
  const int64_t T = static_cast<int64_t>(tokens.size()), V = spec.vocabSize;
  MOE_RETURN_IF_ERROR(checkCache(spec, cache, T));
  // The angles of the whole prompt at once, as the host's forward computes
  // them (a scaling that depends on the length sees the same length).
  const rope::Angles angles = rope::computeAngles(spec, cache.length, T);
  // Chunks whose attention scores (tokens x heads x the KV mirror's rows,
  // at most twice the cache's length) stay within 256 MiB.
  const int64_t mirrorRows = 2 * (cache.length + T);
  const int64_t chunk =
      std::clamp<int64_t>((int64_t(1) << 28) / (4 * spec.attention.numHeads * mirrorRows), 1, kDeviceChunk);
  if (T <= chunk) {
    // One step (a decoded token): straight into `logits`.
    Status status = decodeLayersOnDevice(tokens, angles.cos.data(), angles.sin.data(), angles.half, cache, logits,
                                         lastOnly ? 1 : T);
    if (!status.ok()) {
      // The host cache keeps no rows of a step that failed.
      onDevice->decodeAbandon();
      return status;
    }
    cache.length += T;
    return Status::success();
  }
  // A prompt in chunks; a failed one takes the whole prompt back out of the
  // cache (the host's rows, and the device's mirror, which syncs again).
  const int64_t startLength = cache.length;
  std::vector<size_t> keySizes, valueSizes;
  for (size_t l = 0; l < cache.keys.size(); ++l) {
    keySizes.push_back(cache.keys[l].size());
    valueSizes.push_back(cache.values[l].size());
  }
  std::vector<float> stepLogits;
  if (!lastOnly)
    logits.resize(static_cast<size_t>(T * V));
  for (int64_t first = 0; first < T; first += chunk) {
    const int64_t count = std::min(chunk, T - first), rows = lastOnly ? 1 : count;
    Status status = decodeLayersOnDevice(tokens.subspan(static_cast<size_t>(first), static_cast<size_t>(count)),
                                         angles.cos.data() + first * angles.half,
                                         angles.sin.data() + first * angles.half, angles.half, cache, stepLogits, rows);
    if (!status.ok()) {
      onDevice->decodeAbandon();
      for (size_t l = 0; l < cache.keys.size(); ++l) {
        cache.keys[l].resize(keySizes[l]);
        cache.values[l].resize(valueSizes[l]);
      }
      cache.length = startLength;
      cache.device.reset();
      return status;
    }
    cache.length += count;
    if (!lastOnly)
      std::copy(stepLogits.begin(), stepLogits.end(), logits.begin() + first * V);
  }
  if (lastOnly)
    logits = std::move(stepLogits);
  return Status::success();
}

Status Engine::decodeLayersOnDevice(std::span<const int32_t> tokens, const float *cos, const float *sin,
                                    int64_t ropeHalf, KvCache &cache, std::vector<float> &logits, int64_t rows) {
  const ModelSpec &spec = modelSpec;
  const int64_t H = spec.hiddenSize, T = static_cast<int64_t>(tokens.size());
  std::vector<float> x;
  MOE_RETURN_IF_ERROR(embed(tokens, x));
  // Where every layer is loaded, none is freed before decodeEnd: the device
  // may hold the token's work for one launch at its end.
  MOE_RETURN_IF_ERROR(onDevice->decodeBegin(x.data(), H, T, layers->holdsEveryLayer()));
  thread_local std::vector<float> normedBuffer, branchBuffer, routerBuffer;
  std::vector<float> &normed = sized(normedBuffer, T * H), &branch = sized(branchBuffer, T * H);
  thread_local detail::BlockRouting perThreadRouting;
  thread_local std::vector<std::pair<const MlpWeights *, float>> mlps;
  for (int64_t l = 0; l < spec.numLayers; ++l) {
    Expected<std::shared_ptr<const LayerWeights>> loaded = layers->get(l);
    if (!loaded)
      return loaded.status();
    const LayerWeights &w = **loaded;
    const LayerSpec &layer = spec.layers[static_cast<size_t>(l)];
    const std::set<int64_t> *masked = nullptr;
    if (auto found = maskedExperts.find(l); found != maskedExperts.end())
      masked = &found->second;
    // The MLP on the device without a wait: a dense MLP it holds, or a MoE
    // block it routes (no masked rows, which only the host's router knows).
    if (T > 1) {
      MOE_RETURN_IF_ERROR(stepMlpOnDevice(l, w, layer, masked, cos, sin, ropeHalf, T, cache, normed, branch));
      continue;
    }
    const bool routed = layer.mlp == MlpKind::Moe && !masked && onDevice->routesOnDevice(spec, layer, w);
    if (routed || (layer.mlp == MlpKind::Dense && deviceHolds(w.dense))) {
      MOE_RETURN_IF_ERROR(onDevice->decodeAttention(spec, w, l, cos, sin, ropeHalf, cache, nullptr, nullptr));
      if (routed) {
        counters.routedTokens += 1;
        MOE_RETURN_IF_ERROR(onDevice->decodeRoutedMlp(spec, layer, w));
      } else {
        const std::pair<const MlpWeights *, float> dense{&w.dense, 1.0f};
        MOE_RETURN_IF_ERROR(onDevice->decodeMlp(std::span(&dense, 1), /*everyToken=*/true));
      }
      continue;
    }
    // The router's logits come back with the MLP input where the device
    // holds the router and every MLP of the layer (else the host's block
    // below routes again, and must see the same logits: the CPU's).
    const bool deviceRouter = layer.mlp == MlpKind::Moe && onDevice->holdsRouter(w) && deviceHoldsExperts(layer, w);
    float *routerLogits = deviceRouter ? sized(routerBuffer, w.router.rows).data() : nullptr;
    MOE_RETURN_IF_ERROR(onDevice->decodeAttention(spec, w, l, cos, sin, ropeHalf, cache, normed.data(), routerLogits));
    // The MLP: routed on the host from the device's input, as moeBlock does.
    mlps.clear();
    if (layer.mlp == MlpKind::Moe) {
      detail::BlockRouting &routing = perThreadRouting;
      detail::routeBlock(spec, w, normed.data(), 1, masked, routing, routerLogits);
      counters.routedTokens += 1;
      for (size_t e = 0; e < routing.tokensOf.size(); ++e)
        if (!routing.tokensOf[e].empty()) {
          mlps.emplace_back(&w.experts[e], routing.weightsOf[e][0]);
          counters.expertCalls += 1;
        }
      if (layer.shared.intermediateSize > 0)
        mlps.emplace_back(&w.shared, sharedExpertGate(layer, w, normed.data(), H));
    } else {
      mlps.emplace_back(&w.dense, 1.0f);
    }
    if (std::all_of(mlps.begin(), mlps.end(), [](const auto &mlp) { return deviceHolds(*mlp.first); })) {
      MOE_RETURN_IF_ERROR(onDevice->decodeMlp(mlps));
    } else {
      // Split experts (or matrices the device has no kernel for): the
      // host's block, then its output onto the device's residual stream.
      if (layer.mlp == MlpKind::Moe) {
        MoeBlockHooks hooks;
        hooks.maskedRows = masked;
        MOE_RETURN_IF_ERROR(detail::moeBlock(spec, layer, w, normed.data(), 1, branch.data(), hooks, nullptr));
      } else {
        std::vector<float> intermediate;
        swiglu(w.dense, normed.data(), 1, intermediate, branch.data());
      }
      MOE_RETURN_IF_ERROR(onDevice->takeError());
      MOE_RETURN_IF_ERROR(onDevice->decodeAddBranch(branch.data()));
    }
  }
  // An error the device recorded (a layer it could not prepare to route,
  // under --device cuda) ends the token here.
  MOE_RETURN_IF_ERROR(onDevice->takeError());
  logits.resize(static_cast<size_t>(rows * spec.vocabSize));
  int64_t expertCalls = 0;
  MOE_RETURN_IF_ERROR(onDevice->decodeEnd(spec, globals, logits.data(), expertCalls, rows));
  counters.expertCalls += expertCalls;
  return Status::success();
}

Status Engine::stepMlpOnDevice(int64_t l, const LayerWeights &w, const LayerSpec &layer,
                               const std::set<int64_t> *masked, const float *cos, const float *sin, int64_t ropeHalf,
                               int64_t T, KvCache &cache, std::vector<float> &normed, std::vector<float> &branch) {
  const ModelSpec &spec = modelSpec;
  const int64_t H = spec.hiddenSize;
  // Every token's MLP input comes back (with the router's logits where the
  // device holds the router and the experts, as for one token).
  thread_local std::vector<float> routerBuffer;
  const bool deviceRouter = layer.mlp == MlpKind::Moe && onDevice->holdsRouter(w) && deviceHoldsExperts(layer, w);
  float *routerLogits = deviceRouter ? sized(routerBuffer, T * w.router.rows).data() : nullptr;
  MOE_RETURN_IF_ERROR(onDevice->decodeAttention(spec, w, l, cos, sin, ropeHalf, cache, normed.data(), routerLogits));
  // Every token of the step, and weights of 1 (a dense MLP) or the shared
  // expert's gates.
  thread_local std::vector<int32_t> everyToken;
  thread_local std::vector<float> tokenWeights;
  everyToken.resize(static_cast<size_t>(T));
  std::iota(everyToken.begin(), everyToken.end(), 0);
  thread_local std::vector<DeviceRoutedExpert> block;
  block.clear();
  if (layer.mlp == MlpKind::Dense) {
    if (deviceHolds(w.dense)) {
      tokenWeights.assign(static_cast<size_t>(T), 1.0f);
      block.push_back({&w.dense, everyToken.data(), tokenWeights.data(), T});
      return onDevice->decodeRoutedBlock(block);
    }
    std::vector<float> intermediate;
    swiglu(w.dense, normed.data(), T, intermediate, branch.data());
    MOE_RETURN_IF_ERROR(onDevice->takeError());
    return onDevice->decodeAddBranch(branch.data());
  }
  // The MoE block: routed here as moeBlock routes it, run there when the
  // device holds every expert it chose (and the shared one), in the order
  // moeBlock adds them: routed experts by slot, then the shared expert.
  thread_local detail::BlockRouting perThreadRouting;
  detail::BlockRouting &routing = perThreadRouting;
  detail::routeBlock(spec, w, normed.data(), T, masked, routing, routerLogits);
  counters.routedTokens += T;
  const auto replaced = replacedExperts.find(l);
  bool held = w.expertBase.gate.empty() && replaced == replacedExperts.end() &&
              (layer.shared.intermediateSize == 0 || deviceHolds(w.shared));
  for (size_t e = 0; e < routing.tokensOf.size(); ++e) {
    if (routing.tokensOf[e].empty())
      continue;
    counters.expertCalls += static_cast<int64_t>(routing.tokensOf[e].size());
    held = held && deviceHolds(w.experts[e]);
    block.push_back({&w.experts[e], routing.tokensOf[e].data(), routing.weightsOf[e].data(),
                     static_cast<int64_t>(routing.tokensOf[e].size())});
  }
  if (held) {
    if (layer.shared.intermediateSize > 0) {
      tokenWeights.resize(static_cast<size_t>(T));
      for (int64_t t = 0; t < T; ++t)
        tokenWeights[t] = sharedExpertGate(layer, w, normed.data() + t * H, H);
      block.push_back({&w.shared, everyToken.data(), tokenWeights.data(), T});
    }
    return block.empty() ? Status::success() : onDevice->decodeRoutedBlock(block);
  }
  // Split experts, factored blocks, replaced experts or matrices without a
  // device kernel: the host's block, then its output onto the residual.
  MoeBlockHooks hooks;
  hooks.maskedRows = masked;
  if (replaced != replacedExperts.end())
    hooks.replacedExperts = &replaced->second;
  MOE_RETURN_IF_ERROR(detail::moeBlock(spec, layer, w, normed.data(), T, branch.data(), hooks, experts.get()));
  MOE_RETURN_IF_ERROR(onDevice->takeError());
  return onDevice->decodeAddBranch(branch.data());
}

Status Engine::embed(std::span<const int32_t> tokens, std::vector<float> &x) const {
  const int64_t H = modelSpec.hiddenSize, V = modelSpec.vocabSize;
  x.resize(tokens.size() * static_cast<size_t>(H));
  for (size_t t = 0; t < tokens.size(); ++t) {
    if (tokens[t] < 0 || tokens[t] >= V)
      return Status::error("forward: token id ", tokens[t], " is outside the vocabulary [0, ", V, ")");
    globals.embedding.copyRow(tokens[t], x.data() + t * static_cast<size_t>(H));
  }
  return Status::success();
}

Status Engine::runMoeBlock(int64_t l, const LayerWeights &w, const float *normed, const float *residual, int64_t T,
                           float *out) {
  MoeBlockHooks hooks;
  if (auto masked = maskedExperts.find(l); masked != maskedExperts.end())
    hooks.maskedRows = &masked->second;
  if (auto replaced = replacedExperts.find(l); replaced != replacedExperts.end())
    hooks.replacedExperts = &replaced->second;
  hooks.observer = observer;
  hooks.counters = &counters;
  hooks.residual = residual;
  return detail::moeBlock(modelSpec, modelSpec.layers[static_cast<size_t>(l)], w, normed, T, out, hooks, experts.get());
}

Status Engine::observeMoeBlock(int64_t l, const float *moeInput, int64_t T) {
  const ModelSpec &spec = modelSpec;
  if (l < 0 || l >= spec.numLayers || spec.layers[static_cast<size_t>(l)].mlp != MlpKind::Moe)
    return Status::error("observeMoeBlock: layer ", l, " is not a MoE layer of this model");
  Expected<std::shared_ptr<const LayerWeights>> loaded = layers->get(l);
  if (!loaded)
    return loaded.status();
  const LayerWeights &w = **loaded;
  const int64_t H = spec.hiddenSize;
  thread_local std::vector<float> normedBuffer, branchBuffer;
  std::vector<float> &normed = normedBuffer, &branch = sized(branchBuffer, T * H);
  normed.assign(moeInput, moeInput + T * H);
  normalize(spec, normed.data(), T, w.mlpNorm, w.mlpNormBias);
  MOE_RETURN_IF_ERROR(runMoeBlock(l, w, normed.data(), moeInput, T, branch.data()));
  if (onDevice)
    MOE_RETURN_IF_ERROR(onDevice->takeError());
  return Status::success();
}

Status Engine::forwardLayer(int64_t l, float *xData, int64_t T, KvCache &cache, float *moeInput) {
  const ModelSpec &spec = modelSpec;
  const int64_t H = spec.hiddenSize;
  if (l < 0 || l >= spec.numLayers)
    return Status::error("forward: no layer ", l, " (the model has ", spec.numLayers, ")");
  MOE_RETURN_IF_ERROR(checkCache(spec, cache, T));
  Expected<std::shared_ptr<const LayerWeights>> loaded = layers->get(l);
  if (!loaded)
    return loaded.status();
  const LayerWeights &w = **loaded;
  const LayerSpec &layer = spec.layers[static_cast<size_t>(l)];
  const rope::Angles angles = rope::computeAngles(spec, cache.length, T);
  std::span<float> x(xData, static_cast<size_t>(T * H));
  thread_local std::vector<float> normedBuffer, branchBuffer;
  std::vector<float> &normed = normedBuffer, &branch = sized(branchBuffer, T * H);
  normed.assign(x.begin(), x.end());
  normalize(spec, normed.data(), T, w.attentionNorm, w.attentionNormBias);
  if (spec.attention.kind == AttentionKind::MultiHeadLatent)
    latentAttention(spec, w, normed.data(), T, l, angles, cache, branch.data(), observer);
  else
    groupedQueryAttention(spec, w, normed.data(), T, l, angles, cache, branch.data(), observer);
  for (size_t i = 0; i < x.size(); ++i)
    x[i] += branch[i];
  if (moeInput)
    std::copy(x.begin(), x.end(), moeInput);

  normed.assign(x.begin(), x.end());
  normalize(spec, normed.data(), T, w.mlpNorm, w.mlpNormBias);
  if (layer.mlp == MlpKind::Moe) {
    MOE_RETURN_IF_ERROR(runMoeBlock(l, w, normed.data(), x.data(), T, branch.data()));
  } else {
    std::vector<float> intermediate;
    swiglu(w.dense, normed.data(), T, intermediate, branch.data());
  }
  for (size_t i = 0; i < x.size(); ++i)
    x[i] += branch[i];
  // A product that failed on the device left garbage behind: say so.
  if (onDevice)
    MOE_RETURN_IF_ERROR(onDevice->takeError());
  if (observer)
    observer->onLayerOutput(l, T, x);
  return Status::success();
}

void Engine::replaceLayerWeights(std::unique_ptr<WeightProvider> replacement) {
  layers.reset();
  experts.reset();
  provider = std::move(replacement);
  layers = std::make_unique<LayerCache>(*provider, modelSpec.numLayers, layerBudget, expertCacheBytes == 0);
  layers->setDevice(onDevice);
  layers->setRowTiles(rowTiles);
  deviceDecodes.reset();
  if (expertCacheBytes > 0)
    experts = std::make_unique<ExpertCache>(*provider, expertCacheBytes, expertCachePolicy, rowTiles);
}

Status Engine::setExpertCacheBytes(size_t bytes) {
  if (!experts || bytes == 0)
    return Status::error("the expert cache can be resized, not made or removed, after the engine is made");
  expertCacheBytes = bytes;
  experts = std::make_unique<ExpertCache>(*provider, expertCacheBytes, expertCachePolicy, rowTiles);
  return Status::success();
}

} // namespace moe
