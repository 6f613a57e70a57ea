//===- ExpertPassesTest.cpp - Expert passes where the answer is known -----===//
//
// Part of moec. Each test builds a model whose right answer is known
// (identical or permuted experts, dead neurons, an expert nobody routes
// to), runs a pass, and runs the resulting module directly in the engine
// through the backend's lowering.
//
//===----------------------------------------------------------------------===//

#include "moe/Calibration/Statistics.h"
#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Exporter/Exporter.h"
#include "moe/Importer/Importer.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/Model.h"
#include "moe/Transforms/Passes.h"
#include "moe/Transforms/QuantizeWork.h"

#include "../../passes/lib/Assignment.h"
#include "../../passes/lib/BitAllocation.h"
#include "../../passes/lib/Clustering.h"
#include "../../passes/lib/Gptq.h"
#include "../../passes/lib/SuperExperts.h"
#include "../unit/GradientCheck.h"
#include "../unit/TestSupport.h"
#include "common/QuantFormat.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/Pass/PassManager.h"
#include "mlir/Pass/PassRegistry.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <numeric>
#include <random>
#include <set>

using namespace moe;
using namespace moe::testing;

namespace {

/// A module imported from a checkpoint directory, with passes run on it.
struct Compiled {
  mlir::MLIRContext context;
  mlir::OwningOpRef<mlir::ModuleOp> module;
  ir::ModelOp model() { return *module->getOps<ir::ModelOp>().begin(); }
};

std::unique_ptr<Compiled> importDirectory(const std::string &directory, const std::string &store) {
  registerMoePasses();
  auto compiled = std::make_unique<Compiled>();
  std::string configText = readFile(directory + "/config.json");
  auto spec = ModelSpec::fromConfigText(configText, "config.json");
  EXPECT_TRUE(spec.ok());
  auto checkpoint = Checkpoint::open(directory);
  EXPECT_TRUE(checkpoint.ok());
  EXPECT_TRUE(bindCheckpoint(*spec, **checkpoint).ok());
  auto module = importModel(compiled->context, *spec, **checkpoint, configText, store);
  EXPECT_TRUE(module.ok()) << module.status().message();
  compiled->module = module.take();
  return compiled;
}

bool runPipeline(Compiled &compiled, const std::string &pipeline) {
  mlir::PassManager manager(&compiled.context);
  if (mlir::failed(mlir::parsePassPipeline(pipeline, manager.nest<moe::ir::ModelOp>())))
    return false;
  return mlir::succeeded(manager.run(*compiled.module));
}

/// The module's model in the engine.
LoadedModel run(Compiled &compiled) {
  auto description = lowerToDescription(compiled.model(), "");
  EXPECT_TRUE(description.ok()) << description.status().message();
  auto model = loadDescribedModel(description.take());
  EXPECT_TRUE(model.ok()) << model.status().message();
  return model.take();
}

const std::vector<int32_t> kIds = {3, 17, 99, 4, 42, 8, 127, 0, 55, 1000, 2047, 12, 7, 300, 64, 9};

std::vector<float> logits(LoadedModel &model) {
  std::vector<float> out;
  KvCache cache = model.engine->newCache();
  EXPECT_TRUE(model.engine->forward(kIds, cache, out).ok());
  return out;
}

float maxDifference(const std::vector<float> &a, const std::vector<float> &b) {
  EXPECT_EQ(a.size(), b.size());
  float worst = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    worst = std::max(worst, std::fabs(a[i] - b[i]));
  return worst;
}

/// Copies fixture `name` to `directory`, letting `edit` change each
/// tensor's bf16 values (as f32) before they are written.
using TensorEdit =
    std::function<void(const std::string &name, const std::vector<int64_t> &shape, std::vector<float> &values,
                       const std::map<std::string, std::vector<float>> &all)>;
void writeEditedFixture(const std::string &name, const std::string &directory, const TensorEdit &edit) {
  const std::string source = dataDir() + "/fixtures/" + name;
  std::filesystem::create_directories(directory);
  for (const char *file : {"config.json", "tokenizer.json", "tokenizer_config.json"})
    std::filesystem::copy_file(source + "/" + file, directory + "/" + file);
  auto file = SafetensorsFile::open(source + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  std::map<std::string, std::vector<float>> all;
  for (const TensorInfo &tensor : (*file)->tensors()) {
    std::vector<float> &values = all[tensor.name];
    values.resize(static_cast<size_t>(tensor.numElements()));
    ASSERT_TRUE(convertToF32(tensor.dtype, (*file)->data(tensor).data(), values.size(), values.data()).ok());
  }
  SafetensorsWriter writer;
  for (const TensorInfo &tensor : (*file)->tensors()) {
    std::vector<float> values = all[tensor.name];
    edit(tensor.name, tensor.shape, values, all);
    ASSERT_TRUE(writer.addF32Tensor(tensor.name, DType::BF16, tensor.shape, values).ok());
  }
  ASSERT_TRUE(writer.write(directory + "/model.safetensors").ok());
}

/// The values of expert 0's tensor matching expert tensor `name`, whose
/// ".experts.N." part (one digit) starts at `at`.
const std::vector<float> &expertZeroOf(const std::string &name, size_t at,
                                       const std::map<std::string, std::vector<float>> &all) {
  std::string sibling = name;
  sibling.replace(at, 11, ".experts.0.");
  return all.at(sibling);
}

/// Hand-made statistics for every MoE layer of an 8-expert model.
void writeLayerStats(const std::string &path, int64_t layers, const std::vector<int64_t> &routed,
                     const std::vector<double> &gram) {
  SafetensorsWriter writer;
  auto f64 = [](const std::vector<double> &values) {
    std::vector<uint8_t> bytes(values.size() * 8);
    std::memcpy(bytes.data(), values.data(), bytes.size());
    return bytes;
  };
  std::vector<uint8_t> counts(routed.size() * 8);
  std::memcpy(counts.data(), routed.data(), counts.size());
  const int64_t E = static_cast<int64_t>(routed.size());
  std::vector<double> weights(routed.begin(), routed.end());
  for (int64_t l = 0; l < layers; ++l) {
    const std::string prefix = concat("layers.", l, ".");
    ASSERT_TRUE(writer.addTensor(prefix + "routed_tokens", DType::I64, {E}, counts).ok());
    ASSERT_TRUE(writer.addTensor(prefix + "gate_weight_sum", DType::F64, {E}, f64(weights)).ok());
    ASSERT_TRUE(writer.addTensor(prefix + "max_abs_output", DType::F64, {E}, f64(std::vector<double>(E, 1.0))).ok());
    ASSERT_TRUE(writer.addTensor(prefix + "router_logit_gram", DType::F64, {E, E}, f64(gram)).ok());
  }
  ASSERT_TRUE(writer.write(path).ok());
}

/// Counts, per layer, the tokens each expert slot runs on.
class SlotTokens : public EngineObserver {
public:
  void onExpert(int64_t layer, int64_t expert, std::span<const int32_t> tokens, std::span<const float>,
                std::span<const float>, std::span<const float>) override {
    counts[{layer, expert}] += static_cast<int64_t>(tokens.size());
  }
  void onRouter(int64_t layer, int64_t tokens, std::span<const float>, std::span<const int32_t> chosen,
                std::span<const float>, std::span<const int32_t>) override {
    const int64_t K = static_cast<int64_t>(chosen.size()) / tokens;
    for (int64_t t = 0; t < tokens; ++t) {
      bool first = false;
      for (int64_t k = 0; k < K; ++k)
        first |= chosen[t * K + k] == 0 || chosen[t * K + k] == 1;
      rowsZeroOrOne[layer] += first ? 1 : 0;
    }
  }
  std::map<std::pair<int64_t, int64_t>, int64_t> counts;
  std::map<int64_t, int64_t> rowsZeroOrOne;
};

/// X^T X of `samples` rows of `cols` inputs (row-major): GPTQ's Hessian.
std::vector<double> gramOf(const std::vector<double> &inputs, int64_t samples, int64_t cols) {
  std::vector<double> gram(static_cast<size_t>(cols * cols), 0.0);
  for (int64_t s = 0; s < samples; ++s)
    for (int64_t a = 0; a < cols; ++a)
      for (int64_t b = 0; b < cols; ++b)
        gram[a * cols + b] += inputs[s * cols + a] * inputs[s * cols + b];
  return gram;
}

/// The layer output error of `decoded` against `weights` ([rows, cols])
/// on `samples` inputs: the sum over inputs x and rows of ((W - Q) x)^2.
double layerOutputError(const std::vector<float> &weights, const std::vector<float> &decoded,
                        const std::vector<double> &inputs, int64_t samples, int64_t rows, int64_t cols) {
  double error = 0;
  for (int64_t s = 0; s < samples; ++s)
    for (int64_t r = 0; r < rows; ++r) {
      double difference = 0;
      for (int64_t c = 0; c < cols; ++c)
        difference += (static_cast<double>(weights[r * cols + c]) - decoded[r * cols + c]) * inputs[s * cols + c];
      error += difference * difference;
    }
  return error;
}

} // namespace

TEST(ModuleExecution, APrunedModuleRunsExactlyAsItsExport) {
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-deepseek";
  auto compiled = importDirectory(fixture, dir.file("m.moestore"));
  ASSERT_TRUE(runPipeline(*compiled, "moe-drop-experts{experts=1:1,5;2:0,7;3:2,3}"));
  ASSERT_TRUE(exportHuggingFace(compiled->model(), dir.file("out")).ok());
  LoadedModel fromModule = run(*compiled);
  auto exported = loadModel(dir.file("out"));
  ASSERT_TRUE(exported.ok());
  EXPECT_EQ(logits(fromModule), logits(*exported));
}

TEST(QuantizeShares, EachLayerMatrixOutsideTheExpertsFallsToExactlyOneShare) {
  // A distributed moec compress gives each process one share of the
  // attention and shared-expert matrices; together the shares must be what
  // one process quantises, each matrix once, and a Hessian's readers (MLA's
  // q_proj and kv_a_proj) in one share so that one factorisation serves them.
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-deepseek";
  auto quantised = [&](const std::string &options, const std::string &store, const std::string &before = "") {
    auto compiled = importDirectory(fixture, dir.file(store));
    if (!before.empty())
      EXPECT_TRUE(runPipeline(*compiled, "moe-quantize{targets=attention,shared " + before + "}"));
    EXPECT_TRUE(runPipeline(*compiled, "moe-quantize{targets=attention,shared " + options + "}"));
    std::set<std::string> names;
    compiled->model().walk([&](ir::TensorOp tensor) {
      if (tensor.getQuantAttr())
        names.insert(tensor.getSymName().str());
    });
    return names;
  };
  const std::set<std::string> all = quantised("", "all.moestore");
  ASSERT_GT(all.size(), 10u);
  std::map<std::string, int> shareOf;
  for (int share = 0; share < 3; ++share) {
    const std::set<std::string> mine =
        quantised("shares=3 share=" + std::to_string(share), "s" + std::to_string(share) + ".moestore");
    EXPECT_FALSE(mine.empty()) << "share " << share;
    for (const std::string &name : mine) {
      EXPECT_TRUE(all.count(name)) << name;
      EXPECT_TRUE(shareOf.emplace(name, share).second) << name << " is in two shares";
    }
  }
  EXPECT_EQ(shareOf.size(), all.size());
  // A process that took its own share first (the receiver of a swap) still
  // computes the same split for another's: share 2 after share 0 is shares
  // 0 and 2.
  const std::set<std::string> both = quantised("shares=3 share=2", "s02.moestore", "shares=3 share=0");
  std::set<std::string> expected;
  for (const auto &[name, share] : shareOf)
    if (share == 0 || share == 2)
      expected.insert(name);
  EXPECT_EQ(both, expected);
  for (const char *layer : {"1", "2", "3"}) {
    const std::string prefix = std::string("model.layers.") + layer + ".self_attn.";
    ASSERT_TRUE(shareOf.count(prefix + "q_proj.weight")) << prefix;
    EXPECT_EQ(shareOf[prefix + "q_proj.weight"], shareOf[prefix + "kv_a_proj_with_mqa.weight"]) << prefix;
  }
  auto compiled = importDirectory(fixture, dir.file("bad.moestore"));
  EXPECT_FALSE(runPipeline(*compiled, "moe-quantize{shares=2 share=2}"));
}

TEST(QuantizeWork, TheEstimateFollowsTheShapesAndThePassesSplit) {
  // What a distributed compress balances its ranks by: each routed
  // expert's GPTQ cost from its shapes (one factor for gate and up, one for
  // down), and the GPTQ matrices outside the experts in the share that
  // moe-quantize{shares} gives them.
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-deepseek";
  auto compiled = importDirectory(fixture, dir.file("m.moestore"));
  const std::vector<QuantizeTarget> targets = {QuantizeTarget::Experts, QuantizeTarget::Attention,
                                               QuantizeTarget::Shared};
  const QuantizeWork work = estimateQuantizeWork(compiled->model(), targets, true, 2, 3);
  double hidden = 0, width = 0;
  compiled->model().walk([&](ir::ExpertOp expert) {
    if (expert->getParentOfType<ir::LayerOp>().getIndex() != 2 || expert.getId() != 0)
      return;
    auto gate =
        mlir::cast<ir::TensorOp>(mlir::SymbolTable::lookupSymbolIn(compiled->model(), expert.getGateAttr().getAttr()));
    width = static_cast<double>(gate.getTensorType().getShape()[0]);
    hidden = static_cast<double>(gate.getTensorType().getShape()[1]);
  });
  ASSERT_GT(hidden, 0);
  const double expert =
      hidden * hidden * hidden + 2 * width * hidden * hidden + width * width * width + hidden * width * width;
  ASSERT_EQ(work.expertCost.size(), 8u);
  for (double cost : work.expertCost)
    EXPECT_DOUBLE_EQ(cost, expert);
  EXPECT_DOUBLE_EQ(work.expertLongest, hidden * hidden * hidden + width * hidden * hidden);
  ASSERT_EQ(work.shareCost.size(), 3u);
  // MLA's q_proj, kv_a_proj and o_proj, the shared expert's three (kv_b
  // has no Hessian: RTN).
  ASSERT_EQ(work.gptqOutsideExperts.size(), 6u);
  // The split the estimate reports is the pass's: with RTN each matrix
  // costs rows x columns, and each share's quantised matrices add up to it.
  const QuantizeWork rtn = estimateQuantizeWork(compiled->model(), targets, false, 2, 3);
  EXPECT_TRUE(rtn.gptqOutsideExperts.empty());
  for (int64_t share = 0; share < 3; ++share) {
    auto part = importDirectory(fixture, dir.file("s" + std::to_string(share) + ".moestore"));
    ASSERT_TRUE(runPipeline(
        *part, "moe-quantize{targets=attention,shared layers=2 shares=3 share=" + std::to_string(share) + "}"));
    double cost = 0;
    part->model().walk([&](ir::TensorOp tensor) {
      if (tensor.getQuantAttr())
        cost += static_cast<double>(tensor.getTensorType().getNumElements());
    });
    EXPECT_GT(cost, 0) << "share " << share;
    EXPECT_DOUBLE_EQ(cost, rtn.shareCost[static_cast<size_t>(share)]) << "share " << share;
  }
}

namespace {

/// Each rank's work under a split: its share and its experts' costs.
std::vector<double> rankWorks(const QuantizeWork &work, const std::vector<int64_t> &bounds) {
  std::vector<double> works;
  for (size_t r = 0; r + 1 < bounds.size(); ++r) {
    double sum = work.shareCost[r];
    for (int64_t e = bounds[r]; e < bounds[r + 1]; ++e)
      sum += work.expertCost[static_cast<size_t>(e)];
    works.push_back(sum);
  }
  return works;
}

double largestWork(const QuantizeWork &work, const std::vector<int64_t> &bounds) {
  const std::vector<double> works = rankWorks(work, bounds);
  return *std::max_element(works.begin(), works.end());
}

} // namespace

TEST(SplitExpertsOverRanks, TheRankWithALongMatrixTakesFewerExperts) {
  // DeepSeek-V3's proportions: 256 experts of one unit each, and o_proj, a
  // single matrix of about ten units by the estimate, in rank 0's share.
  QuantizeWork work;
  work.expertCost.assign(256, 1.0);
  work.shareCost.assign(8, 0.3);
  work.shareCost[0] = 10.2;
  auto largest = [&](const std::vector<int64_t> &bounds) { return largestWork(work, bounds); };
  const std::vector<int64_t> bounds = splitExpertsOverRanks(work, 8);
  ASSERT_EQ(bounds.size(), 9u);
  EXPECT_EQ(bounds.front(), 0);
  EXPECT_EQ(bounds.back(), 256);
  for (size_t r = 0; r < 8; ++r)
    EXPECT_GE(bounds[r + 1] - bounds[r], 1) << "rank " << r;
  EXPECT_EQ(bounds[1] - bounds[0], 24); // 10.2 + 24 beside 0.3 + 33 or 34
  const std::vector<int64_t> even = {0, 32, 64, 96, 128, 160, 192, 224, 256};
  EXPECT_LT(largest(bounds), largest(even));
  EXPECT_LE(largest(bounds), 34.3 + 1e-9);

  // Equal shares: an even split. One rank: everything. Too few experts:
  // none.
  work.shareCost.assign(8, 0.3);
  EXPECT_EQ(splitExpertsOverRanks(work, 8), even);
  EXPECT_EQ(splitExpertsOverRanks(work, 1), (std::vector<int64_t>{0, 256}));
  work.expertCost.assign(7, 1.0);
  EXPECT_TRUE(splitExpertsOverRanks(work, 8).empty());
  // A share larger than all the experts together: its rank keeps one.
  work.expertCost.assign(4, 1.0);
  work.shareCost = {100, 0};
  EXPECT_EQ(splitExpertsOverRanks(work, 2), (std::vector<int64_t>{0, 1, 4}));
}

TEST(SplitExpertsOverRanks, NoSplitHasASmallerLargestRank) {
  // Against every split of small random cases (uneven experts, as atom
  // pruning leaves them, and uneven shares): none puts less work on its
  // busiest rank, and of those that tie, none is more even.
  std::mt19937 random(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t ranks = 2 + trial % 3, slots = ranks + static_cast<int64_t>(random() % 6);
    QuantizeWork work;
    for (int64_t e = 0; e < slots; ++e)
      work.expertCost.push_back(static_cast<double>(1 + random() % 1000)); // whole numbers: sums are exact
    for (int64_t r = 0; r < ranks; ++r)
      work.shareCost.push_back(static_cast<double>(random() % 1500));
    auto largest = [&](const std::vector<int64_t> &bounds) { return largestWork(work, bounds); };
    auto squares = [&](const std::vector<int64_t> &bounds) {
      double sum = 0;
      for (double mine : rankWorks(work, bounds))
        sum += mine * mine;
      return sum;
    };
    // Every split: the least largest rank, and of those splits the least
    // sum of squares (the most even).
    std::vector<std::pair<double, double>> all;
    std::vector<int64_t> bounds(static_cast<size_t>(ranks + 1), 0);
    bounds.back() = slots;
    std::function<void(int64_t)> every = [&](int64_t r) { // bounds[r] for r = 1 .. ranks - 1
      if (r == ranks) {
        all.emplace_back(largest(bounds), squares(bounds));
        return;
      }
      for (int64_t b = bounds[static_cast<size_t>(r) - 1] + 1; b <= slots - (ranks - r); ++b) {
        bounds[static_cast<size_t>(r)] = b;
        every(r + 1);
      }
    };
    every(1);
    double best = HUGE_VAL, evenest = HUGE_VAL;
    for (const auto &[most, sum] : all)
      best = std::min(best, most);
    for (const auto &[most, sum] : all)
      if (most == best)
        evenest = std::min(evenest, sum);
    const std::vector<int64_t> split = splitExpertsOverRanks(work, ranks);
    ASSERT_EQ(split.size(), static_cast<size_t>(ranks + 1)) << "trial " << trial;
    for (int64_t r = 0; r < ranks; ++r)
      ASSERT_LT(split[static_cast<size_t>(r)], split[static_cast<size_t>(r) + 1]) << "trial " << trial;
    EXPECT_EQ(split.front(), 0);
    EXPECT_EQ(split.back(), slots);
    EXPECT_EQ(largest(split), best) << "trial " << trial;
    EXPECT_EQ(squares(split), evenest) << "trial " << trial;
  }
}

TEST(MergeExperts, APermutedCopyMergesIntoOneExpertWithUnchangedOutputs) {
  // Expert 1 of every layer is expert 0 with its neurons in reverse order:
  // the same function. Expert 1 is the least used and most similar to 0.
  TempDir dir;
  writeEditedFixture("tiny-mixtral", dir.file("model"),
                     [](const std::string &name, const std::vector<int64_t> &shape, std::vector<float> &values,
                        const std::map<std::string, std::vector<float>> &all) {
                       size_t at = name.find(".experts.1.");
                       if (at == std::string::npos)
                         return;
                       const std::vector<float> &copy = expertZeroOf(name, at, all);
                       const int64_t rows = shape[0], cols = shape[1];
                       const bool down = name.find(".w2.") != std::string::npos;
                       for (int64_t r = 0; r < rows; ++r)
                         for (int64_t c = 0; c < cols; ++c)
                           values[r * cols + c] =
                               down ? copy[r * cols + (cols - 1 - c)] : copy[(rows - 1 - r) * cols + c];
                     });
  std::vector<double> gram(64, 0.0);
  for (int e = 0; e < 8; ++e)
    gram[e * 8 + e] = 1.0;
  gram[0 * 8 + 1] = gram[1 * 8 + 0] = 0.9;
  writeLayerStats(dir.file("stats.safetensors"), 4, {100, 1, 50, 50, 50, 50, 50, 50}, gram);

  auto original = loadModel(dir.file("model"));
  ASSERT_TRUE(original.ok());
  const std::vector<float> expected = logits(*original);
  SlotTokens before;
  original->engine->setObserver(&before);
  logits(*original);

  auto aligned = importDirectory(dir.file("model"), dir.file("a.moestore"));
  ASSERT_TRUE(runPipeline(*aligned, "moe-merge-experts{stats=" + dir.file("stats.safetensors") +
                                        " method=msmoe groups=7 align=permutation}"));
  LoadedModel merged = run(*aligned);
  for (const auto &layer : merged.engine->spec().layers)
    EXPECT_EQ(layer.numExperts, 7);
  EXPECT_LT(maxDifference(logits(merged), expected), 1e-4f);
  // The merged expert serves both router rows: it runs on every token that
  // chose expert 0 or 1, once.
  SlotTokens after;
  merged.engine->setObserver(&after);
  logits(merged);
  for (int64_t l = 0; l < 4; ++l)
    EXPECT_EQ(after.counts[std::make_pair(l, int64_t(0))], before.rowsZeroOrOne[l]) << "layer " << l;

  // Without alignment the average of a function and its permuted copy is
  // a different function.
  auto unaligned = importDirectory(dir.file("model"), dir.file("b.moestore"));
  ASSERT_TRUE(
      runPipeline(*unaligned, "moe-merge-experts{stats=" + dir.file("stats.safetensors") + " method=msmoe groups=7}"));
  LoadedModel averaged = run(*unaligned);
  EXPECT_GT(maxDifference(logits(averaged), expected), 1e-2f);
}

TEST(MixExperts, EveryTermReadsTheExpertsAsTheyWereBeforeThePass) {
  // Expert 1 of every layer is expert 0 doubled (its gate, up and down):
  // half of it is expert 0 again, and so is a quarter of it plus half of
  // expert 0, provided expert 1 is read before it is replaced.
  auto doubled = [](const std::string &name, const std::vector<int64_t> &, std::vector<float> &values,
                    const std::map<std::string, std::vector<float>> &all) {
    size_t at = name.find(".experts.1.");
    if (at == std::string::npos)
      return;
    values = expertZeroOf(name, at, all);
    for (float &v : values)
      v *= 2;
  };
  // The answer: experts 1 and 2 are copies of expert 0.
  auto copies = [](const std::string &name, const std::vector<int64_t> &, std::vector<float> &values,
                   const std::map<std::string, std::vector<float>> &all) {
    for (const char *copy : {".experts.1.", ".experts.2."}) {
      size_t at = name.find(copy);
      if (at != std::string::npos)
        values = expertZeroOf(name, at, all);
    }
  };
  TempDir dir;
  writeEditedFixture("tiny-mixtral", dir.file("doubled"), doubled);
  writeEditedFixture("tiny-mixtral", dir.file("copies"), copies);
  auto expected = loadModel(dir.file("copies"));
  ASSERT_TRUE(expected.ok());
  auto compiled = importDirectory(dir.file("doubled"), dir.file("m.moestore"));
  ASSERT_TRUE(runPipeline(*compiled, "moe-mix-experts{mix=0:1=0.5*1,2=0.25*1|0.5*0;1:1=0.5*1,2=0.25*1|0.5*0;"
                                     "2:1=0.5*1,2=0.25*1|0.5*0;3:1=0.5*1,2=0.25*1|0.5*0}"));
  LoadedModel mixed = run(*compiled);
  EXPECT_EQ(logits(mixed), logits(*expected));

  // Bad mixes fail naming what is wrong.
  for (const char *bad : {"moe-mix-experts{mix=0:9=1*0}", "moe-mix-experts{mix=0:1=1*9}",
                          "moe-mix-experts{mix=7:1=1*0}", "moe-mix-experts{mix=0:1=x*0}"}) {
    auto again = importDirectory(dir.file("doubled"), dir.file("b.moestore"));
    EXPECT_FALSE(runPipeline(*again, bad)) << bad;
  }
}

/// Every expert's matrices whole (base + a b), in f32, from a factored
/// engine's layer: what the factored experts stand for.
std::map<int64_t, std::map<int64_t, std::shared_ptr<const MlpWeights>>> denseOfFactored(Engine &engine,
                                                                                        const ModelSpec &spec) {
  std::map<int64_t, std::map<int64_t, std::shared_ptr<const MlpWeights>>> out;
  auto values = [](const Matrix &m) {
    std::vector<float> v(static_cast<size_t>(m.rows * m.cols));
    for (int64_t r = 0; r < m.rows; ++r)
      m.copyRow(r, v.data() + r * m.cols);
    return v;
  };
  for (int64_t l = 0; l < spec.numLayers; ++l) {
    if (spec.layers[static_cast<size_t>(l)].mlp != MlpKind::Moe)
      continue;
    auto layer = engine.layerWeights(l);
    EXPECT_TRUE(layer.ok());
    const LayerWeights &w = **layer;
    EXPECT_FALSE(w.expertBase.gate.empty()) << "layer " << l << " is factored";
    for (size_t e = 0; e < w.experts.size(); ++e) {
      auto dense = std::make_shared<MlpWeights>();
      const Matrix *bases[3] = {&w.expertBase.gate, &w.expertBase.up, &w.expertBase.down};
      Matrix *targets[3] = {&dense->gate, &dense->up, &dense->down};
      for (int m = 0; m < 3; ++m) {
        const Matrix &a = w.experts[e].lowRank[2 * m], &b = w.experts[e].lowRank[2 * m + 1];
        std::vector<float> sum = values(*bases[m]), av = values(a), bv = values(b);
        for (int64_t i = 0; i < a.rows; ++i)
          for (int64_t j = 0; j < b.cols; ++j) {
            double dot = 0;
            for (int64_t k = 0; k < a.cols; ++k)
              dot += static_cast<double>(av[i * a.cols + k]) * bv[k * b.cols + j];
            sum[i * b.cols + j] += static_cast<float>(dot);
          }
        targets[m]->rows = a.rows;
        targets[m]->cols = b.cols;
        targets[m]->data = std::move(sum);
      }
      out[l][static_cast<int64_t>(e)] = dense;
    }
  }
  return out;
}

TEST(FactorExperts, ExpertsThatDifferByLowRankTermsComeBackWhole) {
  // Every expert is expert 0 plus one rank-1 term per matrix, so each one's
  // difference from any weighted mean of them has rank at most 7: eight
  // ranks per matrix restore the experts up to bf16 rounding of the factors.
  float amplitude = 0.05f;
  auto perturbed = [&](const std::string &name, const std::vector<int64_t> &shape, std::vector<float> &values,
                       const std::map<std::string, std::vector<float>> &all) {
    size_t at = name.find(".experts.");
    if (at == std::string::npos)
      return;
    const int e = name[at + 9] - '0';
    values = expertZeroOf(name, at, all);
    if (e == 0)
      return;
    for (int64_t r = 0; r < shape[0]; ++r)
      for (int64_t c = 0; c < shape[1]; ++c)
        values[r * shape[1] + c] += amplitude * std::sin(0.37f * static_cast<float>(r * e + 1)) *
                                    std::cos(0.11f * static_cast<float>(c + 3 * e));
  };
  TempDir dir;
  writeEditedFixture("tiny-mixtral", dir.file("model"), perturbed);
  auto original = loadModel(dir.file("model"));
  ASSERT_TRUE(original.ok());
  const std::vector<float> expected = logits(*original);
  writeLayerStats(dir.file("stats.safetensors"), 4, {90, 10, 40, 60, 20, 30, 70, 80}, std::vector<double>(64, 0.0));
  auto factorAt = [&](const std::string &directory, const std::string &options) {
    auto compiled = importDirectory(directory, dir.file("f.moestore"));
    EXPECT_TRUE(
        runPipeline(*compiled, "moe-factor-experts{stats=" + dir.file("stats.safetensors") + " " + options + "}"));
    return compiled;
  };
  auto compiled = factorAt(dir.file("model"), "ratio=0.25 rank-multiple=8");
  int64_t bases = 0;
  for (ir::LayerOp layer : compiled->model().getBody().getOps<ir::LayerOp>())
    for (ir::MoeBlockOp block : layer.getBody().getOps<ir::MoeBlockOp>()) {
      bases += std::distance(block.getBody().getOps<ir::ExpertBaseOp>().begin(),
                             block.getBody().getOps<ir::ExpertBaseOp>().end());
      for (ir::ExpertOp expert : block.getBody().getOps<ir::ExpertOp>())
        EXPECT_TRUE(expert.getLowRank().has_value());
    }
  EXPECT_EQ(bases, 4);
  LoadedModel factored = run(*compiled);
  // What is left is the bf16 rounding of the base (a weighted mean of the
  // experts, stored in their dtype), the same whatever the terms' size.
  const float restored = maxDifference(logits(factored), expected);
  EXPECT_LT(restored, 0.05f);
  // One rank each cannot hold the seven terms: the same pass visibly fails.
  auto starved = factorAt(dir.file("model"), "ratio=0.14 rank-multiple=1");
  LoadedModel truncated = run(*starved);
  EXPECT_GT(maxDifference(logits(truncated), expected), 5 * restored);

  // Identical experts: the base is each of them exactly, every delta zero,
  // and the factored engine computes the same function (float order aside).
  amplitude = 0;
  writeEditedFixture("tiny-mixtral", dir.file("same"), perturbed);
  auto same = loadModel(dir.file("same"));
  ASSERT_TRUE(same.ok());
  auto sameFactored = factorAt(dir.file("same"), "ratio=0.25 rank-multiple=8");
  LoadedModel sameRun = run(*sameFactored);
  EXPECT_LT(maxDifference(logits(sameRun), logits(*same)), 1e-4f);
}

TEST(FactorExperts, TheEngineRunsTheFactoredFormAsTheDenseExpertsItStandsFor) {
  // tiny-deepseek (a dense first layer, shared experts), calibrated with
  // moments for the whitened SVD; half of the experts' parameters kept.
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-deepseek";
  auto model = loadModel(fixture);
  ASSERT_TRUE(model.ok());
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  CalibrationOptions options;
  options.maxTokens = 2048;
  options.inputMoments = true;
  auto stats = calibrate(*model->engine, *streams, options);
  ASSERT_TRUE(stats.ok());
  ASSERT_TRUE(writeStatistics(*stats, options, dir.file("stats.safetensors")).ok());
  auto compiled = importDirectory(fixture, dir.file("m.moestore"));
  ASSERT_TRUE(runPipeline(*compiled, "moe-factor-experts{stats=" + dir.file("stats.safetensors") + " ratio=0.5}"));
  LoadedModel factored = run(*compiled);
  const std::vector<float> fast = logits(factored);

  // The dense experts it stands for, run in place of the original experts.
  ASSERT_TRUE(model->engine->setReplacedExperts(denseOfFactored(*factored.engine, factored.spec)).ok());
  const std::vector<float> dense = logits(*model);
  EXPECT_LT(maxDifference(fast, dense), 1e-3f);
  EXPECT_GT(maxDifference(fast, logits(*loadModel(fixture))), 1e-2f) << "factoring changed the model";

  // Token by token (decode: one token a block) as the whole window.
  {
    KvCache cache = factored.engine->newCache();
    std::vector<float> step;
    for (int32_t id : kIds)
      ASSERT_TRUE(factored.engine->forward(std::span<const int32_t>(&id, 1), cache, step).ok());
    const size_t V = step.size();
    EXPECT_LT(maxDifference(step, std::vector<float>(fast.end() - static_cast<std::ptrdiff_t>(V), fast.end())), 1e-3f);
  }
  // Offloaded experts (an expert cache of two experts' size): bit for bit.
  EngineOptions cacheOptions;
  cacheOptions.expertCacheBytes = 20000;
  auto offloaded = loadDescribedModel(lowerToDescription(compiled->model(), "").take(), cacheOptions);
  ASSERT_TRUE(offloaded.ok()) << offloaded.status().message();
  EXPECT_EQ(logits(*offloaded), fast);
  EXPECT_GT(offloaded->engine->expertCache()->counters().misses, 0);
  // Calibration (observers: each expert run whole) works on it.
  CalibrationOptions again;
  again.maxTokens = 256;
  auto restats = calibrate(*factored.engine, *streams, again);
  ASSERT_TRUE(restats.ok()) << restats.status().message();
  // What cannot see factored experts says so.
  EXPECT_FALSE(factored.engine->setReplacedExperts(denseOfFactored(*factored.engine, factored.spec)).ok());
  EXPECT_FALSE(runPipeline(*compiled, "moe-prune-atoms{method=magnitude ratio=0.25}"));
  EXPECT_FALSE(runPipeline(*compiled, "moe-factor-experts{stats=" + dir.file("stats.safetensors") + " ratio=0.5}"));
  // Quantised afterwards, base and factors alike.
  ASSERT_TRUE(runPipeline(*compiled, "moe-quantize{bits=8 group=32}"));
  int64_t plain = 0;
  compiled->model().walk([&](ir::TensorOp tensor) {
    plain += tensor.getSymName().contains("lr_") && !tensor.getQuantAttr();
    plain += tensor.getSymName().contains("expert_base") && !tensor.getQuantAttr();
  });
  EXPECT_EQ(plain, 0);
  LoadedModel quantized = run(*compiled);
  EXPECT_LT(maxDifference(logits(quantized), fast), 0.1f);
}

TEST(FactorExperts, ImpossibleOptionsAreNamed) {
  TempDir dir;
  writeLayerStats(dir.file("stats.safetensors"), 4, {1, 1, 1, 1, 1, 1, 1, 1}, std::vector<double>(64, 0.0));
  const std::string fixture = dataDir() + "/fixtures/tiny-mixtral";
  for (const std::string bad :
       {"moe-factor-experts{ratio=0.5}", "moe-factor-experts{stats=S ratio=0}", "moe-factor-experts{stats=S ratio=1}",
        "moe-factor-experts{stats=S rank-multiple=0}", "moe-factor-experts{stats=S ratio=0.01}"}) {
    std::string pipeline = bad;
    if (size_t at = pipeline.find("=S"); at != std::string::npos)
      pipeline.replace(at + 1, 1, dir.file("stats.safetensors"));
    auto compiled = importDirectory(fixture, dir.file("m.moestore"));
    EXPECT_FALSE(runPipeline(*compiled, pipeline)) << bad;
  }
}

TEST(PruneAtoms, DeadNeuronsGoFirstAndOutputsStay) {
  // Neurons 0..39 of every expert have a zero down column: they never
  // contribute, so removing a quarter of the neurons removes exactly them.
  TempDir dir;
  writeEditedFixture("tiny-mixtral", dir.file("model"),
                     [](const std::string &name, const std::vector<int64_t> &shape, std::vector<float> &values,
                        const std::map<std::string, std::vector<float>> &) {
                       if (name.find(".experts.") == std::string::npos || name.find(".w2.") == std::string::npos)
                         return;
                       for (int64_t r = 0; r < shape[0]; ++r)
                         for (int64_t c = 0; c < 40; ++c)
                           values[r * shape[1] + c] = 0.0f;
                     });
  auto original = loadModel(dir.file("model"));
  ASSERT_TRUE(original.ok());
  auto compiled = importDirectory(dir.file("model"), dir.file("m.moestore"));
  ASSERT_TRUE(runPipeline(*compiled, "moe-prune-atoms{method=magnitude ratio=0.25}"));
  for (ir::LayerOp layer : compiled->model().getBody().getOps<ir::LayerOp>())
    for (ir::MoeBlockOp block : layer.getBody().getOps<ir::MoeBlockOp>())
      for (ir::ExpertOp expert : block.getBody().getOps<ir::ExpertOp>())
        EXPECT_EQ(expert.getWidth(), 120u);
  LoadedModel pruned = run(*compiled);
  EXPECT_LT(maxDifference(logits(pruned), logits(*original)), 1e-4f);
}

TEST(PruneAtoms, GlobalScopeGivesExpertsDifferentWidthsThatTheEngineRuns) {
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-deepseek";
  auto model = loadModel(fixture);
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  CalibrationOptions options;
  options.maxTokens = 2048;
  options.gradients = true;
  auto stats = calibrate(*model->engine, *streams, options);
  ASSERT_TRUE(stats.ok());
  ASSERT_TRUE(writeStatistics(*stats, options, dir.file("stats.safetensors")).ok());
  auto compiled = importDirectory(fixture, dir.file("m.moestore"));
  ASSERT_TRUE(runPipeline(*compiled, "moe-prune-atoms{stats=" + dir.file("stats.safetensors") +
                                         " method=heapr ratio=0.5 scope=global}"));
  std::set<uint64_t> widths;
  int64_t total = 0;
  for (ir::LayerOp layer : compiled->model().getBody().getOps<ir::LayerOp>())
    for (ir::MoeBlockOp block : layer.getBody().getOps<ir::MoeBlockOp>())
      for (ir::ExpertOp expert : block.getBody().getOps<ir::ExpertOp>()) {
        widths.insert(expert.getWidth());
        total += static_cast<int64_t>(expert.getWidth());
      }
  EXPECT_GT(widths.size(), 4u) << "experts keep different widths";
  EXPECT_EQ(total, (3 * 8 * 96) / 2) << "half of 3 layers x 8 experts x 96 neurons remain";
  LoadedModel pruned = run(*compiled);
  auto heldout = readEvalData(dataDir() + "/brown/heldout.jsonl", pruned.tokenizer.get(), pruned.endOfText);
  auto result = evaluate(*pruned.engine, *heldout, EvalOptions{256, 0, 1024});
  ASSERT_TRUE(result.ok());
  EXPECT_LT(result->overall.perplexity(), 200.0) << "a real model, not noise";
}

TEST(DynamicSkip, AThresholdOfOneRunsTheTopExpertOnly) {
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-mixtral";
  auto skipping = importDirectory(fixture, dir.file("a.moestore"));
  mlir::Builder builder(&skipping->context);
  skipping->module->walk([&](ir::RouterOp router) { router.setSkipThresholdAttr(builder.getF64FloatAttr(1.0)); });
  auto topOne = importDirectory(fixture, dir.file("b.moestore"));
  ASSERT_TRUE(runPipeline(*topOne, "moe-set-topk{top-k=1}"));
  LoadedModel a = run(*skipping), b = run(*topOne);
  // Mixtral renormalises: a lone expert gets weight 1 either way, up to
  // the last bit (skipping rescales w1 by (w1 + w2) / w1), which four
  // layers' float products carry to about 1e-5 in the logits; a wrong
  // expert or weight moves them by tenths.
  EXPECT_LT(maxDifference(logits(a), logits(b)), 3e-5f);
  EXPECT_DOUBLE_EQ(a.engine->routingCounters().expertsPerToken(), 1.0);
}

TEST(PruneExperts, ReconstructionDropsTheExpertNobodyUses) {
  // Calibrated with expert 6 of layer 2 masked: removing it reproduces the
  // cached block outputs exactly, so NAEE's search removes it.
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-deepseek";
  EngineOptions masked;
  masked.maskedExperts = {{2, {6}}};
  auto model = loadModel(fixture, masked);
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  CalibrationOptions options;
  options.maxTokens = 1024;
  options.blockSamples = 256;
  auto stats = calibrate(*model->engine, *streams, options);
  ASSERT_TRUE(stats.ok());
  ASSERT_TRUE(writeStatistics(*stats, options, dir.file("stats.safetensors")).ok());
  // Exhaustive, then greedy by the subset limit and by the cost estimate.
  for (std::string limit : {"max-subsets=20000", "max-subsets=2", "search-budget=0"}) {
    auto compiled = importDirectory(fixture, dir.file(limit + ".moestore"));
    ASSERT_TRUE(runPipeline(*compiled, "moe-prune-experts{stats=" + dir.file("stats.safetensors") +
                                           " method=reconstruction keep=7 " + limit + "}"));
    for (ir::LayerOp layer : compiled->model().getBody().getOps<ir::LayerOp>())
      if (layer.getIndex() == 2)
        for (ir::MoeBlockOp block : layer.getBody().getOps<ir::MoeBlockOp>())
          for (ir::ExpertOp expert : block.getBody().getOps<ir::ExpertOp>())
            EXPECT_EQ(expert.getGate().find("experts.6."), llvm::StringRef::npos) << limit;
  }
}

TEST(Assignment, SolvesKnownAndPermutedProblems) {
  // Classic 3x3: rows take columns 1, 0, 2 at cost 1 + 2 + 2 = 5.
  std::vector<double> cost = {4, 1, 3, 2, 0, 5, 3, 2, 2};
  EXPECT_EQ(solveAssignment(cost, 3), (std::vector<int64_t>{1, 0, 2}));
  // A random permutation is recovered from its negated similarity.
  std::mt19937 rng(7);
  const int64_t n = 40;
  std::vector<int64_t> permutation(n);
  std::iota(permutation.begin(), permutation.end(), 0);
  std::shuffle(permutation.begin(), permutation.end(), rng);
  std::normal_distribution<double> normal;
  std::vector<std::vector<double>> vectors(n, std::vector<double>(16));
  for (auto &v : vectors)
    for (double &x : v)
      x = normal(rng);
  std::vector<double> similarity(n * n);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b) {
      double dot = 0;
      for (int i = 0; i < 16; ++i)
        dot += vectors[a][i] * vectors[permutation[b]][i];
      similarity[a * n + b] = -dot;
    }
  std::vector<int64_t> assignment = solveAssignment(similarity, n);
  for (int64_t a = 0; a < n; ++a)
    EXPECT_EQ(permutation[assignment[a]], a);
}

