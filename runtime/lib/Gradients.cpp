//===- Gradients.cpp - The backward pass for activations ------------------===//
//
// Part of moec. Engine::lossGradients: the gradient of a window's mean
// next-token cross-entropy with respect to the activations (never the
// weights) of every family the engine runs: lm_head and the final norm,
// RMSNorm/LayerNorm, GQA attention (biases, qk-norm per head or over the
// full projection, q/k/v clamping) and MLA, every RoPE variant (a
// rotation, so its backward is the transpose), the MoE block (routed
// experts of any width, split into parts or not, merged slots, dynamic
// skipping, masked rows, every router kind) with its shared expert (gated
// or not), and dense MLPs. The forward runs through the engine
// (forwardLayer), keeping each layer's input; the backward recomputes a
// layer from it with the engine's kernels (the MoE block's routing and
// grouping through the engine's routeBlock), then walks it back.
// Top-k choices are piecewise constant and carry no gradient, as in
// autograd through the transformers implementations; a clamped value
// passes none where it was clamped.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Blas.h"
#include "moe/Runtime/Engine.h"

#include "EngineParts.h"
#include "Kernels.h"
#include "Rope.h"
#include "Router.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

namespace moe {

using namespace kernels;

namespace {

using Buffer = std::vector<float>;

Buffer zeros(int64_t count) { return Buffer(static_cast<size_t>(count), 0.0f); }

/// dx[T, in] += dy[T, out] . W[out, in] for any stored matrix: f32 in
/// place, others widened a tile of rows at a time (at least 512 rows or
/// 16 MiB, rows spread over the worker pool), never whole.
void linearBackward(const float *dy, int64_t tokens, const Matrix &weight, float *dx) {
  const int64_t rows = weight.rows, cols = weight.cols;
  if (rows == 0 || cols == 0 || tokens == 0)
    return;
  auto gemm = [&](int64_t first, int64_t count, const float *tile) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(tokens), static_cast<int>(cols),
                static_cast<int>(count), 1.0f, dy + first, static_cast<int>(rows), tile, static_cast<int>(cols), 1.0f,
                dx, static_cast<int>(cols));
  };
  if (!weight.data.empty())
    return gemm(0, rows, weight.data.data());
  const int64_t tileRows = std::min(rows, std::max<int64_t>(512, (int64_t(4) << 20) / cols));
  thread_local Buffer tileBuffer;
  Buffer &tile = tileBuffer;
  tile.resize(static_cast<size_t>(tileRows * cols));
  for (int64_t first = 0; first < rows; first += tileRows) {
    const int64_t count = std::min(tileRows, rows - first);
    parallelRows(count, count * cols, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        weight.copyRow(first + r, tile.data() + r * cols);
    });
    gemm(first, count, tile.data());
  }
}

/// dx += the backward of rmsNorm(x) (per row of `width`) applied to g.
void rmsNormBackward(const float *x, int64_t rows, int64_t width, const std::vector<float> &weight, double eps,
                     const float *g, float *dx) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *row = x + r * width, *grad = g + r * width;
    double squares = 0.0, dot = 0.0;
    for (int64_t i = 0; i < width; ++i) {
      squares += static_cast<double>(row[i]) * row[i];
      dot += static_cast<double>(grad[i]) * weight[i] * row[i];
    }
    const double inverse = 1.0 / std::sqrt(squares / static_cast<double>(width) + eps);
    const double correction = inverse * inverse * inverse * dot / static_cast<double>(width);
    for (int64_t i = 0; i < width; ++i)
      dx[r * width + i] += static_cast<float>(inverse * grad[i] * weight[i] - correction * row[i]);
  }
}

/// dx += the backward of layerNorm(x) applied to g (the bias has none).
void layerNormBackward(const float *x, int64_t rows, int64_t width, const std::vector<float> &weight, double eps,
                       const float *g, float *dx) {
  const double n = static_cast<double>(width);
  for (int64_t r = 0; r < rows; ++r) {
    const float *row = x + r * width, *grad = g + r * width;
    double mean = 0.0, variance = 0.0;
    for (int64_t i = 0; i < width; ++i)
      mean += row[i];
    mean /= n;
    for (int64_t i = 0; i < width; ++i)
      variance += (row[i] - mean) * (row[i] - mean);
    const double inverse = 1.0 / std::sqrt(variance / n + eps);
    double meanGrad = 0.0, meanGradNormed = 0.0;
    for (int64_t i = 0; i < width; ++i) {
      const double normedGrad = static_cast<double>(grad[i]) * weight[i];
      meanGrad += normedGrad;
      meanGradNormed += normedGrad * (row[i] - mean) * inverse;
    }
    meanGrad /= n;
    meanGradNormed /= n;
    for (int64_t i = 0; i < width; ++i) {
      const double normed = (row[i] - mean) * inverse;
      dx[r * width + i] +=
          static_cast<float>(inverse * (static_cast<double>(grad[i]) * weight[i] - meanGrad - normed * meanGradNormed));
    }
  }
}

