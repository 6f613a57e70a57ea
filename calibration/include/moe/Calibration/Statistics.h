//===- Statistics.h - Calibration statistics of MoE layers ------*- C++ -*-===//
//
// Part of moec. The runtime engine plus an observer: one calibration pass
// records, per MoE layer and expert, everything the compression passes
// interpret (DESIGN.md "Calibration statistics"). This library knows no
// pass and no method; it records statistics, passes interpret them.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_CALIBRATION_STATISTICS_H
#define MOE_CALIBRATION_STATISTICS_H

#include "moe/Runtime/Engine.h"
#include "moe/Runtime/Evaluate.h"

#include <functional>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace moe {

struct CalibrationOptions {
  int64_t sequenceLength = 256;
  int64_t maxTokens = 0;     ///< 0: all of the data.
  bool inputMoments = false; ///< X^T X of each expert's routed inputs (H x H each; large).
  /// EAQuant-style balance: an expert's input moments stop accumulating
  /// after ratio x its average load (top-k / experts x tokens) tokens. 0: no cap.
  double sampleCapRatio = 0;
  /// Every expert also runs on every token for its statistics (neurons,
  /// moments, max output), so rarely routed experts get them too; routing
  /// counts and the block output still follow real routing.
  bool allExperts = false;
  /// Block input/output rows kept per MoE layer (evenly spaced tokens), for
  /// reconstruction-error methods. 0: none.
  int64_t blockSamples = 0;
  /// Also run the backward pass of the engine on every window (its mean
  /// next-token loss) and record per neuron the squared gradient at each
  /// expert's down-projection input (HEAPr). Needs the whole model per
  /// window, so not with a layer visitor.
  bool gradients = false;
  /// With input moments, refuse to start when the moments held at once
  /// (every layer's, or one layer's with a visitor) exceed this many bytes.
  /// 0: 90% of physical memory.
  uint64_t memoryLimitBytes = 0;
  /// With input moments: also the per-layer moments of the attention
  /// projections' and the shared expert's inputs (DenseMoments), which GPTQ
  /// of those matrices needs. MLA's attended width makes them large.
  bool denseMoments = true;
  /// With denseMoments: whether layer `layer` records the dense moment
  /// named `statistic` (stats::kAttentionInputMoments and the three
  /// others); null: all of them. A distributed run's rank records only
  /// those its share of GPTQ reads, and no run records those of matrices
  /// it does not quantise (MLA's 16,384-wide attention output alone is
  /// 2.1 GB and about 0.5 T multiply-adds a layer at 2,048 tokens).
  std::function<bool(int64_t layer, const std::string &statistic)> recordsDenseMoment;
  /// With input moments: accumulate them in float (single-precision rank-k
  /// updates, written F32), half the memory of double.
  bool floatMoments = false;
  /// With input moments and a visitor: a MoE layer's routed experts'
  /// moments are gathered in these chunks of expert slots [first, end), in
  /// order. The layer is replayed from its cached input once per chunk,
  /// running only that chunk's experts (EngineObserver::runsExpert), and the
  /// visitor is called per chunk (CalibrationResult::momentFirst/momentEnd),
  /// so the moments of one chunk, not of the layer, are in memory. The
  /// chunks may leave experts out (another process of a distributed run
  /// gathers those). Called as each MoE layer starts; an error stops
  /// calibration. Null or empty: the whole layer at once. Without a
  /// visitor: ignored.
  using ExpertChunks = std::vector<std::pair<int64_t, int64_t>>;
  std::function<Expected<ExpertChunks>(int64_t layer)> expertChunks;
  /// Passes windows [first, end) of the residual stream through the layer,
  /// in place.
  using WindowRunner = std::function<Status(int64_t first, int64_t end)>;
  /// With a visitor: how the windows pass a layer the visitor changed (the
  /// final pass of sequential GPTQ, through the quantised layer): given
  /// the `windows` windows' stream `hidden` ([windows, L, H]) and `run`,
  /// it leaves every window passed. Windows are independent, so a
  /// distributed run passes each process's share of them and gathers the
  /// others' (the same bytes). Null: every window here.
  std::function<Status(int64_t layer, int64_t windows, std::vector<float> &hidden, const WindowRunner &run)>
      passWindows;
};

/// Rows of an expert's moment inputs buffered before one rank-k update adds
/// them (and the buffer is released).
constexpr int64_t kMomentFlushRows = 256;

/// Bytes of one routed expert's input moments in layer `layer` (X^T X of
/// its gate/up and of its down inputs), in double or float.
uint64_t expertMomentBytes(const ModelSpec &spec, int64_t layer, bool floatMoments = false);

/// Bytes of layer `layer`'s per-layer moments (DenseMoments: attention
/// input and output, shared expert) in double, those `options` records
/// (none without denseMoments; recordsDenseMoment's).
uint64_t denseMomentBytes(const ModelSpec &spec, int64_t layer, const CalibrationOptions &options = {});

/// Bytes of layer `layer`'s input moments held at once under `options`
/// without chunks: every expert's, plus the attention and shared-expert
/// ones when recorded; 0 for a dense layer without them.
uint64_t inputMomentBytes(const ModelSpec &spec, int64_t layer, const CalibrationOptions &options = {});

