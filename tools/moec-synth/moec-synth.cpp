//===- moec-synth.cpp - Write a tiny random checkpoint of a family --------===//
//
// Part of moec. Test and demo helper: writes a synthetic checkpoint with the
// exact tensor names, shapes and dtypes of a supported family.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/SyntheticCheckpoint.h"

#include <CLI/CLI.hpp>

#include <fstream>
#include <iostream>

int main(int argc, char **argv) {
  CLI::App app{"moec-synth: write a tiny random-weight checkpoint of an MoE family"};
  std::string familyText, output, dtypeText = "BF16", configPath;
  bool fused = false, fp8 = false;
  int shards = 1;
  uint64_t seed = 1;
  app.add_option("--family", familyText, "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, phimoe");
  app.add_option("--config", configPath, "Use this config.json (real-model shapes) instead of the tiny one");
  app.add_option("-o,--output", output, "Directory to write")->required();
  app.add_option("--shards", shards, "Number of safetensors shards (>1 writes an index)");
  app.add_flag("--fused", fused, "Store routed experts as fused 3-D tensors");
  app.add_flag("--fp8", fp8, "F8_E4M3 linear weights with block scales (deepseek_v3)");
  app.add_option("--dtype", dtypeText, "F32, F16 or BF16");
  app.add_option("--seed", seed, "Random seed");
  CLI11_PARSE(app, argc, argv);

  std::string configText;
  if (!configPath.empty()) {
    std::ifstream stream(configPath);
    if (!stream) {
      std::cerr << "moec-synth: error: " << configPath << ": cannot read\n";
      return 1;
    }
    configText.assign(std::istreambuf_iterator<char>(stream), {});
    auto spec = moe::ModelSpec::fromConfigText(configText, configPath);
    if (!spec) {
      std::cerr << "moec-synth: error: " << spec.status().message() << "\n";
      return 1;
    }
    familyText = std::string(moe::familyName(spec->family));
  }
  if (familyText.empty()) {
    std::cerr << "moec-synth: error: --family or --config is required\n";
    return 1;
  }
  std::optional<moe::ModelFamily> family = moe::parseFamilyName(familyText);
  if (!family) {
    std::cerr << "moec-synth: error: unknown family '" << familyText
              << "'; expected mixtral, qwen2_moe, qwen3_moe, olmoe, "
                 "deepseek_v2, deepseek_v3 or phimoe\n";
    return 1;
  }
  std::optional<moe::DType> dtype = moe::parseDType(dtypeText);
  if (!dtype) {
    std::cerr << "moec-synth: error: unknown --dtype '" << dtypeText << "'\n";
    return 1;
  }
  moe::SyntheticOptions options;
  options.family = *family;
  options.expertLayout = fused ? moe::ExpertLayout::Fused : moe::ExpertLayout::PerExpert;
  options.shards = shards;
  options.fp8 = fp8;
  options.dtype = *dtype;
  options.seed = seed;
  options.configText = configText;
  moe::Status status = moe::writeSyntheticCheckpoint(output, options);
  if (!status.ok()) {
    std::cerr << "moec-synth: error: " << status.message() << "\n";
    return 1;
  }
  return 0;
}
