//===- GgufExportTest.cpp - Modules as llama.cpp GGUF files ---------------===//
//
// Part of moec. moec's GGUF exports of the fixtures are read back and
// compared with what the Python gguf package read from the same exports
// (tests/data/gguf/golden.json, scripts/fixtures/gguf_crosscheck.py), and
// tensor by tensor with the module they came from: lossless formats and
// float tensors exactly (Q/K rows un-permuted, experts unstacked), merged
// experts in every member's slot, atom-pruned experts zero-padded.
// llama.cpp's own perplexity on these exports is in BENCHMARKS.md.
//
//===----------------------------------------------------------------------===//

#include "moe/Exporter/GgufExport.h"
#include "moe/Calibration/Statistics.h"
#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Importer/Importer.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/Gguf.h"
#include "moe/Runtime/Model.h"
#include "moe/Transforms/Passes.h"

#include "../unit/TestSupport.h"
#include "common/GgmlFormats.h"
#include "common/QuantFormat.h"

#include "mlir/IR/MLIRContext.h"
#include "mlir/Pass/PassManager.h"
#include "mlir/Pass/PassRegistry.h"

#include <nlohmann/json.hpp>

#include <cmath>

using namespace moe;
using namespace moe::testing;
using json = nlohmann::json;

namespace {

struct Exported {
  mlir::MLIRContext context;
  mlir::OwningOpRef<mlir::ModuleOp> module;
  ModelDescription description;
  std::unique_ptr<GgufFile> gguf;
  std::vector<std::string> remarks;
  Status status = Status::success();
};

/// Imports `fixture`, runs `pipeline` (if any), lowers and exports to `path`.
std::unique_ptr<Exported> exportFixture(const std::string &fixture, const std::string &pipeline, const TempDir &dir,
                                        const std::string &name, GgufExportOptions options = {}) {
  registerMoePasses();
  auto out = std::make_unique<Exported>();
  auto imported = importCheckpoint(dataDir() + "/fixtures/" + fixture, dir.file(name + ".moestore"), out->context);
  EXPECT_TRUE(imported.ok()) << imported.status().message();
  out->module = std::move(imported->module);
  if (!pipeline.empty()) {
    mlir::PassManager manager(&out->context);
    EXPECT_TRUE(mlir::succeeded(mlir::parsePassPipeline(pipeline, manager.nest<ir::ModelOp>())));
    EXPECT_TRUE(mlir::succeeded(manager.run(*out->module)));
  }
  auto model = findModel(*out->module);
  EXPECT_TRUE(model.ok());
  auto description = lowerToDescription(*model, dir.path());
  EXPECT_TRUE(description.ok()) << description.status().message();
  out->description = *description;
  auto assets = readGgufAssets(out->description);
  EXPECT_TRUE(assets.ok());
  out->status = exportGguf(out->description, *assets, name, dir.file(name + ".gguf"), options, out->remarks);
  if (out->status.ok()) {
    auto file = GgufFile::open(dir.file(name + ".gguf"));
    EXPECT_TRUE(file.ok()) << file.status().message();
    out->gguf = file.take();
  }
  return out;
}

/// A GGUF tensor's values, [rows, ne0] for each of its ne[2] slices.
std::vector<float> values(const GgufFile &file, const std::string &name) {
  const GgufTensorInfo *info = file.tensor(name);
  EXPECT_NE(info, nullptr) << name;
  if (!info)
    return {};
  std::vector<float> out(static_cast<size_t>(info->elements()));
  quant::ggmlDequantizeRow(info->type, file.data(*info), info->elements(), out.data());
  return out;
}

/// The module's values of a tensor (codes dequantised).
std::vector<float> moduleValues(const ModelDescription &description, const TensorRef &ref) {
  TensorReader reader(description);
  DType dtype;
  std::vector<uint8_t> bytes;
  EXPECT_TRUE(reader.read(ref, dtype, bytes).ok());
  std::vector<float> out(static_cast<size_t>(ref.shape[0] * (ref.shape.size() > 1 ? ref.shape[1] : 1)));
  if (!ref.format.empty())
    quant::dequantizeReference(*quant::parseQuantFormat(ref.format), bytes.data(), ref.shape[0], ref.shape[1],
                               out.data());
  else
    EXPECT_TRUE(convertToF32(dtype, bytes.data(), out.size(), out.data()).ok());
  return out;
}

const TensorRef &roleOf(const LayerEntry &layer, TensorRole role) {
  for (const auto &[r, ref] : layer.tensors)
    if (r == role)
      return ref;
  ADD_FAILURE() << "no role " << tensorRoleName(role);
  return layer.tensors.front().second;
}

} // namespace

