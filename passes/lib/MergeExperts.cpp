//===- MergeExperts.cpp - M-SMoE merging and DERN recombination -----------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "PassSupport.h"
#include "moe/Calibration/StatisticNames.h"
#include "moe/Transforms/Passes.h"

#include "Assignment.h"
#include "Clustering.h"
#include "ExpertEditing.h"
#include "LayerLoader.h"
#include "StatisticsReader.h"
#include "SuperExperts.h"

#include "mlir/IR/Builders.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <set>

namespace moe {
#define GEN_PASS_DEF_MOEMERGEEXPERTS
#include "moe/Transforms/Passes.h.inc"
} // namespace moe

using namespace mlir;
using namespace moe;

namespace {

/// One expert's gate [I, H], up [I, H] and down [H, I] as f32.
struct ExpertMatrices {
  std::vector<float> gate, up, down;
  int64_t width = 0, hidden = 0;
  DType dtype = DType::BF16;
};

FailureOr<ExpertMatrices> readExpert(ir::ModelOp model, TensorAccess &access, ir::ExpertOp expert) {
  ExpertMatrices m;
  DType dtypes[3];
  FailureOr<std::vector<float>> gate = readF32(model, access, expert.getGateAttr(), dtypes[0]);
  FailureOr<std::vector<float>> up = readF32(model, access, expert.getUpAttr(), dtypes[1]);
  FailureOr<std::vector<float>> down = readF32(model, access, expert.getDownAttr(), dtypes[2]);
  if (failed(gate) || failed(up) || failed(down))
    return failure();
  m.gate = std::move(*gate);
  m.up = std::move(*up);
  m.down = std::move(*down);
  m.width = static_cast<int64_t>(expert.getWidth());
  m.hidden = static_cast<int64_t>(m.gate.size()) / m.width;
  m.dtype = dtypes[0];
  return m;
}

/// Every expert of a block, in slot order.
FailureOr<std::vector<ExpertMatrices>> readExperts(ir::ModelOp model, TensorAccess &access,
                                                   llvm::ArrayRef<ir::ExpertOp> experts) {
  std::vector<ExpertMatrices> matrices;
  for (ir::ExpertOp expert : experts) {
    FailureOr<ExpertMatrices> m = readExpert(model, access, expert);
    if (failed(m))
      return failure();
    matrices.push_back(std::move(*m));
  }
  return matrices;
}

/// Neuron j as one vector: gate row, up row, down column.
std::vector<double> neuron(const ExpertMatrices &m, int64_t j) {
  const int64_t H = m.hidden, I = m.width;
  std::vector<double> v(static_cast<size_t>(3 * H));
  for (int64_t h = 0; h < H; ++h) {
    v[h] = m.gate[j * H + h];
    v[H + h] = m.up[j * H + h];
    v[2 * H + h] = m.down[h * I + j];
  }
  return v;
}

/// Permutes `member`'s neurons to line up with `centre`'s: the assignment
/// maximising the summed dot products of gate rows, up rows and down columns.
void alignNeurons(const ExpertMatrices &centre, ExpertMatrices &member) {
  const int64_t I = centre.width, H = centre.hidden;
  std::vector<double> cost(static_cast<size_t>(I * I));
  for (int64_t a = 0; a < I; ++a)
    for (int64_t b = 0; b < I; ++b) {
      double dot = 0;
      for (int64_t h = 0; h < H; ++h)
        dot += static_cast<double>(centre.gate[a * H + h]) * member.gate[b * H + h] +
               static_cast<double>(centre.up[a * H + h]) * member.up[b * H + h] +
               static_cast<double>(centre.down[h * I + a]) * member.down[h * I + b];
      cost[a * I + b] = -dot;
    }
  std::vector<int64_t> assignment = solveAssignment(cost, I);
  ExpertMatrices permuted = member;
  for (int64_t a = 0; a < I; ++a) {
    const int64_t b = assignment[static_cast<size_t>(a)];
    std::copy_n(member.gate.begin() + b * H, H, permuted.gate.begin() + a * H);
    std::copy_n(member.up.begin() + b * H, H, permuted.up.begin() + a * H);
    for (int64_t h = 0; h < H; ++h)
      permuted.down[h * I + a] = member.down[h * I + b];
  }
  member = std::move(permuted);
}

struct LayerInfo {
  ir::LayerOp layer;
  BlockParts parts;
  int64_t index = 0;
  std::vector<double> routed, gateWeight, gram;
  LayerDecision history; ///< Routing and coverage; the method fills the rest.
};

struct MergeExpertsPass : public moe::impl::MoeMergeExpertsBase<MergeExpertsPass> {
  using MoeMergeExpertsBase::MoeMergeExpertsBase;