/// dx += the backward of the model's norm of x[tokens, H] applied to g.
void normBackward(const ModelSpec &spec, const float *x, int64_t tokens, const std::vector<float> &weight,
                  const float *g, float *dx) {
  if (spec.normKind == NormKind::LayerNorm)
    layerNormBackward(x, tokens, spec.hiddenSize, weight, spec.normEps, g, dx);
  else
    rmsNormBackward(x, tokens, spec.hiddenSize, weight, spec.normEps, g, dx);
}

/// A SwiGLU MLP (summed over its parts) on x[n, H], backwards: dx += the
/// gradient from dOut[n, H]; `output` (when not null) receives the MLP's
/// output, `intermediate` and `intermediateGradient` the [n, I] activation
/// silu(gate)*up and its gradient, parts joined in order.
void swigluBackward(const MlpWeights &mlp, const float *x, int64_t n, int64_t H, const float *dOut, float *dx,
                    float *output, Buffer &intermediate, Buffer &intermediateGradient) {
  std::vector<const MlpWeights *> parts = {&mlp};
  int64_t total = mlp.gate.rows;
  for (const MlpWeights &part : mlp.moreParts) {
    parts.push_back(&part);
    total += part.gate.rows;
  }
  intermediate.assign(static_cast<size_t>(n * total), 0.0f);
  intermediateGradient.assign(static_cast<size_t>(n * total), 0.0f);
  if (output)
    std::fill(output, output + n * H, 0.0f);
  int64_t offset = 0;
  for (const MlpWeights *part : parts) {
    const int64_t width = part->gate.rows;
    Buffer gate(static_cast<size_t>(n * width)), up(gate.size()), activation(gate.size());
    linear(x, n, part->gate, gate.data());
    linear(x, n, part->up, up.data());
    for (size_t i = 0; i < gate.size(); ++i)
      activation[i] = silu(gate[i]) * up[i];
    if (output) {
      Buffer out(static_cast<size_t>(n * H));
      linear(activation.data(), n, part->down, out.data());
      for (size_t i = 0; i < out.size(); ++i)
        output[i] += out[i];
    }
    Buffer dActivation = zeros(n * width);
    linearBackward(dOut, n, part->down, dActivation.data());
    Buffer dGate(gate.size()), dUp(gate.size());
    for (size_t i = 0; i < gate.size(); ++i) {
      const float s = sigmoid(gate[i]);
      dUp[i] = dActivation[i] * gate[i] * s;
      dGate[i] = dActivation[i] * up[i] * s * (1.0f + gate[i] * (1.0f - s));
    }
    linearBackward(dGate.data(), n, part->gate, dx);
    linearBackward(dUp.data(), n, part->up, dx);
    for (int64_t t = 0; t < n; ++t) {
      std::copy_n(activation.data() + t * width, width, intermediate.data() + t * total + offset);
      std::copy_n(dActivation.data() + t * width, width, intermediateGradient.data() + t * total + offset);
    }
    offset += width;
  }
}

/// Causal attention from position 0 of q[T, heads * qDim] over k[T, kvHeads
/// * qDim] and v[T, kvHeads * vDim] (query head h reads key/value head
/// h / group): the scores of head h, softmaxed row by row (the engine's
/// prefill arithmetic), into `probabilities` [T, T].
struct AttentionShape {
  int64_t heads, kvHeads, qDim, vDim;
  float scale;
};