// What moec wrote is what the Python gguf package read from the same
// exports (metadata, tensor types, dimensions, value sums).
TEST(GgufExport, MatchesWhatPythonGgufReads) {
  const json golden = json::parse(readFile(dataDir() + "/gguf/golden.json"));
  TempDir dir;
  const std::pair<const char *, std::pair<const char *, const char *>> cases[] = {
      {"mixtral", {"tiny-mixtral", ""}},
      {"mixtral-q4_0", {"tiny-mixtral", "moe-quantize{bits=4 group=32 sym=true}"}},
      {"deepseek", {"tiny-deepseek", ""}},
      {"deepseek-q8_0", {"tiny-deepseek", "moe-quantize{bits=8 group=32 sym=true targets=all}"}},
  };
  for (const auto &[name, input] : cases) {
    auto exported = exportFixture(input.first, input.second, dir, name);
    ASSERT_TRUE(exported->status.ok()) << exported->status.message();
    const json &expected = golden.at(name);
    const GgufFile &file = *exported->gguf;
    for (const auto &[key, value] : expected["keys"].items()) {
      const GgufValue *got = file.find(key);
      ASSERT_NE(got, nullptr) << name << ": " << key;
      if (value.is_string())
        EXPECT_EQ(got->text, value.get<std::string>()) << key;
      else if (value.is_boolean())
        EXPECT_EQ(got->integer, value.get<bool>() ? 1 : 0) << key;
      else if (got->type == GgufType::Array)
        EXPECT_EQ(got->size(), value.get<size_t>()) << key;
      else if (got->type == GgufType::F32)
        EXPECT_FLOAT_EQ(static_cast<float>(got->real), value.get<float>()) << key;
      else
        EXPECT_EQ(got->integer, value.get<int64_t>()) << key;
    }
    ASSERT_EQ(file.tensors().size(), expected["tensors"].size()) << name;
    for (const GgufTensorInfo &info : file.tensors()) {
      const json &tensor = expected["tensors"].at(info.name);
      EXPECT_EQ(quant::ggmlTraits(info.type)->ggmlName, tensor["type"].get<std::string>()) << info.name;
      EXPECT_EQ(info.ne, tensor["ne"].get<std::vector<int64_t>>()) << info.name;
      double sum = 0, squares = 0;
      for (float v : values(file, info.name)) {
        sum += v;
        squares += static_cast<double>(v) * v;
      }
      const double scale = 1e-6 * (1.0 + std::sqrt(tensor["sum_squares"].get<double>()));
      EXPECT_NEAR(sum, tensor["sum"].get<double>(), scale) << name << ": " << info.name;
      EXPECT_NEAR(squares, tensor["sum_squares"].get<double>(), 1e-6 * (1.0 + squares)) << name << ": " << info.name;
    }
  }
}

