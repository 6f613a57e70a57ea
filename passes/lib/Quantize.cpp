//===- Quantize.cpp - Group-wise integer quantization of weight matrices --===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "PassSupport.h"
#include "moe/Calibration/StatisticNames.h"
#include "moe/Runtime/Blas.h"
#include "moe/Support/Progress.h"
#include "moe/Support/Threads.h"
#include "moe/Transforms/Passes.h"
#include "moe/Transforms/QuantizeWork.h"

#include "ExpertEditing.h"
#include "Gptq.h"
#include "LayerLoader.h"
#include "StatisticsReader.h"
#include "SuperExperts.h"
#include "common/QuantFormat.h"
#include "common/WeightFormat.h"

#include "mlir/IR/Builders.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

namespace moe {
#define GEN_PASS_DEF_MOEQUANTIZE
#include "moe/Transforms/Passes.h.inc"
} // namespace moe

using namespace mlir;
using namespace moe;

namespace {

/// For GPTQ: which expert matrix a symbol is (layer, expert id, down?).
struct ExpertMatrix {
  int64_t layer, expert;
  bool down;
  int64_t partOffset = -1; ///< A split expert's part: its first neuron.
};
/// What one run quantises, and where GPTQ finds each matrix's Hessian.
struct Plan {
  std::set<QuantizeTarget> kinds; ///< The targets, with All spelled out.
  std::set<std::string> symbols;  ///< Matrices to quantise (a tensor used twice once).
  std::map<std::string, ExpertMatrix> expertMatrices;
  /// Every routed expert's matrix (a factored expert's six factors too):
  /// its layer and expert, for nested-cost.
  std::map<std::string, std::pair<int64_t, int64_t>> expertOf;
  /// Attention projections and shared experts: the layer statistic holding
  /// their Hessian (every token reaches them).
  std::map<std::string, std::pair<int64_t, std::string>> denseMatrices;
  /// The matrices of decoder layers outside routed experts (attention,
  /// shared experts, dense MLPs): what `shares` splits.
  std::set<std::string> layerDense;
  /// Every matrix's layer (-1: outside layers).
  std::map<std::string, int64_t> layerOf;
  std::optional<StatisticsReader> file;   ///< GPTQ's statistics.
  std::shared_ptr<SafetensorsFile> codes; ///< `codes`: packed codes to take instead.
};

/// The targets with All spelled out (none: routed experts).
std::set<QuantizeTarget> targetKinds(ArrayRef<QuantizeTarget> targets) {
  static const QuantizeTarget routed[] = {QuantizeTarget::Experts};
  std::set<QuantizeTarget> kinds;
  for (QuantizeTarget target : targets.empty() ? ArrayRef<QuantizeTarget>(routed) : targets) {
    if (target == QuantizeTarget::All)
      kinds.insert({QuantizeTarget::Experts, QuantizeTarget::Shared, QuantizeTarget::Attention, QuantizeTarget::Dense});
    else
      kinds.insert(target);
  }
  return kinds;
}

/// The matrices moe-quantize would quantise for `kinds` in the layers of
/// `scope` (empty: all; -1 names the tensors outside layers), of the
/// routed experts only the slots `someExperts` (empty: all), and where
/// GPTQ finds their Hessians. Reads the module's structure alone.
Plan collectMatrices(ir::ModelOp model, const std::set<QuantizeTarget> &kinds, const std::set<int64_t> &scope,
                     const std::set<int64_t> &someExperts) {
  Plan plan;
  plan.kinds = kinds;
  auto layerIndex = [](Operation *op) {
    auto layerOp = op->getParentOfType<ir::LayerOp>();
    return layerOp ? static_cast<int64_t>(layerOp.getIndex()) : int64_t{-1};
  };
  auto add = [&](FlatSymbolRefAttr symbol, int64_t layer) {
    if (symbol) {
      plan.symbols.insert(symbol.getValue().str());
      plan.layerOf[symbol.getValue().str()] = layer;
    }
  };
  model.walk([&](Operation *op) {
    const int64_t layer = layerIndex(op);
    if (!scope.empty() && !scope.count(layer))
      return;
    if (auto expert = dyn_cast<ir::ExpertOp>(op);
        expert && !someExperts.empty() && !someExperts.count(static_cast<int64_t>(expert.getId())))
      return;
    if (auto expert = dyn_cast<ir::ExpertOp>(op); expert && kinds.count(QuantizeTarget::Experts)) {
      add(expert.getGateAttr(), layer);
      add(expert.getUpAttr(), layer);
      add(expert.getDownAttr(), layer);
      const int64_t id = static_cast<int64_t>(expert.getId());
      const int64_t offset = expert.getPartOffset() ? static_cast<int64_t>(*expert.getPartOffset()) : -1;
      for (StringRef name : {expert.getGate(), expert.getUp(), expert.getDown()})
        plan.expertOf[name.str()] = {layer, id};
      if (std::optional<ArrayAttr> lowRank = expert.getLowRank()) {
        // Factored (moe-factor-experts): the right factors read the
        // expert's own input (gate, up) and intermediate (down), so GPTQ
        // has their Hessians; the left factors read a rank-wide
        // projection, which has none recorded (RTN).
        for (size_t f = 0; f < lowRank->size(); ++f) {
          auto symbol = cast<FlatSymbolRefAttr>((*lowRank)[f]);
          add(symbol, layer);
          plan.expertMatrices[symbol.getValue().str()] = {layer, id, f == 2, -1};
          plan.expertOf[symbol.getValue().str()] = {layer, id};
        }
      } else {
        plan.expertMatrices[expert.getGate().str()] = {layer, id, false, offset};
        plan.expertMatrices[expert.getUp().str()] = {layer, id, false, offset};
        plan.expertMatrices[expert.getDown().str()] = {layer, id, true, offset};
      }
    } else if (auto base = dyn_cast<ir::ExpertBaseOp>(op); base && kinds.count(QuantizeTarget::Experts)) {
      // The factored experts' base (RTN: no Hessian is recorded for its
      // inputs, every token's and the routing-weighted sum).
      add(base.getGateAttr(), layer);
      add(base.getUpAttr(), layer);
      add(base.getDownAttr(), layer);
    } else if (auto shared = dyn_cast<ir::SharedExpertOp>(op); shared && kinds.count(QuantizeTarget::Shared)) {
      add(shared.getGateAttr(), layer);
      add(shared.getUpAttr(), layer);
      add(shared.getDownAttr(), layer);
      plan.denseMatrices[shared.getGate().str()] = {layer, stats::kSharedInputMoments};
      plan.denseMatrices[shared.getUp().str()] = {layer, stats::kSharedInputMoments};
      plan.denseMatrices[shared.getDown().str()] = {layer, stats::kSharedIntermediateMoments};
      for (StringRef name : {shared.getGate(), shared.getUp(), shared.getDown()})
        plan.layerDense.insert(name.str());
    } else if (auto dense = dyn_cast<ir::DenseOp>(op)) {
      const bool wanted = (dense.getPart() == "attention" && kinds.count(QuantizeTarget::Attention)) ||
                          (dense.getPart() == "dense_mlp" && kinds.count(QuantizeTarget::Dense)) ||
                          (dense.getPart() == "lm_head" && kinds.count(QuantizeTarget::LmHead)) ||
                          (dense.getPart() == "embedding" && kinds.count(QuantizeTarget::Embedding));
      if (!wanted)
        return;
      for (NamedAttribute entry : dense.getTensors()) {
        auto symbol = dyn_cast<FlatSymbolRefAttr>(entry.getValue());
        if (!symbol || lookupTensor(model, symbol).getTensorType().getRank() != 2)
          continue;
        add(symbol, layer);
        if (layer < 0)
          continue;
        plan.layerDense.insert(symbol.getValue().str());
        StringRef role = entry.getName().getValue();
        if (dense.getPart() == "attention") {
          if (role == "q_proj" || role == "k_proj" || role == "v_proj" || role == "q_a_proj" || role == "kv_a_proj")
            plan.denseMatrices[symbol.getValue().str()] = {layer, stats::kAttentionInputMoments};
          else if (role == "o_proj")
            plan.denseMatrices[symbol.getValue().str()] = {layer, stats::kAttentionOutputMoments};
        }
      }
    }
  });
  return plan;
}

/// Which Hessian GPTQ reads for `symbolName`, when one may be shared: a
/// layer statistic (q, k and v read the attention's input; a shared
/// expert's gate and up the MLP's), or a routed expert's input moments
/// (its gate and up, and their split parts). Down projections read their
/// own expert's intermediate moments (or a part's block of them): none.
std::optional<std::string> hessianKey(const Plan &plan, const std::string &symbolName) {
  if (auto where = plan.expertMatrices.find(symbolName); where != plan.expertMatrices.end()) {
    if (where->second.down)
      return std::nullopt;
    return concat("expert ", where->second.layer, " ", where->second.expert);
  }
  if (auto where = plan.denseMatrices.find(symbolName); where != plan.denseMatrices.end())
    return concat("layer ", where->second.first, " ", where->second.second);
  return std::nullopt;
}

/// Matrices that one Hessian's factorisation serves (or one matrix alone)
/// and their estimated cost: GPTQ's arithmetic, rows x columns^2 per
/// matrix for its updates and columns^3 once for the factor (RTN, or no
/// Hessian recorded: rows x columns). `largest` is the costliest matrix's,
/// factor included: the longest single job.
struct CostGroup {
  double cost = 0, largest = 0;
  std::vector<std::string> members; ///< In symbol order.
};

/// `symbols` (in `plan`) grouped by Hessian, by key (hessianKey, else the
/// symbol).
std::map<std::string, CostGroup> costGroups(ir::ModelOp model, const Plan &plan, const std::set<std::string> &symbols,
                                            bool gptq) {
  std::map<std::string, CostGroup> groups;
  for (const std::string &symbolName : symbols) {
    ArrayRef<int64_t> shape =
        lookupTensor(model, FlatSymbolRefAttr::get(model.getContext(), symbolName)).getTensorType().getShape();
    const double rows = static_cast<double>(shape[0]), cols = static_cast<double>(shape[1]);
    const bool withHessian = gptq && (plan.denseMatrices.count(symbolName) || plan.expertMatrices.count(symbolName));
    CostGroup &group = groups[hessianKey(plan, symbolName).value_or(symbolName)];
    if (withHessian && group.members.empty())
      group.cost += cols * cols * cols;
    const double own = withHessian ? rows * cols * cols : rows * cols;
    group.cost += own;
    group.largest = std::max(group.largest, own + (withHessian ? cols * cols * cols : 0.0));
    group.members.push_back(symbolName);
  }
  return groups;
}

/// Which of `shares` shares each group goes to: the costliest first, each
/// to the share with the least so far (ties: the lower share, then the
/// first group in symbol order). Returns the share per group (by key) and
/// fills each share's cost and longest job.
std::map<std::string, int64_t> assignShares(const std::map<std::string, CostGroup> &groups, int64_t shares,
                                            std::vector<double> &load, std::vector<double> &longest) {
  std::vector<std::pair<const std::string *, const CostGroup *>> order;
  for (const auto &[key, group] : groups)
    order.push_back({&key, &group});
  std::stable_sort(order.begin(), order.end(), [](const auto &a, const auto &b) {
    return a.second->cost != b.second->cost ? a.second->cost > b.second->cost
                                            : a.second->members.front() < b.second->members.front();
  });
  load.assign(static_cast<size_t>(shares), 0.0);
  longest.assign(static_cast<size_t>(shares), 0.0);
  std::map<std::string, int64_t> shareOf;
  for (const auto &[key, group] : order) {
    const size_t least = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    load[least] += group->cost;
    longest[least] = std::max(longest[least], group->largest);
    shareOf[*key] = static_cast<int64_t>(least);
  }
  return shareOf;
}

} // namespace

