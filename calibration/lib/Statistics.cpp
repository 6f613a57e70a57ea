//===- Statistics.cpp - Calibration statistics of MoE layers --------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Calibration/Statistics.h"
#include "moe/Calibration/StatisticNames.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Runtime/Blas.h"
#include "moe/Support/HugePages.h"
#include "moe/Support/Progress.h"
#include "moe/Support/Threads.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <unistd.h>

namespace moe {
namespace {

/// Whether `options` record layer `layer`'s dense moment `statistic`
/// (its recordsDenseMoment; all without one).
bool recordsDense(const CalibrationOptions &options, int64_t layer, const char *statistic) {
  return !options.recordsDenseMoment || options.recordsDenseMoment(layer, statistic);
}

class StatisticsObserver : public EngineObserver {
public:
  StatisticsObserver(const ModelSpec &spec, const CalibrationOptions &options, int64_t totalTokens)
      : spec(spec), options(options), withMoments(options.inputMoments), recordDense(options.denseMoments) {
    if (options.blockSamples > 0)
      sampleStride = std::max<int64_t>(1, totalTokens / options.blockSamples);
    this->totalTokens = totalTokens;
  }

  /// The statistics of `layer`, made at its first event: only the layers
  /// being run hold memory (moments are H x H per expert).
  LayerStatistics &statsFor(int64_t layer) {
    auto found = layers.find(layer);
    if (found != layers.end())
      return found->second;
    const LayerSpec &layerSpec = spec.layers[static_cast<size_t>(layer)];
    LayerStatistics stats;
    stats.layer = layer;
    const size_t E = static_cast<size_t>(layerSpec.numExperts);
    const size_t I = static_cast<size_t>(layerSpec.expertIntermediateSize);
    stats.routedTokens.assign(E, 0);
    stats.routerScoreSum.assign(E, 0);
    stats.gateWeightSum.assign(E, 0);
    stats.easyEpScore.assign(E, 0);
    stats.maxAbsOutput.assign(E, 0);
    stats.routerLogitGram.assign(E * E, 0);
    stats.topLogitSum.assign(E, 0);
    stats.neuronSquareSum.assign(E, std::vector<double>(I, 0));
    stats.neuronSquareMax.assign(E, std::vector<double>(I, 0));
    stats.neuronWeightedSquareSum = stats.neuronSquareSum;
    stats.neuronWeightedSquareMax = stats.neuronSquareMax;
    stats.momentTokens.assign(E, 0);
    if (options.sampleCapRatio > 0)
      momentCap[layer] = std::max<int64_t>(
          1, static_cast<int64_t>(options.sampleCapRatio * static_cast<double>(spec.router.topK) /
                                  static_cast<double>(layerSpec.numExperts) * static_cast<double>(totalTokens)));
    if (withMoments) {
      if (options.floatMoments) {
        stats.inputMomentsF32.assign(E, std::vector<float>());
        stats.intermediateMomentsF32.assign(E, std::vector<float>());
      } else {
        stats.inputMoments.assign(E, std::vector<double>());
        stats.intermediateMoments.assign(E, std::vector<double>());
      }
      pending[layer].assign(E, PendingRows());
    }
    return layers.emplace(layer, std::move(stats)).first->second;
  }

  /// Moves out everything recorded for `layer` (its moments complete).
  void take(int64_t layer, CalibrationResult &into) {
    if (auto found = layers.find(layer); found != layers.end()) {
      LayerStatistics &stats = found->second;
      if (withMoments) {
        const size_t H = static_cast<size_t>(spec.hiddenSize);
        const size_t E = stats.routedTokens.size();
        for (size_t e = 0; e < E; ++e) {
          if (!inChunk(static_cast<int64_t>(e)))
            continue; // another chunk's: no moments here
          flush(stats, e);
          // An expert never run has zero moments (of its recorded width).
          const size_t I = stats.neuronSquareSum[e].size();
          if (options.floatMoments) {
            complete(stats.inputMomentsF32[e], H);
            complete(stats.intermediateMomentsF32[e], I);
          } else {
            complete(stats.inputMoments[e], H);
            complete(stats.intermediateMoments[e], I);
          }
        }
        pending.erase(layer);
      }
      into.layers.push_back(std::move(stats));
      layers.erase(found);
    }
    if (auto found = denseMoments.find(layer); found != denseMoments.end()) {
      for (std::vector<double> *m : {&found->second.attentionInput, &found->second.attentionOutput,
                                     &found->second.sharedInput, &found->second.sharedIntermediate})
        symmetrize(*m);
      into.denseMoments[layer] = std::move(found->second);
      denseMoments.erase(found);
    }
  }