void headProbabilities(const AttentionShape &s, const float *q, const float *k, int64_t T, int64_t h,
                       Buffer &probabilities) {
  const int64_t kvHead = h / (s.heads / s.kvHeads);
  probabilities.resize(static_cast<size_t>(T * T));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T), static_cast<int>(T),
              static_cast<int>(s.qDim), s.scale, q + h * s.qDim, static_cast<int>(s.heads * s.qDim),
              k + kvHead * s.qDim, static_cast<int>(s.kvHeads * s.qDim), 0.0f, probabilities.data(),
              static_cast<int>(T));
  for (int64_t t = 0; t < T; ++t) {
    float *row = probabilities.data() + t * T;
    softmax(row, t + 1);
    std::fill(row + t + 1, row + T, 0.0f);
  }
}

void attendForward(const AttentionShape &s, const float *q, const float *k, const float *v, int64_t T, float *out) {
  Buffer p;
  for (int64_t h = 0; h < s.heads; ++h) {
    const int64_t kvHead = h / (s.heads / s.kvHeads);
    headProbabilities(s, q, k, T, h, p);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(T), static_cast<int>(s.vDim),
                static_cast<int>(T), 1.0f, p.data(), static_cast<int>(T), v + kvHead * s.vDim,
                static_cast<int>(s.kvHeads * s.vDim), 0.0f, out + h * s.vDim, static_cast<int>(s.heads * s.vDim));
  }
}

/// The backward of attendForward: dq (written), dk and dv (added) from the
/// gradient of its output dOut[T, heads * vDim].
void attendBackward(const AttentionShape &s, const float *q, const float *k, const float *v, int64_t T,
                    const float *dOut, float *dq, float *dk, float *dv) {
  Buffer p, dp(static_cast<size_t>(T * T));
  const int qWidth = static_cast<int>(s.heads * s.qDim), kWidth = static_cast<int>(s.kvHeads * s.qDim),
            oWidth = static_cast<int>(s.heads * s.vDim), vWidth = static_cast<int>(s.kvHeads * s.vDim);
  const int n = static_cast<int>(T);
  for (int64_t h = 0; h < s.heads; ++h) {
    const int64_t kvHead = h / (s.heads / s.kvHeads);
    headProbabilities(s, q, k, T, h, p);
    // dP = dO v^T; dV += P^T dO.
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, static_cast<int>(s.vDim), 1.0f, dOut + h * s.vDim,
                oWidth, v + kvHead * s.vDim, vWidth, 0.0f, dp.data(), n);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, static_cast<int>(s.vDim), n, 1.0f, p.data(), n,
                dOut + h * s.vDim, oWidth, 1.0f, dv + kvHead * s.vDim, vWidth);
    // Softmax: dS = P (dP - rowsum(P dP)), times the score scale.
    for (int64_t t = 0; t < T; ++t) {
      float *pr = p.data() + t * T, *dpr = dp.data() + t * T;
      double dot = 0.0;
      for (int64_t j = 0; j <= t; ++j)
        dot += static_cast<double>(pr[j]) * dpr[j];
      for (int64_t j = 0; j < T; ++j)
        dpr[j] = j <= t ? pr[j] * (dpr[j] - static_cast<float>(dot)) * s.scale : 0.0f;
    }
    // dq = dS k; dk += dS^T q.
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, static_cast<int>(s.qDim), n, 1.0f, dp.data(), n,
                k + kvHead * s.qDim, kWidth, 0.0f, dq + h * s.qDim, qWidth);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, static_cast<int>(s.qDim), n, 1.0f, dp.data(), n,
                q + h * s.qDim, qWidth, 1.0f, dk + kvHead * s.qDim, kWidth);
  }
}

/// What a layer's attention recomputation keeps for its backward.
struct AttentionTape {
  AttentionShape shape{};
  Buffer q, k, v, attended;        ///< As attended: roped queries and keys, values; the output projection's input.
  Buffer qProjected, kProjected;   ///< GQA: after projection and bias (the qk-norm's input).
  Buffer qNormed, kNormed, vClamp; ///< GQA: the clamp's input.
  Buffer qCompressed, latent;      ///< MLA: the inputs of the query and latent norms.
};