QuantizeWork moe::estimateQuantizeWork(ir::ModelOp model, ArrayRef<QuantizeTarget> targets, bool gptq, int64_t layer,
                                       int64_t shares) {
  const Plan plan = collectMatrices(model, targetKinds(targets), {layer}, {});
  QuantizeWork work;
  model.walk([&](ir::ExpertOp expert) { // every slot of the layer, quantised or not
    if (static_cast<int64_t>(expert->getParentOfType<ir::LayerOp>().getIndex()) == layer)
      work.expertCost.resize(std::max<size_t>(work.expertCost.size(), expert.getId() + 1), 0.0);
  });
  std::set<std::string> routed; // (every one collected: expertOf holds only those)
  for (const auto &[symbol, where] : plan.expertOf)
    routed.insert(symbol);
  for (const auto &[key, group] : costGroups(model, plan, routed, gptq)) {
    const int64_t slot = plan.expertOf.at(group.members.front()).second;
    work.expertCost[static_cast<size_t>(slot)] += group.cost;
    work.expertLongest = std::max(work.expertLongest, group.largest);
  }
  const std::map<std::string, CostGroup> groups = costGroups(model, plan, plan.layerDense, gptq);
  const std::map<std::string, int64_t> shareOf =
      assignShares(groups, std::max<int64_t>(shares, 1), work.shareCost, work.shareLongest);
  if (gptq)
    for (const auto &[key, group] : groups)
      for (const std::string &symbol : group.members)
        if (plan.denseMatrices.count(symbol)) {
          ArrayRef<int64_t> shape =
              lookupTensor(model, FlatSymbolRefAttr::get(model.getContext(), symbol)).getTensorType().getShape();
          work.gptqOutsideExperts.push_back(
              {shape[0], shape[1], shareOf.at(key), plan.denseMatrices.at(symbol).second});
        }
  return work;
}

