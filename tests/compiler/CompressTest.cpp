//===- CompressTest.cpp - The compress job as a library -------------------===//
//
// Part of moec. compressCheckpoint end to end on a fixture, and its
// failures: a bad recipe is named at its JSON path before any work, and
// nothing is written.
//
//===----------------------------------------------------------------------===//

#include "moe/Pipeline/Compress.h"
#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/Model.h"

#include "../unit/TestSupport.h"

#include <filesystem>

using namespace moe;
using namespace moe::testing;

TEST(Compress, QuantizesGatesAndWritesAPackageThatRuns) {
  TempDir dir;
  writeFile(dir.file("recipe.json"), R"({"passes": [{"pass": "moe-quantize", "options": {"bits": 8, "group": 64}}]})");
  CompressRequest request{dataDir() + "/fixtures/tiny-mixtral",
                          dir.file("recipe.json"),
                          dir.file("q.moepkg"),
                          dataDir() + "/brown/heldout.jsonl",
                          256,
                          5.0};
  std::vector<std::string> steps;
  CompressProgress progress;
  progress.step = [&](const std::string &step) { steps.push_back(step); };
  mlir::MLIRContext context;
  Expected<CompressResult> result = compressCheckpoint(request, progress, context);
  ASSERT_TRUE(result.ok()) << result.status().message();
  const nlohmann::json &summary = result->summary;
  EXPECT_FALSE(result->qualityGateFailed) << result->qualityGateReason;
  EXPECT_EQ(summary["quality_gate"], "passed");
  EXPECT_LT(summary["bytes_after"].get<uint64_t>(), summary["bytes_before"].get<uint64_t>());
  const double before = summary["perplexity_before"], after = summary["perplexity_after"];
  EXPECT_LT(std::abs(after / before - 1.0), 0.05) << "8-bit RTN barely moves perplexity";
  EXPECT_GE(steps.size(), 4u); // import, evaluate, the pass, emit, evaluate
  Expected<LoadedModel> loaded = loadModel(dir.file("q.moepkg"));
  ASSERT_TRUE(loaded.ok()) << loaded.status().message();

  // A gate of 0% on 2-bit weights fails, with the numbers in the reason.
  writeFile(dir.file("two.json"), R"({"passes": [{"pass": "moe-quantize", "options": {"bits": 2, "group": 64}}]})");
  request.recipe = dir.file("two.json");
  request.output = dir.file("two.moepkg");
  request.maxPplIncrease = 0;
  result = compressCheckpoint(request, CompressProgress(), context);
  ASSERT_TRUE(result.ok()) << result.status().message();
  EXPECT_TRUE(result->qualityGateFailed);
  EXPECT_NE(result->qualityGateReason.find("more than the allowed 0%"), std::string::npos);
}

TEST(Compress, ABadRecipeIsNamedAndNothingIsWritten) {
  TempDir dir;
  writeFile(
      dir.file("recipe.json"),
      R"({"passes": [{"pass": "moe-quantize", "options": {"bits": 4}}, {"pass": "moe-prune-atoms", "options": {"ratio": "half"}}]})");
  CompressRequest request{
      dataDir() + "/fixtures/tiny-mixtral", dir.file("recipe.json"), dir.file("x.moepkg"), "", 0, -1};
  mlir::MLIRContext context;
  Expected<CompressResult> result = compressCheckpoint(request, CompressProgress(), context);
  expectErrorContains(result.status(), {"recipe.json", "passes[1].options.ratio", "must be a finite number"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("x.moepkg")));
  request.output = dir.file("x.bin");
  expectErrorContains(compressCheckpoint(request, CompressProgress(), context).status(), {"ends in .moepkg"});
}

// Every kind of recipe mistake is named at its JSON path, before any work.
TEST(Recipe, MistakesAreNamedAtTheirJsonPath) {
  TempDir dir;
  auto expectRecipeError = [&](const std::string &text, std::initializer_list<std::string> fragments) {
    writeFile(dir.file("r.json"), text);
    expectErrorContains(readRecipe(dir.file("r.json")).status(), fragments);
  };
  expectRecipeError(R"({"passes": [3]})", {"r.json", "passes[0] must be an object with a \"pass\" name"});
  expectRecipeError(R"({"passes": [{"pass": "moe-quantize", "opts": {}}]})", {"passes[0] has unknown key 'opts'"});
  expectRecipeError(R"({"passes": [{"pass": "moe-quantize", "options": [1]}]})",
                    {"passes[0].options must be an object"});
  expectRecipeError(R"({"passes": [{"pass": "moe-quantize", "options": {"bits": 4.5}}]})",
                    {"passes[0].options.bits: must be an integer, got 4.5"});
  expectRecipeError(R"({"passes": [{"pass": "moe-quantize", "options": {"sym": "yes"}}]})",
                    {"passes[0].options.sym: must be true or false, got \"yes\""});
  expectRecipeError(R"({"passes": [{"pass": "moe-set-topk", "options": {"top-k": 1, "layers": [0, "x"]}}]})",
                    {"passes[0].options.layers: must be a list of integers"});
  expectRecipeError(R"({"calibration": {"tokens": "many"}, "passes": [{"pass": "moe-quantize"}]})",
                    {"calibration.tokens", "got \"many\""});
  expectRecipeError(R"({"passes": [{"pass": "moe-quantize", "options": {"method": "gptq", "layers": "1"}}]})",
                    {"passes[0]: moec compress runs GPTQ layer by layer itself"});
  // Enumerated options take one of their words; lists of them, every word.
  expectRecipeError(R"({"passes": [{"pass": "moe-quantize", "options": {"method": "gptq", "precision": "f16"}}]})",
                    {"passes[0].options.precision: must be f64 or f32", "got \"f16\""});
  expectRecipeError(
      R"({"passes": [{"pass": "moe-prune-experts", "options": {"method": "random"}}]})",
      {"passes[0].options.method: must be frequency, gate-weight, easy-ep, tcess or reconstruction", "got \"random\""});
  expectRecipeError(R"({"passes": [{"pass": "moe-quantize", "options": {"targets": ["experts", "router"]}}]})",
                    {"passes[0].options.targets: must be a list of experts, shared"});
  expectRecipeError(R"({"passes": [{"pass": "moe-quantize", "options": {"targets": ""}}]})",
                    {"passes[0].options.targets: must be a list of"});
  expectRecipeError(R"({"passes": [{"pass": "moe-allocate-bits", "options": {"candidates": "2,x"}}]})",
                    {"passes[0].options.candidates: must be a list of widths (2, 3, 4, 8) or of llama.cpp formats"});
  writeFile(dir.file("words.json"),
            R"({"passes": [{"pass": "moe-quantize", "options": {"targets": ["experts", "lm_head"],
            "scale-type": "bf16", "method": "rtn"}}, {"pass": "moe-merge-experts", "options": {"ratio": 0.5,
            "method": "dern", "similarity": "weights", "align": "permutation"}}]})");
  Expected<Recipe> words = readRecipe(dir.file("words.json"));
  ASSERT_TRUE(words.ok()) << words.status().message();
  EXPECT_TRUE(words->passes[0].quantizesOutsideLayers);
  // Integral floats are integers, lists may be text: both are accepted.
  writeFile(dir.file("ok.json"),
            R"({"passes": [{"pass": "moe-set-topk", "options": {"top-k": 2.0, "layers": "0,1"}}]})");
  EXPECT_TRUE(readRecipe(dir.file("ok.json")).ok());
}