void groupedQueryForward(const ModelSpec &spec, const LayerWeights &w, const float *x, int64_t T,
                         const rope::Angles &angles, AttentionTape &tape, float *out) {
  const AttentionSpec &a = spec.attention;
  const int64_t hd = a.headDim, qWidth = a.numHeads * hd, kvWidth = a.numKeyValueHeads * hd;
  tape.shape = {a.numHeads, a.numKeyValueHeads, hd, a.valueHeadDim, static_cast<float>(a.softmaxScale)};
  tape.q.resize(static_cast<size_t>(T * qWidth));
  tape.k.resize(static_cast<size_t>(T * kvWidth));
  tape.v.resize(static_cast<size_t>(T * a.numKeyValueHeads * a.valueHeadDim));
  linear(x, T, w.query, w.queryBias, tape.q.data());
  linear(x, T, w.key, w.keyBias, tape.k.data());
  linear(x, T, w.value, w.valueBias, tape.v.data());
  tape.qProjected = tape.q;
  tape.kProjected = tape.k;
  if (a.qkNorm == QkNormKind::FullWidth) {
    rmsNorm(tape.q.data(), T, qWidth, w.queryNorm, spec.normEps);
    rmsNorm(tape.k.data(), T, kvWidth, w.keyNorm, spec.normEps);
  } else if (a.qkNorm == QkNormKind::PerHead) {
    rmsNorm(tape.q.data(), T * a.numHeads, hd, w.queryNorm, spec.normEps);
    rmsNorm(tape.k.data(), T * a.numKeyValueHeads, hd, w.keyNorm, spec.normEps);
  }
  if (a.clipQkv > 0) {
    tape.qNormed = tape.q;
    tape.kNormed = tape.k;
    tape.vClamp = tape.v;
    const float clip = static_cast<float>(a.clipQkv);
    for (Buffer *values : {&tape.q, &tape.k, &tape.v})
      for (float &value : *values)
        value = std::clamp(value, -clip, clip);
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < a.numHeads; ++h)
      rope::apply(tape.q.data() + t * qWidth + h * hd, spec.rope.layout, angles, t);
    for (int64_t h = 0; h < a.numKeyValueHeads; ++h)
      rope::apply(tape.k.data() + t * kvWidth + h * hd, spec.rope.layout, angles, t);
  }
  tape.attended.resize(static_cast<size_t>(T * a.numHeads * a.valueHeadDim));
  attendForward(tape.shape, tape.q.data(), tape.k.data(), tape.v.data(), T, tape.attended.data());
  linear(tape.attended.data(), T, w.output, w.outputBias, out);
}

void groupedQueryBackward(const ModelSpec &spec, const LayerWeights &w, int64_t T, const rope::Angles &angles,
                          const AttentionTape &tape, const float *dOut, float *dx) {
  const AttentionSpec &a = spec.attention;
  const int64_t hd = a.headDim, qWidth = a.numHeads * hd, kvWidth = a.numKeyValueHeads * hd;
  Buffer dAttended = zeros(T * a.numHeads * a.valueHeadDim);
  linearBackward(dOut, T, w.output, dAttended.data());
  Buffer dq = zeros(T * qWidth), dk = zeros(T * kvWidth), dv = zeros(T * a.numKeyValueHeads * a.valueHeadDim);
  attendBackward(tape.shape, tape.q.data(), tape.k.data(), tape.v.data(), T, dAttended.data(), dq.data(), dk.data(),
                 dv.data());
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < a.numHeads; ++h)
      rope::applyTranspose(dq.data() + t * qWidth + h * hd, spec.rope.layout, angles, t);
    for (int64_t h = 0; h < a.numKeyValueHeads; ++h)
      rope::applyTranspose(dk.data() + t * kvWidth + h * hd, spec.rope.layout, angles, t);
  }
  if (a.clipQkv > 0) {
    const float clip = static_cast<float>(a.clipQkv);
    auto mask = [clip](const Buffer &input, Buffer &gradient) {
      for (size_t i = 0; i < gradient.size(); ++i)
        if (input[i] < -clip || input[i] > clip)
          gradient[i] = 0.0f;
    };
    mask(tape.qNormed, dq);
    mask(tape.kNormed, dk);
    mask(tape.vClamp, dv);
  }
  if (a.qkNorm != QkNormKind::None) {
    Buffer dqProjected = zeros(T * qWidth), dkProjected = zeros(T * kvWidth);
    const bool full = a.qkNorm == QkNormKind::FullWidth;
    rmsNormBackward(tape.qProjected.data(), full ? T : T * a.numHeads, full ? qWidth : hd, w.queryNorm, spec.normEps,
                    dq.data(), dqProjected.data());
    rmsNormBackward(tape.kProjected.data(), full ? T : T * a.numKeyValueHeads, full ? kvWidth : hd, w.keyNorm,
                    spec.normEps, dk.data(), dkProjected.data());
    dq = std::move(dqProjected);
    dk = std::move(dkProjected);
  }
  linearBackward(dq.data(), T, w.query, dx);
  linearBackward(dk.data(), T, w.key, dx);
  linearBackward(dv.data(), T, w.value, dx);
}

