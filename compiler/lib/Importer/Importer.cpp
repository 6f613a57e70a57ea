//===- Importer.cpp - Checkpoint to moe dialect ---------------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Importer/Importer.h"
#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "moe/Lowering/History.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Support/File.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinTypes.h"
#include "mlir/IR/Verifier.h"

#include <nlohmann/json.hpp>

#include <climits>
#include <cstdlib>
#include <filesystem>
#include <map>

namespace moe {

using namespace mlir;

namespace {

Type elementType(OpBuilder &builder, DType dtype) {
  switch (dtype) {
  case DType::F32:
    return builder.getF32Type();
  case DType::F16:
    return builder.getF16Type();
  case DType::BF16:
    return builder.getBF16Type();
  case DType::F64:
    return builder.getF64Type();
  case DType::F8E4M3:
    return builder.getFloat8E4M3FNType();
  case DType::F8E5M2:
    return builder.getFloat8E5M2Type();
  case DType::Bool:
    return builder.getI1Type();
  case DType::U8:
  case DType::I8:
    return builder.getIntegerType(8);
  case DType::U16:
  case DType::I16:
    return builder.getIntegerType(16);
  case DType::U32:
  case DType::I32:
    return builder.getIntegerType(32);
  case DType::U64:
  case DType::I64:
    return builder.getIntegerType(64);
  }
  return builder.getF32Type();
}

ir::ScoringKind scoringKind(RouterScoring scoring) {
  switch (scoring) {
  case RouterScoring::Softmax:
    return ir::ScoringKind::Softmax;
  case RouterScoring::Sigmoid:
    return ir::ScoringKind::Sigmoid;
  case RouterScoring::SparseMixer:
    return ir::ScoringKind::SparseMixer;
  }
  return ir::ScoringKind::Softmax;
}

ir::SelectionKind selectionKind(ExpertSelection selection) {
  switch (selection) {
  case ExpertSelection::TopK:
    return ir::SelectionKind::TopK;
  case ExpertSelection::GroupLimitedMax:
    return ir::SelectionKind::GroupMax;
  case ExpertSelection::GroupLimitedTopTwoSum:
    return ir::SelectionKind::GroupTopTwoSum;
  }
  return ir::SelectionKind::TopK;
}

std::string absolutePath(const std::string &path) {
  char resolved[PATH_MAX];
  return realpath(path.c_str(), resolved) ? std::string(resolved) : path;
}

} // namespace

Expected<OwningOpRef<ModuleOp>> importModel(MLIRContext &context, const ModelSpec &spec, const Checkpoint &checkpoint,
                                            const std::string &configText, const std::string &storePath) {
  context.loadDialect<ir::MoeDialect>();
  OpBuilder builder(&context);
  Location location = FileLineColLoc::get(&context, checkpoint.configPath(), 0, 0);
  OwningOpRef<ModuleOp> module = ModuleOp::create(location);
  builder.setInsertionPointToEnd(module->getBody());

  std::vector<std::string> sources;
  std::map<const SafetensorsFile *, int64_t> sourceIndex;
  for (const auto &shard : checkpoint.shards()) {
    sourceIndex[shard.get()] = static_cast<int64_t>(sources.size());
    sources.push_back(absolutePath(shard->path()));
  }
  auto model = builder.create<ir::ModelOp>(
      location, builder.getStringAttr("model"), builder.getStringAttr(familyName(spec.family)),
      builder.getI64IntegerAttr(spec.hiddenSize),
      builder.getStrArrayAttr(std::vector<StringRef>(sources.begin(), sources.end())),
      builder.getStringAttr(configText), storePath.empty() ? StringAttr() : builder.getStringAttr(storePath));
  Block *body = new Block();
  model.getBody().push_back(body);
  builder.setInsertionPointToEnd(body);

  // Tensor symbols, named after their checkpoint keys.
  const std::vector<TensorSpec> tensors = spec.tensors();
  auto symbol = [&](const std::string &name) { return FlatSymbolRefAttr::get(&context, name); };
  auto addTensor = [&](const std::string &name) -> Status {
    const TensorLocation *where = checkpoint.find(name);
    if (!where)
      return Status::error(checkpoint.directory(), ": tensor '", name, "' not found");
    auto type = RankedTensorType::get(where->info->shape, elementType(builder, where->info->dtype));
    builder.create<ir::TensorOp>(location, builder.getStringAttr(name), TypeAttr::get(type),
                                 builder.getStringAttr(name), builder.getI64IntegerAttr(sourceIndex.at(where->file)),
                                 DenseI64ArrayAttr(), ir::QuantAttr());
    return Status::success();
  };
  // Fused experts become one sliced tensor per expert matrix, named as the
  // per-expert layout would name it.
  std::map<int64_t, std::map<int64_t, std::array<std::string, 3>>> slicedExperts;
  auto addFused = [&](const TensorSpec &tensor) -> Status {
    const LayerSpec &layer = spec.layers[static_cast<size_t>(tensor.layer)];
    const TensorLocation *where = checkpoint.find(tensor.name);
    if (!where)
      return Status::error(checkpoint.directory(), ": tensor '", tensor.name, "' not found");
    const int64_t I = layer.expertIntermediateSize, H = spec.hiddenSize;
    const bool gateUp = tensor.role == TensorRole::ExpertGateUpFused;
    const std::string prefix = concat("model.layers.", layer.index, ".", layer.moePrefix, "experts.");
    const bool mixtralNames = spec.family == ModelFamily::Mixtral || spec.family == ModelFamily::PhiMoe;
    Type element = elementType(builder, where->info->dtype);
    for (int64_t e = 0; e < layer.numExperts; ++e) {
      struct Piece {
        const char *name;
        int slot;
        int64_t firstRow, rows, cols;
      };
      std::vector<Piece> pieces;
      if (gateUp) {
        pieces.push_back({mixtralNames ? "w1" : "gate_proj", 0, 0, I, H});
        pieces.push_back({mixtralNames ? "w3" : "up_proj", 1, I, I, H});
      } else {
        pieces.push_back({mixtralNames ? "w2" : "down_proj", 2, 0, H, I});
      }
      for (const Piece &piece : pieces) {
        std::string name = concat(prefix, e, ".", piece.name, ".weight");
        int64_t slice[4] = {e, piece.firstRow, piece.rows, layer.fusedTransposed ? 1 : 0};
        builder.create<ir::TensorOp>(location, builder.getStringAttr(name),
                                     TypeAttr::get(RankedTensorType::get({piece.rows, piece.cols}, element)),
                                     builder.getStringAttr(tensor.name),
                                     builder.getI64IntegerAttr(sourceIndex.at(where->file)),
                                     builder.getDenseI64ArrayAttr(slice), ir::QuantAttr());
        slicedExperts[layer.index][e][piece.slot] = name;
      }
    }
    return Status::success();
  };
  for (const TensorSpec &tensor : tensors) {
    if (tensor.role == TensorRole::ExpertGateUpFused || tensor.role == TensorRole::ExpertDownFused) {
      MOE_RETURN_IF_ERROR(addFused(tensor));
      continue;
    }
    MOE_RETURN_IF_ERROR(addTensor(tensor.name));
    if (tensor.isLinearWeight && checkpoint.find(scaleInvName(tensor.name)))
      MOE_RETURN_IF_ERROR(addTensor(scaleInvName(tensor.name)));
  }

  // Dense parts grouped by part name, per layer (-1: model level).
  std::map<int64_t, std::map<std::string, std::vector<NamedAttribute>>> dense;
  for (const TensorSpec &tensor : tensors) {
    RoleGroup group = roleGroup(tensor.role);
    if (group == RoleGroup::Router || group == RoleGroup::RoutedExperts || group == RoleGroup::SharedExperts)
      continue;
    dense[tensor.layer][std::string(roleGroupName(group))].push_back(
        builder.getNamedAttr(tensorRoleName(tensor.role), symbol(tensor.name)));
  }
  auto emitDense = [&](int64_t layer) {
    for (auto &[part, entries] : dense[layer])
      builder.create<ir::DenseOp>(location, builder.getStringAttr(part), builder.getDictionaryAttr(entries));
  };
  emitDense(-1);

  for (const LayerSpec &layer : spec.layers) {
    auto layerOp = builder.create<ir::LayerOp>(location, builder.getI64IntegerAttr(layer.index));
    layerOp.getBody().push_back(new Block());
    OpBuilder::InsertionGuard guard(builder);
    builder.setInsertionPointToEnd(&layerOp.getBody().front());
    emitDense(layer.index);
    if (layer.mlp != MlpKind::Moe)
      continue;
    auto block = builder.create<ir::MoeBlockOp>(location);
    block.getBody().push_back(new Block());
    builder.setInsertionPointToEnd(&block.getBody().front());
    std::string routerName, biasName, sharedGate, sharedUp, sharedDown, sharedGateWeight;
    std::map<int64_t, std::array<std::string, 3>> experts = slicedExperts[layer.index];
    for (const TensorSpec &tensor : tensors) {
      if (tensor.layer != layer.index)
        continue;
      switch (tensor.role) {
      case TensorRole::Router:
        routerName = tensor.name;
        break;
      case TensorRole::RouterCorrectionBias:
        biasName = tensor.name;
        break;
      case TensorRole::ExpertGate:
        experts[tensor.expert][0] = tensor.name;
        break;
      case TensorRole::ExpertUp:
        experts[tensor.expert][1] = tensor.name;
        break;
      case TensorRole::ExpertDown:
        experts[tensor.expert][2] = tensor.name;
        break;
      case TensorRole::SharedGate:
        sharedGate = tensor.name;
        break;
      case TensorRole::SharedUp:
        sharedUp = tensor.name;
        break;
      case TensorRole::SharedDown:
        sharedDown = tensor.name;
        break;
      case TensorRole::SharedExpertGate:
        sharedGateWeight = tensor.name;
        break;
      default:
        break;
      }
    }
    const RouterSpec &router = spec.router;
    auto routerOp = builder.create<ir::RouterOp>(
        location, symbol(routerName), builder.getI64IntegerAttr(router.topK),
        ir::ScoringKindAttr::get(builder.getContext(), scoringKind(router.scoring)),
        ir::SelectionKindAttr::get(builder.getContext(), selectionKind(router.selection)),
        builder.getBoolAttr(router.normalizeTopK), builder.getF64FloatAttr(router.scalingFactor),
        builder.getI64IntegerAttr(router.numGroups), builder.getI64IntegerAttr(router.topKGroups),
        builder.getF64FloatAttr(router.jitterEps), biasName.empty() ? FlatSymbolRefAttr() : symbol(biasName),
        DenseI64ArrayAttr(), FloatAttr());
    (void)routerOp;
    for (const auto &[id, names] : experts)
      builder.create<ir::ExpertOp>(location, builder.getI64IntegerAttr(id),
                                   builder.getI64IntegerAttr(layer.expertIntermediateSize), symbol(names[0]),
                                   symbol(names[1]), symbol(names[2]), builder.getStringAttr("silu"), IntegerAttr(),
                                   IntegerAttr(), ArrayAttr());
    if (layer.shared.intermediateSize > 0)
      builder.create<ir::SharedExpertOp>(location, builder.getI64IntegerAttr(layer.shared.intermediateSize),
                                         symbol(sharedGate), symbol(sharedUp), symbol(sharedDown),
                                         sharedGateWeight.empty() ? FlatSymbolRefAttr() : symbol(sharedGateWeight));
  }
  if (failed(verify(*module)))
    return Status::error(checkpoint.directory(), ": the imported module does not verify (see diagnostics)");
  return module;
}

Expected<ImportedCheckpoint> importCheckpoint(const std::string &directory, const std::string &storePath,
                                              mlir::MLIRContext &context) {
  // A compiled model given where a checkpoint belongs: say which command
  // takes it.
  std::error_code ignored;
  if (std::filesystem::is_regular_file(directory, ignored)) {
    const std::string extension = std::filesystem::path(directory).extension().string();
    if (extension == ".moepkg")
      return Status::error(directory, ": is a moec package; this command takes a Hugging Face checkpoint directory. "
                                      "Run a package with `moec eval` or `moec generate`, describe it with `moec "
                                      "inspect` or `moec report`, convert it with `moec export`");
    if (extension == ".mlir")
      return Status::error(directory, ": is a moe module; this command takes a Hugging Face checkpoint directory. "
                                      "Run passes on a module with `moec opt`, package it with `moec emit`");
    if (extension == ".gguf")
      return Status::error(directory, ": is a GGUF file; this command takes a Hugging Face checkpoint directory");
    return Status::error(directory, ": is a file; expected a Hugging Face checkpoint directory (config.json and "
                                    "safetensors)");
  }
  const std::string configPath = directory + "/config.json";
  Expected<std::string> configText = readWholeFile(configPath);
  if (!configText)
    return Status::error(configPath, ": cannot read (expected a Hugging Face checkpoint directory)");
  Expected<ModelSpec> spec = ModelSpec::fromConfigText(*configText, configPath);
  if (!spec)
    return spec.status();
  Expected<std::unique_ptr<Checkpoint>> checkpoint = Checkpoint::open(directory);
  if (!checkpoint)
    return checkpoint.status();
  Expected<CheckpointReport> report = bindCheckpoint(*spec, **checkpoint);
  if (!report)
    return report.status();
  // The config travels in the module compactly, one line.
  const std::string compactConfig = nlohmann::json::parse(*configText, nullptr, false).dump();
  Expected<mlir::OwningOpRef<mlir::ModuleOp>> module =
      importModel(context, *spec, **checkpoint, compactConfig, storePath);
  if (!module)
    return module.status();
  // The same check the package loader runs (validateDescription, through
  // the lowering): import never writes a module that cannot run.
  Expected<ir::ModelOp> model = findModel(**module);
  if (!model)
    return model.status();
  Expected<ModelDescription> description = lowerToDescription(*model, "");
  if (!description)
    return description.status().withContext(directory);
  MOE_RETURN_IF_ERROR(recordOriginal(*model, *description));
  return ImportedCheckpoint{module.take(), report->warnings};
}

} // namespace moe