// Lossless formats are the module's values exactly: Q4_0 experts slice by
// slice, and llama's Q/K rows are the module's rows interleaved per head.
TEST(GgufExport, TensorsAreTheModulesValues) {
  TempDir dir;
  auto exported =
      exportFixture("tiny-mixtral", "moe-quantize{bits=4 group=32 sym=true targets=experts,attention}", dir, "m");
  ASSERT_TRUE(exported->status.ok()) << exported->status.message();
  const ModelDescription &d = exported->description;
  const GgufFile &file = *exported->gguf;
  EXPECT_EQ(file.tensor("blk.0.ffn_gate_exps.weight")->type, quant::GgmlType::Q4_0);
  EXPECT_EQ(file.tensor("blk.0.attn_q.weight")->type, quant::GgmlType::Q4_0);
  for (size_t l = 0; l < d.layers.size(); ++l) {
    const LayerEntry &layer = d.layers[l];
    const std::string blk = "blk." + std::to_string(l) + ".";
    const std::vector<float> gate = values(file, blk + "ffn_gate_exps.weight");
    const std::vector<float> down = values(file, blk + "ffn_down_exps.weight");
    for (size_t e = 0; e < layer.experts.size(); ++e) {
      const std::vector<float> g = moduleValues(d, layer.experts[e].gate);
      const std::vector<float> dn = moduleValues(d, layer.experts[e].down);
      EXPECT_TRUE(std::equal(g.begin(), g.end(), gate.begin() + e * g.size())) << "layer " << l << " expert " << e;
      EXPECT_TRUE(std::equal(dn.begin(), dn.end(), down.begin() + e * dn.size())) << "layer " << l << " expert " << e;
    }
    const TensorRef &q = roleOf(layer, TensorRole::QueryProj);
    const std::vector<float> moduleQ = moduleValues(d, q), fileQ = values(file, blk + "attn_q.weight");
    const int64_t rows = q.shape[0], cols = q.shape[1], heads = d.spec.attention.numHeads, hd = rows / heads;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < hd / 2; ++i)
        for (int64_t j = 0; j < 2; ++j)
          ASSERT_TRUE(std::equal(moduleQ.begin() + (h * hd + j * hd / 2 + i) * cols,
                                 moduleQ.begin() + (h * hd + j * hd / 2 + i + 1) * cols,
                                 fileQ.begin() + (h * hd + 2 * i + j) * cols))
              << "layer " << l << " head " << h << " row " << i;
  }
  // DeepSeek's MLA, the shared experts and the dense layer keep their rows.
  TempDir other;
  auto deepseek = exportFixture("tiny-deepseek", "", other, "d");
  ASSERT_TRUE(deepseek->status.ok()) << deepseek->status.message();
  const LayerEntry &layer = deepseek->description.layers[1];
  EXPECT_EQ(moduleValues(deepseek->description, roleOf(layer, TensorRole::KvUpProj)),
            values(*deepseek->gguf, "blk.1.attn_kv_b.weight"));
  EXPECT_EQ(moduleValues(deepseek->description, roleOf(layer, TensorRole::SharedDown)),
            values(*deepseek->gguf, "blk.1.ffn_down_shexp.weight"));
  EXPECT_EQ(deepseek->gguf->find("deepseek2.leading_dense_block_count")->integer, 1);
  EXPECT_NE(deepseek->gguf->tensor("blk.0.ffn_gate.weight"), nullptr);
}