std::vector<int64_t> moe::splitExpertsOverRanks(const QuantizeWork &work, int64_t ranks) {
  const int64_t slots = static_cast<int64_t>(work.expertCost.size());
  if (ranks <= 1)
    return {0, slots};
  if (slots < ranks)
    return {}; // no split gives each rank one
  auto fixed = [&](int64_t r) {
    return r < static_cast<int64_t>(work.shareCost.size()) ? work.shareCost[static_cast<size_t>(r)] : 0.0;
  };
  std::vector<double> before(static_cast<size_t>(slots + 1), 0.0); // prefix sums of the experts' costs
  for (int64_t e = 0; e < slots; ++e)
    before[static_cast<size_t>(e + 1)] = before[static_cast<size_t>(e)] + work.expertCost[static_cast<size_t>(e)];
  // least[r][j]: the least largest work of ranks 0..r-1 holding slots
  // [0, j), one at least each.
  // Exact (ranks x slots^2, a few million steps for DeepSeek-V3's 256 over
  // 64 ranks); a greedy bound search is not, once experts' costs differ.
  const size_t width = static_cast<size_t>(slots + 1);
  auto at = [width](int64_t r, int64_t j) { return static_cast<size_t>(r) * width + static_cast<size_t>(j); };
  // Rank r - 1's work when it holds slots [i, j).
  auto mine = [&](int64_t r, int64_t i, int64_t j) {
    return fixed(r - 1) + before[static_cast<size_t>(j)] - before[static_cast<size_t>(i)];
  };
  std::vector<double> least(static_cast<size_t>(ranks + 1) * width, HUGE_VAL);
  least[0] = 0;
  for (int64_t r = 1; r <= ranks; ++r)
    for (int64_t j = r; j <= slots - (ranks - r); ++j)
      for (int64_t i = r - 1; i < j; ++i)
        least[at(r, j)] = std::min(least[at(r, j)], std::max(least[at(r - 1, i)], mine(r, i, j)));
  // Of the splits with that least largest work, the most even: the least
  // sum of squared works (ranks within the bound, which the optimum's
  // ranks meet with the same arithmetic).
  const double bound = least[at(ranks, slots)];
  std::vector<double> squares(least.size(), HUGE_VAL);
  std::vector<int64_t> from(least.size(), 0); // where rank r-1's slots begin
  squares[0] = 0;
  for (int64_t r = 1; r <= ranks; ++r)
    for (int64_t j = r; j <= slots - (ranks - r); ++j)
      for (int64_t i = r - 1; i < j; ++i) {
        const double work = mine(r, i, j);
        if (squares[at(r - 1, i)] == HUGE_VAL || work > bound)
          continue;
        if (squares[at(r - 1, i)] + work * work < squares[at(r, j)]) {
          squares[at(r, j)] = squares[at(r - 1, i)] + work * work;
          from[at(r, j)] = i;
        }
      }
  std::vector<int64_t> bounds(static_cast<size_t>(ranks + 1));
  bounds[static_cast<size_t>(ranks)] = slots;
  for (int64_t r = ranks; r >= 1; --r)
    bounds[static_cast<size_t>(r - 1)] = from[at(r, bounds[static_cast<size_t>(r)])];
  return bounds;
}

namespace {

struct QuantizePass : public moe::impl::MoeQuantizeBase<QuantizePass> {
  using MoeQuantizeBase::MoeQuantizeBase;

  /// One matrix: read (in order), quantised (GPTQ in parallel, a batch of
  /// one matrix per thread at a time, so memory stays at a few matrices and
  /// Hessians), then written (in order).
  /// The Hessian factor matrices with one input share (an expert's gate
  /// and up and their split parts; q, k and v): one factorisation serves
  /// them all (the codes are those each would get alone). The first job to
  /// need it computes it; `users` counts the jobs still to come.
  struct SharedFactor {
    std::mutex mutex;
    std::shared_ptr<const GptqFactor> factor;
    Status status = Status::success();
    int64_t users = 0; ///< Shared ones: the jobs still to come.
    /// The jobs still to compute with it: the last frees the factor (a
    /// computed job may wait a while to be finished, runQueued).
    int64_t computesLeft = 1;
  };