TEST(Gptq, LowersTheLayerOutputErrorOfRtnOnTheSameWeightsAndHessian) {
  // Correlated inputs (the case GPTQ's error feedback exploits) and weights
  // with an odd number of columns for the groups.
  std::mt19937 rng(3);
  std::normal_distribution<double> normal;
  const int64_t rows = 48, cols = 200, samples = 2048;
  std::vector<double> mixing(static_cast<size_t>(cols * cols));
  for (double &v : mixing)
    v = normal(rng) * 0.2;
  for (int64_t i = 0; i < cols; ++i)
    mixing[i * cols + i] += 1.0;
  std::vector<double> inputs(static_cast<size_t>(samples * cols));
  for (int64_t s = 0; s < samples; ++s) {
    std::vector<double> z(static_cast<size_t>(cols));
    for (double &v : z)
      v = normal(rng);
    for (int64_t c = 0; c < cols; ++c) {
      double sum = 0;
      for (int64_t k = 0; k < cols; ++k)
        sum += z[k] * mixing[k * cols + c];
      inputs[s * cols + c] = sum;
    }
  }
  const std::vector<double> hessian = gramOf(inputs, samples, cols);
  std::vector<float> weights(static_cast<size_t>(rows * cols));
  for (float &w : weights)
    w = static_cast<float>(normal(rng) * 0.05);

  auto outputError = [&](const quant::QuantFormat &format, const std::vector<uint8_t> &packed) {
    std::vector<float> dequantized(weights.size());
    quant::dequantizeReference(format, packed.data(), rows, cols, dequantized.data());
    return layerOutputError(weights, dequantized, inputs, samples, rows, cols);
  };
  for (int bits : {2, 3, 4})
    for (bool actOrder : {false, true})
      for (bool symmetric : {false, true}) {
        quant::QuantFormat format{bits, 64, symmetric};
        std::vector<uint8_t> rtn(format.matrixBytes(rows, cols)), gptq;
        quant::quantizeReference(format, weights.data(), rows, cols, rtn.data());
        Status status = quantizeGptq(format, weights, rows, cols, hessian, GptqOptions{0.01, 64, actOrder}, gptq);
        ASSERT_TRUE(status.ok()) << status.message();
        const double rtnError = outputError(format, rtn), gptqError = outputError(format, gptq);
        EXPECT_LT(gptqError, 0.9 * rtnError) << format.name() << " act-order " << actOrder;
      }
  // Groups smaller than the block: each choice of the weights that group
  // scales come from beats RTN, and they differ. With the group equal to
  // the block, the running weights at a group's first column are the
  // block's start, so those two agree byte for byte.
  for (int64_t group : {32, 64}) {
    quant::QuantFormat format{2, static_cast<int>(group), false};
    std::vector<uint8_t> rtn(format.matrixBytes(rows, cols));
    quant::quantizeReference(format, weights.data(), rows, cols, rtn.data());
    std::map<GptqGroupScales, std::vector<uint8_t>> packed;
    for (GptqGroupScales scales : {GptqGroupScales::Running, GptqGroupScales::Block, GptqGroupScales::Static}) {
      GptqOptions options{0.01, 128, false, scales};
      ASSERT_TRUE(quantizeGptq(format, weights, rows, cols, hessian, options, packed[scales]).ok());
      EXPECT_LT(outputError(format, packed[scales]), 0.9 * outputError(format, rtn))
          << "group " << group << " " << choiceName(scales).str();
    }
    EXPECT_NE(packed[GptqGroupScales::Running], packed[GptqGroupScales::Block]);
    EXPECT_NE(packed[GptqGroupScales::Block], packed[GptqGroupScales::Static]);
    std::vector<uint8_t> running, block;
    ASSERT_TRUE(quantizeGptq(format, weights, rows, cols, hessian,
                             GptqOptions{0.01, group, false, GptqGroupScales::Running}, running)
                    .ok());
    ASSERT_TRUE(quantizeGptq(format, weights, rows, cols, hessian,
                             GptqOptions{0.01, group, false, GptqGroupScales::Block}, block)
                    .ok());
    EXPECT_EQ(running, block) << "group " << group << " = block";
  }
  // A Hessian that does not fit the matrix is named.
  std::vector<uint8_t> packed;
  expectErrorContains(quantizeGptq(quant::QuantFormat{}, weights, rows, cols, std::vector<double>(10), {}, packed),
                      {"48x200 matrix needs a 200x200 Hessian"});
}

