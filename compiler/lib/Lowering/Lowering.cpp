//===- Lowering.cpp - moe module to the runtime's model description -------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Lowering/Lowering.h"
#include "moe/Frontend/Checkpoint.h"
#include "moe/Lowering/History.h"

#include <filesystem>
#include <map>

namespace moe {

using namespace mlir;

namespace {

std::string resolve(const std::string &path, const std::string &base) {
  if (path.empty() || std::filesystem::path(path).is_absolute() || base.empty())
    return path;
  return (std::filesystem::path(base) / path).string();
}

class Lowerer {
public:
  explicit Lowerer(ir::ModelOp model) : model(model) {
    for (ir::TensorOp tensor : model.getBody().getOps<ir::TensorOp>())
      tensors[tensor.getSymName()] = tensor;
  }

  Expected<TensorRef> ref(FlatSymbolRefAttr symbol) {
    auto it = tensors.find(symbol.getValue());
    if (it == tensors.end())
      return Status::error("moe.model @", model.getSymName().str(), ": no moe.tensor @", symbol.getValue().str());
    ir::TensorOp tensor = it->second;
    TensorRef out;
    if (ir::QuantAttr quant = tensor.getQuantAttr())
      out.format = quant.getFormat().str();
    if (auto cost = tensor->getAttrOfType<FloatAttr>("moe.nested_cost"))
      out.nestedCost = cost.getValueAsDouble();
    out.name = symbol.getValue().str();
    out.key = tensor.getKey().str();
    if (std::optional<uint64_t> source = tensor.getSource())
      out.source = static_cast<int64_t>(*source);
    if (std::optional<ArrayRef<int64_t>> slice = tensor.getSlice())
      out.slice.assign(slice->begin(), slice->end());
    ArrayRef<int64_t> shape = tensor.getTensorType().getShape();
    out.shape.assign(shape.begin(), shape.end());
    auto scale = tensors.find(out.name + std::string(kScaleInvSuffix));
    if (scale != tensors.end() && scale->second.getSource()) {
      out.scaleKey = scale->second.getKey().str();
      out.scaleSource = static_cast<int64_t>(*scale->second.getSource());
    }
    return out;
  }

  Status addDense(ir::DenseOp dense, std::vector<std::pair<TensorRole, TensorRef>> &out) {
    for (NamedAttribute entry : dense.getTensors()) {
      std::optional<TensorRole> role = parseTensorRole(entry.getName().getValue());
      auto symbol = dyn_cast<FlatSymbolRefAttr>(entry.getValue());
      if (!role || !symbol)
        return Status::error("moe.dense \"", dense.getPart().str(), "\": unknown tensor role '",
                             entry.getName().getValue().str(), "'");
      Expected<TensorRef> tensor = ref(symbol);
      if (!tensor)
        return tensor.status();
      out.emplace_back(*role, tensor.take());
    }
    return Status::success();
  }

