//===- CompressedTensorsTest.cpp - Exports for vLLM and transformers ------===//
//
// Part of moec. moec's compressed-tensors exports of the fixture, decoded by
// an independent numpy reading of the format (scripts/fixtures/
// ct_crosscheck.py, goldens in tests/data/compressed-tensors), hold the
// module's values: exactly for moec's symmetric formats, within the
// requantization for the others; config.json names every module.
//
//===----------------------------------------------------------------------===//

#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Exporter/Exporter.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Importer/Importer.h"
#include "moe/Lowering/TensorAccess.h"
#include "moe/Transforms/Passes.h"

#include "../../compiler/lib/Exporter/CompressedTensors.h"
#include "../unit/TestSupport.h"
#include "common/WeightFormat.h"

#include "mlir/IR/MLIRContext.h"
#include "mlir/Pass/PassManager.h"
#include "mlir/Pass/PassRegistry.h"

#include <nlohmann/json.hpp>

#include <cmath>

using namespace moe;
using namespace moe::testing;
using json = nlohmann::json;

namespace {

/// Sum and sum of squares of every quantised Linear module's values in the
/// module, by checkpoint module name.
std::map<std::string, std::pair<double, double>> moduleSums(ir::ModelOp model) {
  std::map<std::string, std::pair<double, double>> sums;
  TensorAccess access(model);
  for (ir::TensorOp tensor : model.getBody().getOps<ir::TensorOp>()) {
    ir::QuantAttr quant = tensor.getQuantAttr();
    if (!quant)
      continue;
    DType dtype;
    std::vector<uint8_t> bytes;
    EXPECT_TRUE(access.read(tensor, dtype, bytes).ok());
    const int64_t rows = tensor.getTensorType().getShape()[0], cols = tensor.getTensorType().getShape()[1];
    std::vector<float> values(static_cast<size_t>(rows * cols));
    quant::parseWeightFormat(quant.getFormat().str())->dequantize(bytes.data(), rows, cols, values.data());
    double sum = 0, squares = 0;
    for (float v : values) {
      sum += v;
      squares += static_cast<double>(v) * v;
    }
    std::string name = tensor.getSymName().str();
    sums[name.substr(0, name.size() - 7)] = {sum, squares};
  }
  return sums;
}

} // namespace

TEST(CompressedTensors, ExportsHoldTheModulesValues) {
  registerMoePasses();
  const json golden = json::parse(readFile(dataDir() + "/compressed-tensors/golden.json"));
  TempDir dir;
  const std::pair<const char *, const char *> cases[] = {
      {"sym", "moe-quantize{bits=4 group=32 sym=true targets=all}"},
      {"asym", "moe-quantize{bits=4 group=32 targets=experts}"},
  };
  for (const auto &[name, pipeline] : cases) {
    mlir::MLIRContext context;
    auto imported =
        importCheckpoint(dataDir() + "/fixtures/tiny-mixtral", dir.file(std::string(name) + ".moestore"), context);
    ASSERT_TRUE(imported.ok()) << imported.status().message();
    mlir::PassManager manager(&context);
    ASSERT_TRUE(mlir::succeeded(mlir::parsePassPipeline(pipeline, manager.nest<ir::ModelOp>())));
    ASSERT_TRUE(mlir::succeeded(manager.run(*imported->module)));
    ir::ModelOp model = *imported->module->getOps<ir::ModelOp>().begin();
    std::vector<std::string> remarks;
    const std::string out = dir.file(name);
    Status status = exportHuggingFace(model, out, &remarks, QuantizedWeights::CompressedTensors);
    ASSERT_TRUE(status.ok()) << status.message();
    EXPECT_EQ(remarks.empty(), std::string(name) == "sym") << "requantization is said, and only then";

    // config.json: one group naming every quantised module; routers and
    // lm_head (and, for experts only, attention) ignored.
    const json config = json::parse(readFile(out + "/config.json"))["quantization_config"];
    EXPECT_EQ(config["quant_method"], "compressed-tensors");
    EXPECT_EQ(config["format"], "pack-quantized");
    EXPECT_EQ(config["quantization_status"], "compressed");
    const auto sums = moduleSums(model);
    size_t targets = 0;
    for (const auto &[group, scheme] : config["config_groups"].items()) {
      targets += scheme["targets"].size();
      EXPECT_EQ(scheme["weights"]["num_bits"], 4);
      EXPECT_EQ(scheme["weights"]["symmetric"], std::string(name) == "sym");
    }
    EXPECT_EQ(targets, sums.size());
    EXPECT_EQ(config["ignore"].size(), golden[name]["ignore"].get<size_t>());
    EXPECT_NE(std::find(config["ignore"].begin(), config["ignore"].end(), "lm_head"), config["ignore"].end());

    // The numpy decoding of the same export holds the module's values.
    ASSERT_EQ(golden[name]["modules"].size(), sums.size());
    auto file = SafetensorsFile::open(out + "/model.safetensors");
    ASSERT_TRUE(file.ok());
    for (const auto &[module, sum] : sums) {
      const json &expected = golden[name]["modules"].at(module);
      EXPECT_NE((*file)->find(module + ".weight_packed"), nullptr) << module;
      if (std::string(name) == "sym") {
        EXPECT_NEAR(sum.first, expected["sum"].get<double>(), 1e-6 * (1 + std::sqrt(sum.second))) << module;
        EXPECT_NEAR(sum.second, expected["sum_squares"].get<double>(), 1e-9 * sum.second) << module;
      } else {
        // Requantized with compressed-tensors' min-max rule: close, not equal.
        EXPECT_NEAR(sum.second, expected["sum_squares"].get<double>(), 0.02 * sum.second) << module;
      }
    }
  }
}

// Packing follows compressed-tensors: element i of a row at bits
// [i*b, (i+1)*b), offset by 2^(b-1), straddling words when b does not
// divide 32.
TEST(CompressedTensors, PackingIsTheFormatsBitStream) {
  std::vector<int32_t> four = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
  std::vector<int32_t> packed = packInt32(four, 1, 16, 4);
  ASSERT_EQ(packed.size(), 2u);
  EXPECT_EQ(static_cast<uint32_t>(packed[0]), 0x76543210u);
  EXPECT_EQ(static_cast<uint32_t>(packed[1]), 0xfedcba98u);
  packed = packInt32({-128, 0, 127, 1}, 1, 4, 8);
  EXPECT_EQ(static_cast<uint32_t>(packed[0]), 0x81ff8000u);
  // Three bits: eleven values straddle the first word boundary.
  std::vector<int32_t> three(11, 3); // stored 7 = 0b111 each
  packed = packInt32(three, 1, 11, 3);
  ASSERT_EQ(packed.size(), 2u);
  EXPECT_EQ(static_cast<uint32_t>(packed[0]), 0xffffffffu);
  EXPECT_EQ(static_cast<uint32_t>(packed[1]), 0x1u);
}