  void runOnOperation() override {
    ir::ModelOp module = getOperation();
    if (!(ratio >= 0.0 && ratio < 1.0) || groups < 0 || (groups > 0) == (ratio > 0.0))
      return fail(module, "give ratio in (0, 1) or groups > 0, not both");
    if (!(threshold >= -1.0 && threshold <= 1.0))
      return fail(module, "threshold must be a cosine similarity in [-1, 1]");
    ir::ModelOp model = module;
    FailureOr<StatisticsReader> file = StatisticsReader::openForExperts(stats, model, getArgument());
    if (failed(file))
      return signalPassFailure();
    std::vector<LayerInfo> layers;
    for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>()) {
      LayerInfo info;
      info.parts = blockParts(layer);
      if (!info.parts.block)
        continue;
      info.layer = layer;
      info.index = static_cast<int64_t>(layer.getIndex());
      if (info.parts.router.getRemap())
        return fail(layer, concat("layer ", info.index, " is already merged"));
      FailureOr<std::vector<double>> routed = file->layer(info.index, stats::kRoutedTokens, layer);
      FailureOr<std::vector<double>> weight = file->layer(info.index, stats::kGateWeightSum, layer);
      FailureOr<std::vector<double>> gram = file->layer(info.index, stats::kRouterLogitGram, layer);
      if (failed(routed) || failed(weight) || failed(gram))
        return signalPassFailure();
      const size_t E = info.parts.experts.size();
      if (routed->size() != E || static_cast<uint64_t>(info.parts.experts.back().getId()) != E - 1)
        return fail(layer, concat("the statistics have ", routed->size(), " experts for layer ", info.index,
                                  ", the layer has ", E, "; calibrate the model as it is now"));
      info.routed = std::move(*routed);
      if (failed(file->fillRouting(info.index, layer, info.history)))
        return signalPassFailure();
      info.history.pass = getArgument().str();
      info.history.method = choiceName(static_cast<MergeMethod>(method)).str();
      info.history.layer = info.index;
      for (ir::ExpertOp expert : info.parts.experts)
        info.history.experts.push_back(expert.getOriginalId());
      info.gateWeight = std::move(*weight);
      info.gram = std::move(*gram);
      layers.push_back(std::move(info));
    }
    std::set<std::pair<int64_t, int64_t>> superExperts;
    if (protectSuperExperts) {
      FailureOr<std::set<std::pair<int64_t, int64_t>>> found = findSuperExperts(*file, model, getArgument());
      if (failed(found))
        return signalPassFailure();
      superExperts = std::move(*found);
    }
    TensorAccess access(model);
    LogicalResult result = method == MergeMethod::Msmoe ? mergeMsmoe(model, access, layers, superExperts)
                                                        : recombineDern(model, access, layers, superExperts);
    if (failed(result))
      return signalPassFailure();
    eraseUnusedTensors(model);
  }

  void fail(Operation *op, const std::string &message) {
    passError(op, getArgument()) << message;
    signalPassFailure();
  }