  /// Statistics are per expert slot, the unit every pass edits. Before any
  /// merge, slot = router row. After a merge several rows serve one slot:
  /// a slot's router probability is the sum of its rows', its logit the sum
  /// of its rows' logits, and a token counts once per slot it reaches.
  void onRouter(int64_t layer, int64_t tokens, std::span<const float> logits, std::span<const int32_t> chosen,
                std::span<const float> weights, std::span<const int32_t> slotOfRow) override {
    LayerStatistics &stats = statsFor(layer);
    const int64_t E = static_cast<int64_t>(stats.routedTokens.size()); // slots
    const int64_t R = static_cast<int64_t>(logits.size()) / tokens;    // router rows
    const int64_t K = static_cast<int64_t>(chosen.size()) / tokens;
    auto slotOf = [&](int64_t row) { return slotOfRow.empty() ? row : static_cast<int64_t>(slotOfRow[row]); };
    stats.tokens += tokens;
    currentWeights.assign(static_cast<size_t>(tokens * E), 0.0f);
    std::vector<double> scores(static_cast<size_t>(R)), slotScores(static_cast<size_t>(E)),
        slotLogits(static_cast<size_t>(E));
    std::vector<bool> slotLive(static_cast<size_t>(E));
    for (int64_t t = 0; t < tokens; ++t) {
      const float *row = logits.data() + t * R;
      if (spec.router.scoring == RouterScoring::Sigmoid) {
        for (int64_t r = 0; r < R; ++r)
          scores[r] = 1.0 / (1.0 + std::exp(-static_cast<double>(row[r])));
      } else {
        // Softmax (also the score of sparsemixer, whose logits are raw);
        // masked experts (-inf) get 0.
        double maximum = -INFINITY, sum = 0;
        for (int64_t r = 0; r < R; ++r)
          maximum = std::max(maximum, static_cast<double>(row[r]));
        for (int64_t r = 0; r < R; ++r)
          sum += scores[r] = std::exp(static_cast<double>(row[r]) - maximum);
        for (double &score : scores)
          score /= sum;
      }
      std::fill(slotScores.begin(), slotScores.end(), 0.0);
      std::fill(slotLogits.begin(), slotLogits.end(), 0.0);
      std::fill(slotLive.begin(), slotLive.end(), false);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t e = slotOf(r);
        slotScores[e] += scores[r];
        if (std::isfinite(row[r])) {
          slotLogits[e] += row[r];
          slotLive[e] = true;
        }
      }
      int64_t top = -1;
      for (int64_t e = 0; e < E; ++e)
        if (slotLive[e] && (top < 0 || slotLogits[e] > slotLogits[top]))
          top = e;
      if (top >= 0)
        stats.topLogitSum[top] += slotLogits[top];
      for (int64_t e = 0; e < E; ++e) {
        stats.routerScoreSum[e] += slotScores[e];
        if (!slotLive[e])
          continue;
        for (int64_t f = 0; f < E; ++f)
          if (slotLive[f])
            stats.routerLogitGram[e * E + f] += slotLogits[e] * slotLogits[f];
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = slotOf(chosen[t * K + k]);
        bool counted = false; // a token reaches a slot once, however many of its rows chose it
        for (int64_t j = 0; j < k; ++j)
          counted |= slotOf(chosen[t * K + j]) == e;
        stats.routedTokens[e] += counted ? 0 : 1;
        stats.gateWeightSum[e] += weights[t * K + k];
        currentWeights[t * E + e] += weights[t * K + k];
      }
    }
    pendingContributions.clear();
  }

  void onExpert(int64_t layer, int64_t expert, std::span<const int32_t> tokenIndices, std::span<const float> input,
                std::span<const float> intermediate, std::span<const float> output) override {
    LayerStatistics &stats = statsFor(layer);
    const int64_t E = static_cast<int64_t>(stats.routedTokens.size());
    const int64_t n = static_cast<int64_t>(tokenIndices.size());
    const int64_t H = spec.hiddenSize, I = static_cast<int64_t>(intermediate.size()) / n;
    std::vector<double> &squareSum = stats.neuronSquareSum[expert];
    std::vector<double> &squareMax = stats.neuronSquareMax[expert];
    std::vector<double> &weightedSum = stats.neuronWeightedSquareSum[expert];
    std::vector<double> &weightedMax = stats.neuronWeightedSquareMax[expert];
    if (static_cast<int64_t>(squareSum.size()) != I) {
      for (std::vector<double> *values : {&squareSum, &squareMax, &weightedSum, &weightedMax})
        values->assign(static_cast<size_t>(I), 0);
    }
    for (int64_t r = 0; r < n; ++r) {
      const double weight = currentWeights[static_cast<size_t>(tokenIndices[r]) * E + expert];
      for (int64_t i = 0; i < I; ++i) {
        double value = intermediate[r * I + i];
        squareSum[i] += value * value;
        squareMax[i] = std::max(squareMax[i], value * value);
        double weighted = weight * value;
        weightedSum[i] += weighted * weighted;
        weightedMax[i] = std::max(weightedMax[i], weighted * weighted);
      }
      // Super Experts measure the expert's output where the router sends
      // tokens to it; --all-experts runs it on the others too.
      const bool routed = !options.allExperts || weight > 0;
      double norm = 0;
      for (int64_t h = 0; h < H; ++h) {
        double y = output[r * H + h];
        norm += y * y;
        if (routed)
          stats.maxAbsOutput[expert] = std::max(stats.maxAbsOutput[expert], std::fabs(y));
      }
      if (weight > 0)
        pendingContributions.push_back({tokenIndices[r], expert, weight * std::sqrt(norm)});
    }
    if (withMoments) {
      // X^T X of the expert's gate/up input and of its down input (the
      // intermediate activation), over the same capped tokens. Rows are
      // buffered and added kMomentFlushRows at a time with one rank-k update.
      PendingRows &rows = pending[layer][static_cast<size_t>(expert)];
      const int64_t cap = options.sampleCapRatio > 0 ? momentCap.at(layer) : 0;
      for (int64_t r = 0; r < n; ++r) {
        if (cap > 0 && stats.momentTokens[expert] >= cap)
          break;
        ++stats.momentTokens[expert];
        if (options.floatMoments) {
          rows.inputF32.insert(rows.inputF32.end(), input.begin() + r * H, input.begin() + (r + 1) * H);
          rows.intermediateF32.insert(rows.intermediateF32.end(), intermediate.begin() + r * I,
                                      intermediate.begin() + (r + 1) * I);
        } else {
          rows.input.insert(rows.input.end(), input.begin() + r * H, input.begin() + (r + 1) * H);
          rows.intermediate.insert(rows.intermediate.end(), intermediate.begin() + r * I,
                                   intermediate.begin() + (r + 1) * I);
        }
        rows.width = I;
        if (static_cast<int64_t>(rows.input.size() + rows.inputF32.size()) >= kMomentFlushRows * H)
          flush(stats, static_cast<size_t>(expert));
      }
    }
  }

