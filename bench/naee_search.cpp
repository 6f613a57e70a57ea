//===- naee_search.cpp - NAEE's subset search, before and after -----------===//
//
// Part of moec. Per MoE layer of a checkpoint, the cost of scoring one
// expert subset two ways on the same block samples: recomputing the MoE
// block with the subset's router rows masked (moeBlockOutputError, what
// the search did before) and from products of expert outputs computed once
// (MaskedBlockErrors, what it does now), with the largest relative
// difference of their errors, and the search times both give at 25% and 50%
// of experts removed with every subset scored. Prints JSON.
//
//   naee_search DIR TOKENS.u32 [--samples N] [--threads T]
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Checkpoint.h"
#include "moe/Runtime/Engine.h"
#include "moe/Runtime/MoeBlock.h"
#include "moe/Support/Threads.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <fstream>
#include <iostream>
#include <map>
#include <random>

using namespace moe;
using Clock = std::chrono::steady_clock;

namespace {

double secondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

/// The first `limit` block inputs and outputs of every MoE layer.
class Samples : public EngineObserver {
public:
  Samples(int64_t limit, int64_t hidden) : limit(limit), hidden(hidden) {}
  void onMoeBlock(int64_t layer, int64_t tokens, std::span<const float> input, std::span<const float> output) override {
    std::vector<float> &in = inputs[layer], &out = outputs[layer];
    const int64_t take = std::min<int64_t>(tokens, limit - static_cast<int64_t>(in.size()) / hidden);
    in.insert(in.end(), input.begin(), input.begin() + take * hidden);
    out.insert(out.end(), output.begin(), output.begin() + take * hidden);
  }
  bool full() const {
    for (const auto &[layer, in] : inputs)
      if (static_cast<int64_t>(in.size()) / hidden < limit)
        return false;
    return !inputs.empty();
  }
  std::map<int64_t, std::vector<float>> inputs, outputs;
  int64_t limit, hidden;
};

double choose(int64_t n, int64_t k) {
  double count = 1;
  for (int64_t i = 0; i < k; ++i)
    count = count * static_cast<double>(n - i) / static_cast<double>(i + 1);
  return count;
}

int fail(const std::string &message) {
  std::cerr << "naee_search: " << message << "\n";
  return 1;
}

} // namespace

int main(int argc, char **argv) {
  if (argc < 3)
    return fail("usage: naee_search DIR TOKENS.u32 [--samples N] [--threads T]");
  const std::string dir = argv[1], tokensPath = argv[2];
  int64_t limit = 2048;
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--samples")
      limit = std::stoll(argv[i + 1]);
    else if (flag == "--threads")
      setThreadCount(static_cast<unsigned>(std::stoul(argv[i + 1])));
    else
      return fail("unknown option " + flag);
  }
  auto spec = ModelSpec::fromConfigFile(dir + "/config.json");
  auto checkpoint = Checkpoint::open(dir);
  if (!spec.ok() || !checkpoint.ok())
    return fail(!spec.ok() ? spec.status().message() : checkpoint.status().message());
  ModelSpec modelSpec = spec.take();
  std::shared_ptr<const Checkpoint> files = checkpoint.take();
  if (auto bound = bindCheckpoint(modelSpec, *files); !bound.ok())
    return fail(bound.status().message());
  auto engine = Engine::create(modelSpec, makeCheckpointWeightProvider(modelSpec, files));
  if (!engine.ok())
    return fail(engine.status().message());
  std::ifstream in(tokensPath, std::ios::binary);
  std::vector<uint32_t> raw;
  for (uint32_t id; in.read(reinterpret_cast<char *>(&id), 4);)
    raw.push_back(id);
  Samples samples(limit, modelSpec.hiddenSize);
  (*engine)->setObserver(&samples);
  for (size_t begin = 0; begin < raw.size() && !samples.full(); begin += 256) {
    std::vector<int32_t> window;
    for (size_t i = begin; i < std::min(raw.size(), begin + 256); ++i)
      window.push_back(static_cast<int32_t>(raw[i] % static_cast<uint32_t>(modelSpec.vocabSize)));
    KvCache cache = (*engine)->newCache();
    std::vector<float> logits;
    if (Status run = (*engine)->forward(window, cache, logits, true); !run.ok())
      return fail(run.message());
  }
  auto provider = makeCheckpointWeightProvider(modelSpec, files);
  std::mt19937 rng(3);
  nlohmann::json layers = nlohmann::json::array();
  for (const auto &[layer, input] : samples.inputs) {
    LayerWeights weights;
    if (Status loaded = provider->loadLayer(layer, weights); !loaded.ok())
      return fail(loaded.message());
    const LayerSpec &layerSpec = modelSpec.layers[static_cast<size_t>(layer)];
    const BlockSamplesView view{input.data(), samples.outputs[layer].data(),
                                static_cast<int64_t>(input.size()) / modelSpec.hiddenSize};
    const int64_t E = weights.router.rows;
    // Random subsets of half the experts.
    std::vector<std::set<int64_t>> masks(32);
    for (std::set<int64_t> &mask : masks)
      while (static_cast<int64_t>(mask.size()) < E / 2)
        mask.insert(static_cast<int64_t>(rng() % static_cast<uint32_t>(E)));
    std::vector<float> scratch;
    std::vector<double> recomputed;
    auto start = Clock::now();
    for (size_t i = 0; i < 4; ++i)
      recomputed.push_back(moeBlockOutputError(modelSpec, layerSpec, weights, view, &masks[i], scratch));
    const double recomputeSeconds = secondsSince(start) / 4;
    start = Clock::now();
    MaskedBlockErrors products(modelSpec, layerSpec, weights, view);
    const double buildSeconds = secondsSince(start);
    double largestDifference = 0;
    start = Clock::now();
    const int64_t repeats = 512;
    for (int64_t r = 0; r < repeats; ++r) {
      const std::set<int64_t> &mask = masks[static_cast<size_t>(r) % masks.size()];
      std::vector<uint8_t> flags(static_cast<size_t>(E), 0);
      for (int64_t e : mask)
        flags[static_cast<size_t>(e)] = 1;
      const double error = std::sqrt(products.squaredError(flags.data()));
      if (r < 4)
        largestDifference = std::max(largestDifference, std::fabs(error - recomputed[static_cast<size_t>(r)]) /
                                                            std::max(recomputed[static_cast<size_t>(r)], 1e-30));
    }
    const double productSeconds = secondsSince(start) / static_cast<double>(repeats);
    nlohmann::json entry = {{"layer", layer},
                            {"experts", E},
                            {"samples", view.count},
                            {"recompute_seconds_per_subset", recomputeSeconds},
                            {"products_build_seconds", buildSeconds},
                            {"products_seconds_per_subset_one_thread", productSeconds},
                            {"subset_speedup", recomputeSeconds / productSeconds},
                            {"largest_relative_difference", largestDifference}};
    for (double ratio : {0.25, 0.5}) {
      const double subsets = choose(E, static_cast<int64_t>(std::llround(ratio * static_cast<double>(E))));
      const std::string key = ratio == 0.25 ? "25" : "50";
      entry["exhaustive_" + key + "_subsets"] = subsets;
      entry["exhaustive_" + key + "_recompute_seconds"] = subsets * recomputeSeconds;
      entry["exhaustive_" + key + "_products_seconds_one_thread"] = buildSeconds + subsets * productSeconds;
    }
    layers.push_back(entry);
  }
  nlohmann::json result = {{"bench", "naee_search"}, {"model", dir}, {"threads", threadCount()}, {"layers", layers}};
  std::cout << result.dump() << "\n";
  return 0;
}