/// Statistics of one MoE layer; per-expert vectors are indexed by expert.
struct LayerStatistics {
  int64_t layer = 0;
  int64_t tokens = 0;                     ///< Tokens seen by the router.
  std::vector<int64_t> routedTokens;      ///< Tokens routed to each expert.
  std::vector<double> routerScoreSum;     ///< Sum of softmax/sigmoid scores (all tokens).
  std::vector<double> gateWeightSum;      ///< Sum of routing weights where chosen.
  std::vector<double> easyEpScore;        ///< Sum of w * ||y_e|| / ||block output||.
  std::vector<double> maxAbsOutput;       ///< Max |element| of the expert's output (routed tokens).
  std::vector<double> sharedMaxAbsOutput; ///< [1]: the same of the shared expert; empty: none.
  std::vector<double> routerLogitGram;    ///< [E, E] sum of logits^T logits.
  std::vector<double> topLogitSum;        ///< PreMoe marker: sum of the raw logit where the expert is the top-1.
  std::vector<std::vector<double>> neuronSquareSum;         ///< [E][width] sum of intermediate^2.
  std::vector<std::vector<double>> neuronSquareMax;         ///< [E][width] max of intermediate^2.
  std::vector<std::vector<double>> neuronWeightedSquareSum; ///< [E][width] sum of (weight * intermediate)^2.
  std::vector<std::vector<double>> neuronWeightedSquareMax; ///< [E][width] max of (weight * intermediate)^2.
  std::vector<std::vector<double>> neuronGradientSquareSum; ///< [E][width] with gradients: sum of (dL/da)^2.
  std::vector<std::vector<double>> inputMoments;            ///< [E][H*H] when requested.
  std::vector<std::vector<double>> intermediateMoments;     ///< [E][width^2] (down_proj input) when requested.
  /// The same two in float (CalibrationOptions::floatMoments); then the
  /// double ones are empty. An expert outside the chunk has neither.
  std::vector<std::vector<float>> inputMomentsF32, intermediateMomentsF32;
  std::vector<int64_t> momentTokens; ///< Tokens in each expert's moments.
  int64_t blockSampleCount = 0;
  std::vector<float> blockInput, blockOutput; ///< [blockSampleCount, H] each.
};

/// X^T X of the inputs of a layer's attention projections and shared
/// expert (every token), recorded with --input-moments for GPTQ.
struct DenseMoments {
  int64_t tokens = 0;
  std::vector<double> attentionInput;     ///< [H, H]: q/k/v (and MLA's down projections).
  std::vector<double> attentionOutput;    ///< [A, A]: the output projection's input.
  std::vector<double> sharedInput;        ///< [H, H]: shared expert gate/up.
  std::vector<double> sharedIntermediate; ///< [S, S]: shared expert down.
};

struct CalibrationResult {
  int64_t hiddenSize = 0;
  std::vector<LayerStatistics> layers;
  std::map<int64_t, DenseMoments> denseMoments; ///< By layer, with input moments.
  int64_t tokens = 0;
  double seconds = 0;
  double gradientLoss = 0; ///< With gradients: the windows' mean next-token loss.
  /// With expertChunks, the expert slots [first, end) whose moments a
  /// visitor's call holds, and which chunk of how many that is; without,
  /// every expert in one chunk (end -1: all).
  int64_t momentFirst = 0, momentEnd = -1, chunk = 0, chunks = 1;
};

/// Called with each layer's statistics as soon as every window has passed
/// the layer (with expertChunks, once per chunk of its experts); returns
/// whether it changed the layer's weights (through
/// Engine::replaceLayerWeights), so that the windows are run through the
/// changed layer before the next one.
using LayerVisitor = std::function<Expected<bool>(int64_t layer, CalibrationResult &layerStatistics)>;

/// The windows calibration takes from `streams`, as eval takes them:
/// floor((N-1)/L) windows of L tokens per stream, in order, at most
/// ceil(maxTokens / L) in all (maxTokens 0: no limit).
std::vector<std::span<const int32_t>> calibrationWindows(const std::vector<EvalStream> &streams, int64_t L,
                                                         int64_t maxTokens);

/// Runs `streams` through `engine` (windows of the sequence length, as eval
/// does) and records the statistics of every MoE layer. Layer at a time:
/// every window passes layer l before any enters l + 1, so one layer's
/// weights and statistics are in memory at once (plus the windows'
/// residual stream, tokens x hidden floats). With a visitor, each layer's
/// statistics go to it instead of into the result (which then holds only
/// the token count): sequential GPTQ quantises layer l on them and the
/// windows continue through the quantised layer.
Expected<CalibrationResult> calibrate(Engine &engine, const std::vector<EvalStream> &streams,
                                      const CalibrationOptions &options, const LayerVisitor &visitor = {});

/// Writes the statistics as named tensors ("layers.<l>.<name>") in a
/// safetensors file, with the options and token count in its metadata.
Status writeStatistics(const CalibrationResult &result, const CalibrationOptions &options, const std::string &path);

} // namespace moe

#endif // MOE_CALIBRATION_STATISTICS_H