  bool computeAllExperts() const override { return options.allExperts; }
  bool runsExpert(int64_t, int64_t slot) const override { return inChunk(slot); }

  /// The chunk of expert slots [first, end) the next replay records moments
  /// of (end -1: all), and whether it records the dense moments too.
  void setChunk(int64_t first, int64_t end, bool dense) {
    chunkFirst = first;
    chunkEnd = end;
    recordDense = dense;
  }
  bool inChunk(int64_t slot) const { return slot >= chunkFirst && (chunkEnd < 0 || slot < chunkEnd); }

  void onAttention(int64_t layer, int64_t tokens, std::span<const float> input,
                   std::span<const float> attended) override {
    if (!withMoments || !recordDense)
      return;
    DenseMoments &moments = denseMoments[layer];
    moments.tokens += tokens;
    if (records(layer, stats::kAttentionInputMoments))
      addMoments(moments.attentionInput, input, tokens);
    if (records(layer, stats::kAttentionOutputMoments))
      addMoments(moments.attentionOutput, attended, tokens);
  }

  bool records(int64_t layer, const char *statistic) const { return recordsDense(options, layer, statistic); }

  void onSharedExpert(int64_t layer, int64_t tokens, std::span<const float> input, std::span<const float> intermediate,
                      std::span<const float> output) override {
    std::vector<double> &largest = statsFor(layer).sharedMaxAbsOutput;
    largest.resize(1, 0.0);
    for (float y : output)
      largest[0] = std::max(largest[0], static_cast<double>(std::fabs(y)));
    if (!withMoments || !recordDense)
      return;
    DenseMoments &moments = denseMoments[layer];
    if (records(layer, stats::kSharedInputMoments))
      addMoments(moments.sharedInput, input, tokens);
    if (records(layer, stats::kSharedIntermediateMoments))
      addMoments(moments.sharedIntermediate, intermediate, tokens);
  }

  /// target (upper triangle) += rows^T rows for `tokens` rows of `values`.
  static void addMoments(std::vector<double> &target, std::span<const float> values, int64_t tokens) {
    const int64_t width = static_cast<int64_t>(values.size()) / tokens;
    std::vector<double> rows(values.begin(), values.end());
    addRows(target, rows, width);
  }

