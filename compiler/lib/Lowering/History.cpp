//===- History.cpp - What passes did to a module, kept in the module ------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Lowering/History.h"
#include "moe/Runtime/DescriptionSummary.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinAttributes.h"

#include <cmath>

namespace moe {

using json = nlohmann::json;

namespace {

constexpr const char *kDecisions = "moe.decisions";
constexpr const char *kOriginal = "moe.original";
constexpr const char *kTaskSets = "moe.task_sets";

json number(double value) { return std::isfinite(value) ? json(value) : json(nullptr); }

json attributeToJson(mlir::Attribute attribute) {
  if (auto dictionary = llvm::dyn_cast<mlir::DictionaryAttr>(attribute)) {
    json out = json::object();
    for (mlir::NamedAttribute field : dictionary)
      out[field.getName().str()] = attributeToJson(field.getValue());
    return out;
  }
  if (auto array = llvm::dyn_cast<mlir::ArrayAttr>(attribute)) {
    json out = json::array();
    for (mlir::Attribute item : array)
      out.push_back(attributeToJson(item));
    return out;
  }
  if (auto ints = llvm::dyn_cast<mlir::DenseI64ArrayAttr>(attribute))
    return json(std::vector<int64_t>(ints.asArrayRef().begin(), ints.asArrayRef().end()));
  if (auto reals = llvm::dyn_cast<mlir::DenseF64ArrayAttr>(attribute)) {
    json out = json::array();
    for (double value : reals.asArrayRef())
      out.push_back(number(value));
    return out;
  }
  if (auto flag = llvm::dyn_cast<mlir::BoolAttr>(attribute))
    return flag.getValue();
  if (auto integer = llvm::dyn_cast<mlir::IntegerAttr>(attribute))
    return integer.getInt();
  if (auto real = llvm::dyn_cast<mlir::FloatAttr>(attribute))
    return number(real.getValueAsDouble());
  if (auto text = llvm::dyn_cast<mlir::StringAttr>(attribute))
    return text.str();
  return nullptr;
}

} // namespace

void recordDecision(ir::ModelOp model, const LayerDecision &decision) {
  mlir::Builder b(model.getContext());
  llvm::SmallVector<mlir::NamedAttribute> fields = {
      b.getNamedAttr("pass", b.getStringAttr(decision.pass)),
      b.getNamedAttr("method", b.getStringAttr(decision.method)),
      b.getNamedAttr("layer", b.getI64IntegerAttr(decision.layer)),
      b.getNamedAttr("experts", b.getDenseI64ArrayAttr(decision.experts)),
  };
  auto ints = [&](const char *name, const std::vector<int64_t> &values) {
    if (!values.empty())
      fields.push_back(b.getNamedAttr(name, b.getDenseI64ArrayAttr(values)));
  };
  auto reals = [&](const char *name, const std::vector<double> &values) {
    if (!values.empty())
      fields.push_back(b.getNamedAttr(name, b.getDenseF64ArrayAttr(values)));
  };
  if (!decision.scoreName.empty())
    fields.push_back(b.getNamedAttr("score_name", b.getStringAttr(decision.scoreName)));
  reals("scores", decision.scores);
  reals("routed", decision.routed);
  ints("removed", decision.removed);
  ints("into", decision.into);
  ints("widths_before", decision.widthsBefore);
  ints("widths_after", decision.widthsAfter);
  ints("protected", decision.protectedExperts);
  if (decision.calibrationTokens > 0)
    fields.push_back(b.getNamedAttr("calibration_tokens", b.getI64IntegerAttr(decision.calibrationTokens)));
  llvm::SmallVector<mlir::Attribute> entries;
  if (auto existing = model->getAttrOfType<mlir::ArrayAttr>(kDecisions))
    entries.assign(existing.begin(), existing.end());
  entries.push_back(b.getDictionaryAttr(fields));
  model->setAttr(kDecisions, b.getArrayAttr(entries));
}

Status recordOriginal(ir::ModelOp model, const ModelDescription &description) {
  Expected<json> summary = summarizeDescription(description);
  if (!summary)
    return summary.status();
  mlir::Builder b(model.getContext());
  llvm::SmallVector<mlir::NamedAttribute> bytes;
  for (const auto &[role, count] : (*summary)["bytes_by_role"].items())
    bytes.push_back(b.getNamedAttr(role, b.getI64IntegerAttr(count.get<int64_t>())));
  std::vector<int64_t> experts, widths;
  for (size_t l = 0; l < description.layers.size(); ++l) {
    experts.push_back(static_cast<int64_t>(description.layers[l].experts.size()));
    widths.push_back(description.spec.layers[l].mlp == MlpKind::Moe ? description.spec.layers[l].expertIntermediateSize
                                                                    : 0);
  }
  model->setAttr(kOriginal,
                 b.getDictionaryAttr({b.getNamedAttr("bytes_by_role", b.getDictionaryAttr(bytes)),
                                      b.getNamedAttr("bytes", b.getI64IntegerAttr((*summary)["bytes"].get<int64_t>())),
                                      b.getNamedAttr("experts", b.getDenseI64ArrayAttr(experts)),
                                      b.getNamedAttr("expert_widths", b.getDenseI64ArrayAttr(widths))}));
  return Status::success();
}

void setTaskSets(ir::ModelOp model, const std::vector<TaskExpertSet> &sets) {
  mlir::Builder b(model.getContext());
  llvm::SmallVector<mlir::Attribute> entries;
  for (const TaskExpertSet &set : sets) {
    llvm::SmallVector<mlir::NamedAttribute> masked, signatures;
    for (const auto &[layer, rows] : set.masked)
      masked.push_back(b.getNamedAttr(std::to_string(layer),
                                      b.getDenseI64ArrayAttr(std::vector<int64_t>(rows.begin(), rows.end()))));
    for (const auto &[layer, signature] : set.signatures)
      signatures.push_back(b.getNamedAttr(std::to_string(layer), b.getDenseF64ArrayAttr(signature)));
    entries.push_back(b.getDictionaryAttr({
        b.getNamedAttr("name", b.getStringAttr(set.name)),
        b.getNamedAttr("signatures", b.getDictionaryAttr(signatures)),
        b.getNamedAttr("tokens", b.getI64IntegerAttr(set.tokens)),
        b.getNamedAttr("masked", b.getDictionaryAttr(masked)),
    }));
  }
  if (entries.empty())
    model->removeAttr(kTaskSets);
  else
    model->setAttr(kTaskSets, b.getArrayAttr(entries));
}

Expected<std::vector<TaskExpertSet>> readTaskSets(ir::ModelOp model) {
  mlir::Attribute attribute = model->getAttr(kTaskSets);
  if (!attribute)
    return std::vector<TaskExpertSet>();
  return taskSetsFromJson(attributeToJson(attribute), "moe.model @" + model.getSymName().str() + " moe.task_sets");
}

json historyToJson(ir::ModelOp model) {
  json out = {{"original", nullptr}, {"decisions", json::array()}};
  if (mlir::Attribute original = model->getAttr(kOriginal))
    out["original"] = attributeToJson(original);
  if (mlir::Attribute decisions = model->getAttr(kDecisions))
    out["decisions"] = attributeToJson(decisions);
  return out;
}

} // namespace moe
