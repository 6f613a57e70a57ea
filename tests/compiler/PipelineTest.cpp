//===- PipelineTest.cpp - import -> passes -> export, against the engine --===//
//
// Part of moec. The "switch experts off" workflow end to end: the exported
// checkpoint must evaluate exactly as the original model does with the same
// experts masked out of routing; an unmodified round trip reproduces the
// original tensor bytes.
//
//===----------------------------------------------------------------------===//

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

#include <nlohmann/json.hpp>

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
    ASSERT_TRUE(mlir::succeeded(mlir::parsePassPipeline(pipeline, manager)));
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
  ASSERT_TRUE(mlir::succeeded(mlir::parsePassPipeline("moe-drop-experts{experts=2:1}", manager)));
  ASSERT_TRUE(mlir::succeeded(manager.run(**module)));
  Status status = exportHuggingFace(*(**module).getOps<ir::ModelOp>().begin(), dir.file("out"));
  expectErrorContains(status, {"layer 2 has 7 routed experts but an earlier layer has 8",
                               "use the package backend"});
}