void latentForward(const ModelSpec &spec, const LayerWeights &w, const float *x, int64_t T, const rope::Angles &angles,
                   AttentionTape &tape, float *out) {
  const AttentionSpec &a = spec.attention;
  const int64_t heads = a.numHeads, dn = a.qkNopeHeadDim, dr = a.qkRopeHeadDim, dv = a.valueHeadDim, qDim = dn + dr,
                lora = a.kvLoraRank;
  tape.shape = {heads, heads, qDim, dv, static_cast<float>(a.softmaxScale)};
  tape.q.resize(static_cast<size_t>(T * heads * qDim));
  if (a.queryLoraRank > 0) {
    tape.qCompressed.resize(static_cast<size_t>(T * a.queryLoraRank));
    linear(x, T, w.queryDown, tape.qCompressed.data());
    Buffer normed = tape.qCompressed;
    rmsNorm(normed.data(), T, a.queryLoraRank, w.queryDownNorm, spec.normEps);
    linear(normed.data(), T, w.queryUp, tape.q.data());
  } else {
    linear(x, T, w.query, tape.q.data());
  }
  Buffer kvCompressed(static_cast<size_t>(T * (lora + dr)));
  linear(x, T, w.kvDown, kvCompressed.data());
  tape.latent.resize(static_cast<size_t>(T * lora));
  Buffer keyRope(static_cast<size_t>(T * dr));
  for (int64_t t = 0; t < T; ++t) {
    std::copy_n(kvCompressed.data() + t * (lora + dr), lora, tape.latent.data() + t * lora);
    std::copy_n(kvCompressed.data() + t * (lora + dr) + lora, dr, keyRope.data() + t * dr);
  }
  Buffer latent = tape.latent;
  rmsNorm(latent.data(), T, lora, w.kvDownNorm, spec.normEps);
  Buffer kv(static_cast<size_t>(T * heads * (dn + dv)));
  linear(latent.data(), T, w.kvUp, kv.data());
  tape.k.resize(static_cast<size_t>(T * heads * qDim));
  tape.v.resize(static_cast<size_t>(T * heads * dv));
  for (int64_t t = 0; t < T; ++t) {
    float *sharedRope = keyRope.data() + t * dr;
    rope::apply(sharedRope, spec.rope.layout, angles, t);
    for (int64_t h = 0; h < heads; ++h) {
      rope::apply(tape.q.data() + (t * heads + h) * qDim + dn, spec.rope.layout, angles, t);
      const float *source = kv.data() + (t * heads + h) * (dn + dv);
      float *key = tape.k.data() + (t * heads + h) * qDim;
      std::copy_n(source, dn, key);
      std::copy_n(sharedRope, dr, key + dn);
      std::copy_n(source + dn, dv, tape.v.data() + (t * heads + h) * dv);
    }
  }
  tape.attended.resize(static_cast<size_t>(T * heads * dv));
  attendForward(tape.shape, tape.q.data(), tape.k.data(), tape.v.data(), T, tape.attended.data());
  linear(tape.attended.data(), T, w.output, out);
}

