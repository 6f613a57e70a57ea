//===- Compress.cpp - Checkpoint to package in one call -------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Pipeline/Compress.h"
#include "moe/Calibration/StatisticNames.h"
#include "moe/Calibration/Statistics.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Importer/Importer.h"
#include "moe/Lowering/Emit.h"
#include "moe/Lowering/History.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Pipeline/Report.h"
#include "moe/Runtime/Description.h"
#include "moe/Runtime/DescriptionSummary.h"
#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/Model.h"
#include "moe/Runtime/Package.h"
#include "moe/Support/AtomicFile.h"
#include "moe/Support/ByteSize.h"
#include "moe/Support/File.h"
#include "moe/Support/Process.h"
#include "moe/Support/Progress.h"
#include "moe/Transforms/QuantizeWork.h"

#include "moe/Support/Distributed.h"
#include "moe/Support/Signals.h"
#include "moe/Support/Threads.h"
#include <unistd.h>
#include <xxhash.h>

#include "mlir/IR/Diagnostics.h"
#include "mlir/Parser/Parser.h"
#include "mlir/Pass/PassManager.h"
#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Lowering/Lowering.h"

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <set>

namespace moe {
namespace {

using json = nlohmann::json;

double seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

/// `record` without what differs run to run (seconds, memory peaks) or
/// with how it was run (--max-memory's plan and chunks, a distributed
/// run's split: the same bytes).
json withoutTimings(const json &record) {
  if (record.is_array()) {
    json out = json::array();
    for (const json &item : record)
      out.push_back(withoutTimings(item));
    return out;
  }
  if (!record.is_object())
    return record;
  json out = json::object();
  for (const auto &[key, value] : record.items()) {
    // (and where statistics came from: a cached run makes the same bytes)
    const bool timing = key == "seconds" || key.ends_with("_seconds") || key == "peak_rss_bytes" || key == "cached" ||
                        key == "stored" || key == "resumed_after_layers" || key == "memory_plan" || key == "chunks" ||
                        key == "rank_experts" || key == "dense_moments" || key == "rank_windows" || key == "swap_bytes";
    if (!timing)
      out[key] = withoutTimings(value);
  }
  return out;
}

/// Routed experts and their parameters in the module, for the summary.
json moduleCounts(ir::ModelOp model) {
  int64_t experts = 0, parameters = 0;
  auto elements = [&](mlir::Attribute symbol) -> int64_t {
    mlir::Operation *tensor =
        mlir::SymbolTable::lookupSymbolIn(model, mlir::cast<mlir::FlatSymbolRefAttr>(symbol).getAttr());
    return tensor ? mlir::cast<ir::TensorOp>(tensor).getTensorType().getNumElements() : 0;
  };
  model.walk([&](ir::ExpertOp expert) {
    experts += expert.getPartOffset().value_or(0) == 0; // a split expert's parts count once
    // Stored parameters: a factored expert's are its low-rank factors.
    for (mlir::Attribute symbol : {expert.getGateAttr(), expert.getUpAttr(), expert.getDownAttr()})
      parameters += elements(symbol);
    if (std::optional<mlir::ArrayAttr> lowRank = expert.getLowRank())
      for (mlir::Attribute symbol : *lowRank)
        parameters += elements(symbol);
  });
  model.walk([&](ir::ExpertBaseOp base) {
    for (mlir::Attribute symbol : {base.getGateAttr(), base.getUpAttr(), base.getDownAttr()})
      parameters += elements(symbol);
  });
  return {{"routed_experts", experts}, {"routed_expert_parameters", parameters}};
}

/// A file's identity for the statistics cache: its contents' XXH64 when it
/// is small (config, tokenizer, calibration data), else its name, size and
/// modification time (weights are too large to hash on every run).
json fileIdentity(const std::filesystem::path &path) {
  std::error_code error;
  const uintmax_t size = std::filesystem::file_size(path, error);
  if (error)
    return nullptr;
  if (size <= (uintmax_t(256) << 20)) {
    Expected<std::string> text = readWholeFile(path.string());
    if (text)
      return {{"name", path.filename().string()}, {"xxh64", XXH64(text->data(), text->size(), 0)}};
  }
  const auto time = std::filesystem::last_write_time(path, error).time_since_epoch().count();
  return {{"name", path.filename().string()}, {"size", size}, {"mtime", static_cast<int64_t>(time)}};
}

/// The statistics cache key of calibration before pass `passIndex`: the
/// checkpoint's files, the calibration data and options, and the passes
/// already run (which made the module the statistics describe).
std::string statisticsKey(const CompressRequest &request, const Recipe &recipe, size_t passIndex) {
  json model = json::array();
  std::vector<std::filesystem::path> files;
  std::error_code error;
  for (const auto &entry : std::filesystem::directory_iterator(request.model, error))
    if (entry.is_regular_file())
      files.push_back(entry.path());
  std::sort(files.begin(), files.end());
  for (const std::filesystem::path &file : files)
    model.push_back(fileIdentity(file));
  json before = json::array();
  for (size_t i = 0; i < passIndex; ++i) {
    json entry = {{"pass", recipe.passes[i].name}, {"options", recipe.passes[i].options}};
    for (const auto &[name, data] : recipe.passes[i].tasks)
      entry["tasks"].push_back({name, fileIdentity(data)});
    before.push_back(entry);
  }
  const json key = {{"format", 1},
                    {"model", model},
                    {"data", fileIdentity(recipe.calibrationData)},
                    {"tokens", recipe.calibrationTokens},
                    {"seq_len", recipe.sequenceLength},
                    {"block_samples", recipe.blockSamples},
                    {"sample_cap_ratio", recipe.sampleCapRatio},
                    {"input_moments", recipe.inputMoments},
                    {"float_moments", recipe.floatMoments},
                    {"gradients", recipe.gradients},
                    {"passes_before", before}};
  const std::string text = key.dump();
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(XXH64(text.data(), text.size(), 0)));
  return hex;
}

/// Runs one pass (built from the recipe, never from text) on the module.
/// Its errors are the recipe's: collected from MLIR's diagnostics (which
/// would point at the checkpoint's config.json, the module's location) and
/// returned as one message; remarks and warnings still print.
Status runPass(mlir::MLIRContext &context, mlir::ModuleOp module, Expected<std::unique_ptr<mlir::Pass>> pass) {
  if (!pass)
    return pass.status();
  std::string errors;
  mlir::ScopedDiagnosticHandler collect(&context, [&](mlir::Diagnostic &diagnostic) {
    if (diagnostic.getSeverity() != mlir::DiagnosticSeverity::Error)
      return mlir::failure(); // not handled here: printed as before
    errors += (errors.empty() ? "" : "; ") + diagnostic.str();
    return mlir::success();
  });
  mlir::PassManager manager(&context);
  manager.nest<ir::ModelOp>().addPass(pass.take()); // passes are anchored on moe.model
  if (mlir::failed(manager.run(module)))
    return Status::error(errors.empty() ? std::string("the pass failed with no message") : errors);
  return Status::success();
}

/// The module as it is now, loaded in the engine, with the recipe's
/// calibration text and options: what both calibration paths start from.
struct CalibrationRun {
  LoadedModel loaded;
  std::vector<EvalStream> streams;
  CalibrationOptions options;
};

/// The module as the runtime runs it (lowered, then loaded).
Expected<LoadedModel> loadModule(ir::ModelOp model, const EngineOptions &engineOptions = {}) {
  Expected<ModelDescription> description = lowerToDescription(model, "");
  if (!description)
    return description.status();
  return loadDescribedModel(description.take(), engineOptions);
}

Expected<CalibrationRun> prepareCalibration(ir::ModelOp model, const Recipe &recipe,
                                            const EngineOptions &engineOptions = {}) {
  Expected<LoadedModel> loaded = loadModule(model, engineOptions);
  if (!loaded)
    return loaded.status();
  Expected<std::vector<EvalStream>> streams =
      readEvalData(recipe.calibrationData, loaded->tokenizer.get(), loaded->endOfText);
  if (!streams)
    return streams.status();
  CalibrationRun run{loaded.take(), streams.take(), CalibrationOptions()};
  run.options.sequenceLength = recipe.sequenceLength;
  run.options.maxTokens = recipe.calibrationTokens;
  run.options.blockSamples = recipe.blockSamples;
  run.options.inputMoments = recipe.inputMoments;
  run.options.sampleCapRatio = recipe.sampleCapRatio;
  run.options.gradients = recipe.gradients;
  run.options.floatMoments = recipe.floatMoments;
  return run;
}

/// How sequential GPTQ keeps within --max-memory, planned when the first
/// MoE layer starts (the embedding, head and residual streams are then
/// resident and measured). Per MoE layer, what stays besides the chunk:
/// the layer without its routed experts and its dense moments (GPTQ of
/// attention or shared experts), one replay of the residual stream, and
/// GPTQ's working set (per thread, four cols x cols and three rows x cols
/// doubles of the largest matrix it quantises, attention's included when
/// targeted: the Hessian as read, damped, permuted and its inverse factor;
/// W, its permutation and Q), and under MPI the codes being swapped. Per
/// expert of the
/// chunk: its moments (and rows waiting to be added) and its weights in the
/// expert cache, counted at 4 bytes a parameter (f32, an upper bound of
/// what the engine converts to). These are estimates, so the plan fills
/// 90% of the budget: the rest is for what it does not count (allocator
/// slack, the statistics file's pages while the pass reads them). The
/// summary reports the peak measured.
struct ChunkPlan {
  uint64_t budget = 0, heldAtStart = 0, expertCacheBytes = 0;
  std::map<int64_t, int64_t> expertsPerChunk; ///< By MoE layer.

