//===- PipelineTest.cpp - import -> passes -> export, against the engine --===//
//
// Part of moec. The "switch experts off" workflow end to end: the exported
// checkpoint must evaluate exactly as the original model does with the same
// experts masked out of routing; an unmodified round trip reproduces the
// original tensor bytes.
//
//===----------------------------------------------------------------------===//

#include "moe/Calibration/Statistics.h"
#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Exporter/Exporter.h"
#include "moe/Importer/Importer.h"
#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/Model.h"
#include "moe/Transforms/Passes.h"

#include "../unit/TestSupport.h"

#include "mlir/IR/MLIRContext.h"
#include "mlir/Pass/PassManager.h"
#include "mlir/Pass/PassRegistry.h"

#include "mlir/IR/Diagnostics.h"
#include "llvm/Support/raw_ostream.h"

#include <nlohmann/json.hpp>

#include <cstring>
#include <functional>

using namespace moe;
using namespace moe::testing;

namespace {

/// Imports `directory`, runs `pipeline`, exports to `output`.
void compile(const std::string &directory, const std::string &pipeline, const std::string &store,
             const std::string &output) {
  static const bool registered = [] {
    registerMoePasses();
    return true;
  }();
  (void)registered;
  std::string configText = readFile(directory + "/config.json");
  auto spec = ModelSpec::fromConfigText(configText, "config.json");
  ASSERT_TRUE(spec.ok()) << spec.status().message();
  auto checkpoint = Checkpoint::open(directory);
  ASSERT_TRUE(checkpoint.ok());
  ASSERT_TRUE(bindCheckpoint(*spec, **checkpoint).ok());
  mlir::MLIRContext context;
  auto module = importModel(context, *spec, **checkpoint, configText, store);
  ASSERT_TRUE(module.ok()) << module.status().message();
  if (!pipeline.empty()) {
    mlir::PassManager manager(&context);
    ASSERT_TRUE(mlir::succeeded(mlir::parsePassPipeline(pipeline, manager.nest<moe::ir::ModelOp>())));
    ASSERT_TRUE(mlir::succeeded(manager.run(**module)));
  }
  ir::ModelOp model = *(**module).getOps<ir::ModelOp>().begin();
  Status status = exportHuggingFace(model, output);
  ASSERT_TRUE(status.ok()) << status.message();
}

} // namespace

TEST(Pipeline, DroppedExpertsEvaluateLikeMaskedRouting) {
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-deepseek";
  // The same number of experts in every MoE layer (1..3), so the result
  // fits a DeepSeek-V2 config.json.
  compile(fixture, "moe-drop-experts{experts=1:1,5;2:0,7;3:2,3}", dir.file("m.moestore"), dir.file("out"));

  auto exported = loadModel(dir.file("out"));
  ASSERT_TRUE(exported.ok()) << exported.status().message();
  EXPECT_EQ(exported->spec.layers[1].numExperts, 6);
  EngineOptions masked;
  masked.maskedExperts = {{1, {1, 5}}, {2, {0, 7}}, {3, {2, 3}}};
  auto original = loadModel(fixture, masked);
  ASSERT_TRUE(original.ok()) << original.status().message();

  auto streams = readEvalData(dataDir() + "/brown/heldout.jsonl", original->tokenizer.get(), original->endOfText);
  ASSERT_TRUE(streams.ok());
  EvalOptions options{256, 0, 1024};
  auto a = evaluate(*exported->engine, *streams, options);
  auto b = evaluate(*original->engine, *streams, options);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->overall.targets, b->overall.targets);
  EXPECT_NEAR(a->overall.perplexity(), b->overall.perplexity(), 1e-5 * b->overall.perplexity());
  // Masking really changed the model.
  auto unmasked = loadModel(fixture);
  auto c = evaluate(*unmasked->engine, *streams, options);
  ASSERT_TRUE(c.ok());
  EXPECT_GT(std::fabs(c->overall.perplexity() - b->overall.perplexity()), 1.0);
}

