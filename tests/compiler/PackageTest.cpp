//===- PackageTest.cpp - .moepkg: parity, determinism, bad input ----------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Package.h"
#include "common/RowTiles.h"
#include "moe/Frontend/Checkpoint.h"
#include "moe/Importer/Importer.h"
#include "moe/Lowering/Emit.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/Model.h"
#include "moe/Transforms/Passes.h"

#include "../unit/TestSupport.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/Pass/PassManager.h"
#include "mlir/Pass/PassRegistry.h"

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include <functional>

#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>

using namespace moe;
using namespace moe::testing;

namespace {

/// Imports a fixture, runs `pipeline`, and emits `package`.
void buildPackage(const std::string &fixture, const std::string &pipeline, const std::string &store,
                  const std::string &package, std::string *moduleConfigText = nullptr) {
  registerMoePasses();
  const std::string directory = dataDir() + "/fixtures/" + fixture;
  std::string configText = readFile(directory + "/config.json");
  auto spec = ModelSpec::fromConfigText(configText, "config.json");
  auto checkpoint = Checkpoint::open(directory);
  ASSERT_TRUE(bindCheckpoint(*spec, **checkpoint).ok());
  mlir::MLIRContext context;
  auto module = importModel(context, *spec, **checkpoint, configText, store);
  ASSERT_TRUE(module.ok());
  mlir::PassManager manager(&context);
  ASSERT_TRUE(mlir::succeeded(mlir::parsePassPipeline(pipeline, manager.nest<moe::ir::ModelOp>())));
  ASSERT_TRUE(mlir::succeeded(manager.run(**module)));
  ir::ModelOp model = *(**module).getOps<ir::ModelOp>().begin();
  Status status = emitPackage(model, "", package, "{\"test\": true}");
  ASSERT_TRUE(status.ok()) << status.message();
}

std::vector<uint8_t> readBytes(const std::string &path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

void writeBytes(const std::string &path, const std::vector<uint8_t> &bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char *>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

/// Held-out perplexity of `model`, tokenized by `text`'s tokenizer.
double heldOutPerplexity(LoadedModel &model, const LoadedModel &text) {
  auto streams = readEvalData(dataDir() + "/brown/heldout.jsonl", text.tokenizer.get(), text.endOfText);
  EXPECT_TRUE(streams.ok());
  auto result = evaluate(*model.engine, *streams, EvalOptions{256, 0, 512});
  EXPECT_TRUE(result.ok());
  return result->overall.perplexity();
}

/// Logits of a short prompt decoded token by token (the integer GEMV path).
std::vector<float> decodeLogits(LoadedModel &model) {
  const std::vector<int32_t> ids = {5, 300, 17, 2000, 42, 9, 77, 1500};
  KvCache cache = model.engine->newCache();
  std::vector<float> logits, all;
  for (int32_t id : ids) {
    EXPECT_TRUE(model.engine->forward(std::span<const int32_t>(&id, 1), cache, logits).ok());
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

/// Files left under a temporary name (`<output>.tmp.XXXXXX`) in `directory`.
int temporaryFilesIn(const std::string &directory) {
  int count = 0;
  for (const auto &entry : std::filesystem::directory_iterator(directory))
    count += entry.path().filename().string().find(".tmp.") != std::string::npos;
  return count;
}

} // namespace

TEST(Package, RunsAsTheSimulatedQuantizedModelOnBothFixtures) {
  for (const char *fixture : {"tiny-mixtral", "tiny-deepseek"}) {
    TempDir dir;
    buildPackage(fixture, "moe-quantize{bits=4 group=64 targets=all}", dir.file("m.moestore"), dir.file("q.moepkg"));
    auto packaged = loadModel(dir.file("q.moepkg"));
    ASSERT_TRUE(packaged.ok()) << packaged.status().message();
    ASSERT_NE(packaged->tokenizer, nullptr) << "the tokenizer travels in the package";
    auto opened = openPackage(dir.file("q.moepkg"));
    ASSERT_TRUE(opened.ok());
    opened->description.dequantizeQuantized = true;
    auto simulated = loadDescribedModel(opened->description);
    ASSERT_TRUE(simulated.ok());
    const double a = heldOutPerplexity(*packaged, *packaged), b = heldOutPerplexity(*simulated, *packaged);
    EXPECT_NEAR(a, b, 0.005 * b) << fixture;
    // Decode runs the integer kernels on q8 activations: close, not equal.
    std::vector<float> fast = decodeLogits(*packaged), exact = decodeLogits(*simulated);
    double worst = 0, scale = 0;
    for (size_t i = 0; i < fast.size(); ++i) {
      worst = std::max(worst, static_cast<double>(std::fabs(fast[i] - exact[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(exact[i])));
    }
    EXPECT_LT(worst, 0.02 * scale) << fixture;
    // Quantization changed the model, a little.
    auto original = loadModel(dataDir() + "/fixtures/" + fixture);
    const double c = heldOutPerplexity(*original, *packaged);
    EXPECT_GT(a, c * 1.0001);
    EXPECT_LT(a, c * 1.05);
  }
}

// Decode computes all of a token's experts and the shared expert in two
// parallel regions (gate and up of every expert, then every down); an
// observer makes the engine go expert by expert. Both give the same logits,
// bit for bit, for group formats of every width and for the bf16 original.
TEST(Package, DecodingAllExpertsAtOnceEqualsExpertByExpert) {
  EngineObserver passive;
  for (const char *fixture : {"tiny-mixtral", "tiny-deepseek"}) {
    auto check = [&](LoadedModel &model, const std::string &what) {
      std::vector<float> together = decodeLogits(model);
      model.engine->setObserver(&passive);
      std::vector<float> oneByOne = decodeLogits(model);
      model.engine->setObserver(nullptr);
      EXPECT_EQ(together, oneByOne) << fixture << " " << what;
    };
    auto original = loadModel(dataDir() + "/fixtures/" + fixture);
    ASSERT_TRUE(original.ok());
    check(*original, "bf16");
    for (const char *format : {"bits=4 group=32 sym=true", "bits=3 group=128", "bits=8 group=64 sym=true"}) {
      TempDir dir;
      buildPackage(fixture, std::string("moe-quantize{") + format + " targets=all}", dir.file("m.moestore"),
                   dir.file("q.moepkg"));
      auto packaged = loadModel(dir.file("q.moepkg"));
      ASSERT_TRUE(packaged.ok()) << packaged.status().message();
      check(*packaged, format);
    }
  }
}

// On the CPU the LayerCache lays 2- and 4-bit group matrices out in row
// tiles (kernels/common/RowTiles.h) when it loads a layer, where the kernels
// read those faster; the layer's bytes then count the tiles. Prefill and
// decode from tiles give the stored rows' logits up to summation order.
TEST(Package, RowTilesMadeAtLoadGiveTheStoredRowsLogits) {
  for (const char *fixture : {"tiny-mixtral", "tiny-deepseek"}) {
    TempDir dir;
    buildPackage(fixture, "moe-quantize{bits=4 group=32 sym=true targets=all}", dir.file("m.moestore"),
                 dir.file("q.moepkg"));
    EngineOptions untiled;
    untiled.rowTiles = false;
    auto tiled = loadModel(dir.file("q.moepkg")), stored = loadModel(dir.file("q.moepkg"), untiled);
    ASSERT_TRUE(tiled.ok() && stored.ok());
    std::vector<int32_t> prompt(40);
    for (size_t i = 0; i < prompt.size(); ++i)
      prompt[i] = static_cast<int32_t>((i * 7919 + 13) % 4000);
    auto run = [&](LoadedModel &model) {
      KvCache cache = model.engine->newCache();
      std::vector<float> logits, all;
      EXPECT_TRUE(model.engine->forward(prompt, cache, logits).ok()); // prefill: the GEMM
      all = logits;
      std::vector<float> decoded = decodeLogits(model); // decode: the GEMV
      all.insert(all.end(), decoded.begin(), decoded.end());
      return all;
    };
    const std::vector<float> fromTiles = run(*tiled), fromRows = run(*stored);
    ASSERT_EQ(fromTiles.size(), fromRows.size());
    // The same products in another order of float additions: equal within
    // 1e-4, except where an activation lies on an int8 rounding boundary and
    // moves one step in one engine (DESIGN.md): one position's logits may
    // then differ by more, never by much.
    const size_t vocabulary = static_cast<size_t>(tiled->spec.vocabSize);
    int64_t flipped = 0;
    for (size_t row = 0; row * vocabulary < fromTiles.size(); ++row) {
      bool near = true;
      for (size_t i = row * vocabulary; i < std::min((row + 1) * vocabulary, fromTiles.size()); ++i) {
        near &= std::fabs(fromTiles[i] - fromRows[i]) <= 1e-4 * (std::fabs(fromRows[i]) + 1.0);
        ASSERT_NEAR(fromTiles[i], fromRows[i], 2e-2 * (std::fabs(fromRows[i]) + 1.0)) << fixture << " logit " << i;
      }
      flipped += !near;
    }
    EXPECT_LE(flipped, 1) << fixture << ": positions whose logits differ by more than 1e-4";
    // The last layer (an MoE layer in both) as each engine holds it
    // (resident: get() only looks it up).
    const int64_t last = tiled->spec.numLayers - 1;
    auto layer = const_cast<LayerCache &>(tiled->engine->layerCache()).get(last);
    auto storedLayer = const_cast<LayerCache &>(stored->engine->layerCache()).get(last);
    ASSERT_TRUE(layer.ok() && storedLayer.ok());
    ASSERT_FALSE((*layer)->experts.empty() || (*storedLayer)->experts.empty()) << fixture;
    const Matrix &gate = (*layer)->experts[0].gate;
    ASSERT_TRUE(gate.quantFormat);
    EXPECT_EQ(static_cast<bool>(gate.rowTiles), quant::rowTilesHelp(*gate.quantFormat)) << fixture;
    EXPECT_FALSE((*storedLayer)->experts[0].gate.rowTiles) << fixture;
    if (gate.rowTiles)
      EXPECT_EQ(gate.bytes(), quant::rowTileLayout(*gate.quantFormat, gate.rows, gate.cols).totalBytes) << fixture;
  }
}

TEST(Package, NestedExpertsServeTwoBudgetsFromOneFile) {
  TempDir dir;
  buildPackage("tiny-mixtral", "moe-quantize{bits=4 group=32 nested-bits=2}", dir.file("n.moestore"),
               dir.file("n.moepkg"));
  buildPackage("tiny-mixtral", "moe-quantize{bits=4 group=32}", dir.file("p.moestore"), dir.file("p.moepkg"));
  buildPackage("tiny-mixtral", "moe-quantize{bits=2 group=32}", dir.file("l.moestore"), dir.file("l.moepkg"));
  // Without a budget every expert runs its 4-bit codes: the plain package's model.
  auto nested = loadModel(dir.file("n.moepkg")), plain = loadModel(dir.file("p.moepkg"));
  ASSERT_TRUE(nested.ok() && plain.ok()) << nested.status().message();
  EXPECT_FALSE(nested->nestedPrecisions);
  EXPECT_EQ(decodeLogits(*nested), decodeLogits(*plain));
  const double high = heldOutPerplexity(*nested, *nested);

  auto opened = openPackage(dir.file("n.moepkg"));
  ASSERT_TRUE(opened.ok());
  NestedPrecisions roomy = chooseNestedPrecisions(opened->description, uint64_t(1) << 40);
  EXPECT_EQ(roomy.nestedExperts, 32);
  EXPECT_TRUE(roomy.low.empty());
  EXPECT_EQ(roomy.bytes, roomy.highBytes);
  NestedPrecisions tight = chooseNestedPrecisions(opened->description, 0);
  EXPECT_EQ(tight.low.size(), 32u) << "nothing fits: every expert low";
  // Each expert going low saves 8 bytes a group of 32 (q4_g32_asym's 20, q2_g32_asym's 12).
  const int64_t H = nested->spec.hiddenSize, I = nested->spec.layers[0].expertIntermediateSize;
  const uint64_t expertSaving = static_cast<uint64_t>(8 * 3 * I * H / 32);
  EXPECT_EQ(tight.highBytes - tight.bytes, 32 * expertSaving);
  const uint64_t budget = tight.highBytes - 12 * expertSaving;
  NestedPrecisions middle = chooseNestedPrecisions(opened->description, budget);
  EXPECT_EQ(middle.low.size(), 12u);
  EXPECT_LE(middle.bytes, budget);

  // Under --max-memory the engine loads those experts' low part: 2-bit codes.
  EngineOptions options;
  options.nestedBudgetBytes = budget;
  auto mixed = loadModel(dir.file("n.moepkg"), options);
  ASSERT_TRUE(mixed.ok());
  ASSERT_TRUE(mixed->nestedPrecisions);
  EXPECT_EQ(mixed->nestedPrecisions->low, middle.low);
  ASSERT_EQ(mixed->notes.size(), 1u);
  EXPECT_NE(mixed->notes[0].find("nested experts: 12 of 32 at their low bits"), std::string::npos) << mixed->notes[0];
  for (int64_t l = 0; l < mixed->spec.numLayers; ++l) {
    auto layer = mixed->engine->layerWeights(l);
    ASSERT_TRUE(layer.ok());
    for (size_t e = 0; e < (*layer)->experts.size(); ++e)
      for (const Matrix *m : {&(*layer)->experts[e].gate, &(*layer)->experts[e].up, &(*layer)->experts[e].down}) {
        ASSERT_TRUE(m->quantFormat);
        EXPECT_EQ(m->quantFormat->bits, middle.low.count({l, static_cast<int64_t>(e)}) ? 2 : 4)
            << "layer " << l << " expert " << e;
      }
  }
  options.nestedBudgetBytes = 1;
  auto low = loadModel(dir.file("n.moepkg"), options);
  // The layer-streaming budget alone (moec compress under --max-memory) keeps every expert high.
  EngineOptions streaming;
  streaming.maxMemoryBytes = 1;
  auto streamed = loadModel(dir.file("n.moepkg"), streaming);
  ASSERT_TRUE(streamed.ok());
  EXPECT_FALSE(streamed->nestedPrecisions);
  EXPECT_EQ(decodeLogits(*streamed), decodeLogits(*plain));
  auto direct = loadModel(dir.file("l.moepkg"));
  ASSERT_TRUE(low.ok() && direct.ok());
  const double between = heldOutPerplexity(*mixed, *mixed), lowest = heldOutPerplexity(*low, *low),
               twoBits = heldOutPerplexity(*direct, *direct);
  EXPECT_LT(high, between);
  EXPECT_LT(between, lowest);
  EXPECT_LT(lowest, 1.25 * twoBits) << "the nested 2 bits against RTN at 2 bits: " << lowest << " vs " << twoBits;

  // HOBBIT's fallback from the nested low parts: with every missing expert
  // falling back (below 1), nothing is ever loaded whole, so the model is
  // the all-low one, bit for bit.
  EngineOptions offload;
  offload.expertCacheBytes = 1 << 20;
  offload.expertFallbackNested = true;
  offload.expertFallbackBelow = 1;
  auto fallback = loadModel(dir.file("n.moepkg"), offload);
  ASSERT_TRUE(fallback.ok()) << fallback.status().message();
  EXPECT_EQ(decodeLogits(*fallback), decodeLogits(*low));
  EXPECT_EQ(fallback->engine->expertCache()->counters().misses, 0);
  EXPECT_GT(fallback->engine->expertCache()->counters().fallbacks, 0);
  // A package without nested matrices has no low parts to fall back to.
  auto refused = loadModel(dir.file("p.moepkg"), offload);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("q4_g32_asym, not nested"), std::string::npos)
      << refused.status().message();
}

TEST(Package, TheSameModuleGivesTheSameBytes) {
  TempDir dir;
  buildPackage("tiny-mixtral", "moe-set-topk{top-k=2},moe-quantize{bits=3 group=32 sym=true}", dir.file("a.moestore"),
               dir.file("a.moepkg"));
  buildPackage("tiny-mixtral", "moe-set-topk{top-k=2},moe-quantize{bits=3 group=32 sym=true}", dir.file("b.moestore"),
               dir.file("b.moepkg"));
  EXPECT_EQ(readBytes(dir.file("a.moepkg")), readBytes(dir.file("b.moepkg")));
  EXPECT_EQ(temporaryFilesIn(dir.path()), 0);
  std::vector<uint8_t> bytes = readBytes(dir.file("a.moepkg"));
  PackageHeader header;
  std::memcpy(&header, bytes.data(), sizeof(header));
  EXPECT_EQ(header.dataOffset % kPackageAlignment, 0u);
  EXPECT_EQ(header.fileBytes, bytes.size());
}

/// Bytes of `path` that this process's mappings hold resident
/// (/proc/self/smaps); none when no mapping of it is found.
std::optional<uint64_t> residentBytesOf(const std::string &path) {
  std::ifstream smaps("/proc/self/smaps");
  const std::string canonical = std::filesystem::canonical(path).string();
  std::string line;
  bool inside = false, found = false;
  uint64_t total = 0;
  while (std::getline(smaps, line)) {
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) && line.find('-') != std::string::npos &&
        line.find(':') > line.find(' ')) {
      inside = line.size() >= canonical.size() &&
               line.compare(line.size() - canonical.size(), std::string::npos, canonical) == 0;
      found = found || inside;
    } else if (inside && line.rfind("Rss:", 0) == 0) {
      total += std::stoull(line.substr(4)) * 1024;
    }
  }
  if (!found)
    return std::nullopt;
  return total;
}

// Opening a package reads every blob once (its checksum) and leaves the
// pages it read non-resident: what the engine uses it maps back in, so
// opening a package larger than memory (or reopening the one `moec
// compress --max-memory` just wrote) costs its manifest, not its size.
TEST(Package, OpeningReleasesThePagesItChecked) {
  TempDir dir;
  buildPackage("tiny-mixtral", "moe-set-topk{top-k=2}", dir.file("a.moestore"), dir.file("a.moepkg"));
  const uint64_t size = std::filesystem::file_size(dir.file("a.moepkg"));
  ASSERT_GT(size, 4u << 20);
  Expected<OpenedPackage> opened = openPackage(dir.file("a.moepkg"));
  ASSERT_TRUE(opened) << opened.status().message();
  const std::optional<uint64_t> resident = residentBytesOf(dir.file("a.moepkg"));
  ASSERT_TRUE(resident.has_value()) << "no mapping of the package in /proc/self/smaps";
  EXPECT_LT(*resident, size / 10) << *resident << " of " << size << " bytes resident after opening";
  // The package still runs: the engine faults in what it reads.
  Expected<LoadedModel> loaded = loadModel(dir.file("a.moepkg"));
  ASSERT_TRUE(loaded) << loaded.status().message();
  EXPECT_TRUE(std::isfinite(decodeLogits(*loaded).back()));
}

TEST(Package, BadInputIsNamedAndNeverRuns) {
  TempDir dir;
  buildPackage("tiny-deepseek", "moe-quantize{bits=4 group=64}", dir.file("m.moestore"), dir.file("good.moepkg"));
  const std::vector<uint8_t> good = readBytes(dir.file("good.moepkg"));
  PackageHeader header;
  std::memcpy(&header, good.data(), sizeof(header));
  auto expectOpenError = [&](const std::vector<uint8_t> &bytes, std::initializer_list<std::string> fragments) {
    writeBytes(dir.file("bad.moepkg"), bytes);
    expectErrorContains(openPackage(dir.file("bad.moepkg")).status(), fragments);
    EXPECT_FALSE(loadModel(dir.file("bad.moepkg")).ok());
  };
  // Truncated: inside the header, and missing the tail.
  expectOpenError(std::vector<uint8_t>(good.begin(), good.begin() + 40), {"truncated", "64-byte package header"});
  expectOpenError(std::vector<uint8_t>(good.begin(), good.end() - 300), {"truncated or extended"});
  // A flipped byte in a tensor blob, and in the manifest.
  std::vector<uint8_t> flipped = good;
  flipped[good.size() - 1000] ^= 0x10;
  expectOpenError(flipped, {"checksum mismatch", "corrupted"});
  flipped = good;
  flipped[header.manifestOffset + 10] ^= 0x01;
  expectOpenError(flipped, {"manifest checksum mismatch"});
  // Wrong magic and version.
  std::vector<uint8_t> patched = good;
  patched[0] = 'X';
  expectOpenError(patched, {"not a moec package"});
  patched = good;
  uint32_t version = 7;
  std::memcpy(patched.data() + 8, &version, 4);
  expectOpenError(patched, {"package version 7", "reads version 1"});
  // An unknown quantization format, with a manifest checksum that matches.
  patched = good;
  std::string manifest(reinterpret_cast<const char *>(patched.data() + header.manifestOffset), header.manifestBytes);
  size_t at = manifest.find("q4_g64_asym");
  ASSERT_NE(at, std::string::npos);
  manifest.replace(at, 11, "q9_g64_asym");
  std::memcpy(patched.data() + header.manifestOffset, manifest.data(), manifest.size());
  uint64_t hash = XXH64(manifest.data(), manifest.size(), 0);
  std::memcpy(patched.data() + offsetof(PackageHeader, manifestHash), &hash, 8);
  expectOpenError(patched, {"unknown format 'q9_g64_asym'"});
  // Not a file at all.
  expectErrorContains(openPackage(dir.file("missing.moepkg")).status(), {"missing.moepkg", "cannot open"});
}

// Well-formed packages whose contents do not fit their config are rejected
// where the package is read (validateDescription), naming what is wrong,
// instead of running out of bounds or printing NaN.
TEST(Package, InconsistentManifestsAreRejectedOnLoad) {
  TempDir dir;
  buildPackage("tiny-deepseek", "moe-quantize{bits=4 group=64}", dir.file("m.moestore"), dir.file("good.moepkg"));
  const std::vector<uint8_t> good = readBytes(dir.file("good.moepkg"));
  PackageHeader header;
  std::memcpy(&header, good.data(), sizeof(header));
  const nlohmann::json manifest = nlohmann::json::parse(
      std::string(reinterpret_cast<const char *>(good.data() + header.manifestOffset), header.manifestBytes));
  // A MoE layer and the index of a role in a role list.
  size_t moeLayer = 0;
  while (manifest["layers"][moeLayer]["experts"].empty())
    ++moeLayer;
  auto roleIndex = [](const nlohmann::json &list, const std::string &role) {
    for (size_t i = 0; i < list.size(); ++i)
      if (list[i]["role"] == role)
        return i;
    ADD_FAILURE() << "no role " << role;
    return size_t(0);
  };
  auto expectRejected = [&](const std::function<void(nlohmann::json &)> &edit,
                            std::initializer_list<std::string> fragments) {
    nlohmann::json changed = manifest;
    edit(changed);
    std::string text = changed.dump();
    ASSERT_LE(sizeof(PackageHeader) + text.size(), header.dataOffset) << "the edit does not fit the manifest space";
    std::vector<uint8_t> bytes = good;
    std::memset(bytes.data() + sizeof(PackageHeader), 0, header.dataOffset - sizeof(PackageHeader));
    std::memcpy(bytes.data() + sizeof(PackageHeader), text.data(), text.size());
    PackageHeader patched = header;
    patched.manifestBytes = text.size();
    patched.manifestHash = XXH64(text.data(), text.size(), 0);
    std::memcpy(bytes.data(), &patched, sizeof(patched));
    writeBytes(dir.file("bad.moepkg"), bytes);
    expectErrorContains(openPackage(dir.file("bad.moepkg")).status(), fragments);
    EXPECT_FALSE(loadModel(dir.file("bad.moepkg")).ok());
  };
  // Unchanged, the rewritten package loads (the harness itself is sound).
  {
    std::string text = manifest.dump();
    ASSERT_EQ(text.size(), header.manifestBytes);
  }
  const std::string layer = concat("layer ", moeLayer);
  expectRejected(
      [&](nlohmann::json &m) {
        auto &list = m["layers"][moeLayer]["tensors"];
        auto &norm = list[roleIndex(list, "attention_norm")]["tensor"];
        auto &output = list[roleIndex(list, "o_proj")]["tensor"];
        std::swap(norm, output);
      },
      {"bad.moepkg", layer, "has shape", "needs"});
  expectRejected(
      [&](nlohmann::json &m) {
        auto &globals = m["globals"];
        auto &list = m["layers"][moeLayer]["tensors"];
        globals[roleIndex(globals, "embedding")]["tensor"] = list[roleIndex(list, "router")]["tensor"];
      },
      {"the model", "embedding", "has shape"});
  expectRejected(
      [&](nlohmann::json &m) {
        nlohmann::json config = nlohmann::json::parse(m["config"].get<std::string>());
        config["hidden_size"] = config["hidden_size"].get<int64_t>() + 32;
        m["config"] = config.dump();
      },
      {"has shape", "hidden_size"});
  expectRejected([&](nlohmann::json &m) { m["layers"][moeLayer]["router"]["top_k"] = 1000; },
                 {layer, "top-k 1000 must be between 1 and the router's"});
  expectRejected(
      [&](nlohmann::json &m) {
        auto &list = m["layers"][moeLayer]["tensors"];
        list.erase(roleIndex(list, "router"));
      },
      {layer, "no router tensor"});
  expectRejected(
      [&](nlohmann::json &m) {
        auto &list = m["layers"][0]["tensors"];
        list.erase(roleIndex(list, "o_proj"));
      },
      {"layer 0 has no o_proj tensor"});
  expectRejected([&](nlohmann::json &m) { m["layers"][moeLayer]["experts"][0]["id"] = -1; },
                 {layer, "expert id -1 is outside"});
  expectRejected([&](nlohmann::json &m) { m["layers"][moeLayer]["experts"][0]["id"] = 1000; },
                 {layer, "expert id 1000 is outside"});
  expectRejected(
      [&](nlohmann::json &m) { m["layers"][moeLayer]["experts"][1]["id"] = m["layers"][moeLayer]["experts"][0]["id"]; },
      {"appears twice"});
  expectRejected([&](nlohmann::json &m) { m["layers"][moeLayer]["skip_threshold"] = -0.5; },
                 {layer, "skip threshold -0.5 must be in [0, 1]"});
  expectRejected([&](nlohmann::json &m) { m["layers"][moeLayer]["num_experts"] = 3; }, {layer, "declares 3 experts"});
  // A recorded nested cost belongs on a nested matrix, finite and >= 0.
  const std::string gate = manifest["layers"][moeLayer]["experts"][0]["gate"].get<std::string>();
  expectRejected(
      [&](nlohmann::json &m) {
        m["tensors"][gate]["nested_cost"] = 1.5;
        m["provenance"] = nlohmann::json::object(); // room for the key in the manifest's space
      },
      {gate, "nested_cost 1.5; expected a finite number >= 0 on a nested matrix"});
}

// The rules of validateDescription the manifest test above does not reach,
// each on a description loaded from a real package.
TEST(Package, EveryDescriptionRuleNamesWhatIsWrong) {
  TempDir dir;
  buildPackage("tiny-deepseek", "moe-quantize{bits=4 group=64}", dir.file("m.moestore"), dir.file("p.moepkg"));
  auto package = openPackage(dir.file("p.moepkg"));
  ASSERT_TRUE(package.ok()) << package.status().message();
  const ModelDescription &good = package->description;
  ASSERT_TRUE(validateDescription(good, "p.moepkg").ok());
  size_t moe = 0, dense = 0;
  while (good.layers[moe].experts.empty())
    ++moe;
  while (!good.layers[dense].experts.empty())
    ++dense;
  auto tensorOf = [](const LayerEntry &layer, TensorRole role) {
    for (const auto &[r, tensor] : layer.tensors)
      if (r == role)
        return tensor;
    ADD_FAILURE() << "no " << tensorRoleName(role);
    return TensorRef();
  };
  auto expectInvalid = [&](const std::function<void(ModelDescription &)> &edit,
                           std::initializer_list<std::string> fragments) {
    ModelDescription changed = good;
    edit(changed);
    expectErrorContains(validateDescription(changed, "p.moepkg"), fragments);
  };
  const std::string layer = concat("layer ", moe);
  expectInvalid(
      [&](ModelDescription &d) { d.layers[moe].tensors.emplace_back(TensorRole::KeyProj, d.globals[0].second); },
      {"p.moepkg", layer, "has role k_proj, which a DeepseekV2ForCausalLM layer of this config does not have"});
  expectInvalid(
      [&](ModelDescription &d) {
        d.layers[moe].tensors.emplace_back(TensorRole::AttentionNorm,
                                           tensorOf(d.layers[moe], TensorRole::AttentionNorm));
      },
      {layer, "has two attention_norm tensors"});
  expectInvalid(
      [&](ModelDescription &d) {
        d.layers[moe].tensors.emplace_back(TensorRole::ExpertGate, d.layers[moe].experts[0].gate);
      },
      {"routed-expert role expert_gate outside the expert table"});
  expectInvalid(
      [&](ModelDescription &d) { d.layers[dense].experts.push_back(d.layers[moe].experts[0]); },
      {concat("layer ", dense, " is dense in the config but has routed experts, an experts' base or a router")});
  expectInvalid([&](ModelDescription &d) { d.layers[moe].experts.clear(); },
                {layer, "is an MoE layer with no routed experts"});
  // Factored experts (moe-factor-experts): a base only with factored
  // experts and the reverse, factors of consistent ranks, no base on a
  // dense layer.
  auto baseOf = [](const ExpertEntry &expert) {
    ExpertPart base;
    base.width = expert.width;
    base.gate = expert.gate;
    base.up = expert.up;
    base.down = expert.down;
    return base;
  };
  expectInvalid([&](ModelDescription &d) { d.layers[moe].expertBase = baseOf(d.layers[moe].experts[0]); },
                {layer, "is not factored, but the layer has a factored experts' base"});
  expectInvalid([&](ModelDescription &d) { d.layers[dense].expertBase = baseOf(d.layers[moe].experts[0]); },
                {concat("layer ", dense, " is dense in the config but has routed experts, an experts' base")});
  expectInvalid(
      [&](ModelDescription &d) {
        ExpertEntry &e = d.layers[moe].experts[0];
        e.lowRank = {e.gate, e.up, e.down};
      },
      {layer, "has low-rank factors, but the layer has no experts' base"});
  expectInvalid(
      [&](ModelDescription &d) {
        LayerEntry &l = d.layers[moe];
        l.expertBase = baseOf(l.experts[0]);
        for (ExpertEntry &e : l.experts)
          e.lowRank = {e.gate, e.up, e.down}; // right factors of a full-width "rank"
      },
      {layer, "the gate left factor", "expected [96, rank] with 1 <= rank <= 96"});
  expectInvalid(
      [&](ModelDescription &d) {
        LayerEntry &l = d.layers[moe];
        l.expertBase = baseOf(l.experts[0]);
        for (ExpertEntry &e : l.experts) {
          e.lowRank = {e.gate, e.up, e.down};
          e.gate.shape = {e.width, 4}; // a rank-4 left factor whose right factor is not [4, hidden]
          e.up.shape = {e.width, 4};
          e.down.shape = {d.spec.hiddenSize, 4};
        }
      },
      {layer, "its gate right factor tensor", "expected [4, "});
  expectInvalid([&](ModelDescription &d) { d.layers[moe].experts[0].width = 1; },
                {layer, "expert", "its gate tensor", "expected [1, "});
  expectInvalid([&](ModelDescription &d) { d.spec.layers[moe].expertIntermediateSize = 1; },
                {layer, "declares expert width 1 but an expert has"});
  expectInvalid(
      [&](ModelDescription &d) {
        d.layers[moe].routing.remap.assign(d.layers[moe].experts.size(), 0);
        d.layers[moe].routing.remap[1] = 99;
      },
      {layer, "remap entry 99 is not an expert slot"});
  expectInvalid([&](ModelDescription &d) { d.layers[moe].routing.remap = {0}; },
                {layer, "the router", "has shape", "1 remap entries"});
  expectInvalid(
      [&](ModelDescription &d) {
        RouterSpec &router = *d.layers[moe].routing.router;
        router.selection = ExpertSelection::GroupLimitedMax;
        router.numGroups = 3;
      },
      {layer, "router rows do not split into 3 groups"});
  expectInvalid([&](ModelDescription &d) { d.layers[moe].routing.router->topKGroups = 5; },
                {layer, "routing groups with 5 selected"});
  expectInvalid([&](ModelDescription &d) { d.layers[moe].routing.router->scalingFactor = std::nan(""); },
                {layer, "routed scaling nan must be a positive finite number"});
  expectInvalid([&](ModelDescription &d) { d.layers[moe].routing.router->correctionBias = true; },
                {layer, "uses a correction bias, and the layer has no correction-bias tensor"});
  expectInvalid([&](ModelDescription &d) { d.spec.hiddenSize += 8; }, {"disagrees with its config"});
  expectInvalid([&](ModelDescription &d) { d.layers.pop_back(); }, {"layers; its config has num_hidden_layers"});
}

// PhiMoE's sparsemixer picks exactly two experts; a description asking for
// another top-k (a fuzzer found a package that read past the chosen array)
// is rejected before it runs.
TEST(Package, SparsemixerRoutingNeedsTopTwo) {
  TempDir dir;
  const std::string directory = dataDir() + "/hf/phimoe";
  std::string configText = readFile(directory + "/config.json");
  auto spec = ModelSpec::fromConfigText(configText, "config.json");
  ASSERT_TRUE(spec.ok());
  auto checkpoint = Checkpoint::open(directory);
  ASSERT_TRUE(bindCheckpoint(*spec, **checkpoint).ok());
  mlir::MLIRContext context;
  auto module = importModel(context, *spec, **checkpoint, configText, dir.file("m.moestore"));
  ASSERT_TRUE(module.ok());
  ir::ModelOp model = *(**module).getOps<ir::ModelOp>().begin();
  Expected<ModelDescription> description = lowerToDescription(model, "");
  ASSERT_TRUE(description.ok()) << description.status().message();
  ModelDescription changed = *description;
  for (LayerEntry &layer : changed.layers)
    if (layer.routing.router)
      layer.routing.router->topK = 1;
  expectErrorContains(validateDescription(changed, "p.moepkg"),
                      {"p.moepkg", "sparsemixer routing selects exactly 2 experts; top-k is 1"});
}

// A split expert's parts must fit it: each part's matrices have its width,
// and the widths add up to the expert's.
TEST(Package, ExpertPartsThatDoNotFitAreNamed) {
  TempDir dir;
  buildPackage("tiny-deepseek", "moe-quantize{bits=4 group=64}", dir.file("m.moestore"), dir.file("p.moepkg"));
  auto package = openPackage(dir.file("p.moepkg"));
  ASSERT_TRUE(package.ok()) << package.status().message();
  auto loadLayer1 = [&](ModelDescription description) {
    LayerWeights weights;
    return makeDescriptionWeightProvider(std::move(description))->loadLayer(1, weights);
  };
  ASSERT_TRUE(loadLayer1(package->description).ok());
  ModelDescription wrongWidth = package->description;
  ExpertEntry &expert = wrongWidth.layers[1].experts[0];
  expert.moreParts.push_back({5, expert.gate, expert.up, expert.down}); // 96-row matrices
  expectErrorContains(loadLayer1(std::move(wrongWidth)), {"layer 1 expert 0: a part of width 5 has gate 96x160"});
  ModelDescription wrongTotal = package->description;
  ExpertEntry &whole = wrongTotal.layers[1].experts[0];
  whole.moreParts.push_back({whole.width, whole.gate, whole.up, whole.down});
  expectErrorContains(loadLayer1(std::move(wrongTotal)), {"its parts have 192 neurons, the expert 96"});
}

TEST(Package, AFailedWriteLeavesNothing) {
  TempDir dir;
  registerMoePasses();
  const std::string directory = dataDir() + "/fixtures/tiny-mixtral";
  std::string configText = readFile(directory + "/config.json");
  auto spec = ModelSpec::fromConfigText(configText, "config.json");
  auto checkpoint = Checkpoint::open(directory);
  ASSERT_TRUE(bindCheckpoint(*spec, **checkpoint).ok());
  mlir::MLIRContext context;
  auto module = importModel(context, *spec, **checkpoint, configText, dir.file("m.moestore"));
  ASSERT_TRUE(module.ok());
  ir::ModelOp model = *(**module).getOps<ir::ModelOp>().begin();
  // A tensor whose source file vanished: the emitter fails midway.
  std::filesystem::copy(directory, dir.file("copy"));
  model.setSourcesAttr(mlir::Builder(&context).getStrArrayAttr({dir.file("copy/model.safetensors")}));
  std::filesystem::remove(dir.file("copy/model.safetensors"));
  Status status = emitPackage(model, "", dir.file("out.moepkg"), "");
  EXPECT_FALSE(status.ok());
  EXPECT_FALSE(std::filesystem::exists(dir.file("out.moepkg")));
  EXPECT_EQ(temporaryFilesIn(dir.path()), 0);
}