  /// `codeBits`: the widest codes the pass writes (8 at most).
  /// `work`: moe-quantize's work per MoE layer (its GPTQ matrices outside
  /// the routed experts, by share); `bounds`: a distributed run's split of
  /// each layer's experts (splitExpertsOverRanks), rank `rank` of `ranks`.
  static Expected<ChunkPlan> make(const ModelDescription &description, uint64_t budget, uint64_t held,
                                  const CalibrationOptions &options, bool gptqInFloat, int codeBits,
                                  int64_t replayTokens, int64_t chunkLimit, int ranks, int rank,
                                  const std::map<int64_t, QuantizeWork> &work,
                                  const std::map<int64_t, std::vector<int64_t>> &bounds) {
    const ModelSpec &spec = description.spec;
    const uint64_t H = static_cast<uint64_t>(spec.hiddenSize);
    const uint64_t threads = std::max<uint64_t>(1, threadCount());
    auto elements = [](const TensorRef &tensor) { return static_cast<uint64_t>(numElements(tensor.shape)); };
    // One GPTQ job at its peak (Gptq.cpp): the Hessian as read, in double,
    // beside its factor in the arithmetic's precision; then the factor
    // beside the matrix's values (float), W, its permutation and Q.
    const uint64_t scalar = gptqInFloat ? 4 : 8;
    auto gptqWork = [scalar](uint64_t rows, uint64_t cols) {
      return std::max(cols * cols * (8 + scalar) + rows * cols * 4,
                      cols * cols * scalar + rows * cols * (4 + 3 * scalar));
    };
    ChunkPlan plan;
    plan.budget = budget;
    const uint64_t fill = budget / 10 * 9;
    plan.heldAtStart = held;
    for (int64_t l = 0; l < spec.numLayers; ++l) {
      const LayerSpec &layer = spec.layers[static_cast<size_t>(l)];
      if (layer.mlp != MlpKind::Moe)
        continue;
      const LayerEntry &entry = description.layers[static_cast<size_t>(l)];
      uint64_t rest = 0, expertWeights = 0, width = 0;
      for (const auto &[role, tensor] : entry.tensors)
        rest += 4 * elements(tensor);
      if (entry.expertBase) // factored experts' base: held with the layer
        rest +=
            4 * (elements(entry.expertBase->gate) + elements(entry.expertBase->up) + elements(entry.expertBase->down));
      for (const ExpertEntry &expert : entry.experts) {
        uint64_t bytes = 4 * (elements(expert.gate) + elements(expert.up) + elements(expert.down));
        for (const ExpertPart &part : expert.moreParts)
          bytes += 4 * (elements(part.gate) + elements(part.up) + elements(part.down));
        for (const TensorRef &factor : expert.lowRank)
          bytes += 4 * elements(factor);
        expertWeights = std::max(expertWeights, bytes);
        width = std::max(width, static_cast<uint64_t>(expert.width));
      }
      const uint64_t moments = expertMomentBytes(spec, l, options.floatMoments) +
                               kMomentFlushRows * (H + width) * (options.floatMoments ? 4 : 8); // rows waiting
      // GPTQ's working set: the `threads` largest jobs this process runs
      // (its share of the matrices outside routed experts, and experts').
      std::vector<uint64_t> jobs(threads, std::max(gptqWork(width, H), gptqWork(H, width)));
      if (auto found = work.find(l); found != work.end())
        for (const QuantizeWork::Matrix &matrix : found->second.gptqOutsideExperts)
          if (matrix.share == rank)
            jobs.push_back(gptqWork(static_cast<uint64_t>(matrix.rows), static_cast<uint64_t>(matrix.cols)));
      std::sort(jobs.rbegin(), jobs.rend());
      uint64_t gptq = 0;
      for (size_t j = 0; j < threads; ++j)
        gptq += jobs[j];
      // A distributed run swaps codes one rank's share at a time: its own,
      // one received and the file the pass reads: its experts' and at most
      // all of the layer's other matrices, at `codeBits` a parameter and a
      // bit more for group headers (4 bytes per group of 32 at most).
      int64_t mostExperts = static_cast<int64_t>(entry.experts.size());
      if (auto found = bounds.find(l); found != bounds.end() && ranks > 1) {
        mostExperts = 0;
        for (size_t r = 0; r + 1 < found->second.size(); ++r)
          mostExperts = std::max(mostExperts, found->second[r + 1] - found->second[r]);
      }
      const uint64_t share =
          (static_cast<uint64_t>(mostExperts) * expertWeights + rest) / 4 * static_cast<uint64_t>(codeBits + 1) / 8;
      // Beside the windows' stream (held): the first replay's copy of it
      // and what enters the MoE block, which the other replays start from.
      const uint64_t fixed = held + rest + denseMomentBytes(spec, l, options) +
                             2 * static_cast<uint64_t>(replayTokens) * H * 4 + gptq + (ranks > 1 ? 3 * share : 0);
      const uint64_t perExpert = moments + expertWeights;
      if (fixed + perExpert > fill)
        return Status::error("--max-memory ", formatBytes(static_cast<double>(budget)), " is too small for layer ", l,
                             ": the run holds ", formatBytes(static_cast<double>(held)),
                             " already, and quantising one expert at a time needs about ",
                             formatBytes(static_cast<double>(fixed + perExpert - held)),
                             " more (the layer, GPTQ's working set on ", threads, " threads, one expert's weights and ",
                             options.floatMoments ? "float" : "double", " moments); give at least ",
                             formatBytes(static_cast<double>(fixed + perExpert) / 0.9));
      const int64_t fit = static_cast<int64_t>((fill - fixed) / perExpert);
      int64_t chunk = std::min<int64_t>(fit, static_cast<int64_t>(entry.experts.size()));
      if (chunkLimit > 0)
        chunk = std::min(chunk, chunkLimit);
      plan.expertsPerChunk[l] = chunk;
      plan.expertCacheBytes = std::max(plan.expertCacheBytes, static_cast<uint64_t>(chunk) * expertWeights);
    }
    return plan;
  }