// An expert's gate and up read one input: one factorisation of its Hessian
// serves both and gives each the codes it gets with its own copy (what
// moe-quantize does), for moec's formats and ggml's, with and without
// act-order; a factor of another width is refused.
TEST(Gptq, ASharedHessianFactorGivesTheSameCodes) {
  std::mt19937 rng(8);
  std::normal_distribution<double> normal;
  const int64_t cols = 256, samples = 600;
  std::vector<double> hessian(static_cast<size_t>(cols * cols), 0.0);
  for (int64_t s = 0; s < samples; ++s) {
    std::vector<double> x(static_cast<size_t>(cols));
    for (int64_t c = 0; c < cols; ++c)
      x[c] = normal(rng) * (1.0 + static_cast<double>(c % 7)) + (c > 0 ? 0.5 * x[c - 1] : 0.0);
    for (int64_t a = 0; a < cols; ++a)
      for (int64_t b = 0; b < cols; ++b)
        hessian[a * cols + b] += x[a] * x[b];
  }
  for (bool actOrder : {false, true}) {
    const GptqOptions options{0.01, 64, actOrder};
    Expected<std::shared_ptr<const GptqFactor>> factor = factorGptqHessian(hessian, cols, options);
    ASSERT_TRUE(factor) << factor.status().message();
    for (int64_t rows : {24, 40}) { // gate and up of different widths (split parts)
      std::vector<float> weights(static_cast<size_t>(rows * cols));
      for (float &w : weights)
        w = static_cast<float>(normal(rng) * 0.05);
      const quant::QuantFormat format{3, 64, false};
      std::vector<uint8_t> alone, shared;
      ASSERT_TRUE(quantizeGptq(format, weights, rows, cols, hessian, options, alone).ok());
      ASSERT_TRUE(quantizeGptq(format, weights, rows, cols, **factor, options, shared).ok());
      EXPECT_EQ(alone, shared) << "rows " << rows << (actOrder ? " act-order" : "");
      std::vector<uint8_t> ggmlAlone, ggmlShared;
      ASSERT_TRUE(quantizeGptqGgml(quant::GgmlType::Q4_K, weights, rows, cols, hessian, options, ggmlAlone).ok());
      ASSERT_TRUE(quantizeGptqGgml(quant::GgmlType::Q4_K, weights, rows, cols, **factor, options, ggmlShared).ok());
      EXPECT_EQ(ggmlAlone, ggmlShared) << "rows " << rows << (actOrder ? " act-order" : "");
    }
  }
  Expected<std::shared_ptr<const GptqFactor>> factor = factorGptqHessian(hessian, cols, {});
  ASSERT_TRUE(factor);
  std::vector<uint8_t> packed;
  expectErrorContains(quantizeGptq(quant::QuantFormat{}, std::vector<float>(8 * 128), 8, 128, **factor, {}, packed),
                      {"Hessian"});
  expectErrorContains(factorGptqHessian(std::vector<double>(10), cols, {}).status(), {"Hessian"});
}

