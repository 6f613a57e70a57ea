//===- AllocateBits.cpp - Mixed-precision bits per expert under a budget --===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "PassSupport.h"
#include "moe/Calibration/StatisticNames.h"
#include "moe/Support/ByteSize.h"
#include "moe/Transforms/Passes.h"

#include "BitAllocation.h"
#include "ExpertEditing.h"
#include "LayerLoader.h"
#include "StatisticsReader.h"
#include "SuperExperts.h"
#include "common/GgmlFormats.h"
#include "common/QuantFormat.h"

#include "mlir/IR/Builders.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <numeric>
#include <optional>
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

/// The same at a ggml block format (rows of `cols` whole blocks).
std::vector<float> roundTrip(quant::GgmlType type, const std::vector<float> &values, int64_t rows, int64_t cols) {
  std::vector<uint8_t> packed(quant::ggmlRowBytes(type, cols));
  std::vector<float> out(values.size());
  for (int64_t r = 0; r < rows; ++r) {
    quant::ggmlQuantizeRow(type, values.data() + r * cols, cols, packed.data());
    quant::ggmlDequantizeRow(type, packed.data(), cols, out.data() + r * cols);
  }
  return out;
}

struct Unit {
  int64_t layer = 0, expert = 0;
  int matrix = -1; ///< -1: the whole expert; 0/1/2: gate/up/down.
  std::vector<std::string> tensors;
  /// granularity=micro-expert: the unit's neurons (importance order) and its expert op.
  std::vector<int64_t> neurons;
  ir::ExpertOp op;
  /// The [rows, cols] of the matrices the unit's width applies to, as they
  /// will be quantized (for byte budgets).
  std::vector<std::pair<int64_t, int64_t>> matrices;
  AllocationUnit allocation;
};

struct AllocateBitsPass : public moe::impl::MoeAllocateBitsBase<AllocateBitsPass> {
  using MoeAllocateBitsBase::MoeAllocateBitsBase;

  void runOnOperation() override {
    ir::ModelOp model = getOperation();
    FailureOr<std::vector<int>> widths = checkOptions(model);
    if (failed(widths) || failed(refuseSplitExperts(model, getArgument())))
      return signalPassFailure();
    TensorAccess access(model);
    Collected collected;
    if (failed(collectUnits(model, access, *widths, collected)))
      return signalPassFailure();
    if (granularity == Granularity::Layer)
      mergeByLayer(collected.units);
    if (failed(allocateAndAnnotate(model, access, *widths, collected)))
      return signalPassFailure();
    if (!ggmlByBits.empty())
      annotateFormats(model);
  }

  /// granularity=layer: the matrix units of one layer and kind become one
  /// unit (parameters and losses summed, tensors together).
  static void mergeByLayer(std::vector<Unit> &units) {
    std::map<std::pair<int64_t, int>, size_t> index;
    std::vector<Unit> merged;
    for (Unit &unit : units) {
      auto [it, fresh] = index.try_emplace({unit.layer, unit.matrix}, merged.size());
      if (fresh) {
        unit.expert = -1;
        merged.push_back(std::move(unit));
        continue;
      }
      Unit &into = merged[it->second];
      into.allocation.parameters += unit.allocation.parameters;
      for (size_t b = 0; b < into.allocation.loss.size(); ++b)
        into.allocation.loss[b] += unit.allocation.loss[b];
      into.tensors.insert(into.tensors.end(), unit.tensors.begin(), unit.tensors.end());
      into.matrices.insert(into.matrices.end(), unit.matrices.begin(), unit.matrices.end());
    }
    units = std::move(merged);
  }

  /// With llama.cpp candidates: each allocated tensor's `moe.format`, the
  /// format of its width that its rows hold (moe-quantize writes it).
  void annotateFormats(ir::ModelOp model) {
    Builder builder(model.getContext());
    for (ir::TensorOp tensor : model.getBody().getOps<ir::TensorOp>()) {
      auto bits = tensor->getAttrOfType<IntegerAttr>("moe.bits");
      if (!bits)
        continue;
      const int64_t cols = tensor.getTensorType().getShape()[1];
      if (std::optional<quant::GgmlType> type = ggmlFormatFor(static_cast<int>(bits.getInt()), cols))
        tensor->setAttr("moe.format", builder.getStringAttr(quant::ggmlTraits(*type)->name));
      else
        tensor.emitRemark() << getArgument() << ": rows of " << cols
                            << " values are whole blocks of no llama.cpp format; moe-quantize writes moec's "
                            << bits.getInt() << "-bit group format";
    }
  }