  Expected<ModelDescription> lower(const std::string &base) {
    ModelDescription description;
    Expected<ModelSpec> spec = ModelSpec::fromConfigText(model.getConfig(), "config of moe.model");
    if (!spec)
      return spec.status();
    description.spec = spec.take();
    description.configText = model.getConfig().str();
    for (Attribute source : model.getSources())
      description.sources.push_back(resolve(cast<StringAttr>(source).getValue().str(), base));
    if (std::optional<StringRef> store = model.getStore())
      description.store = resolve(store->str(), base);
    if (!description.sources.empty())
      description.assetDirectory = std::filesystem::path(description.sources[0]).parent_path().string();

    ModelSpec &modelSpec = description.spec;
    description.layers.resize(static_cast<size_t>(modelSpec.numLayers));
    std::vector<bool> seen(static_cast<size_t>(modelSpec.numLayers), false);
    std::optional<int64_t> uniformTopK;
    bool topKUniform = true;
    for (Operation &op : model.getBody().front()) {
      if (auto dense = dyn_cast<ir::DenseOp>(op)) {
        MOE_RETURN_IF_ERROR(addDense(dense, description.globals));
        continue;
      }
      auto layer = dyn_cast<ir::LayerOp>(op);
      if (!layer)
        continue;
      const int64_t index = static_cast<int64_t>(layer.getIndex());
      if (index < 0 || index >= modelSpec.numLayers || seen[static_cast<size_t>(index)])
        return Status::error("moe.layer ", index, ": not a layer of the ", modelSpec.numLayers,
                             "-layer model, or given twice");
      seen[static_cast<size_t>(index)] = true;
      LayerEntry &entry = description.layers[static_cast<size_t>(index)];
      LayerSpec &layerSpec = modelSpec.layers[static_cast<size_t>(index)];
      bool hasBlock = false;
      for (Operation &inner : layer.getBody().front()) {
        if (auto dense = dyn_cast<ir::DenseOp>(inner)) {
          MOE_RETURN_IF_ERROR(addDense(dense, entry.tensors));
          continue;
        }
        auto block = dyn_cast<ir::MoeBlockOp>(inner);
        if (!block)
          continue;
        if (layerSpec.mlp != MlpKind::Moe)
          return Status::error("moe.layer ", index, " has a moe_block, but the config makes it dense");
        hasBlock = true;
        int64_t maxWidth = 0;
        std::map<int64_t, int32_t> slotOf;
        for (Operation &part : block.getBody().front()) {
          if (auto router = dyn_cast<ir::RouterOp>(part)) {
            Expected<TensorRef> weight = ref(router.getWeightAttr());
            if (!weight)
              return weight.status();
            entry.tensors.emplace_back(TensorRole::Router, weight.take());
            if (FlatSymbolRefAttr bias = router.getCorrectionBiasAttr()) {
              Expected<TensorRef> tensor = ref(bias);
              if (!tensor)
                return tensor.status();
              entry.tensors.emplace_back(TensorRole::RouterCorrectionBias, tensor.take());
            }
            RouterSpec routing = modelSpec.router;
            routing.topK = static_cast<int64_t>(router.getTopK());
            routing.normalizeTopK = router.getNormalize();
            routing.scalingFactor = router.getScaling().convertToDouble();
            routing.numGroups = static_cast<int64_t>(router.getGroups());
            routing.topKGroups = static_cast<int64_t>(router.getTopKGroups());
            switch (router.getSelection()) {
            case ir::SelectionKind::TopK:
              routing.selection = ExpertSelection::TopK;
              break;
            case ir::SelectionKind::GroupMax:
              routing.selection = ExpertSelection::GroupLimitedMax;
              break;
            case ir::SelectionKind::GroupTopTwoSum:
              routing.selection = ExpertSelection::GroupLimitedTopTwoSum;
              break;
            }
            routing.correctionBias = static_cast<bool>(router.getCorrectionBiasAttr());
            entry.routing.router = routing;
            if (uniformTopK && *uniformTopK != routing.topK)
              topKUniform = false;
            uniformTopK = routing.topK;
            if (std::optional<llvm::APFloat> skip = router.getSkipThreshold())
              entry.routing.skipThreshold = skip->convertToDouble();
            continue;
          }
          if (auto expert = dyn_cast<ir::ExpertOp>(part)) {
            Expected<TensorRef> gate = ref(expert.getGateAttr()), up = ref(expert.getUpAttr()),
                                down = ref(expert.getDownAttr());
            for (Expected<TensorRef> *tensor : {&gate, &up, &down})
              if (!*tensor)
                return tensor->status();
            if (expert.getPartOffset() && *expert.getPartOffset() > 0) {
              // A further part of the expert just lowered (the verifier
              // keeps parts consecutive and in order).
              ExpertEntry &whole = entry.experts.back();
              ExpertPart more;
              more.width = static_cast<int64_t>(expert.getWidth());
              more.gate = gate.take();
              more.up = up.take();
              more.down = down.take();
              whole.width += more.width;
              whole.moreParts.push_back(std::move(more));
              maxWidth = std::max(maxWidth, whole.width);
              continue;
            }
            ExpertEntry e;
            if (std::optional<ArrayAttr> lowRank = expert.getLowRank())
              for (Attribute factor : *lowRank) {
                Expected<TensorRef> tensor = ref(cast<FlatSymbolRefAttr>(factor));
                if (!tensor)
                  return tensor.status();
                e.lowRank.push_back(tensor.take());
              }
            e.id = static_cast<int64_t>(expert.getId());
            e.origin = expert.getOriginalId();
            e.width = static_cast<int64_t>(expert.getWidth());
            e.gate = gate.take();
            e.up = up.take();
            e.down = down.take();
            slotOf[e.id] = static_cast<int32_t>(entry.experts.size());
            maxWidth = std::max(maxWidth, e.width);
            entry.experts.push_back(std::move(e));
            continue;
          }
          if (auto base = dyn_cast<ir::ExpertBaseOp>(part)) {
            Expected<TensorRef> gate = ref(base.getGateAttr()), up = ref(base.getUpAttr()),
                                down = ref(base.getDownAttr());
            for (Expected<TensorRef> *tensor : {&gate, &up, &down})
              if (!*tensor)
                return tensor->status();
            ExpertPart &entryBase = entry.expertBase.emplace();
            entryBase.width = static_cast<int64_t>(base.getWidth());
            entryBase.gate = gate.take();
            entryBase.up = up.take();
            entryBase.down = down.take();
            continue;
          }
          if (auto shared = dyn_cast<ir::SharedExpertOp>(part)) {
            std::pair<TensorRole, FlatSymbolRefAttr> parts[] = {
                {TensorRole::SharedGate, shared.getGateAttr()},
                {TensorRole::SharedUp, shared.getUpAttr()},
                {TensorRole::SharedDown, shared.getDownAttr()},
                {TensorRole::SharedExpertGate, shared.getGatedByAttr()}};
            for (auto &[role, symbol] : parts) {
              if (!symbol)
                continue;
              Expected<TensorRef> tensor = ref(symbol);
              if (!tensor)
                return tensor.status();
              entry.tensors.emplace_back(role, tensor.take());
            }
          }
        }
        // The remap names expert ids; the runtime indexes slots.
        for (ir::RouterOp router : block.getBody().getOps<ir::RouterOp>())
          if (std::optional<ArrayRef<int64_t>> remap = router.getRemap())
            for (int64_t id : *remap) {
              auto slot = slotOf.find(id);
              if (slot == slotOf.end())
                return Status::error("moe.layer ", index, ": the remap table names expert ", id,
                                     ", which the block does not have");
              entry.routing.remap.push_back(slot->second);
            }
        layerSpec.numExperts = static_cast<int64_t>(entry.experts.size());
        layerSpec.expertIntermediateSize = maxWidth;
      }
      if (layerSpec.mlp == MlpKind::Moe && !hasBlock)
        return Status::error("moe.layer ", index, " has no moe_block, but the config makes it an MoE layer");
    }
    for (int64_t l = 0; l < modelSpec.numLayers; ++l)
      if (!seen[static_cast<size_t>(l)])
        return Status::error("moe.model @", model.getSymName().str(), " has no moe.layer ", l);
    if (uniformTopK && topKUniform)
      modelSpec.router.topK = *uniformTopK;
    Expected<std::vector<TaskExpertSet>> taskSets = readTaskSets(model);
    if (!taskSets)
      return taskSets.status();
    description.taskSets = taskSets.take();
    MOE_RETURN_IF_ERROR(validateDescription(description, "moe.model @" + model.getSymName().str()));
    return description;
  }

private:
  ir::ModelOp model;
  std::map<StringRef, ir::TensorOp> tensors;
};

} // namespace

Expected<ModelDescription> lowerToDescription(ir::ModelOp model, const std::string &baseDirectory) {
  return Lowerer(model).lower(baseDirectory);
}

Expected<ir::ModelOp> findModel(ModuleOp module) {
  for (ir::ModelOp model : module.getBody()->getOps<ir::ModelOp>())
    return model;
  return Status::error("the module has no moe.model");
}

} // namespace moe