  json toJson() const {
    json layers = json::object();
    for (const auto &[layer, chunk] : expertsPerChunk)
      layers[std::to_string(layer)] = chunk;
    return {{"max_memory_bytes", budget < UINT64_MAX / 4 ? json(budget) : json(nullptr)},
            {"held_at_start_bytes", heldAtStart},
            {"expert_cache_bytes", expertCacheBytes},
            {"experts_per_chunk", layers}};
  }
};

/// The layer's tensors outside routed experts that are quantised now.
Expected<std::set<std::string>> quantisedLayerTensors(ir::ModelOp model, int64_t layer) {
  Expected<ModelDescription> description = lowerToDescription(model, "");
  if (!description)
    return description.status();
  std::set<std::string> names;
  for (const auto &[role, ref] : description->layers[static_cast<size_t>(layer)].tensors)
    if (!ref.format.empty())
      names.insert(ref.name);
  return names;
}

/// A distributed run's swap after layer `layer`: each rank sends the codes
/// of the expert matrices it quantised (by IR symbol, as the module stores
/// them) and its share of the layer's other matrices (those quantised since
/// `quantisedBefore` was taken, before this rank's first chunk), with
/// its RTN fallbacks to every other (one rank's share at a time), and takes
/// each other rank's codes into its module through
/// moe-quantize{codes=...} (the same attributes and store keys as
/// quantising them itself). Returns the fallbacks of all
/// ranks in slot order and the least coverage. `bounds`: the layer's split
/// of its experts over the ranks (checked against the layer when made).
Expected<json> exchangeLayerCodes(mlir::MLIRContext &context, mlir::ModuleOp module, ir::ModelOp model,
                                  const Recipe &recipe, const RecipePass &pass, const std::string &work, int64_t layer,
                                  const std::vector<int64_t> &bounds, const std::set<std::string> &quantisedBefore,
                                  const json &fallbacks, double leastCoverage) {
  // Tests make one rank fail here: the job must end with no output.
  if (const char *failing = std::getenv("MOEC_TEST_FAIL_RANK");
      failing && std::string(failing) == std::to_string(distributed::rank()))
    return Status::error("rank ", distributed::rank(), " failed on purpose (MOEC_TEST_FAIL_RANK)");
  Expected<ModelDescription> description = lowerToDescription(model, "");
  if (!description)
    return description.status();
  const std::vector<ExpertEntry> &experts = description->layers[static_cast<size_t>(layer)].experts;
  // Mine: a JSON header (fallbacks, coverage, tensors and sizes), its
  // length first, then the codes in the header's order.
  TensorReader reader(*description);
  json header = {{"fallbacks", fallbacks}, {"least_coverage", leastCoverage}, {"tensors", json::array()}};
  std::vector<uint8_t> codes;
  const int64_t first = bounds[static_cast<size_t>(distributed::rank())],
                end = bounds[static_cast<size_t>(distributed::rank()) + 1];
  std::vector<const TensorRef *> refs;
  for (int64_t slot = first; slot < end; ++slot) {
    const ExpertEntry &expert = experts[static_cast<size_t>(slot)];
    refs.insert(refs.end(), {&expert.gate, &expert.up, &expert.down});
    for (const ExpertPart &part : expert.moreParts)
      refs.insert(refs.end(), {&part.gate, &part.up, &part.down});
    for (const TensorRef &factor : expert.lowRank)
      refs.push_back(&factor);
  }
  for (const auto &[role, ref] : description->layers[static_cast<size_t>(layer)].tensors)
    if (!quantisedBefore.count(ref.name)) // this rank's share (or not quantised: skipped below)
      refs.push_back(&ref);
  for (const TensorRef *ref : refs) {
    if (ref->format.empty())
      continue; // not quantised: every rank holds the same
    DType dtype;
    std::vector<uint8_t> bytes;
    MOE_RETURN_IF_ERROR(reader.read(*ref, dtype, bytes));
    header["tensors"].push_back({{"symbol", ref->name}, {"size", bytes.size()}});
    codes.insert(codes.end(), bytes.begin(), bytes.end());
  }
  const std::string text = header.dump();
  std::vector<uint8_t> mine(8);
  const uint64_t length = text.size();
  std::memcpy(mine.data(), &length, 8);
  mine.insert(mine.end(), text.begin(), text.end());
  mine.insert(mine.end(), codes.begin(), codes.end());
  codes = std::vector<uint8_t>();
  // Theirs, one rank at a time: into a codes file for the pass; the
  // fallbacks of every rank in rank (so slot) order.
  json merged = {{"fallbacks", json::array()}, {"least_coverage", 1.0}, {"bytes", 0}};
  const std::string codesPath = work + "/layer-codes.safetensors";
  // Timed once every rank has arrived: the wait for the slowest rank's
  // GPTQ is not the swap's.
  MOE_RETURN_IF_ERROR(distributed::barrier());
  const auto arrived = std::chrono::steady_clock::now();
  MOE_RETURN_IF_ERROR(distributed::broadcastEach(mine, [&](int r, std::span<const uint8_t> bytes) -> Status {
    uint64_t size = 0;
    if (bytes.size() >= 8)
      std::memcpy(&size, bytes.data(), 8);
    if (bytes.size() < 8 || size > bytes.size() - 8)
      return Status::error("rank ", r, " sent a malformed layer record");
    const json theirs =
        json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(size), nullptr, false);
    if (theirs.is_discarded() || !theirs.contains("tensors") || !theirs.contains("fallbacks"))
      return Status::error("rank ", r, " sent a malformed layer record");
    for (const json &slot : theirs["fallbacks"])
      merged["fallbacks"].push_back(slot);
    merged["least_coverage"] = std::min(merged["least_coverage"].get<double>(), theirs["least_coverage"].get<double>());
    if (r == distributed::rank())
      return Status::success();
    merged["bytes"] = merged["bytes"].get<uint64_t>() + bytes.size();
    SafetensorsWriter writer;
    PassOverrides overrides{"", layer, {}};
    overrides.share = r;
    overrides.shares = distributed::size();
    overrides.codes = codesPath;
    for (int64_t slot = bounds[static_cast<size_t>(r)]; slot < bounds[static_cast<size_t>(r) + 1]; ++slot)
      overrides.experts.push_back(slot);
    uint64_t offset = 8 + size;
    for (const json &tensor : theirs["tensors"]) {
      const uint64_t tensorSize = tensor["size"].get<uint64_t>();
      if (tensorSize > bytes.size() - offset)
        return Status::error("rank ", r, " sent fewer codes than its record lists");
      MOE_RETURN_IF_ERROR(writer.addTensorView(tensor["symbol"].get<std::string>(), DType::U8,
                                               {static_cast<int64_t>(tensorSize)}, bytes.subspan(offset, tensorSize)));
      offset += tensorSize;
    }
    MOE_RETURN_IF_ERROR(writer.write(codesPath));
    Status status = runPass(context, module, buildRecipePass(recipe, pass, overrides));
    std::error_code ignored;
    std::filesystem::remove(codesPath, ignored);
    return status;
  }));
  merged["seconds"] = seconds(arrived);
  return merged;
}