  /// What collectUnits finds: the units with their loss per candidate width,
  /// the Super Experts (with pin-bits), the shared experts' tensors.
  struct Collected {
    std::vector<Unit> units;
    std::set<std::pair<int64_t, int64_t>> superExperts; ///< When pin-bits is set.
    std::vector<std::string> sharedTensors;
  };

  /// The trial quantization (its width is replaced by each candidate).
  quant::QuantFormat trialFormat() const { return quant::QuantFormat{2, static_cast<int>(group), symmetric}; }

  /// The ggml format of width `bits` for rows of `cols` values: the
  /// candidate's, or the nearest 32-value format where its blocks do not
  /// fit (as moe-quantize falls back); nullopt when none fits.
  std::optional<quant::GgmlType> ggmlFormatFor(int bits, int64_t cols) const {
    auto it = ggmlByBits.find(bits);
    quant::GgmlType type = it != ggmlByBits.end() ? it->second : quant::ggmlTypeForBits(bits, cols);
    if (cols % quant::ggmlTraits(type)->blockSize != 0)
      type = quant::ggmlTypeForBits(quant::ggmlTraits(type)->bits, cols);
    if (cols % quant::ggmlTraits(type)->blockSize != 0)
      return std::nullopt;
    return type;
  }

  /// The trial round trip of a [rows, cols] matrix at candidate width `bits`.
  std::vector<float> roundTripAt(int bits, const std::vector<float> &values, int64_t rows, int64_t cols) const {
    if (!ggmlByBits.empty())
      if (std::optional<quant::GgmlType> type = ggmlFormatFor(bits, cols))
        return roundTrip(*type, values, rows, cols);
    quant::QuantFormat format = trialFormat();
    format.bits = bits;
    return roundTrip(format, values, rows, cols);
  }

  /// The options, checked; the candidate widths (a ggml format's is its
  /// nominal width, remembered in ggmlByBits).
  FailureOr<std::vector<int>> checkOptions(ir::ModelOp module) {
    if (microSize < 0)
      return fail(module, concat("micro-size must not be negative, got ", static_cast<int64_t>(microSize))), failure();
    std::vector<int> widths;
    ggmlByBits.clear();
    for (const std::string &word :
         candidates.empty() ? std::vector<std::string>{"2", "3", "4"} : std::vector<std::string>(candidates)) {
      int bits = 0;
      if (const quant::GgmlTraits *ggml = quant::ggmlBlockFormat(word)) {
        bits = ggml->bits;
        if (ggmlByBits.count(bits))
          return fail(module, concat("two candidates have the width ", bits, "; each must have its own")), failure();
        ggmlByBits[bits] = ggml->type;
      } else if (!word.empty() && word.size() < 3 && word.find_first_not_of("0123456789") == std::string::npos) {
        bits = std::stoi(word);
        if (!quant::bitsTraits(bits))
          bits = 0;
      }
      if (bits == 0)
        return fail(module, "candidate '" + word +
                                "' is not 2, 3, 4 or 8 bits nor a llama.cpp format (q2_k, q3_k, q4_k, q5_k, q6_k, "
                                "q4_0, q4_1, q5_0, q5_1, q8_0)"),
               failure();
      if (std::find(widths.begin(), widths.end(), bits) != widths.end())
        return fail(module, concat("two candidates have the width ", bits, "; each must have its own")), failure();
      widths.push_back(bits);
    }
    if (!ggmlByBits.empty() && ggmlByBits.size() != widths.size())
      return fail(module, "candidates are either widths or llama.cpp formats, not both"), failure();
    if (!ggmlByBits.empty() && !budgetBytes.empty())
      return fail(module, "budget-bytes counts moec's group formats; with llama.cpp formats give budget in bits"),
             failure();
    if (pinBits != 0 && !quant::bitsTraits(static_cast<int>(pinBits)))
      return fail(module, concat("pin-bits must be 0, 2, 3, 4 or 8, got ", static_cast<int64_t>(pinBits))), failure();
    const quant::QuantFormat trial = trialFormat();
    if (std::string problem = quant::validateQuantFormat(trial); !problem.empty())
      return fail(module, problem), failure();
    return widths;
  }

