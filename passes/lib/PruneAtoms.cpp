//===- PruneAtoms.cpp - Remove the weakest neurons of routed experts ------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "PassSupport.h"
#include "moe/Calibration/StatisticNames.h"
#include "moe/Transforms/Passes.h"

#include "ExpertEditing.h"
#include "LayerLoader.h"
#include "StatisticsReader.h"
#include "SuperExperts.h"

#include <algorithm>
#include <cmath>
#include <map>

namespace moe {
#define GEN_PASS_DEF_MOEPRUNEATOMS
#include "moe/Transforms/Passes.h.inc"
} // namespace moe

using namespace mlir;
using namespace moe;

namespace {

struct Atom {
  int64_t layer, expert, neuron;
  double score;
};

/// Squared L2 norms of the rows (dim 0) or columns (dim 1) of a [rows, cols] matrix.
std::vector<double> squaredNorms(const std::vector<float> &values, int64_t rows, int64_t cols, int dim) {
  std::vector<double> norms(static_cast<size_t>(dim == 0 ? rows : cols), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      double v = values[r * cols + c];
      norms[dim == 0 ? r : c] += v * v;
    }
  return norms;
}

struct PruneAtomsPass : public moe::impl::MoePruneAtomsBase<PruneAtomsPass> {
  using MoePruneAtomsBase::MoePruneAtomsBase;

