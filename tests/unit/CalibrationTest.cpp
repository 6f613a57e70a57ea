//===- CalibrationTest.cpp - Statistics with known answers ----------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Calibration/StatisticNames.h"
#include "moe/Calibration/Statistics.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Runtime/Model.h"

#include "TestSupport.h"

#include <cmath>
#include <cstring>
#include <numeric>

using namespace moe;
using namespace moe::testing;

namespace {

Expected<CalibrationResult> calibrateFixture(const std::string &name, EngineOptions engineOptions,
                                             CalibrationOptions options) {
  auto model = loadModel(dataDir() + "/fixtures/" + name, engineOptions);
  if (!model)
    return model.status();
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  if (!streams)
    return streams.status();
  return calibrate(*model->engine, *streams, options);
}

} // namespace

TEST(Calibration, CountsAndWeightsAddUp) {
  CalibrationOptions options;
  options.maxTokens = 1024;
  auto result = calibrateFixture("tiny-mixtral", {}, options);
  ASSERT_TRUE(result.ok()) << result.status().message();
  EXPECT_EQ(result->tokens, 1024);
  ASSERT_EQ(result->layers.size(), 4u);
  for (const LayerStatistics &stats : result->layers) {
    EXPECT_EQ(stats.tokens, 1024);
    EXPECT_EQ(std::accumulate(stats.routedTokens.begin(), stats.routedTokens.end(), int64_t(0)), 2 * 1024)
        << "top-2 routing";
    // Mixtral renormalises the chosen weights to 1 per token; softmax
    // scores sum to 1 per token.
    EXPECT_NEAR(std::accumulate(stats.gateWeightSum.begin(), stats.gateWeightSum.end(), 0.0), 1024.0, 1e-3);
    EXPECT_NEAR(std::accumulate(stats.routerScoreSum.begin(), stats.routerScoreSum.end(), 0.0), 1024.0, 1e-6);
    const size_t E = stats.routedTokens.size();
    for (size_t a = 0; a < E; ++a)
      for (size_t b = 0; b < E; ++b)
        EXPECT_DOUBLE_EQ(stats.routerLogitGram[a * E + b], stats.routerLogitGram[b * E + a]);
    for (size_t e = 0; e < E; ++e) {
      EXPECT_EQ(stats.neuronSquareSum[e].size(), 160u);
      EXPECT_GT(stats.maxAbsOutput[e], 0.0);
      EXPECT_GT(stats.easyEpScore[e], 0.0);
    }
  }
}

TEST(Calibration, AnExpertThatIsNeverRoutedRecordsNothing) {
  EngineOptions masked;
  masked.maskedExperts = {{1, {3}}};
  CalibrationOptions options;
  options.maxTokens = 512;
  options.inputMoments = true;
  auto result = calibrateFixture("tiny-deepseek", masked, options);
  ASSERT_TRUE(result.ok()) << result.status().message();
  ASSERT_EQ(result->layers.size(), 3u);
  const LayerStatistics &layer1 = result->layers[0];
  EXPECT_EQ(layer1.layer, 1);
  EXPECT_EQ(layer1.routedTokens[3], 0);
  EXPECT_EQ(layer1.gateWeightSum[3], 0.0);
  EXPECT_EQ(layer1.routerScoreSum[3], 0.0);
  EXPECT_EQ(layer1.easyEpScore[3], 0.0);
  for (double value : layer1.neuronSquareSum[3])
    EXPECT_EQ(value, 0.0);
  for (double value : layer1.inputMoments[3])
    EXPECT_EQ(value, 0.0);
  // Routed experts have positive-semidefinite input moments.
  const std::vector<double> &moments = layer1.inputMoments[0];
  const size_t H = 160;
  double trace = 0;
  for (size_t i = 0; i < H; ++i) {
    trace += moments[i * H + i];
    EXPECT_GE(moments[i * H + i], 0.0);
  }
  EXPECT_GT(trace, 0.0);
  EXPECT_GT(result->layers[1].routedTokens[3], 0) << "other layers unaffected";
  // The down_proj Hessian: X^T X of the intermediate activation, width^2.
  ASSERT_EQ(layer1.intermediateMoments[0].size(), 96u * 96u);
  double innerTrace = 0;
  for (size_t i = 0; i < 96; ++i)
    innerTrace += layer1.intermediateMoments[0][i * 96 + i];
  EXPECT_GT(innerTrace, 0.0);
  ASSERT_EQ(layer1.intermediateMoments[3].size(), 96u * 96u) << "an expert never run has zero moments";
  for (double value : layer1.intermediateMoments[3])
    EXPECT_EQ(value, 0.0);
  EXPECT_EQ(layer1.momentTokens[0], layer1.routedTokens[0]);
  // Attention and shared-expert moments over every token, every layer.
  ASSERT_EQ(result->denseMoments.size(), 4u) << "a dense first layer and three MoE layers";
  const DenseMoments &dense = result->denseMoments.at(1);
  EXPECT_EQ(dense.tokens, 512);
  EXPECT_EQ(dense.attentionInput.size(), 160u * 160u);
  EXPECT_FALSE(dense.attentionOutput.empty());
  EXPECT_FALSE(dense.sharedIntermediate.empty());
  EXPECT_TRUE(result->denseMoments.at(0).sharedInput.empty()) << "layer 0 is dense";
}