  struct Job {
    std::string symbol;
    std::shared_ptr<SharedFactor> shared; ///< GPTQ: the Hessian's factor (shareFactor).
    ir::TensorOp tensor;
    quant::WeightFormat format;
    std::vector<float> values;
    int64_t rows = 0, cols = 0;
    std::optional<std::vector<double>> hessian; ///< Set: GPTQ.
    std::string where;                          ///< For messages.
    std::vector<uint8_t> packed;
    bool taken = false;            ///< The codes came from `codes`.
    bool factoredInDouble = false; ///< precision=f32, but float's Cholesky failed.
    Status status = Status::success();
  };

  void runOnOperation() override {
    ir::ModelOp model = getOperation();
    FailureOr<Plan> plan = planRun(model);
    if (failed(plan))
      return;
    TensorAccess access(model);
    const std::set<std::string> otherShares =
        shares > 1 ? matricesOfOtherShares(model, *plan) : std::set<std::string>();
    std::vector<std::string> pending;
    for (const std::string &symbolName : plan->symbols) {
      if (otherShares.count(symbolName))
        continue;
      ir::TensorOp tensor = lookupTensor(model, FlatSymbolRefAttr::get(model.getContext(), symbolName));
      if (tensor.getQuantAttr()) {
        tensor.emitRemark() << "moe-quantize: already quantised (" << tensor.getQuantAttr().getFormat()
                            << "); left as it is";
        continue;
      }
      // llama.cpp's formats hold whole blocks of 32 values (K-quants 256,
      // which fall back to 32-value formats): a shorter or ragged row (a
      // low-rank factor of rank 8, an atom-pruned width of 120) has none.
      if (const int64_t cols = tensor.getTensorType().getShape()[1];
          ggmlFormat && !tensor->hasAttr("moe.format") && cols % 32 != 0) {
        tensor.emitRemark() << "moe-quantize: rows of " << cols
                            << " values are not whole blocks of any llama.cpp format (32 values); left unquantised";
        continue;
      }
      pending.push_back(symbolName);
    }
    // The shared factors: one per Hessian that two or more matrices to be
    // quantised read, released after its last user.
    factors.clear();
    if (method == QuantizeMethod::Gptq) {
      std::map<std::string, int64_t> users;
      for (const std::string &symbolName : pending)
        if (std::optional<std::string> key = hessianKey(*plan, symbolName))
          ++users[*key];
      for (const auto &[key, count] : users)
        if (count > 1) {
          factors[key] = std::make_shared<SharedFactor>();
          factors[key]->users = count;
          factors[key]->computesLeft = count;
        }
    }
    const size_t threads = threadCount();
    // GPTQ's jobs are the parallelism, one per worker, and each calls BLAS
    // on its own thread, a lone job included: OpenBLAS factors a matrix
    // with another blocking (so other roundings) when it has more threads,
    // and the codes must not depend on which jobs run together, on
    // --threads or on the MPI ranks.
    std::optional<SingleThreadedBlas> oneBlasThread;
    if (method == QuantizeMethod::Gptq)
      oneBlasThread.emplace();
    Progress progress(concat(getArgument().str(), method == QuantizeMethod::Gptq ? " (GPTQ)" : " (RTN)"),
                      static_cast<int64_t>(pending.size()), "matrices");
    const std::vector<std::string> order = orderOf(*plan, pending, threads);
    std::vector<bool> deferred;
    const std::vector<size_t> finishing = finishOrder(*plan, order, deferred);
    if (method == QuantizeMethod::Gptq && threads > 1) {
      if (failed(runQueued(model, access, *plan, order, finishing, deferred, threads, progress)))
        return signalPassFailure();
      return;
    }
    std::vector<std::string> inOrder;
    for (size_t index : finishing)
      inOrder.push_back(order[index]);
    if (failed(runInOrder(model, access, *plan, inOrder, progress)))
      return signalPassFailure();
  }

  /// The matrix's shared factor has one user fewer; factors nobody will
  /// read again go.
  void released(Job &job) {
    if (job.shared)
      --job.shared->users;
    job.shared.reset();
    std::erase_if(factors, [](const auto &entry) { return entry.second->users <= 0; });
  }

  /// One matrix after another on this thread.
  LogicalResult runInOrder(ir::ModelOp model, TensorAccess &access, const Plan &plan,
                           const std::vector<std::string> &order, Progress &progress) {
    for (const std::string &symbolName : order) {
      Job job;
      if (failed(prepare(model, access, plan, symbolName, job)))
        return failure();
      compute(job);
      released(job);
      if (failed(finish(model, access, plan, job)))
        return failure();
      progress.advance(1);
    }
    return success();
  }