// GPTQ in float arithmetic (AutoGPTQ's) gives codes within rounding of
// double's. On a well-conditioned Hessian the two rarely differ by a single
// code, so this one is ill-conditioned: fewer inputs than columns (an
// expert that saw few tokens), input scales spread over two orders of
// magnitude, damping 0.05%. Some codes differ (0.4-1.2%: the float path
// ran), fewer than 2%, and the output error on the inputs is the same to
// 2%, for moec's formats and ggml's, with and without act-order.
TEST(Gptq, FloatArithmeticGivesCodesWithinRoundingOfDouble) {
  std::mt19937 rng(11);
  std::normal_distribution<double> normal;
  const int64_t rows = 128, cols = 512, samples = 192;
  std::vector<double> scale(static_cast<size_t>(cols)), inputs(static_cast<size_t>(samples * cols));
  for (double &s : scale)
    s = std::exp(1.2 * normal(rng));
  for (int64_t s = 0; s < samples; ++s) {
    double shared = normal(rng);
    for (int64_t c = 0; c < cols; ++c)
      inputs[s * cols + c] = (shared = 0.7 * shared + 0.7 * normal(rng)) * scale[c];
  }
  const std::vector<double> hessian = gramOf(inputs, samples, cols);
  std::vector<float> weights(static_cast<size_t>(rows * cols));
  for (float &w : weights)
    w = static_cast<float>(normal(rng) * 0.05);
  auto outputError = [&](const std::vector<float> &decoded) {
    return layerOutputError(weights, decoded, inputs, samples, rows, cols);
  };
  auto differing = [](const std::vector<uint8_t> &a, const std::vector<uint8_t> &b) {
    int64_t count = 0;
    for (size_t i = 0; i < a.size(); ++i)
      count += a[i] != b[i];
    return static_cast<double>(count) / static_cast<double>(a.size());
  };
  int64_t anyDifference = 0;
  for (bool actOrder : {false, true}) {
    GptqOptions f64{0.0005, 128, actOrder}, f32 = f64;
    f32.precision = GptqPrecision::F32;
    const quant::QuantFormat format{3, 64, false};
    std::vector<uint8_t> a, b;
    ASSERT_TRUE(quantizeGptq(format, weights, rows, cols, hessian, f64, a).ok());
    ASSERT_TRUE(quantizeGptq(format, weights, rows, cols, hessian, f32, b).ok());
    std::vector<float> da(weights.size()), db(weights.size());
    quant::dequantizeReference(format, a.data(), rows, cols, da.data());
    quant::dequantizeReference(format, b.data(), rows, cols, db.data());
    EXPECT_LT(differing(a, b), 0.02) << (actOrder ? "act-order" : "");
    EXPECT_NEAR(outputError(db) / outputError(da), 1.0, 0.02) << (actOrder ? "act-order" : "");
    anyDifference += a != b;

    std::vector<uint8_t> ga, gb;
    ASSERT_TRUE(quantizeGptqGgml(quant::GgmlType::Q4_K, weights, rows, cols, hessian, f64, ga).ok());
    ASSERT_TRUE(quantizeGptqGgml(quant::GgmlType::Q4_K, weights, rows, cols, hessian, f32, gb).ok());
    for (const std::vector<uint8_t> *packed : {&ga, &gb})
      for (int64_t r = 0; r < rows; ++r)
        quant::ggmlDequantizeRow(quant::GgmlType::Q4_K,
                                 packed->data() + r * quant::ggmlRowBytes(quant::GgmlType::Q4_K, cols), cols,
                                 (packed == &ga ? da : db).data() + r * cols);
    EXPECT_LT(differing(ga, gb), 0.02) << "Q4_K " << (actOrder ? "act-order" : "");
    EXPECT_NEAR(outputError(db) / outputError(da), 1.0, 0.02) << "Q4_K " << (actOrder ? "act-order" : "");
    anyDifference += ga != gb;
  }
  EXPECT_GT(anyDifference, 0) << "float arithmetic ran as double";

  // A Hessian positive definite only to double's precision (all ones but
  // 1e-9 off the diagonal, no damping): float's Cholesky fails, so that
  // factor is made in double, said by factoredInDoubleInstead; double's
  // own and a well-conditioned float one are not.
  const int64_t n = 64;
  std::vector<double> nearlySingular(static_cast<size_t>(n * n), 1.0 - 1e-9);
  for (int64_t i = 0; i < n; ++i)
    nearlySingular[i * n + i] = 1.0;
  GptqOptions undamped{0.0, 128, false};
  undamped.precision = GptqPrecision::F32;
  Expected<std::shared_ptr<const GptqFactor>> fallback = factorGptqHessian(nearlySingular, n, undamped);
  ASSERT_TRUE(fallback) << fallback.status().message();
  EXPECT_TRUE(factoredInDoubleInstead(**fallback));
  std::vector<float> few(static_cast<size_t>(8 * n), 0.01f);
  std::vector<uint8_t> packed;
  EXPECT_TRUE(quantizeGptq(quant::QuantFormat{4, 32, false}, few, 8, n, **fallback, undamped, packed).ok());
  undamped.precision = GptqPrecision::F64;
  Expected<std::shared_ptr<const GptqFactor>> inDouble = factorGptqHessian(nearlySingular, n, undamped);
  ASSERT_TRUE(inDouble) << inDouble.status().message();
  EXPECT_FALSE(factoredInDoubleInstead(**inDouble));
  GptqOptions f32;
  f32.precision = GptqPrecision::F32;
  Expected<std::shared_ptr<const GptqFactor>> wellConditioned = factorGptqHessian(hessian, cols, f32);
  ASSERT_TRUE(wellConditioned);
  EXPECT_FALSE(factoredInDoubleInstead(**wellConditioned));
}