  /// Every unit (an expert, one of its matrices, or a micro-expert of its
  /// neurons) with its loss at each candidate width: MC-MoE's weighted
  /// block-output error, or the Hessian-diagonal-weighted error.
  LogicalResult collectUnits(ir::ModelOp model, TensorAccess &access, const std::vector<int> &widths,
                             Collected &collected) {
    std::vector<Unit> &units = collected.units;
    std::vector<std::string> &sharedTensors = collected.sharedTensors;
    const bool micro = granularity == Granularity::MicroExpert;
    const quant::QuantFormat trial = trialFormat();
    FailureOr<StatisticsReader> file = StatisticsReader::open(stats, model, getArgument());
    if (failed(file))
      return signalPassFailure(), failure();
    if (pinBits > 0) {
      FailureOr<std::set<std::pair<int64_t, int64_t>>> found = findSuperExperts(*file, model, getArgument());
      if (failed(found))
        return signalPassFailure(), failure();
      collected.superExperts = std::move(*found);
    }
    FailureOr<LayerLoader> loader = failure();
    if (objective == AllocationObjective::McMoe) {
      loader = LayerLoader::create(model, getArgument());
      if (failed(loader))
        return signalPassFailure(), failure();
    }
    for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>()) {
      BlockParts parts = blockParts(layer);
      if (!parts.block)
        continue;
      const int64_t index = static_cast<int64_t>(layer.getIndex());
      for (ir::SharedExpertOp shared : parts.block.getBody().getOps<ir::SharedExpertOp>())
        for (StringRef name : {shared.getGate(), shared.getUp(), shared.getDown()})
          sharedTensors.push_back(name.str());
      FailureOr<std::vector<double>> routed = file->layer(index, stats::kRoutedTokens, layer);
      FailureOr<std::vector<double>> scores = file->layer(index, stats::kRouterScoreSum, layer);
      if (failed(routed) || failed(scores))
        return signalPassFailure(), failure();
      const double routedTotal = std::accumulate(routed->begin(), routed->end(), 0.0);
      const double scoreTotal = std::accumulate(scores->begin(), scores->end(), 0.0);

      // mc-moe: block-output error with one unit quantized at a time.
      StatisticsReader::BlockSamples blocks;
      FailureOr<LayerWeights> weights = failure();
      if (objective == AllocationObjective::McMoe) {
        FailureOr<StatisticsReader::BlockSamples> loaded = file->blockSamples(index, loader->spec().hiddenSize, layer);
        if (failed(loaded))
          return signalPassFailure(), failure();
        blocks = std::move(*loaded);
        weights = loader->load(layer);
        if (failed(weights))
          return signalPassFailure(), failure();
        if (!weights->routing.remap.empty())
          return fail(layer, concat("layer ", index, " has merged experts; allocate bits before merging")), failure();
      }
      const LayerSpec *layerSpec =
          objective == AllocationObjective::McMoe ? &loader->spec().layers[static_cast<size_t>(index)] : nullptr;
      // MC-MoE's q: the block-output error with expert `slot` replaced by
      // `trial` (swapped in and back: one expert copied per trial, not
      // the layer).
      auto blockErrorWith = [&](size_t slot, MlpWeights trial) {
        std::swap(weights->experts[slot], trial);
        std::vector<float> scratch;
        const double error = moeBlockOutputError(loader->spec(), *layerSpec, *weights, blocks.view(), nullptr, scratch);
        std::swap(weights->experts[slot], trial);
        return error;
      };
      for (size_t slot = 0; slot < parts.experts.size(); ++slot) {
        ir::ExpertOp expert = parts.experts[slot];
        const int64_t id = static_cast<int64_t>(expert.getId());
        if (id >= static_cast<int64_t>(routed->size()))
          return fail(expert, concat("the statistics have ", routed->size(), " experts for layer ", index,
                                     "; calibrate the model as it is now")),
                 failure();
        FlatSymbolRefAttr symbols[3] = {expert.getGateAttr(), expert.getUpAttr(), expert.getDownAttr()};
        std::vector<float> original[3];
        int64_t shapes[3][2];
        for (int m = 0; m < 3; ++m) {
          DType dtype;
          FailureOr<std::vector<float>> values = readF32(model, access, symbols[m], dtype);
          if (failed(values))
            return signalPassFailure(), failure();
          original[m] = std::move(*values);
          ir::TensorOp tensor = lookupTensor(model, symbols[m]);
          shapes[m][0] = tensor.getTensorType().getShape()[0];
          shapes[m][1] = tensor.getTensorType().getShape()[1];
        }
        std::vector<double> hessianDiagonal[3];
        if (objective == AllocationObjective::Hessian) {
          FailureOr<std::vector<double>> in = file->expert(index, id, stats::kInputMoments, expert);
          FailureOr<std::vector<double>> inner = file->expert(index, id, stats::kIntermediateMoments, expert);
          if (failed(in) || failed(inner))
            return signalPassFailure(), failure();
          for (int m = 0; m < 3; ++m) {
            const std::vector<double> &full = m == 2 ? *inner : *in;
            const int64_t cols = shapes[m][1];
            if (static_cast<int64_t>(full.size()) != cols * cols)
              return fail(expert, concat("moments of layer ", index, " expert ", id,
                                         " do not match its width; "
                                         "calibrate the model as it is now")),
                     failure();
            for (int64_t j = 0; j < cols; ++j)
              hessianDiagonal[m].push_back(full[j * cols + j]);
          }
        }
        const double phi = routedTotal > 0 ? 1000.0 * (*routed)[id] / routedTotal : 0.0;
        const double share = scoreTotal > 0 ? 1000.0 * (*scores)[id] / scoreTotal : 0.0;
        if (micro) {
          // Micro-experts: the expert's neurons ranked by CAMERA's
          // importance, ||W_down[:, j]||^2 x sum of (gate weight x a_j)^2,
          // and cut into units of micro-size neurons (importance tiers).
          FailureOr<std::vector<double>> energy = file->expert(index, id, stats::kNeuronWeightedSquareSum, expert);
          if (failed(energy))
            return signalPassFailure(), failure();
          const int64_t width = shapes[0][0], H = shapes[0][1];
          if (static_cast<int64_t>(energy->size()) != width)
            return fail(expert, concat("the statistics have ", energy->size(), " neurons for layer ", index, " expert ",
                                       id, ", it has ", width, "; calibrate the model as it is now")),
                   failure();
          std::vector<double> importance(static_cast<size_t>(width));
          for (int64_t j = 0; j < width; ++j) {
            double column = 0;
            for (int64_t h = 0; h < H; ++h)
              column += static_cast<double>(original[2][h * width + j]) * original[2][h * width + j];
            importance[j] = column * (*energy)[j];
          }
          std::vector<int64_t> order(static_cast<size_t>(width));
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(),
                           [&](int64_t a, int64_t b) { return importance[a] > importance[b]; });
          const int64_t size = microSize > 0 ? static_cast<int64_t>(microSize) : static_cast<int64_t>(group);
          for (int64_t first = 0; first < width; first += size) {
            Unit unit;
            unit.layer = index;
            unit.expert = id;
            unit.op = expert;
            unit.neurons.assign(order.begin() + first, order.begin() + std::min(width, first + size));
            const int64_t n = static_cast<int64_t>(unit.neurons.size());
            unit.allocation.parameters = 3 * n * H;
            unit.matrices = {{n, H}, {n, H}, {H, n}};
            // The unit's gate/up rows [n, H] and down columns [H, n], as
            // its part will hold them.
            std::vector<float> rows[2], columns(static_cast<size_t>(H * n));
            for (int m = 0; m < 2; ++m)
              for (int64_t j : unit.neurons)
                rows[m].insert(rows[m].end(), original[m].begin() + j * H, original[m].begin() + (j + 1) * H);
            for (int64_t h = 0; h < H; ++h)
              for (int64_t k = 0; k < n; ++k)
                columns[h * n + k] = original[2][h * width + unit.neurons[k]];
            for (int bits : widths) {
              std::vector<float> qRows[2] = {roundTripAt(bits, rows[0], n, H), roundTripAt(bits, rows[1], n, H)};
              std::vector<float> qColumns = roundTripAt(bits, columns, H, n);
              double loss = 0;
              if (objective == AllocationObjective::Hessian) {
                for (int m = 0; m < 2; ++m)
                  for (int64_t k = 0; k < n; ++k)
                    for (int64_t c = 0; c < H; ++c) {
                      const double d = rows[m][k * H + c] - qRows[m][k * H + c];
                      loss += hessianDiagonal[m][c] * d * d;
                    }
                for (int64_t h = 0; h < H; ++h)
                  for (int64_t k = 0; k < n; ++k) {
                    const double d = columns[h * n + k] - qColumns[h * n + k];
                    loss += hessianDiagonal[2][unit.neurons[k]] * d * d;
                  }
              } else {
                MlpWeights mlp = weights->experts[slot];
                std::vector<float> values[3] = {original[0], original[1], original[2]};
                for (int m = 0; m < 2; ++m)
                  for (int64_t k = 0; k < n; ++k)
                    std::copy(qRows[m].begin() + k * H, qRows[m].begin() + (k + 1) * H,
                              values[m].begin() + unit.neurons[k] * H);
                for (int64_t h = 0; h < H; ++h)
                  for (int64_t k = 0; k < n; ++k)
                    values[2][h * width + unit.neurons[k]] = qColumns[h * n + k];
                Matrix *matrices[3] = {&mlp.gate, &mlp.up, &mlp.down};
                for (int m = 0; m < 3; ++m) {
                  matrices[m]->bf16.clear();
                  matrices[m]->data = std::move(values[m]);
                }
                loss = phi * std::pow(share, 1.5) * blockErrorWith(slot, std::move(mlp));
              }
              unit.allocation.loss.push_back(loss);
            }
            units.push_back(std::move(unit));
          }
          continue;
        }
        const int unitsHere = granularity == Granularity::Expert ? 1 : 3; // matrix, layer: per matrix
        for (int u = 0; u < unitsHere; ++u) {
          Unit unit;
          unit.layer = index;
          unit.expert = id;
          unit.matrix = granularity == Granularity::Expert ? -1 : u;
          for (int m = 0; m < 3; ++m)
            if (unit.matrix < 0 || unit.matrix == m) {
              unit.tensors.push_back(symbols[m].getValue().str());
              unit.allocation.parameters += shapes[m][0] * shapes[m][1];
              unit.matrices.push_back({shapes[m][0], shapes[m][1]});
            }
          for (int bits : widths) {
            double loss = 0;
            if (objective == AllocationObjective::Hessian) {
              for (int m = 0; m < 3; ++m) {
                if (unit.matrix >= 0 && unit.matrix != m)
                  continue;
                std::vector<float> q = roundTripAt(bits, original[m], shapes[m][0], shapes[m][1]);
                for (int64_t r = 0; r < shapes[m][0]; ++r)
                  for (int64_t c = 0; c < shapes[m][1]; ++c) {
                    const double d = original[m][r * shapes[m][1] + c] - q[r * shapes[m][1] + c];
                    loss += hessianDiagonal[m][c] * d * d;
                  }
              }
            } else {
              MlpWeights mlp = weights->experts[slot];
              Matrix *matrices[3] = {&mlp.gate, &mlp.up, &mlp.down};
              for (int m = 0; m < 3; ++m) {
                if (unit.matrix >= 0 && unit.matrix != m)
                  continue;
                matrices[m]->bf16.clear();
                matrices[m]->data = roundTripAt(bits, original[m], shapes[m][0], shapes[m][1]);
              }
              // MC-MoE: phi^alpha w^beta q^alpha, alpha = 1, beta = 1.5.
              loss = phi * std::pow(share, 1.5) * blockErrorWith(slot, std::move(mlp));
            }
            unit.allocation.loss.push_back(loss);
          }
          units.push_back(std::move(unit));
        }
      }
    }
    return success();
  }

  /// Super experts pinned, the integer program solved under the budget
  /// (bits or bytes), `moe.bits` set (micro-experts split into parts), and
  /// a remark with the result.
  LogicalResult allocateAndAnnotate(ir::ModelOp model, TensorAccess &access, const std::vector<int> &widths,
                                    Collected &collected) {
    std::vector<Unit> &units = collected.units;
    const quant::QuantFormat trial = trialFormat();
    const bool micro = granularity == Granularity::MicroExpert;
    if (pinBits > 0) {
      for (Unit &unit : units)
        if (collected.superExperts.count({unit.layer, unit.expert}))
          unit.allocation.pinnedBits = static_cast<int>(pinBits);
    }
    // Bytes of a unit at b bits: its groups' headers plus b/8 bytes per
    // (padded) weight. A byte budget is the average-bits budget over the
    // padded weights that leaves those bytes, so both are met the same way.
    std::vector<int64_t> paddedWeights(units.size(), 0), headerBytes(units.size(), 0);
    int64_t totalPadded = 0, totalHeaders = 0;
    for (size_t u = 0; u < units.size(); ++u) {
      for (const auto &[rows, cols] : units[u].matrices) {
        paddedWeights[u] += rows * trial.groupsPerRow(cols) * trial.group;
        headerBytes[u] += rows * trial.groupsPerRow(cols) * static_cast<int64_t>(trial.headerBytes());
      }
      totalPadded += paddedWeights[u];
      totalHeaders += headerBytes[u];
    }
    double budgetBits = budget;
    std::vector<AllocationUnit> problem;
    for (size_t u = 0; u < units.size(); ++u) {
      problem.push_back(units[u].allocation);
      if (!budgetBytes.empty())
        problem.back().parameters = paddedWeights[u];
    }
    if (!budgetBytes.empty()) {
      std::optional<double> bytes = parseByteSize(budgetBytes);
      if (!bytes)
        return fail(model, "budget-bytes '" + budgetBytes + "': expected a size such as 1290240, 512M or 12G"),
               failure();
      budgetBits = 8.0 * (*bytes - static_cast<double>(totalHeaders)) / static_cast<double>(totalPadded);
    }
    Expected<Allocation> allocation = allocateBits(problem, widths, budgetBits, tolerance);
    if (!allocation)
      return fail(model, allocation.status().message()), failure();
    Builder builder(model.getContext());
    std::map<int, int64_t> histogram;
    for (size_t u = 0; u < units.size(); ++u) {
      for (const std::string &name : units[u].tensors)
        lookupTensor(model, FlatSymbolRefAttr::get(model.getContext(), name))
            ->setAttr("moe.bits", builder.getI64IntegerAttr(allocation->bits[u]));
      ++histogram[allocation->bits[u]];
      ++unitsAllocated;
    }
    if (micro && failed(splitExperts(model, access, units, allocation->bits)))
      return signalPassFailure(), failure();
    if (pinBits > 0)
      for (const std::string &name : collected.sharedTensors)
        lookupTensor(model, FlatSymbolRefAttr::get(model.getContext(), name))
            ->setAttr("moe.bits", builder.getI64IntegerAttr(pinBits));
    std::string widthsText;
    for (const auto &[bits, count] : histogram)
      widthsText += concat(widthsText.empty() ? "" : ", ", count, " at ", bits, " bits");
    int64_t bytes = totalHeaders;
    for (size_t u = 0; u < units.size(); ++u)
      bytes += paddedWeights[u] * allocation->bits[u] / 8;
    std::string layout = concat("at group ", trial.group);
    if (!ggmlByBits.empty()) {
      // llama.cpp formats: their own bytes (scales included).
      bytes = 0;
      for (size_t u = 0; u < units.size(); ++u)
        for (const auto &[rows, cols] : units[u].matrices) {
          std::optional<quant::GgmlType> type = ggmlFormatFor(allocation->bits[u], cols);
          bytes += type ? rows * static_cast<int64_t>(quant::ggmlRowBytes(*type, cols))
                        : rows * trial.groupsPerRow(cols) *
                              static_cast<int64_t>(trial.headerBytes() + trial.group * allocation->bits[u] / 8);
        }
      layout = "in llama.cpp's formats";
    }
    model.emitRemark() << concat("moe-allocate-bits: ", units.size(), " units, average ", allocation->averageBits,
                                 " bits (budget ",
                                 budgetBytes.empty() ? concat(static_cast<double>(budget)) : budgetBytes + " bytes",
                                 "), ", bytes, " bytes ", layout, ": ", widthsText,
                                 allocation->proven ? ""
                                                    : "; not proven optimal: GLPK stopped at its time limit with "
                                                      "the best allocation it had found");
    return success();
  }

  /// Micro-expert widths become parts: each expert's neurons grouped by
  /// their width (widest first, importance order within), one moe.expert op
  /// per width with tensors sliced from the originals (stored bytes copied
  /// exactly) and `moe.bits` on them. An expert whose units agree keeps
  /// its tensors.
  LogicalResult splitExperts(ir::ModelOp model, TensorAccess &access, const std::vector<Unit> &units,
                             const std::vector<int> &bits) {
    Builder builder(model.getContext());
    std::map<Operation *, std::map<int, std::vector<int64_t>, std::greater<int>>> byExpert;
    std::vector<ir::ExpertOp> order;
    for (size_t u = 0; u < units.size(); ++u) {
      ir::ExpertOp op = units[u].op;
      auto &widths = byExpert[op.getOperation()];
      if (widths.empty())
        order.push_back(op);
      widths[bits[u]].insert(widths[bits[u]].end(), units[u].neurons.begin(), units[u].neurons.end());
    }
    for (ir::ExpertOp expert : order) {
      const auto &widths = byExpert[expert.getOperation()];
      FlatSymbolRefAttr symbols[3] = {expert.getGateAttr(), expert.getUpAttr(), expert.getDownAttr()};
      if (widths.size() == 1) {
        for (FlatSymbolRefAttr symbol : symbols)
          lookupTensor(model, symbol)->setAttr("moe.bits", builder.getI64IntegerAttr(widths.begin()->first));
        continue;
      }
      ir::ExpertOp previous = expert;
      int64_t offset = 0, part = 0;
      for (const auto &[width, neurons] : widths) {
        // The name says which neurons the part holds (FNV-1a of their
        // indices), so another allocation on the same WeightStore cannot
        // reuse a name for other contents.
        uint32_t hash = 2166136261u;
        for (int64_t neuron : neurons)
          hash = (hash ^ static_cast<uint32_t>(neuron)) * 16777619u;
        char tag[16];
        std::snprintf(tag, sizeof(tag), "%08x", hash);
        FlatSymbolRefAttr parts[3];
        for (int m = 0; m < 3; ++m) {
          FailureOr<FlatSymbolRefAttr> sliced =
              selectSlices(model, access, symbols[m], neurons, m == 2 ? 1 : 0, concat(".part", part, ".", tag));
          if (failed(sliced))
            return failure();
          parts[m] = *sliced;
          lookupTensor(model, parts[m])->setAttr("moe.bits", builder.getI64IntegerAttr(width));
        }
        const int64_t count = static_cast<int64_t>(neurons.size());
        if (part == 0) {
          expert.setWidth(static_cast<uint64_t>(count));
          expert.setGateAttr(parts[0]);
          expert.setUpAttr(parts[1]);
          expert.setDownAttr(parts[2]);
          expert.setPartOffset(0);
        } else {
          OpBuilder after(previous->getContext());
          after.setInsertionPointAfter(previous);
          previous = after.create<ir::ExpertOp>(expert.getLoc(), expert.getIdAttr(), after.getI64IntegerAttr(count),
                                                parts[0], parts[1], parts[2], expert.getActivationAttr(),
                                                after.getI64IntegerAttr(offset), expert.getOriginAttr(), ArrayAttr());
        }
        offset += count;
        ++part;
      }
      ++expertsSplit;
    }
    eraseUnusedTensors(model);
    return success();
  }

  void fail(Operation *op, const std::string &message) {
    passError(op, getArgument()) << message;
    signalPassFailure();
  }

  /// llama.cpp candidates by nominal width; empty: moec's group formats.
  std::map<int, quant::GgmlType> ggmlByBits;
};

} // namespace