TEST(Pipeline, ImportThenExportReproducesTheCheckpoint) {
  TempDir dir;
  const std::string source = dataDir() + "/hf/deepseek_v3";
  compile(source, "", dir.file("m.moestore"), dir.file("out"));
  auto original = SafetensorsFile::open(source + "/model.safetensors");
  auto copy = SafetensorsFile::open(dir.file("out/model.safetensors"));
  ASSERT_TRUE(original.ok() && copy.ok());
  ASSERT_EQ((*original)->tensors().size(), (*copy)->tensors().size());
  for (const TensorInfo &tensor : (*original)->tensors()) {
    const TensorInfo *other = (*copy)->find(tensor.name);
    ASSERT_NE(other, nullptr) << tensor.name;
    EXPECT_EQ(other->dtype, tensor.dtype);
    EXPECT_EQ(other->shape, tensor.shape);
    std::span<const uint8_t> a = (*original)->data(tensor), b = (*copy)->data(*other);
    EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << tensor.name;
  }
  auto configA = nlohmann::json::parse(readFile(source + "/config.json"));
  auto configB = nlohmann::json::parse(readFile(dir.file("out/config.json")));
  EXPECT_EQ(configA, configB) << "an unmodified model keeps its config";
}

TEST(Pipeline, ExportRefusesWhatTheConfigCannotExpress) {
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-mixtral";
  std::string configText = readFile(fixture + "/config.json");
  auto spec = ModelSpec::fromConfigText(configText, "config.json");
  auto checkpoint = Checkpoint::open(fixture);
  ASSERT_TRUE(bindCheckpoint(*spec, **checkpoint).ok());
  registerMoePasses();
  mlir::MLIRContext context;
  auto module = importModel(context, *spec, **checkpoint, configText, dir.file("m.moestore"));
  ASSERT_TRUE(module.ok());
  mlir::PassManager manager(&context);
  ASSERT_TRUE(
      mlir::succeeded(mlir::parsePassPipeline("moe-drop-experts{experts=2:1}", manager.nest<moe::ir::ModelOp>())));
  ASSERT_TRUE(mlir::succeeded(manager.run(**module)));
  Status status = exportHuggingFace(*(**module).getOps<ir::ModelOp>().begin(), dir.file("out"));
  expectErrorContains(status, {"layer 2 has 7 routed experts but an earlier layer has 8", "use the package backend"});
}

namespace {

/// Imports `directory` and runs `pipeline`; returns the printed module.
std::string importAndRun(const std::string &directory, const std::string &pipeline, const std::string &store,
                         mlir::MLIRContext &context, bool expectSuccess = true) {
  registerMoePasses();
  std::string configText = readFile(directory + "/config.json");
  auto spec = ModelSpec::fromConfigText(configText, "config.json");
  auto checkpoint = Checkpoint::open(directory);
  EXPECT_TRUE(bindCheckpoint(*spec, **checkpoint).ok());
  auto module = importModel(context, *spec, **checkpoint, configText, store);
  EXPECT_TRUE(module.ok());
  mlir::PassManager manager(&context);
  EXPECT_TRUE(mlir::succeeded(mlir::parsePassPipeline(pipeline, manager.nest<moe::ir::ModelOp>())));
  EXPECT_EQ(mlir::succeeded(manager.run(**module)), expectSuccess);
  std::string text;
  llvm::raw_string_ostream os(text);
  (*module)->print(os);
  return os.str();
}

/// The expert lines of layer `index` in a printed module.
std::vector<std::string> expertLines(const std::string &module, int64_t index) {
  std::vector<std::string> lines;
  std::string marker = "moe.layer " + std::to_string(index) + " {";
  size_t begin = module.find(marker);
  size_t end = module.find("moe.layer " + std::to_string(index + 1) + " {", begin);
  std::string section = module.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
  size_t position = 0;
  while ((position = section.find("moe.expert ", position)) != std::string::npos) {
    size_t lineEnd = section.find('\n', position);
    lines.push_back(section.substr(position, lineEnd - position));
    position = lineEnd;
  }
  return lines;
}

/// Writes a statistics file with the given routed counts and max outputs
/// for every MoE layer of a model with `layers` layers of `experts` experts.
/// `sharedOutputs`, when given, is every layer's shared_max_abs_output.
void writeStats(const std::string &path, int64_t layers, const std::vector<std::vector<int64_t>> &routed,
                const std::vector<std::vector<double>> &maxOutputs, const std::vector<double> &sharedOutputs = {}) {
  SafetensorsWriter writer;
  for (int64_t l = 0; l < static_cast<int64_t>(sharedOutputs.size()); ++l) {
    std::vector<uint8_t> bytes(8);
    std::memcpy(bytes.data(), &sharedOutputs[l], 8);
    ASSERT_TRUE(writer.addTensor(concat("layers.", l, ".shared_max_abs_output"), DType::F64, {1}, bytes).ok());
  }
  for (int64_t l = 0; l < layers; ++l) {
    std::vector<uint8_t> counts(routed[l].size() * 8), outputs(maxOutputs[l].size() * 8);
    std::memcpy(counts.data(), routed[l].data(), counts.size());
    std::memcpy(outputs.data(), maxOutputs[l].data(), outputs.size());
    int64_t E = static_cast<int64_t>(routed[l].size());
    ASSERT_TRUE(writer.addTensor(concat("layers.", l, ".routed_tokens"), DType::I64, {E}, counts).ok());
    ASSERT_TRUE(writer.addTensor(concat("layers.", l, ".max_abs_output"), DType::F64, {E}, outputs).ok());
  }
  ASSERT_TRUE(writer.write(path).ok());
}

} // namespace