// GPTQ with a ggml block format's own grid (K-quants' quantized sub-block
// scales included) beats that format's row quantizer on the layer output.
TEST(Gptq, GgmlGridsLowerTheLayerOutputErrorOfTheirRowQuantizer) {
  std::mt19937 rng(5);
  std::normal_distribution<double> normal;
  const int64_t rows = 24, cols = 512, samples = 1024;
  std::vector<double> inputs(static_cast<size_t>(samples * cols));
  for (int64_t s = 0; s < samples; ++s) {
    double shared = normal(rng);
    for (int64_t c = 0; c < cols; ++c) // correlated neighbours
      inputs[s * cols + c] = shared = 0.8 * shared + 0.6 * normal(rng);
  }
  const std::vector<double> hessian = gramOf(inputs, samples, cols);
  std::vector<float> weights(static_cast<size_t>(rows * cols));
  for (float &w : weights)
    w = static_cast<float>(normal(rng) * 0.05);
  auto outputError = [&](quant::GgmlType type, const std::vector<uint8_t> &packed) {
    std::vector<float> dequantized(weights.size());
    for (int64_t r = 0; r < rows; ++r)
      quant::ggmlDequantizeRow(type, packed.data() + r * quant::ggmlRowBytes(type, cols), cols,
                               dequantized.data() + r * cols);
    return layerOutputError(weights, dequantized, inputs, samples, rows, cols);
  };
  for (quant::GgmlType type : {quant::GgmlType::Q4_0, quant::GgmlType::Q4_1, quant::GgmlType::Q2_K,
                               quant::GgmlType::Q3_K, quant::GgmlType::Q4_K, quant::GgmlType::Q6_K})
    for (bool actOrder : {false, true}) {
      const size_t rowBytes = quant::ggmlRowBytes(type, cols);
      std::vector<uint8_t> rtn(rowBytes * rows), gptq;
      quant::ggmlQuantizeRows(type, weights.data(), rows, cols, rtn.data());
      Status status = quantizeGptqGgml(type, weights, rows, cols, hessian, GptqOptions{0.01, 128, actOrder}, gptq);
      ASSERT_TRUE(status.ok()) << status.message();
      ASSERT_EQ(gptq.size(), rtn.size());
      const double rtnError = outputError(type, rtn), gptqError = outputError(type, gptq);
      EXPECT_LT(gptqError, 0.9 * rtnError) << quant::ggmlTraits(type)->name << " act-order " << actOrder;
    }
  std::vector<uint8_t> packed;
  expectErrorContains(quantizeGptqGgml(quant::GgmlType::Q4_K, std::vector<float>(rows * 200), rows, 200,
                                       std::vector<double>(200 * 200, 0.0), {}, packed),
                      {"not whole blocks"});
}