  /// GPTQ on `threads` workers, each taking the next prepared matrix when
  /// it is free (a long matrix, DeepSeek-V3's o_proj, runs beside shorter
  /// ones instead of holding a batch). This thread prepares matrices in
  /// `order` (at most `threads` not yet computed, the inputs a batch held)
  /// and finishes them in `finishing`'s order (finishOrder), so the module
  /// and the codes are those of one thread. A computed matrix keeps its
  /// codes only (and its values when nesting needs them) until its turn to
  /// be finished; the last job to compute with a factor frees it. At most
  /// 4 x `threads` matrices wait to be finished, not counting the
  /// `deferred` ones (a layer's few matrices outside its experts, prepared
  /// before them and finished after them), so experts run on through
  /// o_proj's minute.
  LogicalResult runQueued(ir::ModelOp model, TensorAccess &access, const Plan &plan,
                          const std::vector<std::string> &order, const std::vector<size_t> &finishing,
                          const std::vector<bool> &deferred, size_t threads, Progress &progress) {
    struct Slot {
      Job job;
      bool computed = false;
    };
    std::vector<std::unique_ptr<Slot>> slots(order.size());
    std::mutex mutex;
    std::condition_variable changed;
    // `waiting`: matrices prepared and not yet finished, but the deferred.
    size_t prepared = 0, claimed = 0, computed = 0, finished = 0, waiting = 0;
    bool stopping = false;
    std::vector<std::thread> workers;
    for (size_t t = 0; t < threads; ++t)
      workers.emplace_back([&] {
        std::unique_lock<std::mutex> lock(mutex); // (BLAS is single-threaded for the whole pass)
        while (true) {
          changed.wait(lock, [&] { return stopping || claimed < prepared; });
          if (claimed >= prepared)
            return; // stopping
          Slot &slot = *slots[claimed++];
          lock.unlock();
          compute(slot.job);
          if (!nestedFormatOf(slot.job.format))
            slot.job.values = std::vector<float>(); // finish reads only the codes
          lock.lock();
          slot.computed = true;
          ++computed;
          changed.notify_all();
        }
      });
    LogicalResult result = success();
    while (finished < order.size()) {
      std::unique_lock<std::mutex> lock(mutex);
      const size_t next = finishing[finished];
      changed.wait(lock, [&] {
        return (slots[next] && slots[next]->computed) ||
               (prepared < order.size() && prepared - computed < threads && waiting < 4 * threads);
      });
      if (slots[next] && slots[next]->computed) {
        std::unique_ptr<Slot> slot = std::move(slots[next]);
        waiting -= deferred[next] ? 0 : 1;
        lock.unlock();
        released(slot->job);
        if (failed(finish(model, access, plan, slot->job))) {
          result = failure();
          break;
        }
        ++finished; // only this thread reads it
        progress.advance(1);
        continue;
      }
      const size_t index = prepared;
      lock.unlock();
      auto slot = std::make_unique<Slot>();
      if (failed(prepare(model, access, plan, order[index], slot->job))) {
        result = failure();
        break;
      }
      lock.lock();
      slots[index] = std::move(slot);
      waiting += deferred[index] ? 0 : 1;
      ++prepared;
      changed.notify_all();
    }
    {
      std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
      claimed = prepared; // a failure leaves the rest uncomputed
    }
    changed.notify_all();
    for (std::thread &worker : workers)
      worker.join();
    return result;
  }

  /// The order the matrices are prepared and quantised in: layer by layer
  /// (the tensors outside layers first), in each the matrices outside
  /// routed experts first (a long one, o_proj, starts early), then the
  /// routed experts' `threads` experts at a time and a role at a time (in
  /// the order their symbols sort: with Hugging Face's names the downs of
  /// those experts, then their gates, then their ups), so that the workers
  /// hold like matrices of different experts. Taken in symbol order, an
  /// expert's up would often start beside its own gate and wait while the
  /// gate factors the Hessian both read. The codes do not depend on the
  /// order.
  static std::vector<std::string> orderOf(const Plan &plan, const std::vector<std::string> &pending, size_t threads) {
    struct LayerJobs {
      std::vector<std::string> others;
      std::vector<std::vector<std::string>> experts; // each expert's matrices, in symbol order
      std::map<int64_t, size_t> expertIndex;
    };
    std::map<int64_t, LayerJobs> layers;
    for (const std::string &symbolName : pending) {
      LayerJobs &jobs = layers[plan.layerOf.at(symbolName)];
      auto where = plan.expertOf.find(symbolName);
      if (where == plan.expertOf.end()) {
        jobs.others.push_back(symbolName);
        continue;
      }
      auto [index, added] = jobs.expertIndex.try_emplace(where->second.second, jobs.experts.size());
      if (added)
        jobs.experts.emplace_back();
      jobs.experts[index->second].push_back(symbolName);
    }
    std::vector<std::string> order;
    for (const auto &[layer, jobs] : layers) {
      order.insert(order.end(), jobs.others.begin(), jobs.others.end());
      for (size_t first = 0; first < jobs.experts.size(); first += threads) {
        const size_t end = std::min(jobs.experts.size(), first + threads);
        size_t roles = 0;
        for (size_t e = first; e < end; ++e)
          roles = std::max(roles, jobs.experts[e].size());
        for (size_t role = 0; role < roles; ++role)
          for (size_t e = first; e < end; ++e)
            if (role < jobs.experts[e].size())
              order.push_back(jobs.experts[e][role]);
      }
    }
    return order;
  }

  /// The order matrices are finished in (written to the store), as indices
  /// of `order` (orderOf): layer by layer, in each the routed experts'
  /// matrices first, then the others. The others start first, so the
  /// experts computed beside a long one need not wait for it to be
  /// written; one thread writes in this order too, so the store does not
  /// depend on --threads. `deferred` marks the matrices finished after
  /// their layer's experts (those of layers with experts in `order`).
  static std::vector<size_t> finishOrder(const Plan &plan, const std::vector<std::string> &order,
                                         std::vector<bool> &deferred) {
    std::vector<size_t> finishing;
    deferred.assign(order.size(), false);
    for (size_t begin = 0; begin < order.size();) {
      const int64_t layer = plan.layerOf.at(order[begin]);
      size_t end = begin;
      std::vector<size_t> others;
      bool experts = false;
      for (; end < order.size() && plan.layerOf.at(order[end]) == layer; ++end)
        if (plan.expertOf.count(order[end])) {
          finishing.push_back(end);
          experts = true;
        } else {
          others.push_back(end);
        }
      for (size_t index : others)
        deferred[index] = experts;
      finishing.insert(finishing.end(), others.begin(), others.end());
      begin = end;
    }
    return finishing;
  }