TEST(PruneExperts, AnExpertThatIsNeverRoutedGoesFirst) {
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-deepseek";
  EngineOptions masked;
  masked.maskedExperts = {{2, {6}}};
  auto model = loadModel(fixture, masked);
  ASSERT_TRUE(model.ok());
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  CalibrationOptions options;
  options.maxTokens = 1024;
  auto result = calibrate(*model->engine, *streams, options);
  ASSERT_TRUE(result.ok());
  ASSERT_TRUE(writeStatistics(*result, options, dir.file("stats.safetensors")).ok());

  mlir::MLIRContext context;
  std::string module =
      importAndRun(fixture, "moe-prune-experts{stats=" + dir.file("stats.safetensors") + " method=frequency keep=7}",
                   dir.file("m.moestore"), context);
  std::vector<std::string> experts = expertLines(module, 2);
  ASSERT_EQ(experts.size(), 7u);
  for (const std::string &line : experts)
    EXPECT_EQ(line.find("experts.6."), std::string::npos) << line;
  EXPECT_EQ(expertLines(module, 1).size(), 7u) << "keep=7 in every layer";
}

TEST(PruneExperts, RatioZeroIsTheIdentity) {
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-mixtral";
  writeStats(dir.file("stats.safetensors"), 4, std::vector<std::vector<int64_t>>(4, {5, 1, 7, 3, 9, 2, 8, 4}),
             std::vector<std::vector<double>>(4, std::vector<double>(8, 1.0)));
  mlir::MLIRContext a, b;
  std::string pruned = importAndRun(fixture, "moe-prune-experts{stats=" + dir.file("stats.safetensors") + " ratio=0}",
                                    dir.file("m.moestore"), a);
  std::string original = importAndRun(fixture, "moe-set-topk{top-k=2}", dir.file("m.moestore"), b);
  EXPECT_EQ(pruned, original);
}

TEST(PruneExperts, APlantedSuperExpertIsKept) {
  TempDir dir;
  const std::string fixture = dataDir() + "/fixtures/tiny-mixtral";
  // Expert 0 of layer 0 is the least used but has an outlier output.
  std::vector<std::vector<int64_t>> routed(4, {9, 8, 7, 6, 5, 4, 3, 2});
  routed[0] = {1, 2, 30, 30, 30, 30, 30, 30};
  std::vector<std::vector<double>> outputs(4, std::vector<double>(8, 1.0));
  outputs[0][0] = 1000.0;
  writeStats(dir.file("stats.safetensors"), 4, routed, outputs);
  const std::string pipeline = "moe-prune-experts{stats=" + dir.file("stats.safetensors") + " keep=7";
  mlir::MLIRContext a, b;
  std::string kept = importAndRun(fixture, pipeline + "}", dir.file("a.moestore"), a);
  std::vector<std::string> layer0 = expertLines(kept, 0);
  ASSERT_EQ(layer0.size(), 7u);
  EXPECT_NE(layer0[0].find("experts.0.w1"), std::string::npos) << "the super expert stays";
  for (const std::string &line : layer0)
    EXPECT_EQ(line.find("experts.1.w1"), std::string::npos) << "the next least used goes";
  std::string unprotected =
      importAndRun(fixture, pipeline + " protect-super-experts=false}", dir.file("b.moestore"), b);
  for (const std::string &line : expertLines(unprotected, 0))
    EXPECT_EQ(line.find("experts.0.w1"), std::string::npos) << line;
  // Shared experts count in the pool: one twenty times larger makes the
  // rule's floor(largest / 10) leave expert 0 unprotected.
  writeStats(dir.file("stats.safetensors"), 4, routed, outputs, {1.0, 20000.0, 1.0, 1.0});
  mlir::MLIRContext c;
  for (const std::string &line : expertLines(importAndRun(fixture, pipeline + "}", dir.file("c.moestore"), c), 0))
    EXPECT_EQ(line.find("experts.0.w1"), std::string::npos) << line;
}