  LogicalResult mergeMsmoe(ir::ModelOp model, TensorAccess &access, std::vector<LayerInfo> &layers,
                           const std::set<std::pair<int64_t, int64_t>> &superExperts) {
    // Global adaptive group counts (M-SMoE): frequencies normalised per
    // layer, the layer's most used expert (and any super expert) set to 1.
    int64_t total = 0;
    std::vector<std::vector<double>> adjusted;
    std::vector<double> all;
    for (const LayerInfo &info : layers) {
      const size_t E = info.routed.size();
      total += static_cast<int64_t>(E);
      double sum = std::accumulate(info.routed.begin(), info.routed.end(), 0.0);
      std::vector<double> frequency(E);
      for (size_t e = 0; e < E; ++e)
        frequency[e] = sum > 0 ? info.routed[e] / sum : 0.0;
      frequency[std::max_element(frequency.begin(), frequency.end()) - frequency.begin()] = 1.0;
      for (size_t e = 0; e < E; ++e)
        if (superExperts.count({info.index, static_cast<int64_t>(e)}))
          frequency[e] = 1.0;
      all.insert(all.end(), frequency.begin(), frequency.end());
      adjusted.push_back(std::move(frequency));
    }
    if (layers.empty())
      return success();
    int64_t target = groups > 0 ? groups * static_cast<int64_t>(layers.size())
                                : static_cast<int64_t>(std::llround((1.0 - ratio) * static_cast<double>(total)));
    target = std::clamp<int64_t>(target, static_cast<int64_t>(layers.size()), total);
    std::sort(all.begin(), all.end(), std::greater<double>());
    const double threshold = all[static_cast<size_t>(target - 1)];

    for (size_t l = 0; l < layers.size(); ++l) {
      LayerInfo &info = layers[l];
      const int64_t E = static_cast<int64_t>(info.routed.size());
      // Centres: the most used experts (ties: lower id).
      std::vector<int64_t> order(static_cast<size_t>(E));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return adjusted[l][a] > adjusted[l][b]; });
      int64_t centres = 0;
      for (int64_t e = 0; e < E; ++e)
        centres += adjusted[l][e] >= threshold ? 1 : 0;
      centres = std::max<int64_t>(1, centres);
      if (centres == E)
        continue;
      std::vector<int64_t> groupOf(static_cast<size_t>(E), -1);
      std::vector<double> similarityOf(static_cast<size_t>(E), 1.0); // to the group's centre
      std::vector<int64_t> centreIds(order.begin(), order.begin() + centres);
      for (int64_t c : centreIds)
        groupOf[c] = c;

      FailureOr<std::vector<ExpertMatrices>> read = readExperts(model, access, info.parts.experts);
      if (failed(read))
        return failure();
      std::vector<ExpertMatrices> &matrices = *read;
      for (int64_t e = 0; e < E; ++e) {
        if (groupOf[e] >= 0)
          continue;
        int64_t best = -1;
        double bestSimilarity = -INFINITY;
        for (int pass = 0; pass < 2 && best < 0; ++pass)
          for (int64_t c : centreIds) {
            // Super experts take no members unless nothing else can.
            if (pass == 0 && superExperts.count({info.index, c}))
              continue;
            double s;
            if (similarity == MergeSimilarity::RouterLogits) {
              double a = info.gram[e * E + e], b = info.gram[c * E + c];
              s = a > 0 && b > 0 ? info.gram[e * E + c] / std::sqrt(a * b) : 0.0;
            } else {
              std::vector<double> x, y;
              for (int64_t j = 0; j < matrices[e].width; ++j) {
                std::vector<double> u = neuron(matrices[e], j), v = neuron(matrices[c], j);
                x.insert(x.end(), u.begin(), u.end());
                y.insert(y.end(), v.begin(), v.end());
              }
              s = cosine(x, y);
            }
            if (s > bestSimilarity) {
              bestSimilarity = s;
              best = c;
            }
          }
        groupOf[e] = best;
        similarityOf[e] = bestSimilarity;
      }
      // Frequency-weighted average of each group's members.
      for (int64_t c : centreIds) {
        std::vector<int64_t> members;
        for (int64_t e = 0; e < E; ++e)
          if (groupOf[e] == c)
            members.push_back(e);
        if (members.size() < 2)
          continue;
        double weightSum = 0;
        for (int64_t e : members)
          weightSum += info.routed[e];
        ExpertMatrices merged = matrices[c];
        for (std::vector<float> *values : {&merged.gate, &merged.up, &merged.down})
          std::fill(values->begin(), values->end(), 0.0f);
        for (int64_t e : members) {
          if (matrices[e].width != matrices[c].width)
            return passError(info.layer, getArgument()) << "experts " << c << " and " << e << " of layer " << info.index
                                                        << " have different widths; merge before moe-prune-atoms";
          ExpertMatrices member = matrices[e];
          if (align == MergeAlign::Permutation && e != c)
            alignNeurons(matrices[c], member);
          const float w = static_cast<float>(weightSum > 0 ? info.routed[e] / weightSum
                                                           : 1.0 / static_cast<double>(members.size()));
          for (size_t i = 0; i < merged.gate.size(); ++i) {
            merged.gate[i] += w * member.gate[i];
            merged.up[i] += w * member.up[i];
          }
          for (size_t i = 0; i < merged.down.size(); ++i)
            merged.down[i] += w * member.down[i];
        }
        ir::ExpertOp centre = info.parts.experts[static_cast<size_t>(c)];
        FailureOr<FlatSymbolRefAttr> symbols[3];
        const std::vector<float> *values[3] = {&merged.gate, &merged.up, &merged.down};
        FlatSymbolRefAttr old[3] = {centre.getGateAttr(), centre.getUpAttr(), centre.getDownAttr()};
        for (int i = 0; i < 3; ++i) {
          ir::TensorOp like = lookupTensor(model, old[i]);
          symbols[i] = writeTensor(model, access, like, (like.getSymName() + ".merge").str(),
                                   like.getTensorType().getShape(), *values[i], merged.dtype);
          if (failed(symbols[i]))
            return failure();
        }
        centre.setGateAttr(*symbols[0]);
        centre.setUpAttr(*symbols[1]);
        centre.setDownAttr(*symbols[2]);
      }