// Atom-pruned experts are padded with zero neurons to the widest; a format
// that is no ggml type is requantized with a remark, and one whose groups
// are whole ggml blocks (q4_g128_asym: four Q4_1 blocks a group) is not.
TEST(GgufExport, AtomPrunedExpertsArePaddedWithZeroNeurons) {
  TempDir dir;
  auto exported = exportFixture("tiny-mixtral", "moe-prune-atoms{method=magnitude ratio=0.3 scope=global}", dir, "p");
  ASSERT_TRUE(exported->status.ok()) << exported->status.message();
  const ModelDescription &d = exported->description;
  const GgufTensorInfo *gate = exported->gguf->tensor("blk.0.ffn_gate_exps.weight");
  const int64_t width = gate->ne[1], hidden = gate->ne[0];
  EXPECT_EQ(width % 32, 0);
  EXPECT_EQ(exported->gguf->find("llama.feed_forward_length")->integer, width);
  int checked = 0;
  for (size_t l = 0; l < d.layers.size(); ++l) {
    const std::string blk = "blk." + std::to_string(l) + ".";
    const std::vector<float> gates = values(*exported->gguf, blk + "ffn_gate_exps.weight");
    const std::vector<float> downs = values(*exported->gguf, blk + "ffn_down_exps.weight");
    for (size_t e = 0; e < d.layers[l].experts.size(); ++e) {
      const ExpertEntry &expert = d.layers[l].experts[e];
      const std::vector<float> g = moduleValues(d, expert.gate), dn = moduleValues(d, expert.down);
      const float *slice = gates.data() + e * width * hidden;
      ASSERT_TRUE(std::equal(g.begin(), g.end(), slice));
      EXPECT_TRUE(std::all_of(slice + g.size(), slice + width * hidden, [](float v) { return v == 0.0f; }));
      const float *downSlice = downs.data() + e * width * hidden;
      for (int64_t r = 0; r < hidden; ++r)
        for (int64_t c = 0; c < width; ++c)
          ASSERT_EQ(downSlice[r * width + c], c < expert.width ? dn[r * expert.width + c] : 0.0f);
      checked += expert.width < width;
    }
  }
  EXPECT_GT(checked, 0) << "some experts were narrower than the widest";
  TempDir again;
  auto requantized = exportFixture("tiny-mixtral", "moe-quantize{bits=3 group=64}", again, "r");
  ASSERT_TRUE(requantized->status.ok());
  bool said = false;
  for (const std::string &remark : requantized->remarks)
    said |= remark.find("blk.0.ffn_gate_exps.weight: q3_g64_asym is no ggml type: requantized to Q4_0") !=
            std::string::npos;
  EXPECT_TRUE(said);
  TempDir third;
  auto split = exportFixture("tiny-mixtral", "moe-quantize{bits=4 group=128 targets=experts}", third, "s");
  ASSERT_TRUE(split->status.ok());
  EXPECT_TRUE(split->remarks.empty()) << split->remarks.front();
  EXPECT_EQ(split->gguf->tensor("blk.0.ffn_up_exps.weight")->type, quant::GgmlType::Q4_1);
  const std::vector<float> up = values(*split->gguf, "blk.0.ffn_up_exps.weight");
  const std::vector<float> expected = moduleValues(split->description, split->description.layers[0].experts[3].up);
  EXPECT_TRUE(std::equal(expected.begin(), expected.end(), up.begin() + 3 * expected.size()));
}

// Merged experts (M-SMoE) are written into each router slot they serve;
// what GGUF cannot hold is refused with the reason.
TEST(GgufExport, MergedExpertsFillTheirMembersSlotsOrAreRefused) {
  TempDir dir;
  auto model = loadModel(dataDir() + "/fixtures/tiny-mixtral");
  ASSERT_TRUE(model.ok());
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  CalibrationOptions calibration;
  calibration.maxTokens = 1024;
  auto stats = calibrate(*model->engine, *streams, calibration);
  ASSERT_TRUE(stats.ok());
  ASSERT_TRUE(writeStatistics(*stats, calibration, dir.file("stats.safetensors")).ok());
  const std::string merge = "moe-merge-experts{stats=" + dir.file("stats.safetensors") + " groups=6}";
  auto exported = exportFixture("tiny-mixtral", merge, dir, "merged");
  ASSERT_TRUE(exported->status.ok()) << exported->status.message();
  const ModelDescription &d = exported->description;
  EXPECT_EQ(exported->gguf->find("llama.expert_count")->integer, 8);
  for (size_t l = 0; l < d.layers.size(); ++l) {
    const LayerEntry &layer = d.layers[l];
    ASSERT_EQ(layer.routing.remap.size(), 8u);
    const std::vector<float> up = values(*exported->gguf, "blk." + std::to_string(l) + ".ffn_up_exps.weight");
    for (size_t row = 0; row < 8; ++row) {
      const std::vector<float> expected = moduleValues(d, layer.experts[layer.routing.remap[row]].up);
      EXPECT_TRUE(std::equal(expected.begin(), expected.end(), up.begin() + row * expected.size()))
          << "layer " << l << " row " << row;
    }
  }
  GgufExportOptions refuse;
  refuse.expandMerged = false;
  auto refused = exportFixture("tiny-mixtral", merge, dir, "refused", refuse);
  EXPECT_FALSE(refused->status.ok());
  EXPECT_NE(refused->status.message().find("merged experts (a router remap table)"), std::string::npos)
      << refused->status.message();
  EXPECT_FALSE(std::filesystem::exists(dir.file("refused.gguf")));

  auto dropped = exportFixture("tiny-mixtral", "moe-drop-experts{experts=0:1}", dir, "dropped");
  EXPECT_FALSE(dropped->status.ok());
  EXPECT_NE(dropped->status.message().find("routes to 8 experts but an earlier layer to 7"), std::string::npos)
      << dropped->status.message();
}

