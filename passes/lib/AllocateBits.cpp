//===- AllocateBits.cpp - Mixed-precision bits per expert under a budget --===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Transforms/Passes.h"
#include "moe/Runtime/Engine.h"

#include "BitAllocation.h"
#include "CalibrationStats.h"
#include "ExpertEditing.h"
#include "common/QuantFormat.h"

#include "mlir/IR/Builders.h"

#include <cmath>
#include <map>
#include <numeric>
#include <sstream>

namespace moe {
#define GEN_PASS_DEF_MOEALLOCATEBITS
#include "moe/Transforms/Passes.h.inc"
} // namespace moe

using namespace mlir;
using namespace moe;

namespace {

/// The RTN-dequantized values of `values` ([rows, cols]) at `format`.
std::vector<float> roundTrip(const quant::QuantFormat &format, const std::vector<float> &values, int64_t rows,
                             int64_t cols) {
  std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
  quant::quantizeReference(format, values.data(), rows, cols, packed.data());
  std::vector<float> out(values.size());
  quant::dequantizeReference(format, packed.data(), rows, cols, out.data());
  return out;
}

struct Unit {
  int64_t layer = 0, expert = 0;
  int matrix = -1; ///< -1: the whole expert; 0/1/2: gate/up/down.
  std::vector<std::string> tensors;
  AllocationUnit allocation;
};

struct AllocateBitsPass : public moe::impl::MoeAllocateBitsBase<AllocateBitsPass> {
  using MoeAllocateBitsBase::MoeAllocateBitsBase;