/// Sequential GPTQ: the calibration windows pass layer by layer; each
/// layer's moments (and only they) are written to a work file, the pass
/// quantises that layer from them, and the windows continue through the
/// quantised layer, so layer l + 1's Hessians are those of the model it
/// will run in (GPTQ's sequential order) and one layer's moments are in
/// memory at a time. Returns per-layer seconds and the peak RSS.
/// Layers below `layersDone` were quantised by a run that --resume
/// continues: their windows still pass through them (as quantised), the
/// pass is not run again. `layerDone` is called after each new layer.
/// With `maxMemory`, layers are held one at a time without their routed
/// experts, which an expert cache loads on demand, and each layer's experts
/// are gathered and quantised in chunks (ChunkPlan); the package is the
/// same byte for byte.
Expected<json> runSequentialGptq(mlir::MLIRContext &context, mlir::ModuleOp module, ir::ModelOp model,
                                 const RecipePass &pass, const Recipe &recipe, const std::string &work,
                                 const CompressProgress &progress, int64_t layersDone, json earlierLayers,
                                 const std::function<Status(int64_t, const json &)> &layerDone, uint64_t maxMemory,
                                 int64_t chunkLimit) {
  // A distributed run (mpirun -n N): rank r gathers and quantises the r-th
  // of N consecutive ranges of each layer's experts (rankBounds) and its
  // share of the layer's other matrices, and the ranks swap their codes
  // once a layer is done (exchangeLayerCodes).
  const int ranks = distributed::size(), rank = distributed::rank();
  const bool chunked = maxMemory > 0 || chunkLimit > 0 || ranks > 1;
  EngineOptions engineOptions;
  if (chunked) {
    engineOptions.maxMemoryBytes = 1;   // one layer at a time
    engineOptions.expertCacheBytes = 1; // sized by the plan
  }
  Expected<CalibrationRun> run = prepareCalibration(model, recipe, engineOptions);
  if (!run)
    return run.status();
  CalibrationOptions &calibration = run->options;
  calibration.blockSamples = 0; // GPTQ reads only the moments
  calibration.inputMoments = true;
  calibration.gradients = false; // the visitor quantises layer by layer; GPTQ reads no gradients
  calibration.denseMoments = pass.quantizesDenseMoments;
  const std::string statsPath = work + "/layer-stats.safetensors";
  Engine &engine = *run->loaded.engine;
  std::optional<ChunkPlan> plan;
  // moe-quantize's work per MoE layer (from shapes, the same on every
  // rank), and each layer's split of its experts over the ranks (rank r:
  // bounds[r] to bounds[r + 1]), balanced by estimated GPTQ work with each
  // rank's share of the other matrices. A recipe that GPTQs no routed
  // experts is not split: every rank quantises everything (share 0 of 1).
  const bool split = ranks > 1 && pass.quantizesExperts;
  // The widest codes the pass writes: its bits, unless moe-allocate-bits
  // gives tensors their own (8 at most).
  const int codeBits = std::any_of(recipe.passes.begin(), recipe.passes.end(),
                                   [](const RecipePass &p) { return p.name == "moe-allocate-bits"; })
                           ? 8
                           : pass.quantizeCodeBits;
  std::map<int64_t, QuantizeWork> layerWork;
  std::map<int64_t, std::vector<int64_t>> rankBounds;
  // Each layer's dense moments that GPTQ reads here: those of the matrices
  // outside routed experts it quantises (in a MoE layer of a split run,
  // those of this rank's share; dense layers are not split).
  std::map<int64_t, std::set<std::string>> denseMomentsRead;
  for (int64_t l = 0; l < engine.spec().numLayers; ++l) {
    const LayerSpec &layer = engine.spec().layers[static_cast<size_t>(l)];
    const bool moe = layer.mlp == MlpKind::Moe;
    QuantizeWork work = estimateQuantizeWork(model, pass.quantizeTargets, true, l, moe && split ? ranks : 1);
    for (const QuantizeWork::Matrix &matrix : work.gptqOutsideExperts)
      if (!(moe && split) || matrix.share == rank)
        denseMomentsRead[l].insert(matrix.statistic);
    if (!moe)
      continue;
    layerWork[l] = std::move(work);
    if (!split || layer.numExperts < ranks) // (too few experts: refused when the layer starts)
      continue;
    std::vector<int64_t> bounds = splitExpertsOverRanks(layerWork[l], ranks);
    if (bounds.size() != static_cast<size_t>(ranks) + 1 || bounds.back() != layer.numExperts)
      return Status::error("layer ", l, ": the split of its ", layer.numExperts, " experts over ", ranks,
                           " ranks does not match the module's experts");
    rankBounds[l] = std::move(bounds);
  }
  calibration.recordsDenseMoment = [&denseMomentsRead](int64_t layer, const std::string &statistic) {
    auto found = denseMomentsRead.find(layer);
    return found != denseMomentsRead.end() && found->second.count(statistic) > 0;
  };
  const int64_t windowCount =
      static_cast<int64_t>(calibrationWindows(run->streams, calibration.sequenceLength, calibration.maxTokens).size());
  if (chunked) {
    if (maxMemory > 0)
      calibration.memoryLimitBytes = maxMemory;
    const int64_t replayTokens = windowCount * calibration.sequenceLength;
    calibration.expertChunks = [&, replayTokens](int64_t layer) -> Expected<CalibrationOptions::ExpertChunks> {
      if (!plan) {
        Expected<ModelDescription> description = lowerToDescription(model, "");
        if (!description)
          return description.status();
        Expected<ChunkPlan> made =
            ChunkPlan::make(*description, maxMemory > 0 ? maxMemory : UINT64_MAX / 4, currentResidentBytes(),
                            calibration, pass.gptqInFloat, codeBits, replayTokens, chunkLimit, split ? ranks : 1,
                            split ? rank : 0, layerWork, rankBounds);
        if (!made)
          return made.status();
        plan = made.take();
        MOE_RETURN_IF_ERROR(engine.setExpertCacheBytes(std::max<uint64_t>(plan->expertCacheBytes, 1)));
      }
      if (!pass.quantizesExperts)
        return CalibrationOptions::ExpertChunks{}; // nothing to split: the layer at once, every rank
      const int64_t experts = engine.spec().layers[static_cast<size_t>(layer)].numExperts;
      if (experts < ranks)
        return Status::error("layer ", layer, " has ", experts, " experts, fewer than the ", ranks,
                             " processes of this job; run fewer (mpirun -n)");
      int64_t first = 0, end = experts; // one process: all
      if (ranks > 1) {                  // (checked against the layer when made)
        const std::vector<int64_t> &bounds = rankBounds.at(layer);
        first = bounds[static_cast<size_t>(rank)], end = bounds[static_cast<size_t>(rank) + 1];
      }
      const int64_t size = plan->expertsPerChunk.at(layer);
      CalibrationOptions::ExpertChunks chunks;
      for (int64_t begin = first; begin < end; begin += size)
        chunks.emplace_back(begin, std::min(end, begin + size));
      return chunks;
    };
  }
  // The share of the windows rank r passes through a quantised layer.
  auto firstWindow = [windowCount, ranks](int64_t r) { return r * windowCount / ranks; };
  auto passShare = [rank, windowCount, firstWindow](int64_t layer, int64_t windows, std::vector<float> &hidden,
                                                    const CalibrationOptions::WindowRunner &run) -> Status {
    // Every rank holds the whole quantised layer now: each passes its
    // consecutive share of the windows and sends it to the others. (A
    // MOEC_BENCH_RANK stand-in gets no other share: those windows keep
    // the layer's input, as the package it does not write needs no
    // later layer right.)
    if (windows != windowCount)
      return Status::error("layer ", layer, ": ", windows, " calibration windows, ", windowCount, " planned");
    MOE_RETURN_IF_ERROR(run(firstWindow(rank), firstWindow(rank + 1)));
    const size_t perWindow = hidden.size() / static_cast<size_t>(windows);
    auto bytesOf = [&](int64_t r) {
      return std::span<uint8_t>(
          reinterpret_cast<uint8_t *>(hidden.data() + static_cast<size_t>(firstWindow(r)) * perWindow),
          static_cast<size_t>(firstWindow(r + 1) - firstWindow(r)) * perWindow * sizeof(float));
    };
    return distributed::broadcastEach(bytesOf(rank), [&](int r, std::span<const uint8_t> theirs) -> Status {
      if (r == rank)
        return Status::success();
      const std::span<uint8_t> into = bytesOf(r);
      if (theirs.size() != into.size())
        return Status::error("layer ", layer, ": rank ", r, " sent ", theirs.size(), " bytes of its windows, ",
                             into.size(), " expected");
      std::copy(theirs.begin(), theirs.end(), into.begin());
      return Status::success();
    });
  };
  json layers = earlierLayers.is_array() ? earlierLayers : json::array();
  json layerFallbacks = json::array();
  double layerLeastCoverage = 1.0;
  std::set<std::string> layerQuantisedBefore; // a distributed run's: see exchangeLayerCodes
  double quantizeSeconds = 0, layerQuantizeSeconds = 0;
  auto layerStart = std::chrono::steady_clock::now();
  double calibrated = 0;
  // The windows through each quantised layer: all here, or under MPI this
  // rank's share, then gathered; timed for the summary.
  calibration.passWindows = [&](int64_t layer, int64_t windows, std::vector<float> &hidden,
                                const CalibrationOptions::WindowRunner &run) -> Status {
    const auto start = std::chrono::steady_clock::now();
    MOE_RETURN_IF_ERROR(ranks > 1 ? passShare(layer, windows, hidden, run) : run(0, windows));
    if (layer >= layersDone && !layers.empty() && layers.back()["layer"] == layer)
      layers.back()["final_pass_seconds"] = seconds(start);
    layerStart = std::chrono::steady_clock::now(); // (not the next layer's calibration)
    return Status::success();
  };
  LayerVisitor visitor = [&](int64_t layer, CalibrationResult &stats) -> Expected<bool> {
    if (layer < layersDone) {
      layerStart = std::chrono::steady_clock::now();
      return false; // quantised before the interruption
    }
    if (stats.chunk == 0) {
      calibrated = 0;
      layerQuantizeSeconds = 0;
      layerFallbacks = json::array();
      layerLeastCoverage = 1.0;
    }
    calibrated += seconds(layerStart);
    const bool lastChunk = stats.chunk + 1 == stats.chunks;
    if (stats.chunks > 1)
      progress.step(concat("layer ", layer, ": experts ", stats.momentFirst, "..", stats.momentEnd - 1, " (chunk ",
                           stats.chunk + 1, "/", stats.chunks, ")"));
    auto quantizeStart = std::chrono::steady_clock::now();
    // What each expert will get: GPTQ, or RTN below min-coverage (the
    // pass's rule), and the least coverage, for the summary.
    const double minCoverage = pass.minCoverage;
    json &fallbacks = layerFallbacks;
    double &leastCoverage = layerLeastCoverage;
    for (const LayerStatistics &layerStats : stats.layers)
      for (size_t e = 0; e < layerStats.momentTokens.size(); ++e) {
        const int64_t slot = static_cast<int64_t>(e);
        if (slot < stats.momentFirst || (stats.momentEnd >= 0 && slot >= stats.momentEnd))
          continue; // another chunk's
        const double coverage =
            stats.tokens > 0 ? static_cast<double>(layerStats.momentTokens[e]) / static_cast<double>(stats.tokens) : 0;
        leastCoverage = std::min(leastCoverage, coverage);
        if (coverage < minCoverage || layerStats.momentTokens[e] == 0)
          fallbacks.push_back(static_cast<int64_t>(e));
      }
    MOE_RETURN_IF_ERROR(writeStatistics(stats, calibration, statsPath));
    // A chunk: its experts only, and the layer's other tensors with the
    // first (a distributed run's: this rank's share of them, swapped too).
    PassOverrides overrides{statsPath, layer, {}};
    const bool someExperts = stats.momentEnd >= 0; // chunked: this rank's experts (a swap follows)
    if (someExperts) {
      for (int64_t e = stats.momentFirst; e < stats.momentEnd; ++e)
        overrides.experts.push_back(e);
      overrides.routedOnly = stats.chunk > 0;
      if (ranks > 1 && stats.chunk == 0) {
        Expected<std::set<std::string>> before = quantisedLayerTensors(model, layer);
        if (!before)
          return before.status();
        layerQuantisedBefore = before.take();
        overrides.share = rank;
        overrides.shares = ranks;
      }
    }
    const int64_t chunks = stats.chunks;
    stats = CalibrationResult(); // the moments now live only in the file
    Status status = runPass(context, module, buildRecipePass(recipe, pass, overrides));
    std::error_code ignored;
    std::filesystem::remove(statsPath, ignored);
    if (!status.ok())
      return Status::error("layer ", layer, ": ", status.message());
    if (!lastChunk) {
      layerQuantizeSeconds += seconds(quantizeStart);
      layerStart = std::chrono::steady_clock::now();
      return false; // the windows pass the layer once every chunk is quantised
    }
    json swap = json::object(); // the codes' swap: its time and the bytes this rank received
    if (ranks > 1 && someExperts) {
      // The other ranks' experts of this layer: their codes, and their
      // RTN fallbacks for the summary, in rank (so slot) order.
      Expected<json> others = exchangeLayerCodes(context, module, model, recipe, pass, work, layer,
                                                 rankBounds.at(layer), layerQuantisedBefore, fallbacks, leastCoverage);
      if (!others)
        return Status::error("layer ", layer, ": ", others.status().message());
      fallbacks = (*others)["fallbacks"];
      leastCoverage = (*others)["least_coverage"].get<double>();
      swap = {{"swap_seconds", (*others)["seconds"]}, {"swap_bytes", (*others)["bytes"]}};
    }
    json record = {{"layer", layer}};
    record.update(swap);
    if (!fallbacks.empty() || leastCoverage < 1.0) {
      record["least_expert_coverage"] = leastCoverage;
      record["rtn_fallback_experts"] = fallbacks;
    }
    Expected<ModelDescription> changed = lowerToDescription(model, "");
    if (!changed)
      return changed.status();
    engine.replaceLayerWeights(makeDescriptionWeightProvider(changed.take()));
    const double quantized = layerQuantizeSeconds + seconds(quantizeStart);
    quantizeSeconds += quantized;
    record["calibrate_seconds"] = calibrated;
    record["quantize_seconds"] = quantized;
    if (chunks > 1)
      record["chunks"] = chunks;
    if (calibration.denseMoments) {
      json names = json::array(); // the dense moments this process calibrated for its GPTQ
      for (const char *statistic : {stats::kAttentionInputMoments, stats::kAttentionOutputMoments,
                                    stats::kSharedInputMoments, stats::kSharedIntermediateMoments})
        if (calibration.recordsDenseMoment(layer, statistic))
          names.push_back(statistic);
      record["dense_moments"] = names;
    }
    if (auto bounds = rankBounds.find(layer); bounds != rankBounds.end() && someExperts) {
      json counts = json::array(); // each rank's experts, balanced by estimated GPTQ work
      for (size_t r = 0; r + 1 < bounds->second.size(); ++r)
        counts.push_back(bounds->second[r + 1] - bounds->second[r]);
      record["rank_experts"] = counts;
    }
    layers.push_back(std::move(record));
    progress.layer(layer, engine.spec().numLayers, calibrated, quantized);
    MOE_RETURN_IF_ERROR(layerDone(layer, layers));
    return true; // (the final pass follows, and restarts layerStart)
  };
  Expected<CalibrationResult> result = calibrate(engine, run->streams, calibration, visitor);
  if (!result)
    return result.status();
  // lm_head and embedding (outside layers; GPTQ has no Hessian for them)
  // take RTN when targeted.
  if (pass.quantizesOutsideLayers)
    MOE_RETURN_IF_ERROR(
        runPass(context, module, buildRecipePass(recipe, pass, PassOverrides{"", -1, QuantizeMethod::Rtn})));
  json done = {{"tokens", result->tokens},
               {"quantize_seconds", quantizeSeconds},
               {"peak_rss_bytes", peakResidentBytes()},
               {"layers", layers}};
  if (plan)
    done["memory_plan"] = plan->toJson();
  if (calibration.floatMoments)
    done["moments"] = "f32";
  if (layersDone > 0)
    done["resumed_after_layers"] = layersDone;
  if (ranks > 1) {
    json counts = json::array(); // the windows each rank passed through each quantised layer
    for (int64_t r = 0; r < ranks; ++r)
      counts.push_back(firstWindow(r + 1) - firstWindow(r));
    done["rank_windows"] = counts;
  }
  return done;
}