// The round trip module -> GGUF -> engine: moec runs its own GGUF files (the
// config and tokenizer travel in moec.* keys) as it runs the module: the
// same perplexity for bf16 and ggml-format tensors, within 0.1% where moec's
// integer kernels met a lossless conversion.
TEST(GgufExport, RunsInMoecAsTheModuleDoes) {
  TempDir dir;
  const std::pair<const char *, std::pair<const char *, double>> cases[] = {
      {"tiny-mixtral", {"", 0.0}},
      {"tiny-deepseek", {"moe-quantize{format=q4_0 targets=all}", 0.0}},
      {"tiny-mixtral", {"moe-quantize{bits=8 group=32 sym=true targets=all}", 1e-3}},
  };
  int index = 0;
  for (const auto &[fixture, run] : cases) {
    const std::string name = "e" + std::to_string(index++);
    auto exported = exportFixture(fixture, run.first, dir, name);
    ASSERT_TRUE(exported->status.ok()) << exported->status.message();
    auto fromModule = loadDescribedModel(exported->description);
    auto fromGguf = loadModel(dir.file(name + ".gguf"));
    ASSERT_TRUE(fromModule.ok() && fromGguf.ok()) << fromGguf.status().message();
    auto streams = readEvalData(dataDir() + "/brown/heldout.jsonl", fromGguf->tokenizer.get(), fromGguf->endOfText);
    ASSERT_TRUE(streams.ok());
    EvalOptions options;
    options.maxTokens = 512;
    auto a = evaluate(*fromModule->engine, *streams, options), b = evaluate(*fromGguf->engine, *streams, options);
    ASSERT_TRUE(a.ok() && b.ok());
    const double pa = a->overall.perplexity(), pb = b->overall.perplexity();
    if (run.second == 0.0)
      EXPECT_EQ(pa, pb) << fixture << " " << run.first;
    else
      EXPECT_LT(std::fabs(pa - pb) / pa, run.second) << fixture << " " << run.first << ": " << pa << " vs " << pb;
  }
  // A GGUF file without moec's keys is refused with the reason.
  GgufWriter writer;
  writer.set("general.architecture", GgufValue::string("llama"));
  ASSERT_TRUE(
      writer.write(dir.file("foreign.gguf"), [](size_t, std::vector<uint8_t> &) { return Status::success(); }).ok());
  auto foreign = loadModel(dir.file("foreign.gguf"));
  ASSERT_FALSE(foreign.ok());
  EXPECT_NE(foreign.status().message().find("no 'moec.config_json' key"), std::string::npos)
      << foreign.status().message();
}