void latentBackward(const ModelSpec &spec, const LayerWeights &w, int64_t T, const rope::Angles &angles,
                    const AttentionTape &tape, const float *dOut, float *dx) {
  const AttentionSpec &a = spec.attention;
  const int64_t heads = a.numHeads, dn = a.qkNopeHeadDim, dr = a.qkRopeHeadDim, dv = a.valueHeadDim, qDim = dn + dr,
                lora = a.kvLoraRank;
  Buffer dAttended = zeros(T * heads * dv);
  linearBackward(dOut, T, w.output, dAttended.data());
  Buffer dq = zeros(T * heads * qDim), dk = zeros(T * heads * qDim), dValues = zeros(T * heads * dv);
  attendBackward(tape.shape, tape.q.data(), tape.k.data(), tape.v.data(), T, dAttended.data(), dq.data(), dk.data(),
                 dValues.data());
  // Keys are [nope from kv_b | the token's one roped key part]; values from kv_b.
  Buffer dKv = zeros(T * heads * (dn + dv)), dCompressed = zeros(T * (lora + dr));
  for (int64_t t = 0; t < T; ++t) {
    float *dKeyRope = dCompressed.data() + t * (lora + dr) + lora;
    for (int64_t h = 0; h < heads; ++h) {
      const float *dKey = dk.data() + (t * heads + h) * qDim;
      float *target = dKv.data() + (t * heads + h) * (dn + dv);
      std::copy_n(dKey, dn, target);
      std::copy_n(dValues.data() + (t * heads + h) * dv, dv, target + dn);
      for (int64_t i = 0; i < dr; ++i)
        dKeyRope[i] += dKey[dn + i];
      rope::applyTranspose(dq.data() + (t * heads + h) * qDim + dn, spec.rope.layout, angles, t);
    }
    rope::applyTranspose(dKeyRope, spec.rope.layout, angles, t);
  }
  Buffer dLatentNormed = zeros(T * lora), dLatent = zeros(T * lora);
  linearBackward(dKv.data(), T, w.kvUp, dLatentNormed.data());
  rmsNormBackward(tape.latent.data(), T, lora, w.kvDownNorm, spec.normEps, dLatentNormed.data(), dLatent.data());
  for (int64_t t = 0; t < T; ++t)
    std::copy_n(dLatent.data() + t * lora, lora, dCompressed.data() + t * (lora + dr));
  linearBackward(dCompressed.data(), T, w.kvDown, dx);
  if (a.queryLoraRank > 0) {
    Buffer dNormed = zeros(T * a.queryLoraRank), dQueryCompressed = zeros(T * a.queryLoraRank);
    linearBackward(dq.data(), T, w.queryUp, dNormed.data());
    rmsNormBackward(tape.qCompressed.data(), T, a.queryLoraRank, w.queryDownNorm, spec.normEps, dNormed.data(),
                    dQueryCompressed.data());
    linearBackward(dQueryCompressed.data(), T, w.queryDown, dx);
  } else {
    linearBackward(dq.data(), T, w.query, dx);
  }
}

/// dx += the backward of layer `layer`'s MoE block on x[T, H] from the
/// gradient g[T, H] of its output.
void moeBackward(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &w, const float *x, int64_t T,
                 const std::set<int64_t> *maskedRows, const float *g, float *dx, GradientObserver &observer) {
  const int64_t H = spec.hiddenSize;
  // The engine's own routing and grouping (its experts run once, below).
  detail::BlockRouting routing;
  detail::routeBlock(spec, w, x, T, maskedRows, routing);
  const RouterSpec &routerSpec = w.routing.router ? *w.routing.router : spec.router;
  const int64_t E = w.router.rows, K = routerSpec.topK, slots = static_cast<int64_t>(w.experts.size());
  const double threshold = w.routing.skipThreshold;
  const std::vector<std::vector<int32_t>> &tokensOf = routing.tokensOf;
  const std::vector<std::vector<float>> &weightsOf = routing.weightsOf;
  // Routed experts: their inputs' gradients, and <g_t, expert output> for
  // the routing weights.
  // <g_t, output of the slot choice i ran as>, per choice.
  Buffer choiceDot = zeros(T * K), intermediate, intermediateGradient;
  for (int64_t e = 0; e < slots; ++e) {
    const std::vector<int32_t> &routed = tokensOf[e];
    if (routed.empty())
      continue;
    const int64_t n = static_cast<int64_t>(routed.size());
    Buffer input(static_cast<size_t>(n * H)), dOut(input.size()), dInput = zeros(n * H), output(input.size());
    for (int64_t r = 0; r < n; ++r) {
      std::copy_n(x + routed[r] * H, H, input.data() + r * H);
      for (int64_t i = 0; i < H; ++i)
        dOut[r * H + i] = weightsOf[e][r] * g[routed[r] * H + i];
    }
    swigluBackward(w.experts[e], input.data(), n, H, dOut.data(), dInput.data(), output.data(), intermediate,
                   intermediateGradient);
    observer.onExpertGradient(layer.index, e, routed, intermediate, intermediateGradient);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t t = routed[r];
      double dot = 0.0;
      for (int64_t i = 0; i < H; ++i) {
        dx[t * H + i] += dInput[r * H + i];
        dot += static_cast<double>(g[t * H + i]) * output[r * H + i];
      }
      for (int64_t i = 0; i < K; ++i)
        if (routing.slotOfChoice[t * K + i] == e)
          choiceDot[t * K + i] = static_cast<float>(dot);
    }
  }
  // The router: weights after skipping -> before -> logits -> x.
  Buffer dWeights(static_cast<size_t>(K)), dLogits(static_cast<size_t>(T * E));
  for (int64_t t = 0; t < T; ++t) {
    router::skipWeakChoicesBackward(threshold, K, routing.weights.data() + t * K, choiceDot.data() + t * K,
                                    dWeights.data());
    router::routeBackward(routerSpec, E, routing.logits.data() + t * E, routing.chosen.data() + t * K, dWeights.data(),
                          dLogits.data() + t * E);
  }
  linearBackward(dLogits.data(), T, w.router, dx);
  // The shared expert, times its gate.
  if (layer.shared.intermediateSize <= 0)
    return;
  Buffer gates(static_cast<size_t>(T)), dOut(static_cast<size_t>(T * H)), shared(dOut.size());
  for (int64_t t = 0; t < T; ++t) {
    gates[t] = detail::sharedExpertGate(layer, w, x + t * H, H);
    for (int64_t i = 0; i < H; ++i)
      dOut[t * H + i] = gates[t] * g[t * H + i];
  }
  swigluBackward(w.shared, x, T, H, dOut.data(), dx, shared.data(), intermediate, intermediateGradient);
  if (!layer.shared.gated)
    return;
  for (int64_t t = 0; t < T; ++t) {
    double dot = 0.0;
    for (int64_t i = 0; i < H; ++i)
      dot += static_cast<double>(g[t * H + i]) * shared[t * H + i];
    const float dz = static_cast<float>(dot) * gates[t] * (1.0f - gates[t]);
    for (int64_t i = 0; i < H; ++i)
      dx[t * H + i] += dz * w.sharedExpertGate[i];
  }
}

} // namespace