/// Task-adaptive expert sets (PreMoe): the prune pass runs once per task,
/// on a copy of the module, with statistics calibrated on the task's data;
/// what it would remove becomes the task's masked router rows. Experts no
/// task keeps leave the model (moe-drop-experts); the rest stay, and the
/// sets (rows renumbered past that drop) go into the module's
/// moe.task_sets, with each MoE layer's TCESS pattern (the mean over the
/// task's tokens of the top-1 expert's raw logit, zeros elsewhere) measured
/// on the model after the drop as their signatures.
Expected<json> runTaskSets(mlir::MLIRContext &context, mlir::ModuleOp module, ir::ModelOp model, const RecipePass &pass,
                           const Recipe &recipe, const std::string &work, const CompressProgress &progress,
                           const EngineOptions &streaming) {
  Expected<ModelDescription> description = lowerToDescription(model, "");
  if (!description)
    return description.status();
  if (!description->taskSets.empty())
    return Status::error("the model already carries task sets; one task step per recipe");
  for (int64_t l = 0; l < description->spec.numLayers; ++l)
    if (!description->layers[static_cast<size_t>(l)].routing.remap.empty())
      return Status::error("layer ", l, " has merged experts; task sets need one router row per expert, so ",
                           "put the task step before moe-merge-experts");
  // Expert origins (ids in the imported checkpoint) by layer and slot.
  auto origins = [](ir::ModelOp of) {
    std::map<int64_t, std::vector<int64_t>> out;
    of.walk([&](ir::ExpertOp expert) {
      // Parts of a split expert repeat its id; the first part stands for it.
      if (expert.getPartOffset() && *expert.getPartOffset() != 0)
        return;
      auto layer = expert->getParentOfType<ir::LayerOp>();
      std::vector<int64_t> &ids = out[static_cast<int64_t>(layer.getIndex())];
      const int64_t id = static_cast<int64_t>(expert.getId());
      if (static_cast<int64_t>(ids.size()) <= id)
        ids.resize(static_cast<size_t>(id + 1), -1);
      ids[static_cast<size_t>(id)] = expert.getOriginalId();
    });
    return out;
  };
  const std::map<int64_t, std::vector<int64_t>> before = origins(model);
  const std::string statsPath = work + "/task-stats.safetensors";
  std::vector<TaskExpertSet> sets;
  json records = json::array();
  for (const auto &[name, data] : pass.tasks) {
    progress.step(concat("task '", name, "': calibrating on ", data));
    Recipe taskRecipe = recipe;
    taskRecipe.calibrationData = data;
    Expected<CalibrationRun> run = prepareCalibration(model, taskRecipe, streaming);
    if (!run)
      return Status::error("task '", name, "': ", run.status().message());
    Expected<CalibrationResult> result = calibrate(*run->loaded.engine, run->streams, run->options);
    if (!result)
      return Status::error("task '", name, "': ", result.status().message());
    TaskExpertSet set;
    set.name = name;
    set.tokens = result->tokens;
    MOE_RETURN_IF_ERROR(writeStatistics(*result, run->options, statsPath));
    // The pass as the recipe gives it, on a copy: what would it remove?
    mlir::OwningOpRef<mlir::ModuleOp> copy = module.clone();
    Expected<ir::ModelOp> copied = findModel(*copy);
    if (!copied)
      return copied.status();
    if (Status status = runPass(context, *copy, buildRecipePass(recipe, pass, PassOverrides{statsPath, {}, {}}));
        !status.ok())
      return Status::error("task '", name, "': ", status.message());
    const std::map<int64_t, std::vector<int64_t>> after = origins(*copied);
    json kept = json::object();
    for (const auto &[layer, ids] : before) {
      std::set<int64_t> survivors;
      if (auto found = after.find(layer); found != after.end())
        survivors.insert(found->second.begin(), found->second.end());
      for (size_t slot = 0; slot < ids.size(); ++slot)
        if (!survivors.count(ids[slot]))
          set.masked[layer].insert(static_cast<int64_t>(slot));
      kept[std::to_string(layer)] = static_cast<int64_t>(ids.size() - set.masked[layer].size());
    }
    records.push_back({{"task", name}, {"data", data}, {"tokens", set.tokens}, {"kept", kept}});
    sets.push_back(std::move(set));
  }
  std::error_code ignored;
  std::filesystem::remove(statsPath, ignored);

  // Experts every task masks leave the model; the sets' rows follow the
  // renumbering (the drop keeps the others in order).
  std::string dropText;
  for (const auto &[layer, ids] : before) {
    std::set<int64_t> everywhere = sets.front().masked[layer];
    for (const TaskExpertSet &set : sets) {
      std::set<int64_t> both;
      auto found = set.masked.find(layer);
      if (found != set.masked.end())
        std::set_intersection(everywhere.begin(), everywhere.end(), found->second.begin(), found->second.end(),
                              std::inserter(both, both.begin()));
      everywhere = std::move(both);
    }
    if (everywhere.empty())
      continue;
    dropText += concat(dropText.empty() ? "" : ";", layer, ":");
    bool first = true;
    for (int64_t slot : everywhere) {
      dropText += concat(first ? "" : ",", slot);
      first = false;
    }
    for (TaskExpertSet &set : sets) {
      std::set<int64_t> renumbered;
      for (int64_t slot : set.masked[layer])
        if (!everywhere.count(slot))
          renumbered.insert(slot -
                            static_cast<int64_t>(std::distance(everywhere.begin(), everywhere.lower_bound(slot))));
      set.masked[layer] = std::move(renumbered);
    }
  }
  for (TaskExpertSet &set : sets)
    std::erase_if(set.masked, [](const auto &entry) { return entry.second.empty(); });
  if (!dropText.empty()) {
    RecipePass drop;
    drop.name = "moe-drop-experts";
    drop.jsonPath = pass.jsonPath;
    drop.options = {{"experts", dropText}};
    MOE_RETURN_IF_ERROR(runPass(context, module, buildRecipePass(recipe, drop, PassOverrides{})));
  }
  // Signatures of the model the sets run on (after that drop, every expert
  // live, as retrieval measures a prompt): each task's windows, as
  // calibration takes them, through routingSignatures.
  Expected<LoadedModel> dropped = loadModule(model, streaming);
  if (!dropped)
    return dropped.status();
  std::set<int64_t> layers;
  for (const auto &[layer, ids] : before)
    layers.insert(layer);
  for (size_t t = 0; t < sets.size(); ++t) {
    progress.step(concat("task '", sets[t].name, "': routing signature"));
    Expected<std::vector<EvalStream>> streams =
        readEvalData(pass.tasks[t].second, dropped->tokenizer.get(), dropped->endOfText);
    if (!streams)
      return Status::error("task '", sets[t].name, "': ", streams.status().message());
    // The windows the task's calibration ran on (so not empty), all L
    // tokens long: the mean over tokens is the mean of the windows' means.
    const std::vector<std::span<const int32_t>> windows =
        calibrationWindows(*streams, recipe.sequenceLength, recipe.calibrationTokens);
    for (std::span<const int32_t> window : windows) {
      Expected<std::map<int64_t, std::vector<double>>> signature = routingSignatures(*dropped->engine, window, layers);
      if (!signature)
        return Status::error("task '", sets[t].name, "': ", signature.status().message());
      for (const auto &[layer, values] : *signature) {
        std::vector<double> &sum = sets[t].signatures[layer];
        sum.resize(values.size(), 0.0);
        for (size_t r = 0; r < values.size(); ++r)
          sum[r] += values[r];
      }
    }
    for (auto &[layer, sum] : sets[t].signatures)
      for (double &value : sum)
        value /= static_cast<double>(windows.size());
  }
  setTaskSets(model, sets);
  // Checked now against the model they will run on.
  Expected<ModelDescription> checked = lowerToDescription(model, "");
  if (!checked)
    return checked.status();
  return json{{"tasks", records}, {"dropped_by_every_task", dropText}};
}

} // namespace