// A SentencePiece-style tokenizer (BPE over "▁" words with byte fallback:
// Mixtral's, PhiMoE's) becomes llama.cpp's "llama" vocabulary: scores that
// order merges as BPE's ranks do, byte and unknown token types, the space
// prefix. (llama.cpp tokenizes the same text into the same windows:
// BENCHMARKS.md, bench/gguf_families.py.)
TEST(GgufExport, SentencePieceTokenizersBecomeLlamaVocabularies) {
  TempDir dir;
  auto exported = exportFixture("tiny-mixtral", "", dir, "m");
  ASSERT_TRUE(exported->status.ok());
  for (const char *style : {"sp-metaspace", "sp-legacy"}) {
    GgufAssets assets{readFile(dataDir() + "/tokenizers/" + std::string(style) + "/tokenizer.json"),
                      R"({"add_bos_token": false, "bos_token": "<s>", "eos_token": "</s>"})"};
    std::vector<std::string> remarks;
    const std::string path = dir.file(std::string(style) + ".gguf");
    ASSERT_TRUE(exportGguf(exported->description, assets, style, path, {}, remarks).ok());
    auto file = GgufFile::open(path);
    ASSERT_TRUE(file.ok());
    EXPECT_EQ((*file)->find("tokenizer.ggml.model")->text, "llama");
    EXPECT_EQ((*file)->find("tokenizer.ggml.unknown_token_id")->integer, 0);
    EXPECT_EQ((*file)->find("tokenizer.ggml.bos_token_id")->integer, 1);
    EXPECT_EQ((*file)->find("tokenizer.ggml.add_space_prefix")->integer, 1);
    const GgufValue *tokens = (*file)->find("tokenizer.ggml.tokens"),
                    *types = (*file)->find("tokenizer.ggml.token_type"),
                    *scores = (*file)->find("tokenizer.ggml.scores");
    ASSERT_TRUE(tokens && types && scores);
    EXPECT_EQ(scores->size(), 4096u);
    EXPECT_EQ(tokens->strings[3], "<0x00>");
    EXPECT_EQ(types->integers[3], 6); // BYTE
    EXPECT_EQ(types->integers[0], 2); // UNKNOWN
    EXPECT_EQ(types->integers[1], 3); // CONTROL
    // The first merge's piece scores 0, later merges lower.
    const json tokenizer = json::parse(assets.tokenizerJson);
    const json &first = tokenizer["model"]["merges"][0];
    const std::string piece = first.is_string() ? first.get<std::string>().erase(first.get<std::string>().find(' '), 1)
                                                : first[0].get<std::string>() + first[1].get<std::string>();
    const int64_t id = tokenizer["model"]["vocab"][piece].get<int64_t>();
    EXPECT_EQ(scores->reals[static_cast<size_t>(id)], 0.0);
    EXPECT_EQ(*std::max_element(scores->reals.begin(), scores->reals.end()), 0.0);
  }
}

// A GGUF file with moec's keys but a tensor missing or of the wrong shape is
// refused where it is read, naming the tensor.
TEST(GgufExport, GgufFilesWithMissingOrMisshapenTensorsAreRefused) {
  TempDir dir;
  auto exported = exportFixture("tiny-mixtral", "", dir, "m");
  ASSERT_TRUE(exported->status.ok());
  const GgufFile &good = *exported->gguf;
  auto rewrite = [&](const std::string &path, const std::string &skip, const std::string &reshape) {
    GgufWriter writer;
    for (const auto &[key, value] : good.keys())
      writer.set(key, value);
    std::vector<const GgufTensorInfo *> kept;
    for (const GgufTensorInfo &info : good.tensors()) {
      if (info.name == skip)
        continue;
      std::vector<int64_t> ne = info.ne;
      if (info.name == reshape)
        ne.back() -= 1;
      ASSERT_TRUE(writer.addTensor(info.name, ne, info.type).ok());
      kept.push_back(&info);
    }
    ASSERT_TRUE(writer
                    .write(path,
                           [&](size_t index, std::vector<uint8_t> &bytes) {
                             bytes.assign(good.data(*kept[index]),
                                          good.data(*kept[index]) + writer.tensors()[index].bytes);
                             return Status::success();
                           })
                    .ok());
  };
  rewrite(dir.file("missing.gguf"), "blk.1.attn_k.weight", "");
  auto missing = loadModel(dir.file("missing.gguf"));
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("missing.gguf: no tensor 'blk.1.attn_k.weight'"), std::string::npos)
      << missing.status().message();
  rewrite(dir.file("shape.gguf"), "", "blk.2.ffn_up_exps.weight");
  auto shape = loadModel(dir.file("shape.gguf"));
  ASSERT_FALSE(shape.ok());
  EXPECT_NE(shape.status().message().find("'blk.2.ffn_up_exps.weight' is missing or not {160, 160, 8}"),
            std::string::npos)
      << shape.status().message();
}