TEST(BitAllocation, MoreBitsGoWhereTheLossFallsFastest) {
  // Same size; A's loss falls steeply with width, B's barely.
  AllocationUnit a{1000, {10.0, 1.0, 0.5}, 0}, b{1000, {2.0, 1.8, 1.7}, 0};
  auto result = allocateBits({a, b}, {2, 3, 4}, 3.0);
  ASSERT_TRUE(result.ok()) << result.status().message();
  EXPECT_EQ(result->bits, (std::vector<int>{4, 2}));
  EXPECT_DOUBLE_EQ(result->averageBits, 3.0);
  // A pinned unit keeps its width and uses budget.
  AllocationUnit pinned{1000, {}, 4};
  auto withPin = allocateBits({a, b, pinned}, {2, 3, 4}, 3.0);
  ASSERT_TRUE(withPin.ok());
  EXPECT_EQ(withPin->bits[2], 4);
  EXPECT_NEAR(withPin->averageBits, 3.0, 1e-12) << "the budget is met exactly";
  EXPECT_EQ(withPin->bits[0], 3) << "the pin leaves 5 bits for two units";
  // Below the narrowest widths: named, with the closest feasible budget.
  expectErrorContains(allocateBits({a, b, pinned}, {2, 3, 4}, 2.2).status(),
                      {"2.2 bits per weight is infeasible", "closest feasible budget is 2.66667"});
  // Above the widest widths: named too.
  expectErrorContains(allocateBits({a, b}, {2, 3, 4}, 5.0).status(),
                      {"5 bits per weight (within 0) is infeasible", "closest feasible budget is 4"});
  // NaN compares false both ways: it is named, never taken for a budget.
  expectErrorContains(allocateBits({a, b}, {2, 3, 4}, std::nan("")).status(),
                      {"the budget must be a positive number of bits per weight, got nan"});
  expectErrorContains(allocateBits({a, b}, {2, 3, 4}, 3.0, std::nan("")).status(), {"tolerance must not be negative"});
}

