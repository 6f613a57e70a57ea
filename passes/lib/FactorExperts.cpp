//===- FactorExperts.cpp - A shared base plus low-rank deltas (D2MoE) -----===//
//
// Part of moec. The pass's documentation (Passes.td) says what it computes
// and where it departs from D2MoE's released code.
//
//===----------------------------------------------------------------------===//

#include "PassSupport.h"
#include "moe/Calibration/StatisticNames.h"
#include "moe/Frontend/DType.h"
#include "moe/Lowering/TensorAccess.h"
#include "moe/Support/Status.h"
#include "moe/Transforms/Passes.h"

#include "ExpertEditing.h"
#include "StatisticsReader.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/Threading.h"
#include "llvm/Support/FormatVariadic.h"

#include <Eigen/Dense>
#include <Eigen/SVD>

#include <array>
#include <cmath>
#include <queue>

namespace moe {
#define GEN_PASS_DEF_MOEFACTOREXPERTS
#include "moe/Transforms/Passes.h.inc"
} // namespace moe

using namespace mlir;
using namespace moe;

namespace {

using Dense = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

const char *const kRoles[3] = {"gate", "up", "down"};

/// One expert matrix's difference from the base, decomposed: the whitened
/// SVD's singular values and left singular vectors (the right factor is
/// computed from them and the difference itself, so neither the whitening
/// nor the right singular vectors are kept).
struct Decomposed {
  Eigen::VectorXd sigma; ///< Decreasing.
  Dense u;               ///< Thin: [out, k].
  int64_t out = 0, in = 0;
  int64_t rank = 0; ///< Chosen.
};

/// The Cholesky factor of `moments` (X^T X over the expert's routed
/// tokens), damped by a small fraction of its mean diagonal until it
/// factors; an empty matrix when the moments are zero (no tokens).
Dense whiteningOf(std::vector<double> moments, int64_t n) {
  Eigen::Map<Dense> m(moments.data(), n, n);
  const double mean = m.diagonal().mean();
  if (!(mean > 0) || !std::isfinite(mean))
    return Dense();
  for (double damp = 1e-6; damp < 1; damp *= 10) {
    Dense damped = m;
    damped.diagonal().array() += damp * mean;
    Eigen::LLT<Dense> llt(damped);
    if (llt.info() == Eigen::Success)
      return llt.matrixL();
  }
  return Dense();
}

struct FactorExpertsPass : public moe::impl::MoeFactorExpertsBase<FactorExpertsPass> {
  using MoeFactorExpertsBase::MoeFactorExpertsBase;

  void runOnOperation() override {
    ir::ModelOp model = getOperation();
    if (stats.empty()) {
      passError(model, getArgument()) << "stats: a calibration statistics file is required (moec calibrate "
                                         "--input-moments)";
      return signalPassFailure();
    }
    if (!(ratio > 0.0 && ratio < 1.0)) {
      passError(model, getArgument()) << "ratio must be in (0, 1), the fraction of each layer's routed-expert "
                                         "parameters kept; got "
                                      << ratio.getValue();
      return signalPassFailure();
    }
    if (rankMultiple < 1) {
      passError(model, getArgument()) << "rank-multiple must be at least 1, got " << rankMultiple.getValue();
      return signalPassFailure();
    }
    FailureOr<StatisticsReader> file = StatisticsReader::openForExperts(stats, model, getArgument());
    if (failed(file))
      return signalPassFailure();
    TensorAccess access(model);
    for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>())
      for (ir::MoeBlockOp block : layer.getBody().getOps<ir::MoeBlockOp>())
        if (failed(factorLayer(model, layer, block, *file, access)))
          return signalPassFailure();
    eraseUnusedTensors(model);
  }