TEST(PruneExperts, BadOptionsAreNamed) {
  TempDir dir;
  mlir::MLIRContext context;
  mlir::ScopedDiagnosticHandler capture(&context, [&](mlir::Diagnostic &diagnostic) {
    EXPECT_NE(diagnostic.str().find("moe-prune-experts"), std::string::npos) << diagnostic.str();
    return mlir::success();
  });
  importAndRun(dataDir() + "/fixtures/tiny-mixtral", "moe-prune-experts{stats=" + dir.file("none") + " ratio=0.5}",
               dir.file("m.moestore"), context, /*expectSuccess=*/false);
  importAndRun(dataDir() + "/fixtures/tiny-mixtral", "moe-prune-experts{ratio=1.5 stats=x}", dir.file("m.moestore"),
               context, /*expectSuccess=*/false);
  importAndRun(dataDir() + "/fixtures/tiny-mixtral",
               "moe-prune-experts{ratio=0.25 stats=x method=reconstruction search-budget=-1}", dir.file("m.moestore"),
               context, /*expectSuccess=*/false);
  // A shared expert statistic that is not one value.
  writeStats(dir.file("stats.safetensors"), 4, std::vector<std::vector<int64_t>>(4, {5, 1, 7, 3, 9, 2, 8, 4}),
             std::vector<std::vector<double>>(4, std::vector<double>(8, 1.0)));
  // The valid file plus `extra` tensors, as `name`.
  auto copyWith = [&](const std::string &name, const std::function<void(SafetensorsWriter &)> &extra) {
    SafetensorsWriter writer;
    auto original = SafetensorsFile::open(dir.file("stats.safetensors"));
    ASSERT_TRUE(original.ok());
    for (const TensorInfo &info : (*original)->tensors()) {
      std::span<const uint8_t> bytes = (*original)->data(info);
      ASSERT_TRUE(writer.addTensor(info.name, info.dtype, info.shape, {bytes.begin(), bytes.end()}).ok());
    }
    extra(writer);
    ASSERT_TRUE(writer.write(dir.file(name)).ok());
  };
  copyWith("bad.safetensors", [](SafetensorsWriter &writer) {
    ASSERT_TRUE(writer.addTensor("layers.1.shared_max_abs_output", DType::F64, {2}, std::vector<uint8_t>(16, 0)).ok());
  });
  importAndRun(dataDir() + "/fixtures/tiny-mixtral",
               "moe-prune-experts{stats=" + dir.file("bad.safetensors") + " keep=7}", dir.file("m.moestore"), context,
               /*expectSuccess=*/false);
  // Block samples with no rows: NAEE's search has nothing to score.
  copyWith("empty.safetensors", [](SafetensorsWriter &writer) {
    for (int layer = 0; layer < 4; ++layer)
      for (const char *name : {"block_input", "block_output"})
        ASSERT_TRUE(writer.addTensor(concat("layers.", layer, ".", name), DType::F32, {0, 160}, {}).ok());
  });
  std::string message;
  mlir::MLIRContext empty;
  mlir::ScopedDiagnosticHandler record(&empty, [&](mlir::Diagnostic &diagnostic) {
    message += diagnostic.str();
    return mlir::success();
  });
  importAndRun(dataDir() + "/fixtures/tiny-mixtral",
               "moe-prune-experts{stats=" + dir.file("empty.safetensors") + " method=reconstruction keep=7}",
               dir.file("m.moestore"), empty, /*expectSuccess=*/false);
  EXPECT_NE(message.find("has no block samples for layer"), std::string::npos) << message;
  // Super Experts' maxima for fewer experts than the layer holds.
  {
    SafetensorsWriter writer;
    for (int layer = 0; layer < 4; ++layer) {
      std::vector<int64_t> counts(8, 5);
      std::vector<double> maxima(4, 1.0);
      ASSERT_TRUE(
          writer
              .addTensor(concat("layers.", layer, ".routed_tokens"), DType::I64, {8},
                         {reinterpret_cast<uint8_t *>(counts.data()), reinterpret_cast<uint8_t *>(counts.data()) + 64})
              .ok());
      ASSERT_TRUE(
          writer
              .addTensor(concat("layers.", layer, ".max_abs_output"), DType::F64, {4},
                         {reinterpret_cast<uint8_t *>(maxima.data()), reinterpret_cast<uint8_t *>(maxima.data()) + 32})
              .ok());
    }
    ASSERT_TRUE(writer.write(dir.file("short.safetensors")).ok());
  }
  message.clear();
  importAndRun(dataDir() + "/fixtures/tiny-mixtral",
               "moe-prune-experts{stats=" + dir.file("short.safetensors") + " keep=7}", dir.file("m.moestore"), empty,
               /*expectSuccess=*/false);
  EXPECT_NE(message.find("the statistics have 4 experts for layer"), std::string::npos) << message;
}