TEST(BitAllocation, StoppingAtTheTimeLimitIsSaidNeverPassedOffAsProvenOrInfeasible) {
  // 20000 units of unequal sizes: GLPK cannot prove an optimum in 1 ms.
  // Whatever it had by then is either an allocation marked unproven that
  // meets the budget, or an error that names the time limit; never a
  // proven optimum and never "no choice of widths" (which would be false).
  std::vector<AllocationUnit> units;
  std::mt19937 random(7);
  std::uniform_real_distribution<double> loss(0.5, 1.5);
  for (int u = 0; u < 20000; ++u) {
    const double scale = loss(random);
    units.push_back({1000 + u % 7, {4.0 * scale * loss(random), 2.0 * scale, scale}, 0});
  }
  auto limited = allocateBits(units, {2, 3, 4}, 3.0, 0.01, /*timeLimitMs=*/1);
  if (limited.ok()) {
    EXPECT_FALSE(limited->proven);
    EXPECT_LE(limited->averageBits, 3.0 + 1e-9);
    EXPECT_GE(limited->averageBits, 2.99 - 1e-9);
  } else {
    expectErrorContains(limited.status(), {"time limit", "none is proven impossible"});
  }
  // With time, the same problem is solved and proven.
  std::vector<AllocationUnit> few(units.begin(), units.begin() + 50);
  auto solved = allocateBits(few, {2, 3, 4}, 3.0, 0.01);
  ASSERT_TRUE(solved.ok()) << solved.status().message();
  EXPECT_TRUE(solved->proven);
}