  /// target (upper triangle, width x width) += R^T R for R = rows [n, width].
  template <typename T> static void addRows(std::vector<T> &target, const std::vector<T> &rows, int64_t width) {
    if (width == 0)
      return;
    if (static_cast<int64_t>(target.size()) != width * width)
      assignLarge(target, static_cast<size_t>(width * width), T(0));
    const int64_t n = static_cast<int64_t>(rows.size()) / width;
    if (n == 0)
      return;
    // OpenBLAS's threads (the engine's pool keeps it at one) where the
    // update is worth starting and ending them: 2^27 multiply-adds take a
    // few milliseconds on one core, a thread's start and end microseconds.
    std::optional<ScopedBlasThreads> blasThreads;
    if (width * width * n >= (int64_t(1) << 28))
      blasThreads.emplace(static_cast<int>(threadCount()));
    if constexpr (std::is_same_v<T, double>)
      cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(width), static_cast<int>(n), 1.0, rows.data(),
                  static_cast<int>(width), 1.0, target.data(), static_cast<int>(width));
    else
      cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(width), static_cast<int>(n), 1.0f,
                  rows.data(), static_cast<int>(width), 1.0f, target.data(), static_cast<int>(width));
  }

  /// Moments of `width` made whole: zeros if nothing was added, then the
  /// lower triangle filled.
  template <typename T> static void complete(std::vector<T> &m, size_t width) {
    resizeLarge(m, width * width); // (zeros when new)
    symmetrize(m);
  }

  /// Copies the upper triangle to the lower (the rank-k updates fill only
  /// the upper), in tiles: a column-wise read of a 7,168-wide matrix misses
  /// the cache on every element.
  template <typename T> static void symmetrize(std::vector<T> &m) {
    const int64_t width = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(m.size()))));
    constexpr int64_t tile = 64;
    for (int64_t a0 = 0; a0 < width; a0 += tile)
      for (int64_t b0 = 0; b0 <= a0; b0 += tile)
        for (int64_t a = a0; a < std::min(width, a0 + tile); ++a)
          for (int64_t b = b0; b < std::min(a, b0 + tile); ++b)
            m[a * width + b] = m[b * width + a];
  }

  void flush(LayerStatistics &stats, size_t expert) {
    PendingRows &rows = pending[stats.layer][expert];
    if (rows.input.empty() && rows.inputF32.empty())
      return;
    if (options.floatMoments) {
      addRows(stats.inputMomentsF32[expert], rows.inputF32, spec.hiddenSize);
      addRows(stats.intermediateMomentsF32[expert], rows.intermediateF32, rows.width);
    } else {
      addRows(stats.inputMoments[expert], rows.input, spec.hiddenSize);
      addRows(stats.intermediateMoments[expert], rows.intermediate, rows.width);
    }
    // Released, not kept: with many experts the buffers of all of them
    // would outweigh a chunk's moments.
    rows = PendingRows{{}, {}, {}, {}, rows.width};
  }

  std::map<int64_t, DenseMoments> denseMoments;

  void onMoeBlock(int64_t layer, int64_t tokens, std::span<const float> input, std::span<const float> output) override {
    LayerStatistics &stats = statsFor(layer);
    const int64_t H = spec.hiddenSize;
    if (sampleStride > 0) {
      // Evenly spaced tokens of the whole calibration run (stats.tokens
      // already counts this batch).
      const int64_t first = stats.tokens - tokens;
      for (int64_t t = 0; t < tokens && stats.blockSampleCount < options.blockSamples; ++t) {
        if ((first + t) % sampleStride != 0)
          continue;
        stats.blockInput.insert(stats.blockInput.end(), input.begin() + t * H, input.begin() + (t + 1) * H);
        stats.blockOutput.insert(stats.blockOutput.end(), output.begin() + t * H, output.begin() + (t + 1) * H);
        ++stats.blockSampleCount;
      }
    }
    // EASY-EP (arXiv 2504.06792, RUCAIBox/EASYEP): S_i = sum over tokens
    // routed to i of g_{t,i} ||E_i(x_t)|| c_t, with the token's
    // contribution c_t from onMoeResidual.
    for (const Contribution &c : pendingContributions)
      if (static_cast<size_t>(c.token) < tokenContribution.size())
        stats.easyEpScore[c.expert] += c.weightedNorm * tokenContribution[static_cast<size_t>(c.token)];
    pendingContributions.clear();
    tokenContribution.clear();
  }

  /// c_t = max(1 - cos(h_t, h_t + r_t), 0): how much the routed experts
  /// turn the residual stream h_t (r_t: their weighted output, shared
  /// experts excluded).
  void onMoeResidual(int64_t, int64_t tokens, std::span<const float> residual, std::span<const float> routed) override {
    const int64_t H = spec.hiddenSize;
    tokenContribution.assign(static_cast<size_t>(tokens), 0.0);
    for (int64_t t = 0; t < tokens; ++t) {
      double dot = 0, hh = 0, nn = 0;
      for (int64_t i = 0; i < H; ++i) {
        const double h = residual[t * H + i], n = h + static_cast<double>(routed[t * H + i]);
        dot += h * n;
        hh += h * h;
        nn += n * n;
      }
      const double cosine = hh > 0 && nn > 0 ? dot / std::sqrt(hh * nn) : 1.0;
      tokenContribution[static_cast<size_t>(t)] = std::max(0.0, 1.0 - cosine);
    }
  }

  std::map<int64_t, LayerStatistics> layers;

private:
  /// Rows of one expert's moment inputs not yet added ([n, H] and [n, I]),
  /// in the moments' precision.
  struct PendingRows {
    std::vector<double> input, intermediate;
    std::vector<float> inputF32, intermediateF32;
    int64_t width = 0;
  };
  std::map<int64_t, std::vector<PendingRows>> pending;
  struct Contribution {
    int32_t token;
    int64_t expert;
    double weightedNorm;
  };
  const ModelSpec &spec;
  const CalibrationOptions &options;
  bool withMoments;
  int64_t sampleStride = 0, totalTokens = 0;
  std::map<int64_t, int64_t> momentCap; ///< By layer, with --sample-cap-ratio.
  std::vector<float> currentWeights;
  int64_t chunkFirst = 0, chunkEnd = -1; ///< Expert slots run and recorded (end -1: all).
  bool recordDense = true;
  std::vector<Contribution> pendingContributions;
  std::vector<double> tokenContribution; ///< c_t of the block being run.
};