  void runOnOperation() override {
    ModuleOp module = getOperation();
    if (granularity != "expert" && granularity != "matrix")
      return fail(module, "granularity '" + granularity + "' is not expert or matrix");
    if (objective != "mc-moe" && objective != "hessian")
      return fail(module, "objective '" + objective + "' is not mc-moe or hessian");
    std::vector<int> widths;
    std::stringstream list(candidates);
    for (std::string item; std::getline(list, item, ',');) {
      int bits = std::atoi(item.c_str());
      if (!quant::bitsTraits(bits))
        return fail(module, "candidate '" + item + "' is not 2, 3, 4 or 8 bits");
      widths.push_back(bits);
    }
    if (widths.empty())
      return fail(module, "no candidate widths");
    if (pinBits != 0 && !quant::bitsTraits(static_cast<int>(pinBits)))
      return fail(module, concat("pin-bits must be 0, 2, 3, 4 or 8, got ", static_cast<int64_t>(pinBits)));
    quant::QuantFormat trial{2, static_cast<int>(group), symmetric};
    if (std::string problem = quant::validateQuantFormat(trial); !problem.empty())
      return fail(module, problem);
    FailureOr<CalibrationStats> file = CalibrationStats::open(stats, module, getArgument());
    if (failed(file))
      return signalPassFailure();

    for (ir::ModelOp model : module.getOps<ir::ModelOp>()) {
      TensorAccess access(model);
      std::vector<Unit> units;
      std::vector<std::pair<double, std::pair<int64_t, int64_t>>> maxOutputs;
      std::vector<std::string> sharedTensors;
      FailureOr<LayerLoader> loader = failure();
      if (objective == "mc-moe") {
        loader = LayerLoader::create(model, getArgument());
        if (failed(loader))
          return signalPassFailure();
      }
      for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>()) {
        BlockParts parts = blockParts(layer);
        if (!parts.block)
          continue;
        const int64_t index = static_cast<int64_t>(layer.getIndex());
        for (ir::SharedExpertOp shared : parts.block.getBody().getOps<ir::SharedExpertOp>())
          for (StringRef name : {shared.getGate(), shared.getUp(), shared.getDown()})
            sharedTensors.push_back(name.str());
        FailureOr<std::vector<double>> routed = file->layer(index, "routed_tokens", layer);
        FailureOr<std::vector<double>> scores = file->layer(index, "router_score_sum", layer);
        FailureOr<std::vector<double>> outputs = file->layer(index, "max_abs_output", layer);
        if (failed(routed) || failed(scores) || failed(outputs))
          return signalPassFailure();
        const double routedTotal = std::accumulate(routed->begin(), routed->end(), 0.0);
        const double scoreTotal = std::accumulate(scores->begin(), scores->end(), 0.0);

        // mc-moe: block-output error with one unit quantized at a time.
        CalibrationStats::BlockSamples blocks;
        FailureOr<LayerWeights> weights = failure();
        if (objective == "mc-moe") {
          FailureOr<CalibrationStats::BlockSamples> loaded = file->blockSamples(index, loader->spec().hiddenSize, layer);
          if (failed(loaded))
            return signalPassFailure();
          blocks = std::move(*loaded);
          weights = loader->load(layer);
          if (failed(weights))
            return signalPassFailure();
          if (!weights->routing.remap.empty())
            return fail(layer, concat("layer ", index, " has merged experts; allocate bits before merging"));
        }
        const LayerSpec *layerSpec =
            objective == "mc-moe" ? &loader->spec().layers[static_cast<size_t>(index)] : nullptr;
        for (size_t slot = 0; slot < parts.experts.size(); ++slot) {
          ir::ExpertOp expert = parts.experts[slot];
          const int64_t id = static_cast<int64_t>(expert.getId());
          if (id >= static_cast<int64_t>(routed->size()))
            return fail(expert, concat("the statistics have ", routed->size(), " experts for layer ", index,
                                       "; calibrate the model as it is now"));
          maxOutputs.push_back({(*outputs)[id], {index, id}});
          FlatSymbolRefAttr symbols[3] = {expert.getGateAttr(), expert.getUpAttr(), expert.getDownAttr()};
          std::vector<float> original[3];
          int64_t shapes[3][2];
          for (int m = 0; m < 3; ++m) {
            DType dtype;
            FailureOr<std::vector<float>> values = readF32(model, access, symbols[m], dtype);
            if (failed(values))
              return signalPassFailure();
            original[m] = std::move(*values);
            ir::TensorOp tensor = lookupTensor(model, symbols[m]);
            shapes[m][0] = tensor.getTensorType().getShape()[0];
            shapes[m][1] = tensor.getTensorType().getShape()[1];
          }
          std::vector<double> hessianDiagonal[3];
          if (objective == "hessian") {
            FailureOr<std::vector<double>> in = file->expert(index, id, "input_moments", expert);
            FailureOr<std::vector<double>> inner = file->expert(index, id, "intermediate_moments", expert);
            if (failed(in) || failed(inner))
              return signalPassFailure();
            for (int m = 0; m < 3; ++m) {
              const std::vector<double> &full = m == 2 ? *inner : *in;
              const int64_t cols = shapes[m][1];
              if (static_cast<int64_t>(full.size()) != cols * cols)
                return fail(expert, concat("moments of layer ", index, " expert ", id, " do not match its width; "
                                           "calibrate the model as it is now"));
              for (int64_t j = 0; j < cols; ++j)
                hessianDiagonal[m].push_back(full[j * cols + j]);
            }
          }
          const double phi = routedTotal > 0 ? 1000.0 * (*routed)[id] / routedTotal : 0.0;
          const double share = scoreTotal > 0 ? 1000.0 * (*scores)[id] / scoreTotal : 0.0;
          const int unitsHere = granularity == "expert" ? 1 : 3;
          for (int u = 0; u < unitsHere; ++u) {
            Unit unit;
            unit.layer = index;
            unit.expert = id;
            unit.matrix = granularity == "expert" ? -1 : u;
            for (int m = 0; m < 3; ++m)
              if (unit.matrix < 0 || unit.matrix == m) {
                unit.tensors.push_back(symbols[m].getValue().str());
                unit.allocation.parameters += shapes[m][0] * shapes[m][1];
              }
            for (int bits : widths) {
              quant::QuantFormat format = trial;
              format.bits = bits;
              double loss = 0;
              if (objective == "hessian") {
                for (int m = 0; m < 3; ++m) {
                  if (unit.matrix >= 0 && unit.matrix != m)
                    continue;
                  std::vector<float> q = roundTrip(format, original[m], shapes[m][0], shapes[m][1]);
                  for (int64_t r = 0; r < shapes[m][0]; ++r)
                    for (int64_t c = 0; c < shapes[m][1]; ++c) {
                      const double d = original[m][r * shapes[m][1] + c] - q[r * shapes[m][1] + c];
                      loss += hessianDiagonal[m][c] * d * d;
                    }
                }
              } else {
                LayerWeights trialWeights = *weights;
                Matrix *matrices[3] = {&trialWeights.experts[slot].gate, &trialWeights.experts[slot].up,
                                       &trialWeights.experts[slot].down};
                for (int m = 0; m < 3; ++m) {
                  if (unit.matrix >= 0 && unit.matrix != m)
                    continue;
                  matrices[m]->bf16.clear();
                  matrices[m]->data = roundTrip(format, original[m], shapes[m][0], shapes[m][1]);
                }
                std::vector<float> scratch;
                const double error = blockOutputError(loader->spec(), *layerSpec, trialWeights, blocks, {}, scratch);
                // MC-MoE: phi^alpha w^beta q^alpha, alpha = 1, beta = 1.5.
                loss = phi * std::pow(share, 1.5) * error;
              }
              unit.allocation.loss.push_back(loss);
            }
            units.push_back(std::move(unit));
          }
        }
      }
      if (pinBits > 0) {
        std::set<std::pair<int64_t, int64_t>> superExperts = findSuperExperts(maxOutputs);
        for (Unit &unit : units)
          if (superExperts.count({unit.layer, unit.expert}))
            unit.allocation.pinnedBits = static_cast<int>(pinBits);
      }
      std::vector<AllocationUnit> problem;
      for (const Unit &unit : units)
        problem.push_back(unit.allocation);
      Expected<Allocation> allocation = allocateBits(problem, widths, budget, tolerance);
      if (!allocation)
        return fail(model, allocation.status().message());
      Builder builder(model.getContext());
      std::map<int, int64_t> histogram;
      for (size_t u = 0; u < units.size(); ++u) {
        for (const std::string &name : units[u].tensors)
          lookupTensor(model, FlatSymbolRefAttr::get(model.getContext(), name))
              ->setAttr("moe.bits", builder.getI64IntegerAttr(allocation->bits[u]));
        ++histogram[allocation->bits[u]];
        ++unitsAllocated;
      }
      if (pinBits > 0)
        for (const std::string &name : sharedTensors)
          lookupTensor(model, FlatSymbolRefAttr::get(model.getContext(), name))
              ->setAttr("moe.bits", builder.getI64IntegerAttr(pinBits));
      std::string widthsText;
      for (const auto &[bits, count] : histogram)
        widthsText += concat(widthsText.empty() ? "" : ", ", count, " at ", bits, " bits");
      model.emitRemark() << concat("moe-allocate-bits: ", units.size(), " units, average ", allocation->averageBits,
                                   " bits (budget ", static_cast<double>(budget), "): ", widthsText);
    }
  }

  void fail(Operation *op, const std::string &message) {
    op->emitError() << "moe-allocate-bits: " << message;
    signalPassFailure();
  }
};

} // namespace
