//===- CalibrationStats.h - Reading moec calibrate files in passes -*- C++ -*-===//
//
// Part of moec. Internal to the passes: named statistics of a calibration
// file (calibration/Statistics.h writes them), errors that name the pass,
// the file and the statistic, and the Super Experts rule shared by every
// pass that removes or merges experts.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_CALIBRATIONSTATS_H
#define MOE_PASSES_LIB_CALIBRATIONSTATS_H

#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Runtime/Description.h"
#include "moe/Runtime/Engine.h"

#include <memory>
#include <set>
#include <utility>
#include <vector>

namespace moe {

class CalibrationStats {
public:
  /// Opens `path`; on failure emits an error on `op` naming `pass`.
  static mlir::FailureOr<CalibrationStats> open(llvm::StringRef path, mlir::Operation *op, llvm::StringRef pass);

  /// `layers.<layer>.<name>` as doubles (F64, F32 or I64).
  mlir::FailureOr<std::vector<double>> layer(int64_t layer, llvm::StringRef name, mlir::Operation *op) const;
  /// `layers.<layer>.experts.<expert>.<name>`.
  mlir::FailureOr<std::vector<double>> expert(int64_t layer, int64_t expert, llvm::StringRef name,
                                              mlir::Operation *op) const;
  /// Layer `layer`'s block input and output samples (`--block-samples`),
  /// checked against the model's hidden size.
  struct BlockSamples {
    int64_t count = 0;
    std::vector<float> input, output; ///< [count, hidden] each.
  };
  mlir::FailureOr<BlockSamples> blockSamples(int64_t layer, int64_t hiddenSize, mlir::Operation *op) const;
  const std::string &path() const { return file->path(); }

private:
  mlir::FailureOr<std::vector<double>> read(const std::string &key, mlir::Operation *op) const;
  /// An F32 [rows, cols] statistic with its shape.
  mlir::FailureOr<std::vector<float>> floats(int64_t layer, llvm::StringRef name, mlir::Operation *op, int64_t &rows,
                                             int64_t &cols) const;
  std::shared_ptr<SafetensorsFile> file;
  std::string pass;
};

/// ||Z - MoEBlock(X)||_F over `samples`, the block recomputed by the
/// engine's own MoE block with `weights` and `hooks` (e.g. masked router
/// rows); `scratch` holds the recomputed outputs. NAEE's and MC-MoE's loss.
double blockOutputError(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &weights,
                        const CalibrationStats::BlockSamples &samples, const MoeBlockHooks &hooks,
                        std::vector<float> &scratch);

/// (layer, expert) pairs that are Super Experts: max |output| above the
/// 99.5th percentile of all experts and above a tenth of the largest (Su et
/// al.); with so few experts that the percentile is the maximum itself, the
/// largest is one when it stands 10x above the next.
std::set<std::pair<int64_t, int64_t>>
findSuperExperts(const std::vector<std::pair<double, std::pair<int64_t, int64_t>>> &maxOutputs);

/// The router and experts of a layer's moe_block (null when dense).
struct BlockParts {
  ir::MoeBlockOp block;
  ir::RouterOp router;
  llvm::SmallVector<ir::ExpertOp> experts;
};
BlockParts blockParts(ir::LayerOp layer);

/// The engine's weights of one layer of the module as it is now (through
/// the backend's lowering), for passes that run the engine's MoE block on
/// cached block inputs.
class LayerLoader {
public:
  static mlir::FailureOr<LayerLoader> create(ir::ModelOp model, llvm::StringRef pass);
  mlir::FailureOr<LayerWeights> load(ir::LayerOp layer);
  const ModelSpec &spec() const { return modelSpec; }

private:
  ModelSpec modelSpec;
  std::shared_ptr<WeightProvider> provider;
  std::string pass;
};

} // namespace moe

#endif // MOE_PASSES_LIB_CALIBRATIONSTATS_H