  /// With `shares` > 1: the layer matrices outside routed experts that the
  /// other shares quantise. A Hessian's readers stay together (one
  /// factorisation serves them), and the groups are split by estimated cost
  /// (costGroups, assignShares). It reads only the module's shapes, so
  /// every process of a distributed run, at any point of its layer,
  /// computes the same split.
  std::set<std::string> matricesOfOtherShares(ir::ModelOp model, const Plan &plan) const {
    const std::map<std::string, CostGroup> groups =
        costGroups(model, plan, plan.layerDense, method == QuantizeMethod::Gptq);
    std::vector<double> load, longest;
    const std::map<std::string, int64_t> shareOf = assignShares(groups, shares, load, longest);
    std::set<std::string> others;
    for (const auto &[key, group] : groups)
      if (shareOf.at(key) != share)
        others.insert(group.members.begin(), group.members.end());
    return others;
  }

  /// Checks the options and collects the matrices to quantise.
  FailureOr<Plan> planRun(ir::ModelOp model) {
    ir::ModelOp module = model;
    Plan plan;
    if (nestedCost && nestedBits == 0)
      return fail(module, "nested-cost needs nested-bits"), failure();
    if (shares < 1 || share < 0 || share >= shares)
      return fail(module, concat("share must be in [0, shares) and shares at least 1, got share=", share.getValue(),
                                 " shares=", shares.getValue())),
             failure();
    if (!(minCoverage >= 0.0 && minCoverage <= 1.0))
      return fail(module, "min-coverage must be a fraction of the calibration tokens in [0, 1]"), failure();
    if (!codes.empty()) {
      Expected<std::unique_ptr<SafetensorsFile>> opened = SafetensorsFile::open(codes);
      if (!opened)
        return fail(module, "codes: " + opened.status().message()), failure();
      plan.codes = opened.take();
    } else if (method == QuantizeMethod::Gptq || nestedCost) {
      FailureOr<StatisticsReader> opened = StatisticsReader::open(stats, module, getArgument());
      if (failed(opened))
        return signalPassFailure(), failure();
      plan.file = std::move(*opened);
    }
    groupFormat = quant::QuantFormat{static_cast<int>(bits), static_cast<int>(group), symmetric,
                                     scaleType == ScaleKind::BF16 ? quant::ScaleType::BF16 : quant::ScaleType::F16};
    if (std::string problem = quant::validateQuantFormat(groupFormat); !problem.empty())
      return fail(module, problem), failure();
    if (this->format.getValue() != QuantizeFormat::Group)
      ggmlFormat = quant::ggmlBlockFormat(choiceName(this->format.getValue()).str())->type;
    if (nestedBits != 0 && (ggmlFormat || (bits != 4 && bits != 8) || nestedBits * 2 != bits))
      return fail(module, concat("nested-bits=", nestedBits,
                                 " needs a group format of 4 or 8 bits and half of them "
                                 "(nested-bits=2 with bits=4, nested-bits=4 with bits=8), got ",
                                 ggmlFormat ? choiceName(this->format.getValue()).str() : concat("bits=", bits))),
             failure();
    plan.kinds = targetKinds(targets);
    const std::set<int64_t> scope(layers.begin(), layers.end());
    int64_t numLayers = 0;
    model.walk([&](ir::LayerOp) { ++numLayers; });
    for (int64_t layer : scope)
      if (layer < -1 || layer >= numLayers)
        return fail(model, concat("layers: the model has no layer ", layer, " (it has ", numLayers,
                                  "; -1 names the tensors outside layers)")),
               failure();
    const std::set<int64_t> someExperts(experts.begin(), experts.end());
    Plan collected = collectMatrices(model, plan.kinds, scope, someExperts);
    collected.file = std::move(plan.file);
    collected.codes = std::move(plan.codes);
    plan = std::move(collected);
    return plan;
  }