/// The bytes of `values`, in place (the writer streams them to the file).
template <typename T> std::span<const uint8_t> toBytes(const std::vector<T> &values) {
  return {reinterpret_cast<const uint8_t *>(values.data()), values.size() * sizeof(T)};
}

} // namespace

uint64_t expertMomentBytes(const ModelSpec &spec, int64_t layer, bool floatMoments) {
  const LayerSpec &l = spec.layers[static_cast<size_t>(layer)];
  if (l.mlp != MlpKind::Moe)
    return 0;
  const uint64_t H = static_cast<uint64_t>(spec.hiddenSize), I = static_cast<uint64_t>(l.expertIntermediateSize);
  return (H * H + I * I) * (floatMoments ? 4 : 8);
}

uint64_t denseMomentBytes(const ModelSpec &spec, int64_t layer, const CalibrationOptions &options) {
  if (!options.denseMoments)
    return 0;
  const LayerSpec &l = spec.layers[static_cast<size_t>(layer)];
  auto square = [&](const char *statistic, int64_t width) -> uint64_t {
    if (!recordsDense(options, layer, statistic))
      return 0;
    return static_cast<uint64_t>(width) * static_cast<uint64_t>(width) * 8;
  };
  const AttentionSpec &a = spec.attention;
  uint64_t bytes = square(stats::kAttentionInputMoments, spec.hiddenSize) +
                   square(stats::kAttentionOutputMoments, a.numHeads * a.valueHeadDim); // the output projection's input
  if (l.mlp == MlpKind::Moe && l.shared.intermediateSize > 0)
    bytes += square(stats::kSharedInputMoments, spec.hiddenSize) +
             square(stats::kSharedIntermediateMoments, l.shared.intermediateSize);
  return bytes;
}

uint64_t inputMomentBytes(const ModelSpec &spec, int64_t layer, const CalibrationOptions &options) {
  const LayerSpec &l = spec.layers[static_cast<size_t>(layer)];
  return denseMomentBytes(spec, layer, options) + static_cast<uint64_t>(l.mlp == MlpKind::Moe ? l.numExperts : 0) *
                                                      expertMomentBytes(spec, layer, options.floatMoments);
}

namespace {

/// Sums of squared activation gradients per routed expert neuron, into the
/// statistics of the layers the forward calibration recorded.
class GradientStatistics : public GradientObserver {
public:
  explicit GradientStatistics(CalibrationResult &result) {
    for (LayerStatistics &stats : result.layers) {
      byLayer[stats.layer] = &stats;
      stats.neuronGradientSquareSum.resize(stats.neuronSquareSum.size());
    }
  }
  void onExpertGradient(int64_t layer, int64_t expert, std::span<const int32_t> tokens, std::span<const float>,
                        std::span<const float> gradient) override {
    std::vector<double> &sums = byLayer.at(layer)->neuronGradientSquareSum.at(static_cast<size_t>(expert));
    const size_t width = gradient.size() / tokens.size();
    if (sums.size() != width)
      sums.assign(width, 0.0);
    for (size_t i = 0; i < gradient.size(); ++i)
      sums[i % width] += static_cast<double>(gradient[i]) * gradient[i];
  }

private:
  std::map<int64_t, LayerStatistics *> byLayer;
};

} // namespace

std::vector<std::span<const int32_t>> calibrationWindows(const std::vector<EvalStream> &streams, int64_t L,
                                                         int64_t maxTokens) {
  std::vector<std::span<const int32_t>> windows;
  const int64_t limit = maxTokens > 0 ? (maxTokens + L - 1) / L : INT64_MAX;
  for (const EvalStream &stream : streams) {
    const int64_t count = std::max<int64_t>(0, (static_cast<int64_t>(stream.ids.size()) - 1) / L);
    for (int64_t w = 0; w < count && static_cast<int64_t>(windows.size()) < limit; ++w)
      windows.push_back(std::span(stream.ids).subspan(static_cast<size_t>(w * L), static_cast<size_t>(L)));
  }
  return windows;
}