  void runOnOperation() override {
    ir::ModelOp module = getOperation();
    if (!(ratio >= 0.0 && ratio < 1.0))
      return fail(module, concat("ratio must be in [0, 1), got ", static_cast<double>(ratio)));
    if (!(rho >= 0.0 && rho <= 1.0))
      return fail(module, concat("rho must be in [0, 1], got ", static_cast<double>(rho)));
    if (minWidth < 1)
      return fail(module, concat("min-width must be at least 1, got ", static_cast<int64_t>(minWidth)));
    ir::ModelOp model = module;
    FailureOr<StatisticsReader> file = failure();
    if (method != AtomScore::Magnitude ? failed(file = StatisticsReader::openForExperts(stats, model, getArgument()))
                                       : failed(refuseSplitExperts(model, getArgument())))
      return signalPassFailure();
    TensorAccess access(model);
    std::vector<Atom> atoms;
    std::map<std::pair<int64_t, int64_t>, ir::ExpertOp> experts;
    std::map<int64_t, int64_t> layerNeurons;
    for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>()) {
      BlockParts parts = blockParts(layer);
      if (!parts.block)
        continue;
      const int64_t index = static_cast<int64_t>(layer.getIndex());
      FailureOr<std::vector<double>> routed = failure();
      if (method == AtomScore::Heapr || method == AtomScore::CameraSum) {
        routed = file->layer(index, stats::kRoutedTokens, layer);
        if (failed(routed))
          return signalPassFailure();
      }
      if (method == AtomScore::Heapr && !parts.experts.empty() &&
          !file->has(index, concat("experts.", static_cast<int64_t>(parts.experts.front().getId()), ".",
                                   stats::kNeuronGradientSquareSum)))
        return fail(layer, concat("method=heapr needs the loss gradients of layer ", index, "'s experts (",
                                  stats::kNeuronGradientSquareSum, ") in '", stats.getValue(),
                                  "': calibrate with moec calibrate --gradients (moec compress does so itself)"));
      for (ir::ExpertOp expert : parts.experts) {
        const int64_t id = static_cast<int64_t>(expert.getId());
        const int64_t width = static_cast<int64_t>(expert.getWidth());
        experts[{index, id}] = expert;
        layerNeurons[index] += width;
        DType dtype;
        FailureOr<std::vector<float>> down = readF32(model, access, expert.getDownAttr(), dtype);
        if (failed(down))
          return signalPassFailure();
        const int64_t hidden = static_cast<int64_t>(down->size()) / width;
        std::vector<double> downNorms = squaredNorms(*down, hidden, width, 1);
        std::vector<double> scores(static_cast<size_t>(width));
        if (method == AtomScore::Magnitude) {
          FailureOr<std::vector<float>> gate = readF32(model, access, expert.getGateAttr(), dtype);
          FailureOr<std::vector<float>> up = readF32(model, access, expert.getUpAttr(), dtype);
          if (failed(gate) || failed(up))
            return signalPassFailure();
          std::vector<double> gateNorms = squaredNorms(*gate, width, hidden, 0);
          std::vector<double> upNorms = squaredNorms(*up, width, hidden, 0);
          for (int64_t j = 0; j < width; ++j)
            scores[j] = std::sqrt(gateNorms[j] * upNorms[j] * downNorms[j]);
        } else if (method == AtomScore::Heapr) {
          // HEAPr: (1/N_e) sum_t x_tj^2 . w_j^T M_e w_j with M_e the
          // empirical Fisher (1/N_e) sum_t g_t g_t^T in the expert's output
          // space, and w_j^T g_t = dL/dx_tj.
          FailureOr<std::vector<double>> squares = file->expert(index, id, stats::kNeuronSquareSum, layer);
          FailureOr<std::vector<double>> gradients = file->expert(index, id, stats::kNeuronGradientSquareSum, layer);
          if (failed(squares) || failed(gradients))
            return signalPassFailure();
          if (static_cast<int64_t>(squares->size()) != width || static_cast<int64_t>(gradients->size()) != width)
            return fail(expert, concat("the statistics of layer ", index, " expert ", id, " have ", squares->size(),
                                       " neurons, the expert has ", width, "; calibrate the model as it is now"));
          const double tokens = id < static_cast<int64_t>(routed->size()) ? (*routed)[id] : 0.0;
          for (int64_t j = 0; j < width; ++j)
            scores[j] = tokens > 0 ? ((*squares)[j] / tokens) * ((*gradients)[j] / tokens) : -1.0;
        } else {
          FailureOr<std::vector<double>> sum = file->expert(index, id, stats::kNeuronWeightedSquareSum, layer);
          if (failed(sum))
            return signalPassFailure();
          if (static_cast<int64_t>(sum->size()) != width)
            return fail(expert, concat("the statistics of layer ", index, " expert ", id, " have ", sum->size(),
                                       " neurons, the expert has ", width, "; calibrate the model as it is now"));
          if (method == AtomScore::Camera) {
            FailureOr<std::vector<double>> max = file->expert(index, id, stats::kNeuronWeightedSquareMax, layer);
            if (failed(max))
              return signalPassFailure();
            for (int64_t j = 0; j < width; ++j)
              scores[j] = downNorms[j] * ((1.0 - rho) * (*sum)[j] + rho * (*max)[j]);
          } else {
            const double tokens = id < static_cast<int64_t>(routed->size()) ? (*routed)[id] : 0.0;
            for (int64_t j = 0; j < width; ++j)
              scores[j] = tokens > 0 ? downNorms[j] * (*sum)[j] / tokens : -1.0;
          }
        }
        for (int64_t j = 0; j < width; ++j)
          atoms.push_back({index, id, j, scores[j]});
      }
    }