Expected<CompressResult> compressCheckpoint(const CompressRequest &options, const CompressProgress &progress,
                                            mlir::MLIRContext &context) {
  const auto start = std::chrono::steady_clock::now();
  if (!isPackagePath(options.output))
    return Status::error("-o '", options.output, "': a package file name ends in .moepkg");
  if (options.recipe.empty() == options.preset.empty())
    return Status::error("give a recipe (--recipe FILE) or a preset (--preset NAME), one of them");
  Expected<Recipe> recipe = options.preset.empty() ? readRecipe(options.recipe) : presetRecipe(options.preset);
  if (!recipe)
    return recipe.status();
  if (!options.calibrationData.empty())
    recipe->calibrationData = options.calibrationData;
  if (options.calibrationTokens > 0)
    recipe->calibrationTokens = options.calibrationTokens;
  const bool needsCalibration = std::any_of(recipe->passes.begin(), recipe->passes.end(),
                                            [](const RecipePass &p) { return p.needsStatistics && p.tasks.empty(); });
  if (needsCalibration && recipe->calibrationData.empty())
    return Status::error(recipe->path, ": a pass needs calibration statistics; give --calib-data FILE",
                         options.preset.empty() ? " or \"calibration\": {\"data\": ...} in the recipe" : "");
  if (options.maxPplIncrease >= 0 && options.evalData.empty())
    return Status::error("--max-ppl-increase needs --eval-data");
  if (distributed::simulated() && (options.resume || !options.statsCache.empty()))
    return Status::error("MOEC_BENCH_RANK times one rank's part alone, whose model is then partly quantised; ",
                         options.resume ? "--resume" : "--stats-cache", " would keep it for a real run: drop it");
  if (distributed::size() > 1 && options.resume)
    return Status::error("--resume is not supported under mpirun (the ranks would share one work directory)");
  // Under --max-memory every engine of the run holds one layer at a time.
  EngineOptions streaming;
  if (options.maxMemoryBytes > 0) {
    streaming.maxMemoryBytes = 1;
    if (const size_t held = currentResidentBytes(); held >= options.maxMemoryBytes)
      return Status::error("--max-memory ", formatBytes(static_cast<double>(options.maxMemoryBytes)),
                           ": the process holds ", formatBytes(static_cast<double>(held)), " before it starts");
  }

  // Work files (module store, statistics) live in a temporary directory,
  // removed when this returns and on SIGINT/SIGTERM (Signals.h). With
  // --resume they live beside the package (NAME.work/) and stay until the
  // package is written, with the module and how far the run got saved
  // after every pass and every GPTQ layer.
  std::string work;
  if (options.resume) {
    work = options.output.substr(0, options.output.size() - std::string(".moepkg").size()) + ".work";
    std::error_code error;
    std::filesystem::create_directories(work, error);
    if (error)
      return Status::error(work, ": cannot create the --resume work directory: ", error.message());
  } else {
    work = std::filesystem::temp_directory_path() / "moec-compress-XXXXXX";
    if (!mkdtemp(work.data()))
      return Status::error(work, ": cannot create a temporary directory");
    registerTemporaryPath(work);
  }
  struct Cleanup {
    std::string path;
    bool keep;
    ~Cleanup() {
      if (keep)
        return;
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
      unregisterTemporaryPath(path);
    }
  } cleanup{work, options.resume};

  // What an interrupted --resume run left: the module after its last
  // finished step, and which step that was.
  const std::string runKey = statisticsKey(options, *recipe, recipe->passes.size());
  const std::string statePath = work + "/state.json", modulePath = work + "/module.mlir";
  json state = nullptr;
  if (options.resume && std::filesystem::exists(statePath)) {
    Expected<std::string> text = readWholeFile(statePath);
    if (!text)
      return text.status();
    state = json::parse(*text, nullptr, false);
    if (!state.is_object() || !state.contains("key") || !state["pass"].is_number_integer() ||
        !state["layers_done"].is_number_integer() || !state["passes"].is_array())
      return Status::error(statePath, ": not a moec compress state file; remove ", work, " to start again");
    if (state["key"] != runKey)
      return Status::error(work, ": holds an interrupted run of another model, recipe or calibration; remove it to "
                                 "start this one, or give the same inputs to resume that one");
  }

  mlir::OwningOpRef<mlir::ModuleOp> module;
  CompressResult out;
  json &summary = out.summary;
  summary["model"] = options.model;
  summary["recipe"] = recipe->path;
  summary["output"] = options.output;
  if (state.is_object()) {
    progress.step(concat("resuming from ", work, " (", state["pass"].get<int64_t>(), " passes and ",
                         state["layers_done"].get<int64_t>(), " GPTQ layers done)"));
    context.loadDialect<ir::MoeDialect>();
    module = mlir::parseSourceFile<mlir::ModuleOp>(modulePath, &context);
    if (!module)
      return Status::error(modulePath, ": cannot read the saved module; remove ", work, " to start again");
    summary["resumed"] = {{"pass", state["pass"]}, {"layers_done", state["layers_done"]}};
  } else {
    progress.step("importing " + options.model);
    Expected<ImportedCheckpoint> imported = importCheckpoint(options.model, work + "/m.moestore", context);
    if (!imported)
      return imported.status();
    module = std::move(imported->module);
    if (!imported->warnings.empty())
      summary["warnings"] = imported->warnings;
  }
  Expected<ir::ModelOp> found = findModel(*module);
  if (!found)
    return found.status();
  ir::ModelOp model = *found;
  // Saves the module and how far the run got (atomically, module first).
  auto saveState = [&](size_t pass, int64_t layersDone, const json &passes, const json &layers) -> Status {
    if (!options.resume)
      return Status::success();
    std::string text;
    llvm::raw_string_ostream os(text);
    module->print(os);
    os.flush();
    MOE_RETURN_IF_ERROR(writeTextAtomically(modulePath, text));
    const std::string record = json{{"key", runKey},    {"pass", pass},     {"layers_done", layersDone},
                                    {"passes", passes}, {"layers", layers}, {"before", summary["before"]}}
                                   .dump();
    MOE_RETURN_IF_ERROR(writeTextAtomically(statePath, record));
    // Test hook: simulate a kill after this many saved GPTQ layers.
    static int64_t saves = 0;
    if (const char *stop = std::getenv("MOEC_TEST_KILL_AFTER_LAYERS");
        stop && layersDone > 0 && ++saves >= std::atoll(stop))
      std::raise(SIGKILL);
    return Status::success();
  };
  uint64_t bytesBefore = 0;
  for (mlir::Attribute source : model.getSources())
    bytesBefore += std::filesystem::file_size(llvm::cast<mlir::StringAttr>(source).getValue().str());
  summary["bytes_before"] = bytesBefore;
  summary["before"] = state.is_object() ? state["before"] : moduleCounts(model);

  // Evaluation: the original once (perplexity per domain and which experts
  // each domain routes to, for the report), and at the end the package
  // against the original over the same windows (KL divergence, top-1).
  auto evaluateModel = [&](LoadedModel &loaded, Engine *reference, const char *label) -> Expected<EvalResult> {
    Expected<std::vector<EvalStream>> streams =
        readEvalData(options.evalData, loaded.tokenizer.get(), loaded.endOfText);
    if (!streams)
      return streams.status();
    EvalOptions evalOptions{options.evalSequenceLength, 0, options.evalTokens};
    evalOptions.reference = reference;
    evalOptions.countRouting = reference == nullptr;
    evalOptions.progressLabel = label;
    // A package with task sets is measured as it runs by default: each
    // window retrieves its set from its first tokens (--task auto).
    if (!loaded.taskSets.empty())
      evalOptions.beforeWindow = [&](std::span<const int32_t> inputs) -> Status {
        Expected<size_t> chosen =
            retrieveTaskSet(*loaded.engine, loaded.taskSets, inputs.first(std::min<size_t>(inputs.size(), 64)));
        return chosen ? Status::success() : chosen.status();
      };
    return evaluate(*loaded.engine, *streams, evalOptions);
  };
  std::optional<double> before;
  json quality = nullptr, routing = nullptr;
  if (!options.evalData.empty() && distributed::rank() == 0 && !distributed::simulated()) {
    progress.step("evaluating the original model on " + options.evalData);
    Expected<LoadedModel> original = loadModel(options.model, streaming);
    Expected<EvalResult> result = original ? evaluateModel(*original, nullptr, "evaluating the original")
                                           : Expected<EvalResult>(original.status());
    if (!result)
      return result.status();
    before = result->overall.perplexity();
    summary["perplexity_before"] = *before;
    quality = {{"data", options.evalData}, {"before", evalResultToJson(*result)}};
    routing = {{"domains", result->routing}, {"tokens", result->routingTokens}};
  }

  json passes = state.is_object() ? state["passes"] : json::array();
  const size_t firstPass = state.is_object() ? static_cast<size_t>(state["pass"].get<int64_t>()) : 0;
  const std::string statsPath = work + "/stats.safetensors";
  bool statsCurrent = false;
  MOE_RETURN_IF_ERROR(saveState(firstPass, state.is_object() ? state["layers_done"].get<int64_t>() : 0, passes,
                                state.is_object() ? state.value("layers", json::array()) : json::array()));
  for (size_t i = firstPass; i < recipe->passes.size(); ++i) {
    const RecipePass &pass = recipe->passes[i];
    json record = {{"pass", pass.name}, {"options", pass.options}};
    // Steps that calibrate for themselves (sequential GPTQ, task sets):
    // their record under `key`, then the state saved after them.
    auto ownCalibration = [&](const char *key, const std::function<Expected<json>()> &step) -> Status {
      auto passStart = std::chrono::steady_clock::now();
      Expected<json> done = step();
      if (!done)
        return Status::error(recipe->path, ": ", pass.jsonPath, ": ", done.status().message(), "; nothing was written");
      record[key] = *done;
      record["seconds"] = seconds(passStart);
      record["after"] = moduleCounts(model);
      passes.push_back(record);
      statsCurrent = false;
      return saveState(i + 1, 0, passes, json::array());
    };
    if (pass.sequentialGptq) {
      progress.step(concat("[", i + 1, "/", recipe->passes.size(), "] ", describeRecipePass(pass),
                           ", layer by layer on ", recipe->calibrationData));
      const int64_t layersDone = i == firstPass && state.is_object() ? state["layers_done"].get<int64_t>() : 0;
      MOE_RETURN_IF_ERROR(ownCalibration("sequential", [&] {
        return runSequentialGptq(
            context, *module, model, pass, *recipe, work, progress, layersDone,
            layersDone > 0 ? state.value("layers", json::array()) : json::array(),
            [&](int64_t layer, const json &layers) { return saveState(i, layer + 1, passes, layers); },
            options.maxMemoryBytes, options.expertsPerChunk);
      }));
      continue;
    }
    if (!pass.tasks.empty()) {
      progress.step(concat("[", i + 1, "/", recipe->passes.size(), "] ", describeRecipePass(pass), " for ",
                           pass.tasks.size(), " tasks"));
      MOE_RETURN_IF_ERROR(ownCalibration(
          "task_sets", [&] { return runTaskSets(context, *module, model, pass, *recipe, work, progress, streaming); }));
      continue;
    }
    if (pass.needsStatistics && !statsCurrent) {
      // Statistics of the module as it is now (earlier passes changed it),
      // from the cache when the same model, data, options and earlier
      // passes were calibrated before.
      auto calibrationStart = std::chrono::steady_clock::now();
      std::string cached;
      if (!options.statsCache.empty()) {
        std::error_code error;
        std::filesystem::create_directories(options.statsCache, error);
        if (error)
          return Status::error("--stats-cache ", options.statsCache,
                               ": cannot create the directory: ", error.message());
        cached = options.statsCache + "/" + statisticsKey(options, *recipe, i) + ".safetensors";
      }
      if (!cached.empty() && std::filesystem::exists(cached)) {
        progress.step("calibration statistics from the cache: " + cached);
        std::error_code error;
        std::filesystem::copy_file(cached, statsPath, std::filesystem::copy_options::overwrite_existing, error);
        if (error)
          return Status::error(cached, ": cannot copy the cached statistics: ", error.message());
        Expected<std::string> about = readWholeFile(cached + ".json");
        const json tokens = about ? json::parse(*about, nullptr, false).value("tokens", json(nullptr)) : json(nullptr);
        record["calibration"] = {{"tokens", tokens}, {"cached", cached}, {"seconds", seconds(calibrationStart)}};
      } else {
        progress.step("calibrating on " + recipe->calibrationData);
        Expected<CalibrationRun> run = prepareCalibration(model, *recipe, streaming);
        if (!run)
          return run.status();
        Expected<CalibrationResult> result = calibrate(*run->loaded.engine, run->streams, run->options);
        Status status = result ? writeStatistics(*result, run->options, statsPath) : result.status();
        if (!status.ok())
          return status;
        record["calibration"] = {{"tokens", result->tokens}, {"seconds", seconds(calibrationStart)}};
        if (!cached.empty()) {
          // Into the cache under a unique name, then renamed: a concurrent
          // run never reads half a file.
          const std::string about = json{{"tokens", result->tokens}}.dump();
          MOE_RETURN_IF_ERROR(writeTextAtomically(cached + ".json", about));
          const std::string temporary = cached + ".tmp" + std::to_string(::getpid());
          std::error_code error;
          std::filesystem::copy_file(statsPath, temporary, std::filesystem::copy_options::overwrite_existing, error);
          if (!error)
            std::filesystem::rename(temporary, cached, error);
          if (error)
            return Status::error(cached, ": cannot store the statistics in the cache: ", error.message());
          record["calibration"]["stored"] = cached;
        }
      }
      statsCurrent = true;
    }
    progress.step(concat("[", i + 1, "/", recipe->passes.size(), "] ", describeRecipePass(pass)));
    auto passStart = std::chrono::steady_clock::now();
    if (Status status = runPass(context, *module, buildRecipePass(*recipe, pass, PassOverrides{statsPath, {}, {}}));
        !status.ok())
      return Status::error(recipe->path, ": ", pass.jsonPath, ": ", status.message(), "; nothing was written");
    record["seconds"] = seconds(passStart);
    record["after"] = moduleCounts(model);
    passes.push_back(record);
    // moe-allocate-bits only annotates tensors; every other pass changes
    // what calibration would measure.
    if (pass.name != "moe-allocate-bits")
      statsCurrent = false;
    MOE_RETURN_IF_ERROR(saveState(i + 1, 0, passes, json::array()));
  }
  summary["passes"] = passes;
  if (distributed::simulated()) {
    // One rank's part alone (a benchmark): the other ranks' codes never
    // came, so there is no package to write.
    summary["simulated_rank"] = {{"rank", distributed::rank()}, {"ranks", distributed::size()}};
    summary.erase("output");
    cleanup.keep = false;
    out.summary = summary;
    return out;
  }
  if (distributed::size() > 1) {
    // A distributed run: rank 0 alone writes (and evaluates), once every
    // rank got here (a rank that failed ends the job instead).
    if (const char *failing = std::getenv("MOEC_TEST_FAIL_RANK");
        failing && std::string(failing) == concat(distributed::rank(), ":end"))
      return Status::error("rank ", distributed::rank(), " failed on purpose at the end (MOEC_TEST_FAIL_RANK)");
    MOE_RETURN_IF_ERROR(distributed::barrier());
    if (distributed::rank() != 0) {
      cleanup.keep = false;
      out.summary = summary;
      return out;
    }
  }

  progress.step("emitting " + options.output);
  // The package records what was done, not how long it took: the same
  // inputs give the same bytes (timings stay in the summary).
  json provenance = {{"tool", "moec compress"},
                     {"model", options.model},
                     {"recipe", recipe->path},
                     {"passes", withoutTimings(passes)}};
  MOE_RETURN_IF_ERROR(emitPackage(model, "", options.output, provenance.dump()));
  summary["bytes_after"] = std::filesystem::file_size(options.output);
  summary["after"] = moduleCounts(model);

  if (before) {
    progress.step("evaluating the package against the original on " + options.evalData);
    Expected<LoadedModel> packaged = loadModel(options.output, streaming);
    Expected<LoadedModel> original =
        packaged ? loadModel(options.model, streaming) : Expected<LoadedModel>(packaged.status());
    Expected<EvalResult> result = original ? evaluateModel(*packaged, original->engine.get(), "evaluating the package")
                                           : Expected<EvalResult>(original.status());
    if (!result)
      return result.status();
    const double ppl = result->overall.perplexity();
    const double increase = (ppl / *before - 1.0) * 100.0;
    quality["after"] = evalResultToJson(*result);
    if (quality["after"].contains("compare")) {
      quality["compare"] = quality["after"]["compare"];
      quality["after"].erase("compare");
      summary["compare"] = quality["compare"];
    }
    summary["perplexity_after"] = ppl;
    summary["perplexity_increase_percent"] = increase;
    if (options.maxPplIncrease >= 0) {
      summary["max_ppl_increase_percent"] = options.maxPplIncrease;
      // NaN compares false both ways: only a finite increase within the bound passes.
      const bool passed = std::isfinite(increase) && increase <= options.maxPplIncrease;
      summary["quality_gate"] = passed ? "passed" : "failed";
      if (!passed) {
        out.qualityGateFailed = true;
        out.qualityGateReason = concat("quality gate failed: perplexity rose ", increase, "% (", *before, " -> ", ppl,
                                       "), more than the allowed ", options.maxPplIncrease, "%");
      }
    }
  }
  // The report: the package as written, the module's history, the
  // measurements. Written beside the package (atomically) like the
  // package itself.
  {
    Expected<OpenedPackage> written = openPackage(options.output);
    if (!written)
      return written.status();
    Expected<json> packageSummary = summarizeDescription(written->description);
    if (!packageSummary)
      return packageSummary.status();
    ReportInputs inputs;
    inputs.model = options.output;
    inputs.summary = packageSummary.take();
    inputs.history = historyToJson(model);
    inputs.quality = quality;
    inputs.routing = routing;
    Expected<json> report = buildReport(inputs);
    if (!report)
      return report.status();
    (*report)["source"] = options.model;
    (*report)["recipe"] = recipe->path;
    out.report = report.take();
    std::string jsonPath = options.reportJson;
    if (jsonPath.empty()) {
      jsonPath = options.output;
      jsonPath = jsonPath.substr(0, jsonPath.size() - std::string(".moepkg").size()) + ".report.json";
    }
    MOE_RETURN_IF_ERROR(writeReportFiles(out.report, options.reportHtml, jsonPath));
    summary["report_json"] = jsonPath;
    if (!options.reportHtml.empty())
      summary["report_html"] = options.reportHtml;
  }
  summary["seconds"] = seconds(start);
  cleanup.keep = false; // the package is written: the work directory goes
  return out;
}

} // namespace moe