      LayerDecision &decision = info.history;
      decision.scoreName = similarity == MergeSimilarity::RouterLogits ? "router-logit cosine to the group's centre"
                                                                       : "weight cosine to the group's centre";
      decision.scores = similarityOf;
      for (int64_t e = 0; e < E; ++e) {
        decision.into.push_back(decision.experts[static_cast<size_t>(groupOf[e])]);
        if (groupOf[e] != e)
          decision.removed.push_back(decision.experts[static_cast<size_t>(e)]);
        if (superExperts.count({info.index, e}))
          decision.protectedExperts.push_back(decision.experts[static_cast<size_t>(e)]);
      }
      recordDecision(model, decision);

      // Members go; centres are renumbered in id order; every router row
      // maps to its group's expert.
      std::vector<int64_t> newId(static_cast<size_t>(E), -1);
      int64_t next = 0;
      for (int64_t e = 0; e < E; ++e)
        if (groupOf[e] == e)
          newId[e] = next++;
      SmallVector<int64_t> remap;
      for (int64_t e = 0; e < E; ++e)
        remap.push_back(newId[groupOf[e]]);
      for (int64_t e = 0; e < E; ++e) {
        ir::ExpertOp expert = info.parts.experts[static_cast<size_t>(e)];
        if (groupOf[e] != e) {
          expert->erase();
          ++expertsMerged;
        } else {
          renumberExpert(expert, newId[e]);
        }
      }
      info.parts.router.setRemapAttr(Builder(model.getContext()).getDenseI64ArrayAttr(remap));
    }
    return success();
  }

  LogicalResult recombineDern(ir::ModelOp model, TensorAccess &access, std::vector<LayerInfo> &layers,
                              const std::set<std::pair<int64_t, int64_t>> &superExperts) {
    for (LayerInfo &info : layers) {
      const int64_t E = static_cast<int64_t>(info.routed.size());
      const int64_t topK = static_cast<int64_t>(info.parts.router.getTopK());
      int64_t keep = groups > 0 ? groups : E - static_cast<int64_t>(std::llround(ratio * static_cast<double>(E)));
      keep = std::clamp<int64_t>(keep, topK, E);
      if (keep == E)
        continue;
      // Retain the experts with the largest routed gate weight (super experts first).
      std::vector<int64_t> order(static_cast<size_t>(E));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        bool sa = superExperts.count({info.index, a}), sb = superExperts.count({info.index, b});
        return sa != sb ? sa : info.gateWeight[a] > info.gateWeight[b];
      });
      std::vector<int64_t> retained(order.begin(), order.begin() + keep);
      std::set<int64_t> dropped(order.begin() + keep, order.end());
      FailureOr<std::vector<ExpertMatrices>> read = readExperts(model, access, info.parts.experts);
      if (failed(read))
        return failure();
      std::vector<ExpertMatrices> &matrices = *read;
      // Neuron vectors of the retained experts (cosine compares them).
      struct Target {
        int64_t expert;
        std::vector<double> vector;
      };
      std::vector<Target> targets;
      // Super experts receive nothing: re-clustering would average their
      // outlier neurons with others.
      for (int64_t e : retained) {
        if (superExperts.count({info.index, e}))
          continue;
        for (int64_t j = 0; j < matrices[e].width; ++j)
          targets.push_back({e, neuron(matrices[e], j)});
      }
      // Each dropped neuron goes to the retained expert holding its most
      // similar neuron, when that similarity reaches the threshold, with
      // its expert's importance (the score that dropped it) as weight.
      auto importance = [&](int64_t e) { return std::max(info.gateWeight[e], 0.0) + 1e-12; };
      std::map<int64_t, std::vector<Segment>> incoming;
      for (int64_t d : dropped)
        for (int64_t j = 0; j < matrices[d].width; ++j) {
          std::vector<double> v = neuron(matrices[d], j);
          const Target *best = nullptr;
          double bestSimilarity = threshold;
          for (const Target &t : targets) {
            double s = cosine(v, t.vector);
            if (s >= bestSimilarity) {
              bestSimilarity = s;
              best = &t;
            }
          }
          if (!best)
            continue;
          incoming[best->expert].push_back({std::move(v), importance(d)});
          ++neuronsRecombined;
        }
      // Each expert that received neurons: its own and the received ones
      // clustered back to its width by weighted spherical k-means.
      for (auto &[e, segments] : incoming) {
        ExpertMatrices &m = matrices[e];
        const int64_t H = m.hidden, I = m.width;
        std::vector<Segment> members;
        for (int64_t j = 0; j < I; ++j)
          members.push_back({neuron(m, j), importance(e)});
        for (Segment &segment : segments)
          members.push_back(std::move(segment));
        std::vector<std::vector<double>> centroids = sphericalKMeans(members, I, H);
        for (int64_t j = 0; j < I; ++j)
          for (int64_t h = 0; h < H; ++h) {
            m.gate[j * H + h] = static_cast<float>(centroids[j][h]);
            m.up[j * H + h] = static_cast<float>(centroids[j][H + h]);
            m.down[h * I + j] = static_cast<float>(centroids[j][2 * H + h]);
          }
      }
      for (const auto &[e, segments] : incoming) {
        ir::ExpertOp expert = info.parts.experts[static_cast<size_t>(e)];
        const std::vector<float> *values[3] = {&matrices[e].gate, &matrices[e].up, &matrices[e].down};
        FlatSymbolRefAttr old[3] = {expert.getGateAttr(), expert.getUpAttr(), expert.getDownAttr()};
        FailureOr<FlatSymbolRefAttr> symbols[3];
        for (int i = 0; i < 3; ++i) {
          ir::TensorOp like = lookupTensor(model, old[i]);
          symbols[i] = writeTensor(model, access, like, (like.getSymName() + ".dern").str(),
                                   like.getTensorType().getShape(), *values[i], matrices[e].dtype);
          if (failed(symbols[i]))
            return failure();
        }
        expert.setGateAttr(*symbols[0]);
        expert.setUpAttr(*symbols[1]);
        expert.setDownAttr(*symbols[2]);
      }
      LayerDecision &decision = info.history;
      decision.scoreName = "gate weight sum (the largest are retained)";
      decision.scores = info.gateWeight;
      for (int64_t d : dropped)
        decision.removed.push_back(decision.experts[static_cast<size_t>(d)]);
      for (int64_t e = 0; e < E; ++e)
        if (superExperts.count({info.index, e}))
          decision.protectedExperts.push_back(decision.experts[static_cast<size_t>(e)]);
      recordDecision(model, decision);
      DropCounts counts;
      if (failed(dropExperts(model, info.layer, dropped, access, getArgument(), counts)))
        return failure();
      expertsMerged += counts.experts;
    }
    return success();
  }
};

} // namespace