    // Lowest first; ties remove the later neuron.
    std::stable_sort(atoms.begin(), atoms.end(), [](const Atom &a, const Atom &b) {
      if (a.score != b.score)
        return a.score < b.score;
      return std::tie(a.layer, a.expert, a.neuron) > std::tie(b.layer, b.expert, b.neuron);
    });
    int64_t totalNeurons = 0;
    for (const auto &[layer, neurons] : layerNeurons)
      totalNeurons += neurons;
    std::map<int64_t, int64_t> layerRemoved;
    std::map<std::pair<int64_t, int64_t>, std::set<int64_t>> removed;
    int64_t removedTotal = 0;
    const int64_t globalBudget = static_cast<int64_t>(std::llround(ratio * static_cast<double>(totalNeurons)));
    for (const Atom &atom : atoms) {
      if (scope == PruneScope::Global
              ? removedTotal >= globalBudget
              : layerRemoved[atom.layer] >=
                    static_cast<int64_t>(std::llround(ratio * static_cast<double>(layerNeurons[atom.layer]))))
        continue;
      std::set<int64_t> &expertRemoved = removed[{atom.layer, atom.expert}];
      ir::ExpertOp expert = experts[{atom.layer, atom.expert}];
      if (static_cast<int64_t>(expert.getWidth()) - static_cast<int64_t>(expertRemoved.size()) <= minWidth)
        continue;
      expertRemoved.insert(atom.neuron);
      ++layerRemoved[atom.layer];
      ++removedTotal;
    }

    // The history (History.h): per layer, each expert's widths and the
    // share of its neurons' importance that went.
    std::map<std::pair<int64_t, int64_t>, std::pair<double, double>> importance; // removed, total
    for (const Atom &atom : atoms) {
      auto &[gone, total] = importance[{atom.layer, atom.expert}];
      const double score = std::max(0.0, atom.score);
      total += score;
      auto it = removed.find({atom.layer, atom.expert});
      if (it != removed.end() && it->second.count(atom.neuron))
        gone += score;
    }
    // (A pass that removes nothing leaves the module as it was.)
    for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>()) {
      BlockParts parts = blockParts(layer);
      if (!parts.block || removedTotal == 0)
        continue;
      LayerDecision decision;
      decision.pass = getArgument().str();
      decision.method = choiceName(static_cast<AtomScore>(method)).str();
      decision.layer = static_cast<int64_t>(layer.getIndex());
      decision.scoreName = "share of the expert's neuron importance removed";
      if (method != AtomScore::Magnitude && failed(file->fillRouting(decision.layer, layer, decision)))
        return signalPassFailure();
      for (ir::ExpertOp expert : parts.experts) {
        const std::pair<int64_t, int64_t> where = {decision.layer, static_cast<int64_t>(expert.getId())};
        const int64_t width = static_cast<int64_t>(expert.getWidth());
        auto it = removed.find(where);
        const auto &[gone, total] = importance[where];
        decision.experts.push_back(expert.getOriginalId());
        decision.widthsBefore.push_back(width);
        decision.widthsAfter.push_back(width - (it == removed.end() ? 0 : static_cast<int64_t>(it->second.size())));
        decision.scores.push_back(total > 0 ? gone / total : 0.0);
      }
      recordDecision(model, decision);
    }

    for (const auto &[where, neurons] : removed) {
      if (neurons.empty())
        continue;
      ir::ExpertOp expert = experts[where];
      SmallVector<int64_t> keep;
      for (int64_t j = 0; j < static_cast<int64_t>(expert.getWidth()); ++j)
        if (!neurons.count(j))
          keep.push_back(j);
      FailureOr<FlatSymbolRefAttr> gate = selectSlices(model, access, expert.getGateAttr(), keep, 0, ".atoms");
      FailureOr<FlatSymbolRefAttr> up = selectSlices(model, access, expert.getUpAttr(), keep, 0, ".atoms");
      FailureOr<FlatSymbolRefAttr> down = selectSlices(model, access, expert.getDownAttr(), keep, 1, ".atoms");
      if (failed(gate) || failed(up) || failed(down))
        return signalPassFailure();
      expert.setGateAttr(*gate);
      expert.setUpAttr(*up);
      expert.setDownAttr(*down);
      expert.setWidth(static_cast<uint64_t>(keep.size()));
      neuronsPruned += static_cast<int64_t>(neurons.size());
    }
    eraseUnusedTensors(model);
  }

  void fail(Operation *op, const std::string &message) {
    passError(op, getArgument()) << message;
    signalPassFailure();
  }
};

} // namespace