TEST(Calibration, StatisticsFileIsSafetensorsWithNamedTensors) {
  CalibrationOptions options;
  options.maxTokens = 256;
  auto result = calibrateFixture("tiny-deepseek", {}, options);
  ASSERT_TRUE(result.ok());
  TempDir dir;
  ASSERT_TRUE(writeStatistics(*result, options, dir.file("stats.safetensors")).ok());
  auto file = SafetensorsFile::open(dir.file("stats.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status().message();
  EXPECT_EQ((*file)->metadata().at("tokens"), "256");
  const TensorInfo *counts = (*file)->find("layers.2.routed_tokens");
  ASSERT_NE(counts, nullptr);
  EXPECT_EQ(counts->dtype, DType::I64);
  std::vector<int64_t> values(8);
  std::memcpy(values.data(), (*file)->data(*counts).data(), 64);
  EXPECT_EQ(values, result->layers[1].routedTokens);
  ASSERT_NE((*file)->find("layers.3.experts.7.neuron_square_max"), nullptr);
  EXPECT_EQ((*file)->find("layers.1.router_logit_gram")->shape, (std::vector<int64_t>{8, 8}));
  EXPECT_EQ((*file)->find("layers.1.experts.0.input_moments"), nullptr) << "only on request";
  const TensorInfo *shared = (*file)->find("layers.1.shared_max_abs_output");
  ASSERT_NE(shared, nullptr);
  EXPECT_EQ(shared->shape, (std::vector<int64_t>{1}));
}

TEST(Calibration, AllExpertsModeGivesEveryExpertStatisticsWithoutChangingRouting) {
  // Expert 3 of layer 1 is never routed; in all-experts mode it still runs
  // on every token for its statistics, while routing counts stay real.
  EngineOptions masked;
  masked.maskedExperts = {{1, {3}}};
  CalibrationOptions routedOnly;
  routedOnly.maxTokens = 512;
  CalibrationOptions all = routedOnly;
  all.allExperts = true;
  auto a = calibrateFixture("tiny-deepseek", masked, routedOnly);
  auto b = calibrateFixture("tiny-deepseek", masked, all);
  ASSERT_TRUE(a.ok() && b.ok());
  for (size_t l = 0; l < a->layers.size(); ++l) {
    EXPECT_EQ(a->layers[l].routedTokens, b->layers[l].routedTokens) << "routing unchanged";
    for (size_t e = 0; e < a->layers[l].gateWeightSum.size(); ++e)
      EXPECT_NEAR(a->layers[l].gateWeightSum[e], b->layers[l].gateWeightSum[e], 1e-3);
  }
  const LayerStatistics &layer1 = b->layers[0];
  EXPECT_EQ(layer1.routedTokens[3], 0);
  double activity = std::accumulate(layer1.neuronSquareSum[3].begin(), layer1.neuronSquareSum[3].end(), 0.0);
  EXPECT_GT(activity, 0.0) << "the unrouted expert has activation statistics";
  // Super Experts look at the tokens the router sends: the unrouted
  // expert's max |output| stays 0 and the others' are those of routing.
  EXPECT_EQ(layer1.maxAbsOutput[3], 0.0);
  for (size_t l = 0; l < a->layers.size(); ++l)
    for (size_t e = 0; e < a->layers[l].maxAbsOutput.size(); ++e)
      EXPECT_NEAR(b->layers[l].maxAbsOutput[e], a->layers[l].maxAbsOutput[e], 1e-5 * a->layers[l].maxAbsOutput[e])
          << "layer " << l << " expert " << e;
  // The shared expert's max |output| is recorded too (it is in the pool).
  for (const LayerStatistics &layer : a->layers) {
    ASSERT_EQ(layer.sharedMaxAbsOutput.size(), 1u);
    EXPECT_GT(layer.sharedMaxAbsOutput[0], 0.0);
  }
  // Gate-weighted statistics stay zero: the expert never contributes.
  for (double value : layer1.neuronWeightedSquareSum[3])
    EXPECT_EQ(value, 0.0);
  // A routed expert sees more tokens than it was routed.
  EXPECT_GT(std::accumulate(layer1.neuronSquareSum[0].begin(), layer1.neuronSquareSum[0].end(), 0.0),
            std::accumulate(a->layers[0].neuronSquareSum[0].begin(), a->layers[0].neuronSquareSum[0].end(), 0.0));
}

TEST(Calibration, BlockSamplesReproduceThroughTheEnginesMoeBlock) {
  auto model = loadModel(dataDir() + "/fixtures/tiny-mixtral");
  ASSERT_TRUE(model.ok());
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  CalibrationOptions options;
  options.maxTokens = 1024;
  options.blockSamples = 100;
  auto result = calibrate(*model->engine, *streams, options);
  ASSERT_TRUE(result.ok());
  const int64_t H = model->spec.hiddenSize;
  for (const LayerStatistics &stats : result->layers) {
    ASSERT_EQ(stats.blockSampleCount, 100);
    ASSERT_EQ(stats.blockInput.size(), static_cast<size_t>(100 * H));
  }
  // Z = MoEBlock(X) row by row, through the engine's own block.
  auto provider = makeCheckpointWeightProvider(model->spec, model->checkpoint);
  for (const LayerStatistics &stats : result->layers) {
    LayerWeights w;
    ASSERT_TRUE(provider->loadLayer(stats.layer, w).ok());
    std::vector<float> out(stats.blockOutput.size());
    moeBlockForward(model->spec, model->spec.layers[static_cast<size_t>(stats.layer)], w, stats.blockInput.data(),
                    stats.blockSampleCount, out.data());
    for (size_t i = 0; i < out.size(); ++i)
      ASSERT_NEAR(out[i], stats.blockOutput[i], 1e-4f) << "layer " << stats.layer << " element " << i;
  }
}

TEST(Calibration, SampleCapLimitsPopularExpertsMoments) {
  CalibrationOptions options;
  options.maxTokens = 1024;
  options.inputMoments = true;
  options.sampleCapRatio = 1.0; // average load: 2/8 x 1024 = 256 tokens
  auto result = calibrateFixture("tiny-mixtral", {}, options);
  ASSERT_TRUE(result.ok());
  bool someCapped = false;
  for (const LayerStatistics &stats : result->layers)
    for (size_t e = 0; e < stats.momentTokens.size(); ++e) {
      EXPECT_EQ(stats.momentTokens[e], std::min<int64_t>(stats.routedTokens[e], 256));
      someCapped |= stats.routedTokens[e] > 256;
    }
  EXPECT_TRUE(someCapped);
  EXPECT_FALSE(calibrateFixture("tiny-mixtral", {},
                                [] {
                                  CalibrationOptions bad;
                                  bad.sampleCapRatio = -1;
                                  return bad;
                                }())
                   .ok());
}

namespace {

/// Records each expert's raw inputs and intermediates of one layer while
/// the model runs window by window (Engine::forward), for a brute-force
/// X^T X.
class RawExpertInputs : public EngineObserver {
public:
  explicit RawExpertInputs(int64_t layer) : layer(layer) {}
  void onExpert(int64_t l, int64_t expert, std::span<const int32_t>, std::span<const float> input,
                std::span<const float> intermediate, std::span<const float>) override {
    if (l != layer)
      return;
    inputs[expert].insert(inputs[expert].end(), input.begin(), input.end());
    intermediates[expert].insert(intermediates[expert].end(), intermediate.begin(), intermediate.end());
  }
  int64_t layer;
  std::map<int64_t, std::vector<float>> inputs, intermediates;
};

std::vector<double> gram(const std::vector<float> &rows, int64_t width) {
  std::vector<double> result(static_cast<size_t>(width * width), 0.0);
  for (size_t r = 0; r * width < rows.size(); ++r)
    for (int64_t a = 0; a < width; ++a)
      for (int64_t b = 0; b < width; ++b)
        result[a * width + b] += static_cast<double>(rows[r * width + a]) * rows[r * width + b];
  return result;
}

} // namespace

// Calibration runs layer at a time (every window through layer l, then
// l + 1) and adds moments with batched rank-k updates; both must give what
// a plain window-by-window forward pass and a brute-force X^T X give.
TEST(Calibration, LayerAtATimeMomentsEqualBruteForceOverTheForwardPass) {
  auto model = loadModel(dataDir() + "/fixtures/tiny-mixtral");
  ASSERT_TRUE(model.ok()) << model.status().message();
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  CalibrationOptions options;
  options.maxTokens = 512;
  options.sequenceLength = 128;
  options.inputMoments = true;
  auto result = calibrate(*model->engine, *streams, options);
  ASSERT_TRUE(result.ok()) << result.status().message();

  const int64_t layer = 1, H = model->spec.hiddenSize;
  RawExpertInputs raw(layer);
  model->engine->setObserver(&raw);
  std::vector<float> logits;
  int64_t windows = 0;
  for (const EvalStream &stream : *streams) {
    for (size_t w = 0; windows < 4 && (w + 1) * 128 < stream.ids.size(); ++w, ++windows) {
      KvCache cache = model->engine->newCache();
      ASSERT_TRUE(model->engine->forward(std::span(stream.ids).subspan(w * 128, 128), cache, logits, true).ok());
    }
  }
  model->engine->setObserver(nullptr);
  ASSERT_EQ(raw.inputs.size(), 8u); // every expert of the layer was routed some tokens
  const LayerStatistics &stats = result->layers[layer];
  ASSERT_EQ(stats.layer, layer);
  for (const auto &[expert, rows] : raw.inputs) {
    EXPECT_EQ(stats.momentTokens[expert] * H, static_cast<int64_t>(rows.size()));
    std::vector<double> expected = gram(rows, H);
    const int64_t I = static_cast<int64_t>(raw.intermediates[expert].size() * H / rows.size());
    std::vector<double> expectedInner = gram(raw.intermediates[expert], I);
    ASSERT_EQ(stats.inputMoments[expert].size(), expected.size());
    ASSERT_EQ(stats.intermediateMoments[expert].size(), expectedInner.size());
    for (size_t i = 0; i < expected.size(); ++i)
      ASSERT_NEAR(stats.inputMoments[expert][i], expected[i], 1e-6 * (1 + std::fabs(expected[i]))) << i;
    for (size_t i = 0; i < expectedInner.size(); ++i)
      ASSERT_NEAR(stats.intermediateMoments[expert][i], expectedInner[i], 1e-6 * (1 + std::fabs(expectedInner[i])));
  }
}

// A visitor takes each layer's statistics in turn (nothing is left in the
// result); when it says the layer changed, the windows rerun through it, so
// with unchanged weights every later layer sees the same statistics.
TEST(Calibration, LayerVisitorSeesEachLayerOnceAndRerunsChangedLayers) {
  CalibrationOptions options;
  options.maxTokens = 512;
  options.inputMoments = true;
  auto plain = calibrateFixture("tiny-deepseek", {}, options);
  ASSERT_TRUE(plain.ok());

  auto model = loadModel(dataDir() + "/fixtures/tiny-deepseek");
  ASSERT_TRUE(model.ok());
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  std::vector<int64_t> visited;
  std::vector<LayerStatistics> seen;
  Engine &engine = *model->engine;
  auto visited_result = calibrate(engine, *streams, options, [&](int64_t layer, CalibrationResult &stats) {
    visited.push_back(layer);
    for (LayerStatistics &s : stats.layers)
      seen.push_back(std::move(s));
    EXPECT_TRUE(stats.denseMoments.count(layer)); // attention moments of every layer
    engine.replaceLayerWeights(makeCheckpointWeightProvider(model->spec, model->checkpoint));
    return Expected<bool>(true);
  });
  ASSERT_TRUE(visited_result.ok()) << visited_result.status().message();
  EXPECT_TRUE(visited_result->layers.empty());
  EXPECT_EQ(visited.size(), static_cast<size_t>(model->spec.numLayers));
  ASSERT_EQ(seen.size(), plain->layers.size());
  for (size_t i = 0; i < seen.size(); ++i) {
    EXPECT_EQ(seen[i].routedTokens, plain->layers[i].routedTokens);
    for (size_t e = 0; e < seen[i].inputMoments.size(); ++e)
      for (size_t k = 0; k < seen[i].inputMoments[e].size(); k += 97)
        EXPECT_DOUBLE_EQ(seen[i].inputMoments[e][k], plain->layers[i].inputMoments[e][k]);
  }
  // An error from the visitor stops calibration with it.
  auto failed = calibrate(engine, *streams, options, [](int64_t, CalibrationResult &) {
    return Expected<bool>(Status::error("visitor refused"));
  });
  ASSERT_FALSE(failed.ok());
  EXPECT_NE(failed.status().message().find("visitor refused"), std::string::npos);
}

// passWindows decides how the windows pass a changed layer: in pieces and
// in any order (a distributed run: each rank its share, then gathered),
// the later layers see the same stream, so their moments are bit for bit
// those of one pass; a runner asked for windows that do not exist, or a
// passWindows that fails, stops calibration with the reason.
TEST(Calibration, WindowsPassAChangedLayerInAnyPieces) {
  CalibrationOptions options;
  options.maxTokens = 512;
  options.inputMoments = true;
  auto model = loadModel(dataDir() + "/fixtures/tiny-deepseek");
  ASSERT_TRUE(model.ok());
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  Engine &engine = *model->engine;
  auto run = [&](std::vector<LayerStatistics> &seen) {
    return calibrate(engine, *streams, options, [&](int64_t, CalibrationResult &stats) {
      for (LayerStatistics &s : stats.layers)
        seen.push_back(std::move(s));
      engine.replaceLayerWeights(makeCheckpointWeightProvider(model->spec, model->checkpoint));
      return Expected<bool>(true);
    });
  };
  std::vector<LayerStatistics> whole, pieces;
  ASSERT_TRUE(run(whole).ok());
  std::vector<int64_t> layersPassed;
  options.passWindows = [&](int64_t layer, int64_t windows, std::vector<float> &hidden,
                            const CalibrationOptions::WindowRunner &runner) -> Status {
    EXPECT_EQ(hidden.size() % static_cast<size_t>(windows), 0u);
    layersPassed.push_back(layer);
    const int64_t middle = windows / 2;
    MOE_RETURN_IF_ERROR(runner(middle, windows)); // the second half first
    MOE_RETURN_IF_ERROR(runner(0, 0));            // none
    return runner(0, middle);
  };
  auto pieced = run(pieces);
  ASSERT_TRUE(pieced.ok()) << pieced.status().message();
  EXPECT_EQ(layersPassed.size(), static_cast<size_t>(model->spec.numLayers));
  ASSERT_EQ(pieces.size(), whole.size());
  ASSERT_GE(pieces.size(), 2u);
  for (size_t i = 0; i < pieces.size(); ++i) {
    EXPECT_EQ(pieces[i].routedTokens, whole[i].routedTokens);
    EXPECT_EQ(pieces[i].inputMoments, whole[i].inputMoments) << "layer " << pieces[i].layer;
  }

  options.passWindows = [](int64_t, int64_t windows, std::vector<float> &,
                           const CalibrationOptions::WindowRunner &runner) { return runner(0, windows + 1); };
  std::vector<LayerStatistics> ignored;
  expectErrorContains(run(ignored).status(), {"are not within the", "calibration windows"});
  options.passWindows = [](int64_t layer, int64_t, std::vector<float> &, const CalibrationOptions::WindowRunner &) {
    return Status::error("rank 1 sent nothing for layer ", layer);
  };
  expectErrorContains(run(ignored).status(), {"rank 1 sent nothing for layer 0"});
}

// recordsDenseMoment picks which of a layer's dense moments are recorded
// (a distributed run's rank: those its share of GPTQ reads): those equal
// the moments recorded with all of them, bit for bit; the others stay
// empty, and the bytes the plan counts drop with them.
TEST(Calibration, OnlyTheDenseMomentsAskedForAreRecorded) {
  CalibrationOptions options;
  options.maxTokens = 512;
  options.inputMoments = true;
  auto all = calibrateFixture("tiny-deepseek", {}, options);
  ASSERT_TRUE(all.ok()) << all.status().message();
  options.recordsDenseMoment = [](int64_t layer, const std::string &statistic) {
    return layer != 1 || statistic == stats::kAttentionOutputMoments || statistic == stats::kSharedInputMoments;
  };
  auto some = calibrateFixture("tiny-deepseek", {}, options);
  ASSERT_TRUE(some.ok()) << some.status().message();
  const DenseMoments &got = some->denseMoments.at(1), &reference = all->denseMoments.at(1);
  EXPECT_FALSE(got.attentionOutput.empty());
  EXPECT_EQ(got.attentionOutput, reference.attentionOutput);
  EXPECT_EQ(got.sharedInput, reference.sharedInput);
  EXPECT_TRUE(got.attentionInput.empty());
  EXPECT_TRUE(got.sharedIntermediate.empty());
  EXPECT_EQ(some->denseMoments.at(2).attentionInput, all->denseMoments.at(2).attentionInput);
  EXPECT_EQ(some->denseMoments.at(2).sharedIntermediate, all->denseMoments.at(2).sharedIntermediate);

  auto model = loadModel(dataDir() + "/fixtures/tiny-deepseek");
  ASSERT_TRUE(model.ok());
  const ModelSpec &spec = model->spec;
  const uint64_t H = static_cast<uint64_t>(spec.hiddenSize),
                 A = static_cast<uint64_t>(spec.attention.numHeads * spec.attention.valueHeadDim);
  EXPECT_EQ(denseMomentBytes(spec, 1, options), (A * A + H * H) * 8);
  EXPECT_GT(denseMomentBytes(spec, 2, options), denseMomentBytes(spec, 1, options));
  options.denseMoments = false;
  EXPECT_EQ(denseMomentBytes(spec, 2, options), 0u);
}

// With expertChunks, a layer's experts' moments come a chunk at a time,
// each chunk from a replay of the layer that runs only its experts (through
// an expert cache, loading only those): every chunk's moments equal the ones
// gathered all at once, bit for bit; other chunks' experts have none; the
// dense moments come with the first chunk only; and the windows pass each
// layer once after its last chunk, so later layers see what they saw before.
TEST(Calibration, ExpertChunksGiveTheSameMomentsAsOneLayerAtOnce) {
  CalibrationOptions options;
  options.maxTokens = 512;
  options.inputMoments = true;
  auto plain = calibrateFixture("tiny-deepseek", {}, options);
  ASSERT_TRUE(plain.ok()) << plain.status().message();

  EngineOptions offloaded;
  offloaded.maxMemoryBytes = 1;
  offloaded.expertCacheBytes = 1; // resized below
  auto model = loadModel(dataDir() + "/fixtures/tiny-deepseek", offloaded);
  ASSERT_TRUE(model.ok());
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  ASSERT_TRUE(model->engine->setExpertCacheBytes(3 * 3 * 160 * 96 * 4).ok()); // three experts in f32
  options.expertChunks = [](int64_t) -> Expected<CalibrationOptions::ExpertChunks> {
    return CalibrationOptions::ExpertChunks{{0, 3}, {3, 6}, {6, 8}};
  };
  struct Call {
    int64_t layer, first, end, chunk, chunks;
    bool dense;
  };
  std::vector<Call> calls;
  auto chunked = calibrate(*model->engine, *streams, options, [&](int64_t layer, CalibrationResult &stats) {
    calls.push_back(
        {layer, stats.momentFirst, stats.momentEnd, stats.chunk, stats.chunks, stats.denseMoments.count(layer) > 0});
    if (stats.layers.empty())
      return Expected<bool>(false); // the dense layer 0
    const LayerStatistics *reference = nullptr;
    for (const LayerStatistics &r : plain->layers)
      if (r.layer == layer)
        reference = &r;
    EXPECT_TRUE(reference);
    if (!reference)
      return Expected<bool>(false);
    EXPECT_EQ(stats.layers.size(), 1u);
    const LayerStatistics &got = stats.layers.front();
    EXPECT_EQ(got.routedTokens, reference->routedTokens); // routing runs in every replay
    for (size_t e = 0; e < got.inputMoments.size(); ++e) {
      const bool mine = static_cast<int64_t>(e) >= stats.momentFirst && static_cast<int64_t>(e) < stats.momentEnd;
      if (!mine) {
        EXPECT_TRUE(got.inputMoments[e].empty()) << "layer " << layer << " expert " << e;
        EXPECT_EQ(got.momentTokens[e], 0);
        continue;
      }
      EXPECT_EQ(got.momentTokens[e], reference->momentTokens[e]);
      EXPECT_EQ(got.inputMoments[e], reference->inputMoments[e]) << "layer " << layer << " expert " << e;
      EXPECT_EQ(got.intermediateMoments[e], reference->intermediateMoments[e]);
    }
    if (stats.chunk == 0) {
      EXPECT_EQ(stats.denseMoments.at(layer).attentionInput, plain->denseMoments.at(layer).attentionInput);
      EXPECT_EQ(stats.denseMoments.at(layer).sharedIntermediate, plain->denseMoments.at(layer).sharedIntermediate);
    }
    return Expected<bool>(false);
  });
  ASSERT_TRUE(chunked.ok()) << chunked.status().message();
  // Layer 0 is dense (one call); layers 1-3 have 8 experts: 0-2, 3-5, 6-7.
  ASSERT_EQ(calls.size(), 1u + 3 * 3);
  EXPECT_EQ(calls[0].layer, 0);
  EXPECT_EQ(calls[0].chunks, 1);
  for (size_t i = 1; i < calls.size(); ++i) {
    const int64_t c = static_cast<int64_t>(i - 1) % 3;
    EXPECT_EQ(calls[i].layer, 1 + static_cast<int64_t>(i - 1) / 3);
    EXPECT_EQ(calls[i].chunk, c);
    EXPECT_EQ(calls[i].chunks, 3);
    EXPECT_EQ(calls[i].first, 3 * c);
    EXPECT_EQ(calls[i].end, std::min<int64_t>(8, 3 * c + 3));
    EXPECT_EQ(calls[i].dense, c == 0) << "dense moments with the first chunk only";
  }

  // A chunk size the caller cannot give stops calibration with its reason.
  auto visitNothing = [](int64_t, CalibrationResult &) { return Expected<bool>(false); };
  options.expertChunks = [](int64_t layer) -> Expected<CalibrationOptions::ExpertChunks> {
    return Status::error("no room for layer ", layer);
  };
  expectErrorContains(calibrate(*model->engine, *streams, options, visitNothing).status(), {"no room for layer 1"});
  // Chunks outside the layer's experts are refused.
  options.expertChunks = [](int64_t) -> Expected<CalibrationOptions::ExpertChunks> {
    return CalibrationOptions::ExpertChunks{{6, 9}};
  };
  expectErrorContains(calibrate(*model->engine, *streams, options, visitNothing).status(),
                      {"layer 1: expert chunk [6, 9) is not within its 8 experts"});
  // A process that gathers only some experts (a rank of a distributed
  // run) gets only theirs.
  options.expertChunks = [](int64_t) -> Expected<CalibrationOptions::ExpertChunks> {
    return CalibrationOptions::ExpertChunks{{4, 6}, {6, 7}};
  };
  std::vector<std::pair<int64_t, int64_t>> ranges;
  auto some = calibrate(*model->engine, *streams, options, [&](int64_t layer, CalibrationResult &stats) {
    if (layer == 2) {
      ranges.emplace_back(stats.momentFirst, stats.momentEnd);
      const LayerStatistics &got = stats.layers.front();
      for (size_t e = 0; e < got.inputMoments.size(); ++e)
        EXPECT_EQ(got.inputMoments[e].empty(),
                  !(static_cast<int64_t>(e) >= stats.momentFirst && static_cast<int64_t>(e) < stats.momentEnd));
    }
    return Expected<bool>(false);
  });
  ASSERT_TRUE(some.ok()) << some.status().message();
  EXPECT_EQ(ranges, (std::vector<std::pair<int64_t, int64_t>>{{4, 6}, {6, 7}}));
}

// Float moments (CalibrationOptions::floatMoments) are the double ones to
// float precision, in half the bytes, and are written as F32.
TEST(Calibration, FloatMomentsMatchDoubleToFloatPrecision) {
  CalibrationOptions options;
  options.maxTokens = 512;
  options.inputMoments = true;
  auto exact = calibrateFixture("tiny-mixtral", {}, options);
  ASSERT_TRUE(exact.ok());
  options.floatMoments = true;
  auto single = calibrateFixture("tiny-mixtral", {}, options);
  ASSERT_TRUE(single.ok());
  auto model = loadModel(dataDir() + "/fixtures/tiny-mixtral");
  ASSERT_TRUE(model.ok());
  EXPECT_EQ(expertMomentBytes(model->spec, 1, true), (160u * 160 + 160u * 160) * 4);
  EXPECT_EQ(expertMomentBytes(model->spec, 1, false), 2 * expertMomentBytes(model->spec, 1, true));
  for (size_t l = 0; l < exact->layers.size(); ++l) {
    const LayerStatistics &a = exact->layers[l], &b = single->layers[l];
    EXPECT_TRUE(b.inputMoments.empty());
    ASSERT_EQ(b.inputMomentsF32.size(), a.inputMoments.size());
    for (size_t e = 0; e < a.inputMoments.size(); ++e) {
      ASSERT_EQ(b.inputMomentsF32[e].size(), a.inputMoments[e].size());
      double worst = 0, scale = 0;
      for (size_t i = 0; i < a.inputMoments[e].size(); ++i) {
        worst = std::max(worst, std::fabs(a.inputMoments[e][i] - b.inputMomentsF32[e][i]));
        scale = std::max(scale, std::fabs(a.inputMoments[e][i]));
      }
      EXPECT_LE(worst, 1e-5 * scale) << "layer " << l << " expert " << e;
      EXPECT_GT(scale, 0.0);
      for (size_t i = 0; i < b.intermediateMomentsF32[e].size(); i += 7)
        EXPECT_NEAR(b.intermediateMomentsF32[e][i], a.intermediateMoments[e][i],
                    1e-5 * (1 + std::fabs(a.intermediateMoments[e][i])));
    }
  }
  const std::string path = ::testing::TempDir() + "/float-moments.safetensors";
  ASSERT_TRUE(writeStatistics(*single, options, path).ok());
  auto file = SafetensorsFile::open(path);
  ASSERT_TRUE(file.ok()) << file.status().message();
  const TensorInfo *info = (*file)->find("layers.1.experts.2.input_moments");
  ASSERT_TRUE(info);
  EXPECT_EQ(info->dtype, DType::F32);
  EXPECT_EQ((*file)->metadata().at("moment_dtype"), "f32");
}

// Input moments are large (H x H per expert); calibration refuses up front
// when they would not fit, and says what to use instead.
TEST(Calibration, InputMomentsThatDoNotFitAreRefusedUpFront) {
  auto model = loadModel(dataDir() + "/fixtures/tiny-mixtral");
  ASSERT_TRUE(model.ok());
  // 2 x 160^2 (attention in and out) + 8 experts x (160^2 + 160^2), in doubles.
  EXPECT_EQ(inputMomentBytes(model->spec, 1), (2u * 160 * 160 + 8u * 2 * 160 * 160) * 8);
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  CalibrationOptions options;
  options.maxTokens = 256;
  options.inputMoments = true;
  options.memoryLimitBytes = 4 * inputMomentBytes(model->spec, 1) - 1; // four layers need 4x
  expectErrorContains(calibrate(*model->engine, *streams, options).status(),
                      {"--input-moments: this model's moments take", "every layer until they are written",
                       "moec compress with a GPTQ recipe"});
  // Layer by layer, one layer's moments fit.
  int visited = 0;
  auto oneLayer = calibrate(*model->engine, *streams, options, [&](int64_t, CalibrationResult &) {
    ++visited;
    return Expected<bool>(false);
  });
  ASSERT_TRUE(oneLayer.ok()) << oneLayer.status().message();
  EXPECT_EQ(visited, 4);
  options.memoryLimitBytes = 1000;
  expectErrorContains(
      calibrate(*model->engine, *streams, options, [](int64_t, CalibrationResult &) { return Expected<bool>(false); })
          .status(),
      {"held at once (one layer)"});
}

namespace {

/// Sums of squared expert-activation gradients and the block-output
/// gradients, straight from the engine's backward pass.
class DirectGradients : public GradientObserver {
public:
  std::map<std::pair<int64_t, int64_t>, std::vector<double>> sums;
  double blockGradientNorm = 0;
  void onBlockOutputGradient(int64_t, int64_t, std::span<const float> gradient) override {
    for (float value : gradient)
      blockGradientNorm += static_cast<double>(value) * value;
  }
  void onExpertGradient(int64_t layer, int64_t expert, std::span<const int32_t> tokens, std::span<const float>,
                        std::span<const float> gradient) override {
    std::vector<double> &target = sums[{layer, expert}];
    const size_t width = gradient.size() / tokens.size();
    target.resize(width, 0.0);
    for (size_t i = 0; i < gradient.size(); ++i)
      target[i % width] += static_cast<double>(gradient[i]) * gradient[i];
  }
};

} // namespace

// HEAPr's statistic: per routed-expert neuron, the sum over windows and
// routed tokens of the squared loss gradient at the down projection's
// input; zeros for an expert no token reaches; only when asked for.
TEST(Calibration, GradientsSumTheBackwardPassOverWindows) {
  EngineOptions masked;
  masked.maskedExperts = {{1, {3}}};
  CalibrationOptions options;
  options.maxTokens = 512;
  options.gradients = true;
  auto result = calibrateFixture("tiny-deepseek", masked, options);
  ASSERT_TRUE(result.ok()) << result.status().message();
  EXPECT_GT(result->gradientLoss, 3.0);
  EXPECT_LT(result->gradientLoss, 6.0) << "a trained model's next-token loss on real text";

  auto model = loadModel(dataDir() + "/fixtures/tiny-deepseek", masked);
  ASSERT_TRUE(model.ok());
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  DirectGradients direct;
  const std::vector<int32_t> &ids = (*streams)[0].ids;
  ASSERT_GE(ids.size(), 513u) << "both windows come from the first document";
  double loss = 0;
  for (int w = 0; w < 2; ++w) {
    auto windowLoss = model->engine->lossGradients(std::span(ids).subspan(256 * w, 256), direct);
    ASSERT_TRUE(windowLoss.ok()) << windowLoss.status().message();
    loss += *windowLoss / 2;
  }
  EXPECT_NEAR(result->gradientLoss, loss, 1e-9);
  EXPECT_GT(direct.blockGradientNorm, 0.0);
  for (const LayerStatistics &stats : result->layers) {
    ASSERT_EQ(stats.neuronGradientSquareSum.size(), stats.routedTokens.size());
    for (size_t e = 0; e < stats.routedTokens.size(); ++e) {
      auto it = direct.sums.find({stats.layer, static_cast<int64_t>(e)});
      if (stats.routedTokens[e] == 0) {
        EXPECT_TRUE(it == direct.sums.end());
        for (double value : stats.neuronGradientSquareSum[e])
          EXPECT_EQ(value, 0.0);
        continue;
      }
      ASSERT_TRUE(it != direct.sums.end()) << "layer " << stats.layer << " expert " << e;
      ASSERT_EQ(stats.neuronGradientSquareSum[e].size(), it->second.size());
      for (size_t j = 0; j < it->second.size(); ++j)
        EXPECT_NEAR(stats.neuronGradientSquareSum[e][j], it->second[j], 1e-9 * it->second[j] + 1e-30);
      EXPECT_GT(*std::max_element(it->second.begin(), it->second.end()), 0.0);
    }
  }
  EXPECT_EQ(result->layers[0].routedTokens[3], 0) << "the masked expert";

  TempDir dir;
  ASSERT_TRUE(writeStatistics(*result, options, dir.file("g.safetensors")).ok());
  auto file = SafetensorsFile::open(dir.file("g.safetensors"));
  ASSERT_TRUE(file.ok());
  EXPECT_NE((*file)->find("layers.1.experts.0.neuron_gradient_square_sum"), nullptr);
  EXPECT_NE((*file)->find("layers.1.experts.3.neuron_gradient_square_sum"), nullptr) << "zeros, not missing";
  options.gradients = false;
  auto plain = calibrateFixture("tiny-deepseek", masked, options);
  ASSERT_TRUE(plain.ok());
  EXPECT_TRUE(plain->layers[0].neuronGradientSquareSum.empty());
}

TEST(Calibration, GradientsAreRefusedLayerByLayer) {
  CalibrationOptions options;
  options.maxTokens = 256;
  options.gradients = true;
  auto model = loadModel(dataDir() + "/fixtures/tiny-deepseek");
  ASSERT_TRUE(model.ok());
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  LayerVisitor visitor = [](int64_t, CalibrationResult &) -> Expected<bool> { return false; };
  expectErrorContains(calibrate(*model->engine, *streams, options, visitor).status(),
                      {"--gradients", "layer-by-layer"});
  options.sequenceLength = 1;
  expectErrorContains(calibrate(*model->engine, *streams, options).status(), {"at least 2 tokens", "got 1"});
}