Expected<CalibrationResult> calibrate(Engine &engine, const std::vector<EvalStream> &streams,
                                      const CalibrationOptions &options, const LayerVisitor &visitor) {
  const int64_t L = options.sequenceLength;
  if (L < 1)
    return Status::error("--seq-len must be positive, got ", L);
  if (options.sampleCapRatio < 0)
    return Status::error("--sample-cap-ratio must not be negative, got ", options.sampleCapRatio);
  if (options.blockSamples < 0)
    return Status::error("--block-samples must not be negative, got ", options.blockSamples);
  if (options.gradients && visitor)
    return Status::error("--gradients runs the whole model per window (forward and backward) and cannot be combined "
                         "with layer-by-layer quantisation");
  if (options.allExperts && engine.hasUnloadedExperts())
    return Status::error("--all-experts runs every expert on every token, but the task set chosen at load left some "
                         "unloaded; give --task all");
  if (options.gradients && L < 2)
    return Status::error("--gradients needs windows of at least 2 tokens (--seq-len), got ", L);
  const std::vector<std::span<const int32_t>> windows = calibrationWindows(streams, L, options.maxTokens);
  if (windows.empty())
    return Status::error("no complete window of ", L, " tokens in the calibration data");
  const ModelSpec &spec = engine.spec();
  const int64_t W = static_cast<int64_t>(windows.size()), H = spec.hiddenSize;
  if (options.inputMoments && !(visitor && options.expertChunks)) {
    // Every layer's moments stay until the statistics are written; with a
    // visitor, one layer's at a time (with chunks, whoever sizes them
    // checks). Refuse up front rather than run out of memory hours in.
    uint64_t held = 0;
    for (int64_t l = 0; l < spec.numLayers; ++l)
      held = visitor ? std::max(held, inputMomentBytes(spec, l, options)) : held + inputMomentBytes(spec, l, options);
    uint64_t limit = options.memoryLimitBytes;
    if (limit == 0) {
      const long pages = sysconf(_SC_PHYS_PAGES), pageSize = sysconf(_SC_PAGE_SIZE);
      limit = pages > 0 && pageSize > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(pageSize) / 10 * 9
                                        : UINT64_MAX;
    }
    if (held > limit)
      return Status::error("--input-moments: this model's moments take ", static_cast<double>(held) / 1e9,
                           " GB held at once (", visitor ? "one layer" : "every layer until they are written",
                           "), more than the ", static_cast<double>(limit) / 1e9, " GB available",
                           visitor ? ""
                                   : "; moec compress with a GPTQ recipe calibrates and quantises one layer "
                                     "at a time");
  }

  // The residual stream of every window, advanced one layer at a time: one
  // layer's weights and statistics are live at once, and every layer is
  // loaded once whatever the memory budget.
  std::vector<float> hidden(static_cast<size_t>(W * L * H)), window;
  for (int64_t w = 0; w < W; ++w) {
    MOE_RETURN_IF_ERROR(engine.embed(windows[static_cast<size_t>(w)], window));
    std::copy(window.begin(), window.end(), hidden.begin() + w * L * H);
  }
  // With `moeInputs`, what enters the layer's MLP block is copied there.
  auto runWindows = [&](int64_t layer, std::vector<float> &x, int64_t first, int64_t end,
                        float *moeInputs = nullptr) -> Status {
    if (first < 0 || end > W || first > end)
      return Status::error("layer ", layer, ": windows [", first, ", ", end, ") are not within the ", W,
                           " calibration windows");
    for (int64_t w = first; w < end; ++w) {
      KvCache cache = engine.newCache();
      MOE_RETURN_IF_ERROR(
          engine.forwardLayer(layer, x.data() + w * L * H, L, cache, moeInputs ? moeInputs + w * L * H : nullptr));
    }
    return Status::success();
  };
  auto runLayer = [&](int64_t layer, std::vector<float> &x, float *moeInputs = nullptr) -> Status {
    return runWindows(layer, x, 0, W, moeInputs);
  };
  // The windows through a layer the visitor changed: here, or shared out
  // (passWindows).
  auto passChangedLayer = [&](int64_t layer) -> Status {
    if (!options.passWindows)
      return runLayer(layer, hidden);
    return options.passWindows(layer, W, hidden,
                               [&](int64_t first, int64_t end) { return runWindows(layer, hidden, first, end); });
  };

  StatisticsObserver observer(spec, options, W * L);
  CalibrationResult result;
  result.tokens = W * L;
  result.hiddenSize = H;
  auto start = std::chrono::steady_clock::now();
  Progress progress(
      concat(visitor ? "calibrating and quantising layer by layer (" : "calibrating (", result.tokens, " tokens)"),
      spec.numLayers, "layers");
  std::vector<float> layerInput, replay, moeInputs;
  // `run` with the observer attached; what it recorded of layer l into `into`.
  auto observe = [&](int64_t l, CalibrationResult &into, const std::function<Status()> &run) -> Status {
    engine.setObserver(&observer);
    Status status = run();
    engine.setObserver(nullptr);
    MOE_RETURN_IF_ERROR(status);
    into.tokens = result.tokens;
    into.hiddenSize = H;
    observer.take(l, into);
    return Status::success();
  };
  auto observeLayer = [&](int64_t l, std::vector<float> &x, CalibrationResult &into) -> Status {
    return observe(l, into, [&] { return runLayer(l, x); });
  };
  for (int64_t l = 0; l < spec.numLayers; ++l) {
    const LayerSpec &layerSpec = spec.layers[static_cast<size_t>(l)];
    CalibrationOptions::ExpertChunks chunkList;
    if (visitor && options.inputMoments && options.expertChunks && layerSpec.mlp == MlpKind::Moe) {
      Expected<CalibrationOptions::ExpertChunks> planned = options.expertChunks(l);
      if (!planned)
        return planned.status();
      chunkList = planned.take();
      for (const auto &[first, end] : chunkList)
        if (first < 0 || end <= first || end > layerSpec.numExperts)
          return Status::error("layer ", l, ": expert chunk [", first, ", ", end, ") is not within its ",
                               layerSpec.numExperts, " experts");
    }
    if (!chunkList.empty()) {
      // The layer's experts' moments a chunk at a time: each chunk replays
      // the layer, running only the chunk's experts (the replay's output
      // is not used), and goes to the visitor; then the windows pass the
      // layer, as the visitor left it, once. The first replay runs the
      // whole layer from its input (the dense moments too) and keeps what
      // enters the MoE block; the others run that block alone on it, the
      // same computation without the attention.
      const int64_t chunks = static_cast<int64_t>(chunkList.size());
      for (int64_t c = 0; c < chunks; ++c) {
        const auto [first, end] = chunkList[static_cast<size_t>(c)];
        observer.setChunk(first, end, options.denseMoments && c == 0);
        CalibrationResult chunkResult;
        chunkResult.momentFirst = first;
        chunkResult.momentEnd = end;
        chunkResult.chunk = c;
        chunkResult.chunks = chunks;
        Status observed = Status::success(); // the chunk's experts' moments
        if (c == 0) {
          replay = hidden;
          if (chunks > 1)
            moeInputs.resize(hidden.size());
          observed =
              observe(l, chunkResult, [&] { return runLayer(l, replay, chunks > 1 ? moeInputs.data() : nullptr); });
          replay = std::vector<float>();
        } else {
          observed = observe(l, chunkResult, [&]() -> Status {
            for (int64_t w = 0; w < W; ++w)
              MOE_RETURN_IF_ERROR(engine.observeMoeBlock(l, moeInputs.data() + w * L * H, L));
            return Status::success();
          });
        }
        observer.setChunk(0, -1, options.denseMoments);
        MOE_RETURN_IF_ERROR(observed);
        // Changed or not, the replays' outputs were partial: the windows
        // pass the layer below in any case.
        Expected<bool> visited = visitor(l, chunkResult);
        if (!visited)
          return visited.status();
      }
      moeInputs = std::vector<float>();
      MOE_RETURN_IF_ERROR(passChangedLayer(l));
      progress.update(l + 1);
      continue;
    }
    if (visitor)
      layerInput = hidden;
    CalibrationResult layerResult;
    MOE_RETURN_IF_ERROR(observeLayer(l, hidden, layerResult));
    if (visitor) {
      Expected<bool> changed = visitor(l, layerResult);
      if (!changed)
        return changed.status();
      if (*changed) {
        // The visitor changed the layer (sequential GPTQ): the next layer
        // sees what the changed layer computes.
        hidden = std::move(layerInput);
        MOE_RETURN_IF_ERROR(passChangedLayer(l));
      }
    } else {
      for (LayerStatistics &stats : layerResult.layers)
        result.layers.push_back(std::move(stats));
      for (auto &[layer, moments] : layerResult.denseMoments)
        result.denseMoments[layer] = std::move(moments);
    }
    progress.update(l + 1);
  }
  progress.finish();
  if (options.gradients) {
    // HEAPr's backward pass: per window, the gradient of its next-token
    // loss at every routed expert's down-projection input.
    GradientStatistics gradients(result);
    Progress backward(concat("gradients (", result.tokens, " tokens)"), W, "windows");
    double loss = 0;
    for (int64_t w = 0; w < W; ++w) {
      Expected<double> windowLoss = engine.lossGradients(windows[static_cast<size_t>(w)], gradients);
      if (!windowLoss)
        return windowLoss.status();
      loss += *windowLoss;
      backward.update(w + 1);
    }
    backward.finish();
    result.gradientLoss = loss / static_cast<double>(W);
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

Status writeStatistics(const CalibrationResult &result, const CalibrationOptions &options, const std::string &path) {
  SafetensorsWriter writer;
  const int64_t hiddenSize = result.hiddenSize;
  for (const LayerStatistics &stats : result.layers) {
    const std::string prefix = concat("layers.", stats.layer, ".");
    const int64_t E = static_cast<int64_t>(stats.routedTokens.size());
    auto addF64 = [&](const std::string &name, std::vector<int64_t> shape, const std::vector<double> &values) {
      return writer.addTensorView(prefix + name, DType::F64, std::move(shape), toBytes(values));
    };
    MOE_RETURN_IF_ERROR(
        writer.addTensorView(prefix + stats::kRoutedTokens, DType::I64, {E}, toBytes(stats.routedTokens)));
    MOE_RETURN_IF_ERROR(writer.addTensor(prefix + stats::kTokens, DType::I64, {},
                                         std::vector<uint8_t>(reinterpret_cast<const uint8_t *>(&stats.tokens),
                                                              reinterpret_cast<const uint8_t *>(&stats.tokens + 1))));
    MOE_RETURN_IF_ERROR(addF64(stats::kRouterScoreSum, {E}, stats.routerScoreSum));
    MOE_RETURN_IF_ERROR(addF64(stats::kGateWeightSum, {E}, stats.gateWeightSum));
    MOE_RETURN_IF_ERROR(addF64(stats::kEasyEpScore, {E}, stats.easyEpScore));
    MOE_RETURN_IF_ERROR(addF64(stats::kMaxAbsOutput, {E}, stats.maxAbsOutput));
    if (!stats.sharedMaxAbsOutput.empty())
      MOE_RETURN_IF_ERROR(addF64(stats::kSharedMaxAbsOutput, {1}, stats.sharedMaxAbsOutput));
    MOE_RETURN_IF_ERROR(addF64(stats::kRouterLogitGram, {E, E}, stats.routerLogitGram));
    MOE_RETURN_IF_ERROR(addF64(stats::kTopLogitSum, {E}, stats.topLogitSum));
    for (int64_t e = 0; e < E; ++e) {
      const std::string expert = concat("experts.", e, ".");
      int64_t width = static_cast<int64_t>(stats.neuronSquareSum[e].size());
      MOE_RETURN_IF_ERROR(addF64(expert + stats::kNeuronSquareSum, {width}, stats.neuronSquareSum[e]));
      MOE_RETURN_IF_ERROR(addF64(expert + stats::kNeuronSquareMax, {width}, stats.neuronSquareMax[e]));
      MOE_RETURN_IF_ERROR(addF64(expert + stats::kNeuronWeightedSquareSum, {width}, stats.neuronWeightedSquareSum[e]));
      MOE_RETURN_IF_ERROR(addF64(expert + stats::kNeuronWeightedSquareMax, {width}, stats.neuronWeightedSquareMax[e]));
      if (!stats.neuronGradientSquareSum.empty()) {
        // An expert no window routed to has no gradient: zeros of its width.
        std::vector<double> gradient = stats.neuronGradientSquareSum[e];
        gradient.resize(static_cast<size_t>(width), 0.0);
        MOE_RETURN_IF_ERROR(addF64(expert + stats::kNeuronGradientSquareSum, {width}, gradient));
      }
      // Moments in double or float; an expert of another chunk has none.
      const int64_t H = hiddenSize, I = static_cast<int64_t>(stats.neuronSquareSum[e].size());
      auto addMoments = [&](const auto &input, const auto &intermediate, DType dtype) -> Status {
        if (input.empty() || input[e].empty())
          return Status::success();
        if (input[e].size() != static_cast<size_t>(H * H) || intermediate[e].size() != static_cast<size_t>(I * I))
          return Status::error("calibration statistics: layer ", stats.layer, " expert ", e,
                               " has moments of the wrong size");
        MOE_RETURN_IF_ERROR(
            writer.addTensorView(prefix + expert + stats::kInputMoments, dtype, {H, H}, toBytes(input[e])));
        return writer.addTensorView(prefix + expert + stats::kIntermediateMoments, dtype, {I, I},
                                    toBytes(intermediate[e]));
      };
      MOE_RETURN_IF_ERROR(addMoments(stats.inputMoments, stats.intermediateMoments, DType::F64));
      MOE_RETURN_IF_ERROR(addMoments(stats.inputMomentsF32, stats.intermediateMomentsF32, DType::F32));
    }
    if (!stats.inputMoments.empty() || !stats.inputMomentsF32.empty())
      MOE_RETURN_IF_ERROR(
          writer.addTensorView(prefix + stats::kMomentTokens, DType::I64, {E}, toBytes(stats.momentTokens)));
    if (stats.blockSampleCount > 0) {
      const int64_t H = static_cast<int64_t>(stats.blockInput.size()) / stats.blockSampleCount;
      MOE_RETURN_IF_ERROR(writer.addTensorView(prefix + stats::kBlockInput, DType::F32, {stats.blockSampleCount, H},
                                               toBytes(stats.blockInput)));
      MOE_RETURN_IF_ERROR(writer.addTensorView(prefix + stats::kBlockOutput, DType::F32, {stats.blockSampleCount, H},
                                               toBytes(stats.blockOutput)));
    }
  }
  for (const auto &[layer, moments] : result.denseMoments) {
    const std::string prefix = concat("layers.", layer, ".");
    auto addSquare = [&](const std::string &name, const std::vector<double> &values) -> Status {
      if (values.empty())
        return Status::success();
      const int64_t width = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(values.size()))));
      return writer.addTensorView(prefix + name, DType::F64, {width, width}, toBytes(values));
    };
    MOE_RETURN_IF_ERROR(addSquare(stats::kAttentionInputMoments, moments.attentionInput));
    MOE_RETURN_IF_ERROR(addSquare(stats::kAttentionOutputMoments, moments.attentionOutput));
    MOE_RETURN_IF_ERROR(addSquare(stats::kSharedInputMoments, moments.sharedInput));
    MOE_RETURN_IF_ERROR(addSquare(stats::kSharedIntermediateMoments, moments.sharedIntermediate));
  }
  writer.setMetadata("format", "moec-calibration-statistics-v1");
  writer.setMetadata("tokens", std::to_string(result.tokens));
  writer.setMetadata("seq_len", std::to_string(options.sequenceLength));
  writer.setMetadata("input_moments", options.inputMoments ? "true" : "false");
  writer.setMetadata("moment_dtype", options.floatMoments ? "f32" : "f64");
  writer.setMetadata("sample_cap_ratio", concat(options.sampleCapRatio));
  writer.setMetadata("all_experts", options.allExperts ? "true" : "false");
  writer.setMetadata("block_samples", std::to_string(options.blockSamples));
  writer.setMetadata("gradients", options.gradients ? "true" : "false");
  return writer.write(path);
}

} // namespace moe