Expected<double> Engine::lossGradients(std::span<const int32_t> tokens, GradientObserver &gradients,
                                       std::span<const float> embeddings) {
  const ModelSpec &spec = modelSpec;
  const int64_t T = static_cast<int64_t>(tokens.size()), H = spec.hiddenSize, V = spec.vocabSize;
  if (T < 2)
    return Status::error("gradients: a window needs at least 2 tokens (one to predict), got ", T);
  if (!replacedExperts.empty())
    return Status::error("gradients: the engine runs replaced experts, which the backward would not see");
  if (experts)
    return Status::error("gradients: the backward pass reads every layer's experts directly and does not run with "
                         "an expert cache (offloading)");
  for (int32_t token : tokens)
    if (token < 0 || token >= V)
      return Status::error("gradients: token id ", token, " is outside the vocabulary [0, ", V, ")");
  // The attached observer is calibration's; it sees the forward passes of
  // calibration, not these.
  struct Detach {
    EngineObserver *&slot, *saved;
    RoutingCounters &counters, savedCounters;
    ~Detach() {
      slot = saved;
      counters = savedCounters;
    }
  } detach{observer, observer, counters, counters};
  observer = nullptr;
  // The backward's own GEMMs (attention, linearBackward) are single calls
  // on OpenBLAS's threads; the engine's products inside set one thread
  // around their regions (moe/Runtime/Blas.h).
  const ScopedBlasThreads blasThreads(static_cast<int>(poolThreads()));

  Buffer x;
  if (embeddings.empty()) {
    MOE_RETURN_IF_ERROR(embed(tokens, x));
  } else {
    if (static_cast<int64_t>(embeddings.size()) != T * H)
      return Status::error("gradients: embeddings hold ", embeddings.size(), " values, expected ", T, " x ", H);
    x.assign(embeddings.begin(), embeddings.end());
  }
  KvCache cache = newCache();
  std::vector<Buffer> inputs(static_cast<size_t>(spec.numLayers));
  for (int64_t l = 0; l < spec.numLayers; ++l) {
    inputs[l] = x;
    MOE_RETURN_IF_ERROR(forwardLayer(l, x.data(), T, cache));
    // The backward recomputes attention; the layer's keys and values go.
    std::vector<float>().swap(cache.keys[static_cast<size_t>(l)]);
    std::vector<float>().swap(cache.values[static_cast<size_t>(l)]);
  }

  // Head and loss: mean cross-entropy of tokens[1..]; the last row predicts nothing.
  Buffer normed = x, logits(static_cast<size_t>(T * V));
  detail::normalize(spec, normed.data(), T, globals.finalNorm, globals.finalNormBias);
  linear(normed.data(), T, globals.outputProjection(), globals.lmHeadBias, logits.data());
  const double predicted = static_cast<double>(T - 1);
  double loss = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    float *row = logits.data() + t * V;
    if (t == T - 1) {
      std::fill(row, row + V, 0.0f);
      continue;
    }
    const float top = *std::max_element(row, row + V);
    double sum = 0.0;
    for (int64_t i = 0; i < V; ++i)
      sum += std::exp(static_cast<double>(row[i]) - top);
    const int32_t label = tokens[t + 1];
    loss -= static_cast<double>(row[label]) - top - std::log(sum);
    for (int64_t i = 0; i < V; ++i)
      row[i] = static_cast<float>(std::exp(static_cast<double>(row[i]) - top) / sum / predicted);
    row[label] -= static_cast<float>(1.0 / predicted);
  }
  if (!std::isfinite(loss))
    return onDevice && !onDevice->takeError().ok()
               ? Status::error("gradients: a product on the device failed")
               : Status::error("gradients: the loss is not finite (the model produced non-finite logits)");
  Buffer dNormed = zeros(T * H), g = zeros(T * H);
  linearBackward(logits.data(), T, globals.outputProjection(), dNormed.data());
  normBackward(spec, x.data(), T, globals.finalNorm, dNormed.data(), g.data());

  const rope::Angles angles = rope::computeAngles(spec, 0, T);
  for (int64_t l = spec.numLayers - 1; l >= 0; --l) {
    Expected<std::shared_ptr<const LayerWeights>> loaded = layers->get(l);
    if (!loaded)
      return loaded.status();
    const LayerWeights &w = **loaded;
    if (!w.expertBase.gate.empty())
      return Status::error("gradients: layer ", l,
                           "'s experts are factored (moe-factor-experts); the backward pass reads dense experts");
    const LayerSpec &layer = spec.layers[static_cast<size_t>(l)];
    const Buffer &input = inputs[l];
    // Recompute: h = x + Attn(Norm1(x)), the MLP's input Norm2(h).
    Buffer attentionInput = input, attention(static_cast<size_t>(T * H));
    detail::normalize(spec, attentionInput.data(), T, w.attentionNorm, w.attentionNormBias);
    AttentionTape tape;
    const bool latent = spec.attention.kind == AttentionKind::MultiHeadLatent;
    if (latent)
      latentForward(spec, w, attentionInput.data(), T, angles, tape, attention.data());
    else
      groupedQueryForward(spec, w, attentionInput.data(), T, angles, tape, attention.data());
    Buffer h(input);
    for (size_t i = 0; i < h.size(); ++i)
      h[i] += attention[i];
    Buffer mlpInput = h;
    detail::normalize(spec, mlpInput.data(), T, w.mlpNorm, w.mlpNormBias);

    // Back: the MLP block, its norm, the attention, its norm; residuals pass g on.
    gradients.onBlockOutputGradient(l, T, g);
    Buffer dMlpInput = zeros(T * H);
    if (layer.mlp == MlpKind::Moe) {
      auto masked = maskedExperts.find(l);
      moeBackward(spec, layer, w, mlpInput.data(), T, masked == maskedExperts.end() ? nullptr : &masked->second,
                  g.data(), dMlpInput.data(), gradients);
    } else {
      Buffer intermediate, intermediateGradient;
      swigluBackward(w.dense, mlpInput.data(), T, H, g.data(), dMlpInput.data(), nullptr, intermediate,
                     intermediateGradient);
    }
    Buffer dh = g;
    normBackward(spec, h.data(), T, w.mlpNorm, dMlpInput.data(), dh.data());
    Buffer dAttentionInput = zeros(T * H);
    if (latent)
      latentBackward(spec, w, T, angles, tape, dh.data(), dAttentionInput.data());
    else
      groupedQueryBackward(spec, w, T, angles, tape, dh.data(), dAttentionInput.data());
    g = dh;
    normBackward(spec, input.data(), T, w.attentionNorm, dAttentionInput.data(), g.data());
    inputs[l] = Buffer();
  }
  gradients.onInputGradient(T, g);
  // A product that failed on a device left its output undefined.
  if (onDevice)
    MOE_RETURN_IF_ERROR(onDevice->takeError());
  return loss / predicted;
}

} // namespace moe