TEST(Pipeline, FusedExpertsExportAsPerExpertWithIdenticalLogits) {
  TempDir dir;
  const std::string source = dataDir() + "/hf/mixtral_fused";
  compile(source, "", dir.file("m.moestore"), dir.file("out"));
  auto original = loadModel(source), exported = loadModel(dir.file("out"));
  ASSERT_TRUE(original.ok() && exported.ok()) << exported.status().message();
  EXPECT_EQ(original->spec.layers[0].expertLayout, ExpertLayout::Fused);
  EXPECT_EQ(exported->spec.layers[0].expertLayout, ExpertLayout::PerExpert);
  std::vector<int32_t> ids = {3, 17, 99, 4, 42, 8, 127, 0, 55};
  std::vector<float> a, b;
  KvCache cacheA = original->engine->newCache(), cacheB = exported->engine->newCache();
  ASSERT_TRUE(original->engine->forward(ids, cacheA, a).ok());
  ASSERT_TRUE(exported->engine->forward(ids, cacheB, b).ok());
  EXPECT_EQ(a, b) << "the same bf16 values, per expert instead of fused";
}

// Enumerated options print back as the words they were parsed from, so a
// printed pipeline parses to the same pipeline; a wrong word lists the right
// ones.
TEST(PassOptions, EnumeratedOptionsRoundTripThroughPipelineText) {
  registerMoePasses();
  mlir::MLIRContext context;
  const std::string text = "builtin.module(moe.model(moe-prune-experts{method=easy-ep scope=global},"
                           "moe-merge-experts{align=permutation method=dern similarity=weights},"
                           "moe-prune-atoms{method=magnitude},"
                           "moe-quantize{method=gptq scale-type=bf16 targets=shared,lm_head},"
                           "moe-allocate-bits{candidates=2,8 granularity=micro-expert objective=hessian}))";
  auto printed = [&](const std::string &pipeline) {
    std::string out;
    llvm::raw_string_ostream stream(out);
    mlir::FailureOr<mlir::OpPassManager> manager = mlir::parsePassPipeline(pipeline, stream);
    EXPECT_TRUE(mlir::succeeded(manager)) << out;
    if (mlir::succeeded(manager))
      manager->printAsTextualPipeline(stream);
    return out;
  };
  const std::string once = printed(text);
  for (const char *word : {"method=easy-ep", "scope=global", "align=permutation", "method=dern", "similarity=weights",
                           "method=magnitude", "method=gptq", "scale-type=bf16", "targets=shared,lm_head",
                           "candidates=2,8", "granularity=micro-expert", "objective=hessian"})
    EXPECT_NE(once.find(word), std::string::npos) << word << " missing from " << once;
  EXPECT_EQ(printed(once), once);

  // The word's message goes to stderr (llvm::cl); the lit tests check it.
  std::string errors;
  llvm::raw_string_ostream errorStream(errors);
  EXPECT_TRUE(
      mlir::failed(mlir::parsePassPipeline("builtin.module(moe.model(moe-prune-atoms{scope=model}))", errorStream)));
  EXPECT_NE(errors.find("failed to add `moe-prune-atoms` with options `scope=model`"), std::string::npos) << errors;
}