  /// Reads a matrix, its format (moe-allocate-bits' choice overrides
  /// `bits`) and, for GPTQ, its Hessian; a rarely routed expert gets RTN.
  LogicalResult prepare(ir::ModelOp model, TensorAccess &access, const Plan &plan, const std::string &symbolName,
                        Job &job) {
    FlatSymbolRefAttr symbol = FlatSymbolRefAttr::get(model.getContext(), symbolName);
    ir::TensorOp tensor = lookupTensor(model, symbol);
    job.symbol = symbolName;
    job.tensor = tensor;
    if (!plan.codes) {
      DType dtype;
      FailureOr<std::vector<float>> values = readF32(model, access, symbol, dtype);
      if (failed(values))
        return failure();
      job.values = std::move(*values);
    }
    job.rows = tensor.getTensorType().getShape()[0];
    job.cols = tensor.getTensorType().getShape()[1];
    const int64_t cols = job.cols;
    // moe-allocate-bits' choice overrides `bits` for this tensor.
    job.format = quant::WeightFormat{groupFormat, std::nullopt};
    auto chosen = tensor->getAttrOfType<IntegerAttr>("moe.bits");
    if (chosen && !ggmlFormat) {
      job.format.group->bits = static_cast<int>(chosen.getInt());
      if (std::string problem = quant::validateQuantFormat(*job.format.group); !problem.empty()) {
        fail(tensor, "moe.bits: " + problem);
        return failure();
      }
    }
    if (auto named = tensor->getAttrOfType<StringAttr>("moe.format")) {
      // moe-allocate-bits named the format (llama.cpp candidates).
      std::optional<quant::WeightFormat> chosenFormat = quant::parseWeightFormat(named.getValue());
      if (!chosenFormat) {
        fail(tensor, "moe.format: '" + named.getValue().str() + "' is not a format moec knows");
        return failure();
      }
      if (std::string problem = chosenFormat->checkColumns(cols); !problem.empty()) {
        fail(tensor, "moe.format: " + problem);
        return failure();
      }
      job.format = *chosenFormat;
    } else if (ggmlFormat) {
      // A llama.cpp block format: moe.bits picks the K-quant of its width;
      // rows that are not whole blocks take the nearest 32-value format.
      quant::GgmlType type = chosen ? quant::ggmlTypeForBits(static_cast<int>(chosen.getInt()), cols) : *ggmlFormat;
      if (cols % quant::ggmlTraits(type)->blockSize != 0) {
        const quant::GgmlType fallback = quant::ggmlTypeForBits(quant::ggmlTraits(type)->bits, cols);
        tensor.emitRemark() << "moe-quantize: rows of " << cols << " values are not whole "
                            << quant::ggmlTraits(type)->ggmlName << " blocks of " << quant::ggmlTraits(type)->blockSize
                            << "; " << quant::ggmlTraits(fallback)->ggmlName << " instead";
        type = fallback;
      }
      job.format = quant::WeightFormat{std::nullopt, type};
    }
    if (plan.codes) {
      // Another process's codes: in this format (nested, as that process
      // stored them, when nested-bits applies), of this size.
      if (std::optional<quant::NestedFormat> nested = nestedFormatOf(job.format))
        job.format = quant::WeightFormat{std::nullopt, std::nullopt, *nested};
      const TensorInfo *info = plan.codes->find(symbolName);
      const size_t expected = job.format.matrixBytes(job.rows, job.cols);
      if (!info || info->dtype != DType::U8 || info->byteSize() != expected) {
        fail(tensor, concat("codes: ", codes, " has no U8 tensor '", symbolName, "' of ", expected, " bytes (",
                            job.format.name(), ")"));
        return failure();
      }
      std::span<const uint8_t> bytes = plan.codes->data(*info);
      job.packed.assign(bytes.begin(), bytes.end());
      job.taken = true;
      return success();
    }
    if (method != QuantizeMethod::Gptq)
      return success();
    auto where = plan.expertMatrices.find(symbolName);
    auto denseWhere = plan.denseMatrices.find(symbolName);
    if (where == plan.expertMatrices.end() && denseWhere != plan.denseMatrices.end()) {
      const auto &[layer, statistic] = denseWhere->second;
      FailureOr<std::vector<double>> hessian = plan.file->layer(layer, statistic, tensor);
      if (failed(hessian))
        return failure();
      if (static_cast<int64_t>(hessian->size()) != cols * cols) {
        fail(tensor, concat("the Hessian '", statistic, "' of layer ", layer, " has ", hessian->size(),
                            " values, the matrix has ", cols, " columns; calibrate the model as it is now"));
        return failure();
      }
      job.hessian = std::move(*hessian);
      job.where = concat("layer ", layer);
      shareFactor(plan, symbolName, job);
    } else if (where == plan.expertMatrices.end()) {
      tensor.emitRemark() << "moe-quantize: no Hessian is recorded for this tensor's input (MLA's q_b/kv_b, "
                             "dense-layer MLPs, lm_head, embeddings, factored experts' base and left factors); it "
                             "gets RTN";
    } else {
      const ExpertMatrix &m = where->second;
      FailureOr<std::vector<double>> coverage = plan.file->layer(m.layer, stats::kMomentTokens, tensor);
      FailureOr<std::vector<double>> total = plan.file->layer(m.layer, stats::kTokens, tensor);
      if (failed(coverage) || failed(total))
        return failure();
      if (m.expert >= static_cast<int64_t>(coverage->size())) {
        fail(tensor, concat("the statistics have ", coverage->size(), " experts for layer ", m.layer,
                            "; calibrate the model as it is now"));
        return failure();
      }
      const double seen = (*coverage)[m.expert], tokens = total->empty() ? 0.0 : (*total)[0];
      if (seen < minCoverage * tokens || seen == 0) {
        tensor.emitRemark() << concat("moe-quantize: layer ", m.layer, " expert ", m.expert, " saw ",
                                      static_cast<int64_t>(seen), " calibration tokens (",
                                      tokens > 0 ? 100.0 * seen / tokens : 0.0, "% of ", static_cast<int64_t>(tokens),
                                      "), below min-coverage ", 100.0 * minCoverage, "%: RTN instead of GPTQ");
        ++rtnFallbacks;
        return success();
      }
      FailureOr<std::vector<double>> hessian =
          plan.file->expert(m.layer, m.expert, m.down ? stats::kIntermediateMoments : stats::kInputMoments, tensor);
      if (failed(hessian))
        return failure();
      if (m.down && m.partOffset >= 0) {
        // A part's down projection sees the part's neurons: its block of
        // the expert's intermediate moments (calibrated after the split).
        const int64_t full = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(hessian->size()))));
        if (m.partOffset + cols > full) {
          fail(tensor, concat("the intermediate moments of layer ", m.layer, " expert ", m.expert, " cover ", full,
                              " neurons, the part needs ", m.partOffset + cols, "; calibrate the model as it is now"));
          return failure();
        }
        std::vector<double> block(static_cast<size_t>(cols * cols));
        for (int64_t a = 0; a < cols; ++a)
          for (int64_t b = 0; b < cols; ++b)
            block[a * cols + b] = (*hessian)[(m.partOffset + a) * full + m.partOffset + b];
        *hessian = std::move(block);
      }
      if (static_cast<int64_t>(hessian->size()) != cols * cols) {
        fail(tensor, concat("the Hessian of layer ", m.layer, " expert ", m.expert, " is ", hessian->size(),
                            " values, the matrix has ", cols, " columns; calibrate the model as it is now"));
        return failure();
      }
      job.hessian = std::move(*hessian);
      job.where = concat("layer ", m.layer, " expert ", m.expert);
      shareFactor(plan, symbolName, job);
    }
    return success();
  }

  /// The job's factor: the one its Hessian's other readers share, or its
  /// own.
  void shareFactor(const Plan &plan, const std::string &symbolName, Job &job) {
    if (std::optional<std::string> key = hessianKey(plan, symbolName))
      if (auto shared = factors.find(*key); shared != factors.end()) {
        job.shared = shared->second;
        return;
      }
    job.shared = std::make_shared<SharedFactor>();
  }

  /// Quantises one matrix (thread-safe: touches only `job`).
  void compute(Job &job) const {
    if (job.taken)
      return;
    job.packed.assign(job.format.matrixBytes(job.rows, job.cols), 0);
    if (job.hessian) {
      GptqOptions gptq{damping, block, actOrder, groupScales, precision};
      std::shared_ptr<const GptqFactor> factor;
      {
        // The first of the factor's readers computes it; the others wait and share.
        std::lock_guard<std::mutex> lock(job.shared->mutex);
        if (!job.shared->factor && job.shared->status.ok()) {
          Expected<std::shared_ptr<const GptqFactor>> made = factorGptqHessian(std::move(*job.hessian), job.cols, gptq);
          if (made)
            job.shared->factor = made.take();
          else
            job.shared->status = made.status();
        }
        factor = job.shared->factor;
        job.status = job.shared->status;
      }
      job.factoredInDouble = factor && factoredInDoubleInstead(*factor);
      job.hessian.reset();
      if (factor)
        job.status =
            job.format.group
                ? quantizeGptq(*job.format.group, job.values, job.rows, job.cols, *factor, gptq, job.packed)
                : quantizeGptqGgml(*job.format.ggml, job.values, job.rows, job.cols, *factor, gptq, job.packed);
      std::lock_guard<std::mutex> lock(job.shared->mutex);
      if (--job.shared->computesLeft <= 0)
        job.shared->factor.reset();
    } else if (job.format.group) {
      quant::quantizeReference(*job.format.group, job.values.data(), job.rows, job.cols, job.packed.data());
    } else {
      quant::ggmlQuantizeRows(*job.format.ggml, job.values.data(), job.rows, job.cols, job.packed.data());
    }
  }

  /// The nested format `format`'s codes are stored in: nested-bits given
  /// and `format` a group format of twice as many bits (matrices that
  /// moe-allocate-bits gave another width stay plain); else none.
  std::optional<quant::NestedFormat> nestedFormatOf(const quant::WeightFormat &format) const {
    if (nestedBits == 0 || !format.group || format.group->bits != 2 * nestedBits)
      return std::nullopt;
    return quant::NestedFormat{*format.group, static_cast<int>(nestedBits)};
  }

  /// Writes the codes to the store and points the tensor at them.
  LogicalResult finish(ir::ModelOp model, TensorAccess &access, const Plan &plan, Job &job) {
    if (!job.status.ok()) {
      fail(job.tensor, concat(job.where, ": ", job.status.message()));
      return failure();
    }
    if (!job.where.empty()) // GPTQ ran
      ++gptqMatrices;
    if (job.factoredInDouble)
      job.tensor.emitRemark() << "moe-quantize: " << job.where
                              << ": the damped Hessian's float Cholesky factorisation failed; GPTQ ran in double "
                                 "for this matrix";
    if (std::optional<quant::NestedFormat> nestedOf = nestedFormatOf(job.format)) {
      const quant::NestedFormat nested = *nestedOf;
      std::vector<uint8_t> bytes(nested.matrixBytes(job.rows, job.cols));
      quant::nestCodes(nested, job.packed.data(), job.values.empty() ? nullptr : job.values.data(), job.rows, job.cols,
                       bytes.data());
      job.packed = std::move(bytes);
      job.format = quant::WeightFormat{std::nullopt, std::nullopt, nested};
      if (nestedCost && plan.file)
        if (auto where = plan.expertOf.find(job.symbol); where != plan.expertOf.end()) {
          // Routed tokens x the squared difference of the two precisions.
          const auto [layer, expert] = where->second;
          FailureOr<std::vector<double>> routed = plan.file->layer(layer, stats::kRoutedTokens, job.tensor);
          if (failed(routed))
            return failure();
          if (expert < 0 || expert >= static_cast<int64_t>(routed->size())) {
            fail(job.tensor, concat("nested-cost: ", plan.file->path(), " has no routed-token count for expert ",
                                    expert, " of layer ", layer, "; calibrate the model as it is now"));
            return failure();
          }
          const double squared = quant::nestedSquaredDifference(nested, job.packed.data(), job.rows, job.cols);
          job.tensor->setAttr("moe.nested_cost",
                              FloatAttr::get(Float64Type::get(model.getContext()), (*routed)[expert] * squared));
        }
    }
    const std::string name = job.format.name();
    const std::string key = job.symbol + "." + name;
    auto quantAttr =
        ir::QuantAttr::get(model.getContext(), job.format.bits(), job.format.block(), job.format.scheme(), name);
    const int64_t size = static_cast<int64_t>(job.packed.size());
    FailureOr<std::string> stored = appendToStore(model, access, key, DType::U8, {size}, job.packed);
    if (failed(stored))
      return failure();
    // Same symbol and logical type: every use stays valid.
    ir::TensorOp tensor = job.tensor;
    tensor->removeAttr("moe.bits");
    tensor->removeAttr("moe.format");
    tensor.setKey(*stored);
    tensor.removeSourceAttr();
    tensor.removeSliceAttr();
    tensor.setQuantAttr(quantAttr);
    if (Operation *scale =
            SymbolTable::lookupSymbolIn(model, StringAttr::get(model.getContext(), job.symbol + "_scale_inv")))
      scale->erase();
    ++tensorsQuantized;
    return success();
  }

  void fail(Operation *op, const std::string &message) {
    passError(op, getArgument()) << message;
    signalPassFailure();
  }

  quant::QuantFormat groupFormat;            ///< bits, group, sym, scale-type.
  std::optional<quant::GgmlType> ggmlFormat; ///< format=q4_k etc.
  /// hessianKey -> the factor the matrices reading that Hessian share
  /// (runOnOperation).
  std::map<std::string, std::shared_ptr<SharedFactor>> factors;
};

} // namespace