  LogicalResult factorLayer(ir::ModelOp model, ir::LayerOp layer, ir::MoeBlockOp block, const StatisticsReader &file,
                            TensorAccess &access) {
    const int64_t index = static_cast<int64_t>(layer.getIndex());
    SmallVector<ir::ExpertOp> experts(block.getBody().getOps<ir::ExpertOp>());
    const int64_t E = static_cast<int64_t>(experts.size());
    const int64_t W = static_cast<int64_t>(experts.front().getWidth()), H = static_cast<int64_t>(model.getHidden());
    for (ir::ExpertOp expert : experts)
      if (static_cast<int64_t>(expert.getWidth()) != W)
        return passError(expert, getArgument())
               << "layer " << index << "'s experts have different widths (" << W << " and " << expert.getWidth()
               << "); factor them before moe-prune-atoms";
    FailureOr<std::vector<double>> routed = file.layer(index, stats::kRoutedTokens, layer);
    if (failed(routed))
      return failure();
    for (ir::ExpertOp expert : experts)
      if (static_cast<int64_t>(expert.getId()) >= static_cast<int64_t>(routed->size()))
        return passError(expert, getArgument()) << "the statistics have " << routed->size() << " experts for layer "
                                                << index << "; calibrate the model as it is now";

    // Every expert's matrices, and the base: their mean weighted by routed
    // tokens (D2MoE's frequency merge; uniform when no token was routed).
    std::vector<std::array<std::vector<float>, 3>> values(static_cast<size_t>(E));
    std::array<DType, 3> dtypes{};
    std::vector<double> weights(static_cast<size_t>(E));
    double totalWeight = 0;
    for (int64_t e = 0; e < E; ++e) {
      weights[e] = (*routed)[experts[e].getId()];
      totalWeight += weights[e];
    }
    for (int64_t e = 0; e < E; ++e) {
      weights[e] = totalWeight > 0 ? weights[e] / totalWeight : 1.0 / static_cast<double>(E);
      const FlatSymbolRefAttr symbols[3] = {experts[e].getGateAttr(), experts[e].getUpAttr(), experts[e].getDownAttr()};
      for (int m = 0; m < 3; ++m) {
        FailureOr<std::vector<float>> read = readF32(model, access, symbols[m], dtypes[m]);
        if (failed(read))
          return failure();
        values[e][m] = std::move(*read);
      }
    }
    const int64_t outs[3] = {W, W, H}, ins[3] = {H, H, W};
    std::array<std::vector<double>, 3> base;
    for (int m = 0; m < 3; ++m) {
      base[m].assign(static_cast<size_t>(outs[m] * ins[m]), 0.0);
      for (int64_t e = 0; e < E; ++e)
        for (size_t i = 0; i < base[m].size(); ++i)
          base[m][i] += weights[e] * values[e][m][i];
    }
    // The base as stored (rounded to its dtype): the deltas are taken from
    // what the runtime will add them to.
    std::array<std::vector<float>, 3> storedBase;
    for (int m = 0; m < 3; ++m) {
      storedBase[m].assign(base[m].begin(), base[m].end());
      roundTo(storedBase[m], dtypes[m]);
    }

    // Whitening: the expert's input moments for gate and up, its
    // intermediate moments for down (calibrated on the model as it is).
    bool whitened = whiten;
    for (ir::ExpertOp expert : experts)
      whitened = whitened && file.hasExpert(index, static_cast<int64_t>(expert.getId()), stats::kInputMoments) &&
                 file.hasExpert(index, static_cast<int64_t>(expert.getId()), stats::kIntermediateMoments);
    if (whiten && !whitened)
      layer.emitRemark() << getArgument() << ": layer " << index << ": " << file.path()
                         << " has no input and intermediate moments for every expert (moec calibrate "
                            "--input-moments); plain SVD, each expert's error weighted by its routed tokens";
    std::vector<Decomposed> parts(static_cast<size_t>(E * 3));
    for (int64_t e = 0; e < E; ++e)
      for (int m = 0; m < 3; ++m) {
        parts[e * 3 + m].out = outs[m];
        parts[e * 3 + m].in = ins[m];
      }
    auto difference = [&](int64_t e, int m) {
      Dense delta(outs[m], ins[m]);
      for (int64_t i = 0; i < outs[m] * ins[m]; ++i)
        delta.data()[i] = static_cast<double>(values[e][m][i]) - static_cast<double>(storedBase[m][i]);
      return delta;
    };
    // A batch of experts at a time, so that only a batch's whitening factors
    // are held: one for gate and up (the same input), one for down.
    const int64_t batch = 8;
    for (int64_t first = 0; first < E; first += batch) {
      const int64_t end = std::min(E, first + batch);
      struct Whitening {
        Dense factor[2]; ///< Input, intermediate; empty: scale x identity.
        double scale[2] = {1.0, 1.0};
      };
      std::vector<Whitening> whitening(static_cast<size_t>(end - first));
      for (int64_t e = first; e < end; ++e) {
        Whitening &w = whitening[static_cast<size_t>(e - first)];
        const int64_t id = static_cast<int64_t>(experts[e].getId());
        for (int kind = 0; kind < 2; ++kind) {
          if (!whitened) {
            w.scale[kind] = std::sqrt(std::max((*routed)[id], 1e-6));
            continue;
          }
          const int64_t n = kind == 0 ? H : W;
          FailureOr<std::vector<double>> moments =
              file.expert(index, id, kind == 0 ? stats::kInputMoments : stats::kIntermediateMoments, experts[e]);
          if (failed(moments))
            return failure();
          if (static_cast<int64_t>(moments->size()) != n * n)
            return passError(experts[e], getArgument())
                   << "the " << (kind == 0 ? "input" : "intermediate") << " moments of layer " << index << " expert "
                   << id << " hold " << moments->size() << " values, not " << n << " x " << n
                   << "; calibrate the model as it is now";
          w.factor[kind] = whiteningOf(std::move(*moments), n);
          if (w.factor[kind].size() == 0)
            w.scale[kind] = 1e-3; // never routed: its error weighs (almost) nothing
        }
      }
      // The SVDs, independent of each other.
      mlir::parallelFor(model.getContext(), 0, static_cast<size_t>((end - first) * 3), [&](size_t job) {
        const int64_t e = first + static_cast<int64_t>(job / 3);
        const int m = static_cast<int>(job % 3);
        Decomposed &d = parts[e * 3 + m];
        const Whitening &w = whitening[static_cast<size_t>(e - first)];
        const int kind = m == 2 ? 1 : 0;
        const Dense delta = difference(e, m);
        Dense whitenedDelta = w.factor[kind].size() ? Dense(delta * w.factor[kind]) : Dense(delta * w.scale[kind]);
        Eigen::BDCSVD<Dense> svd(whitenedDelta, Eigen::ComputeThinU);
        d.sigma = svd.singularValues();
        d.u = svd.matrixU();
      });
    }

    // Ranks: one step each, then greedily the step that removes the most
    // weighted squared error per parameter, within the layer's budget.
    const int64_t step = rankMultiple;
    int64_t expertParameters = 0;
    for (int m = 0; m < 3; ++m)
      expertParameters += outs[m] * ins[m];
    const double budget = ratio * static_cast<double>(E * expertParameters);
    double used = static_cast<double>(expertParameters); // the base
    auto maxRank = [](const Decomposed &d) { return std::min(d.out, d.in); };
    for (Decomposed &d : parts) {
      d.rank = std::min(step, maxRank(d));
      used += static_cast<double>(d.rank * (d.out + d.in));
    }
    if (used > budget)
      return passError(layer, getArgument())
             << "layer " << index << ": ratio " << ratio.getValue() << " keeps " << static_cast<int64_t>(budget)
             << " of its " << E * expertParameters << " routed-expert parameters, but the base and one rank step ("
             << step << ") per expert matrix need " << static_cast<int64_t>(used)
             << "; raise ratio or lower rank-multiple";
    struct Candidate {
      double value;
      size_t part;
      bool operator<(const Candidate &other) const {
        return value < other.value || (value == other.value && part > other.part);
      }
    };
    auto nextStep = [&](size_t p) -> std::optional<Candidate> {
      const Decomposed &d = parts[p];
      const int64_t to = std::min(d.rank + step, maxRank(d));
      if (to <= d.rank)
        return std::nullopt;
      double gain = 0;
      for (int64_t k = d.rank; k < to && k < d.sigma.size(); ++k)
        gain += d.sigma[k] * d.sigma[k];
      return Candidate{gain / static_cast<double>((to - d.rank) * (d.out + d.in)), p};
    };
    std::priority_queue<Candidate> queue;
    for (size_t p = 0; p < parts.size(); ++p)
      if (std::optional<Candidate> c = nextStep(p))
        queue.push(*c);
    while (!queue.empty()) {
      const Candidate best = queue.top();
      queue.pop();
      Decomposed &d = parts[best.part];
      const int64_t to = std::min(d.rank + step, maxRank(d));
      const double cost = static_cast<double>((to - d.rank) * (d.out + d.in));
      if (used + cost > budget)
        continue; // too large now; a cheaper step elsewhere may still fit
      used += cost;
      d.rank = to;
      if (std::optional<Candidate> c = nextStep(best.part))
        queue.push(*c);
    }

    // Write the base and the factors: a = U_r sqrt(Sigma_r), b = sqrt(Sigma_r)
    // V_r^T S^-1 (S^-1 = 1 / scale without moments).
    ir::TensorOp like[3] = {lookupTensor(model, experts.front().getGateAttr()),
                            lookupTensor(model, experts.front().getUpAttr()),
                            lookupTensor(model, experts.front().getDownAttr())};
    FlatSymbolRefAttr baseSymbols[3];
    for (int m = 0; m < 3; ++m) {
      FailureOr<FlatSymbolRefAttr> symbol =
          writeTensor(model, access, like[m], concat("layers.", index, ".expert_base.", kRoles[m]), {outs[m], ins[m]},
                      storedBase[m], dtypes[m]);
      if (failed(symbol))
        return failure();
      baseSymbols[m] = *symbol;
    }
    for (int64_t e = 0; e < E; ++e) {
      FlatSymbolRefAttr left[3];
      SmallVector<Attribute> right;
      for (int m = 0; m < 3; ++m) {
        const Decomposed &d = parts[e * 3 + m];
        const int64_t r = d.rank;
        // With (W_i - base) S = U Sigma V^T: a = U_r sqrt(Sigma_r), and
        // b = sqrt(Sigma_r) V_r^T S^-1 = Sigma_r^-1/2 U_r^T (W_i - base).
        // Directions whose singular value is nil add nothing: zero.
        const Dense delta = difference(e, m);
        const double floor = 1e-12 * (d.sigma.size() ? d.sigma[0] : 0.0);
        std::vector<float> aValues(static_cast<size_t>(d.out * r), 0.0f), bValues(static_cast<size_t>(r * d.in), 0.0f);
        for (int64_t k = 0; k < r && k < d.sigma.size(); ++k) {
          const double sigma = d.sigma[k];
          if (!(sigma > floor))
            continue;
          const double root = std::sqrt(sigma);
          for (int64_t i = 0; i < d.out; ++i)
            aValues[i * r + k] = static_cast<float>(d.u(i, k) * root);
          const Eigen::RowVectorXd row = d.u.col(k).transpose() * delta / root;
          for (int64_t j = 0; j < d.in; ++j)
            bValues[k * d.in + j] = static_cast<float>(row[j]);
        }
        ir::TensorOp expertTensor = lookupTensor(model, m == 0   ? experts[e].getGateAttr()
                                                        : m == 1 ? experts[e].getUpAttr()
                                                                 : experts[e].getDownAttr());
        FailureOr<FlatSymbolRefAttr> aSymbol = writeTensor(
            model, access, expertTensor, (expertTensor.getSymName() + ".lr_a").str(), {d.out, r}, aValues, dtypes[m]);
        if (failed(aSymbol))
          return failure();
        FailureOr<FlatSymbolRefAttr> bSymbol = writeTensor(
            model, access, expertTensor, (expertTensor.getSymName() + ".lr_b").str(), {r, d.in}, bValues, dtypes[m]);
        if (failed(bSymbol))
          return failure();
        left[m] = *aSymbol;
        right.push_back(*bSymbol);
        rankTotal += r;
      }
      experts[e].setGateAttr(left[0]);
      experts[e].setUpAttr(left[1]);
      experts[e].setDownAttr(left[2]);
      experts[e].setLowRankAttr(ArrayAttr::get(model.getContext(), right));
      ++expertsFactored;
    }
    OpBuilder builder(experts.front());
    builder.create<ir::ExpertBaseOp>(experts.front().getLoc(), builder.getI64IntegerAttr(W), baseSymbols[0],
                                     baseSymbols[1], baseSymbols[2]);
    int64_t lowest = parts.front().rank, highest = lowest, total = 0;
    for (const Decomposed &d : parts) {
      lowest = std::min(lowest, d.rank);
      highest = std::max(highest, d.rank);
      total += d.rank;
    }
    layer.emitRemark() << getArgument() << ": layer " << index << ": " << E << " experts as a base plus deltas of rank "
                       << lowest << " to " << highest << " (mean "
                       << llvm::formatv("{0:f1}", static_cast<double>(total) / static_cast<double>(parts.size()))
                       << "; " << static_cast<int64_t>(used) << " of " << E * expertParameters << " parameters"
                       << (whitened ? ", whitened" : "") << ")";
    return success();
  }

  /// `values` rounded to what `dtype` stores (writeTensor's rounding).
  static void roundTo(std::vector<float> &values, DType dtype) {
    for (float &v : values)
      v = dtype == DType::F32   ? v
          : dtype == DType::F16 ? halfToFloat(floatToHalf(v))
                                : bfloat16ToFloat(floatToBfloat16(v));
  }
};

} // namespace