TEST(BitAllocation, TheBudgetIsMetExactlyOrTheClosestBudgetsAreNamed) {
  // Unequal units with widths 2 or 4: the averages are 2, 2.5, 3.5 and 4,
  // so 3.0 cannot be met exactly.
  AllocationUnit small{1000, {10.0, 1.0}, 0}, large{3000, {5.0, 4.0}, 0};
  expectErrorContains(
      allocateBits({small, large}, {2, 4}, 3.0).status(),
      {"no choice of widths averages 3 bits per weight (within 0)", "closest feasible budgets are 2.5 or 3.5"});
  // Within a tolerance of 0.5 bits below, 2.5 is allowed.
  auto relaxed = allocateBits({small, large}, {2, 4}, 3.0, 0.5);
  ASSERT_TRUE(relaxed.ok()) << relaxed.status().message();
  EXPECT_EQ(relaxed->bits, (std::vector<int>{4, 2}));
  EXPECT_DOUBLE_EQ(relaxed->averageBits, 2.5);
  // A budget that can be met is met exactly, even where a lower average
  // would lose less (here the widest widths lose the most).
  AllocationUnit odd{1000, {1.0, 2.0}, 0};
  auto exact = allocateBits({odd, odd}, {2, 4}, 3.0);
  ASSERT_TRUE(exact.ok());
  EXPECT_DOUBLE_EQ(exact->averageBits, 3.0);
  expectErrorContains(allocateBits({odd}, {2, 4}, 3.0, -1).status(), {"tolerance must not be negative"});
}

TEST(SuperExperts, TheRuleIsTheReleasedCodes) {
  // Expected sets from the released code's expressions in numpy:
  // pool = layers < round(0.75 * L); p = np.percentile(pool, 99.5);
  // value > p and value > np.max(pool) // 10.
  std::vector<ExpertMaximum> maxima;
  const std::map<std::pair<int64_t, int64_t>, double> planted = {
      {{1, 7}, 480.0}, {{2, -1}, 95.0}, {{3, 12}, 47.5}, {{7, 3}, 900.0}, {{0, 0}, 49.0}};
  for (int64_t layer = 0; layer < 8; ++layer)
    for (int64_t expert = -1; expert < 40; ++expert) {
      auto found = planted.find({layer, expert});
      maxima.push_back({layer, expert,
                        found != planted.end() ? found->second
                                               : static_cast<double>((layer * 41 + expert + 1) * 7919 % 1000) / 100.0});
    }
  using Set = std::set<std::pair<int64_t, int64_t>>;
  // 8 layers: the first 6 count (p = 84.65); layer 7's 900 is not looked at,
  // and a shared expert can be one.
  EXPECT_EQ(superExpertRule(maxima, 8), (Set{{1, 7}, {2, -1}}));
  // 6 layers: round(4.5) = 4 (half to even), p = 166.2.
  EXPECT_EQ(superExpertRule(maxima, 6), (Set{{1, 7}}));
  // The largest over ten is floored: with a largest of 19, values of 1.51
  // to 1.54 above the percentile (1.50005) pass "> 19 // 10 = 1".
  std::vector<ExpertMaximum> floored;
  for (int64_t e = 0; e < 994; ++e)
    floored.push_back({0, e, 1.0});
  for (int64_t i = 0; i < 5; ++i)
    floored.push_back({0, 994 + i, 1.5 + 0.01 * static_cast<double>(i)});
  floored.push_back({0, 999, 19.0});
  EXPECT_EQ(superExpertRule(floored, 1), (Set{{0, 995}, {0, 996}, {0, 997}, {0, 998}, {0, 999}}));
  // All equal: nothing stands out.
  EXPECT_TRUE(superExpertRule(std::vector<ExpertMaximum>(50, ExpertMaximum{0, 0, 2.0}), 4).empty());
}

TEST(Clustering, SphericalKMeansPairsNearCopiesAndWeighsThem) {
  // Four neurons and a noisy copy of each, worth three times as much:
  // four clusters pair each neuron with its copy, and each centroid points
  // between them, nearer the copy, at their weighted mean norm.
  std::mt19937 rng(11);
  std::normal_distribution<double> normal;
  const int64_t hidden = 8, clusters = 4;
  std::vector<Segment> members;
  for (int64_t i = 0; i < clusters; ++i) {
    std::vector<double> v(static_cast<size_t>(3 * hidden));
    for (double &x : v)
      x = normal(rng);
    members.push_back({v, 1.0});
  }
  for (int64_t i = 0; i < clusters; ++i) {
    std::vector<double> copy = members[static_cast<size_t>(i)].vector;
    for (double &x : copy)
      x = 2.0 * (x + 0.1 * normal(rng));
    members.push_back({copy, 3.0});
  }
  std::vector<std::vector<double>> centroids = sphericalKMeans(members, clusters, hidden);
  ASSERT_EQ(centroids.size(), static_cast<size_t>(clusters));
  auto norm = [](const std::vector<double> &v) {
    double square = 0;
    for (double x : v)
      square += x * x;
    return std::sqrt(square);
  };
  std::set<int64_t> matched;
  for (const std::vector<double> &centroid : centroids) {
    int64_t which = -1;
    for (int64_t i = 0; i < clusters; ++i)
      if (cosine(centroid, members[static_cast<size_t>(i)].vector) > 0.95)
        which = i;
    ASSERT_GE(which, 0);
    matched.insert(which);
    const Segment &own = members[static_cast<size_t>(which)], &copy = members[static_cast<size_t>(which + clusters)];
    EXPECT_GT(cosine(centroid, copy.vector), cosine(centroid, own.vector)) << "the heavier copy pulls harder";
    EXPECT_NEAR(norm(centroid), (1.0 * norm(own.vector) + 3.0 * norm(copy.vector)) / 4.0, 1e-9);
  }
  EXPECT_EQ(matched.size(), static_cast<size_t>(clusters)) << "one cluster per pair";
  // As many clusters as members: every member is its own centroid.
  std::vector<Segment> alone(members.begin(), members.begin() + clusters);
  std::vector<std::vector<double>> same = sphericalKMeans(alone, clusters, hidden);
  for (int64_t i = 0; i < clusters; ++i) {
    bool found = false;
    for (const std::vector<double> &centroid : same) {
      double largest = 0;
      for (size_t k = 0; k < centroid.size(); ++k)
        largest = std::max(largest, std::fabs(centroid[k] - alone[static_cast<size_t>(i)].vector[k]));
      found |= largest < 1e-12;
    }
    EXPECT_TRUE(found) << i;
  }
}

// The backward pass through what only moec's compiled models hold, against
// finite differences of the engine's own loss: merged experts (router rows
// remapped to shared slots) with dynamic skipping on tiny-deepseek (MLA,
// shared experts), and experts split into parts of different widths by
// micro-expert bit allocation (before quantisation: quantised matrices run
// with int8 activations, whose rounding finite differences cannot see
// through; the backward reads them dequantised).
TEST(Gradients, MergedSkippingAndSplitExpertsAgreeWithFiniteDifferences) {
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-deepseek";
  auto model = loadModel(fixture);
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  CalibrationOptions options;
  options.maxTokens = 1024;
  options.blockSamples = 256; // for micro-expert bit allocation
  auto stats = calibrate(*model->engine, *streams, options);
  ASSERT_TRUE(stats.ok());
  ASSERT_TRUE(writeStatistics(*stats, options, dir.file("stats.safetensors")).ok());
  std::vector<int32_t> ids((*streams)[0].ids.begin(), (*streams)[0].ids.begin() + 24);

  auto merged = importDirectory(fixture, dir.file("m.moestore"));
  ASSERT_TRUE(
      runPipeline(*merged, "moe-merge-experts{stats=" + dir.file("stats.safetensors") + " method=msmoe ratio=0.25}"));
  mlir::Builder builder(&merged->context);
  merged->module->walk([&](ir::RouterOp router) { router.setSkipThresholdAttr(builder.getF64FloatAttr(0.6)); });
  auto description = lowerToDescription(merged->model(), "");
  ASSERT_TRUE(description.ok());
  bool remapped = false;
  for (const LayerEntry &layer : description->layers)
    remapped = remapped || (!layer.routing.remap.empty() && layer.routing.skipThreshold == 0.6);
  EXPECT_TRUE(remapped) << "merging leaves router rows sharing slots";
  LoadedModel mergedModel = run(*merged);
  expectFiniteDifferencesAgree(*mergedModel.engine, ids, "merged, skipping");

  auto split = importDirectory(fixture, dir.file("s.moestore"));
  ASSERT_TRUE(runPipeline(*split, "moe-allocate-bits{stats=" + dir.file("stats.safetensors") +
                                      " budget=3 group=64 granularity=micro-expert}"));
  int64_t parts = 0;
  split->module->walk([&](ir::ExpertOp expert) { parts += expert->hasAttr("part_offset") ? 1 : 0; });
  EXPECT_GT(parts, 0) << "some experts are split into parts";
  LoadedModel splitModel = run(*split);
  expectFiniteDifferencesAgree(*splitModel.engine, ids, "split parts");
}
