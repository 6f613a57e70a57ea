//===- StatisticsReader.h - Calibration statistics read by passes ---*- C++ -*-===//
//
// Part of moec. Internal to the passes: the named statistics of a
// calibration file (names in moe/Calibration/StatisticNames.h), with errors
// that name the pass, the file and the statistic.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_STATISTICSREADER_H
#define MOE_PASSES_LIB_STATISTICSREADER_H

#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Lowering/History.h"
#include "moe/Runtime/MoeBlock.h"

#include "mlir/IR/Operation.h"
#include "mlir/Support/LogicalResult.h"

#include <memory>
#include <string>
#include <vector>

namespace moe {

class StatisticsReader {
public:
  /// Opens `path`; on failure emits an error on `op` naming `pass`.
  static mlir::FailureOr<StatisticsReader> open(llvm::StringRef path, mlir::Operation *op, llvm::StringRef pass);
  /// The prologue of every pass that scores, selects, merges or slices
  /// routed experts from calibration: `path` opened, and a module whose
  /// experts moe-allocate-bits split into parts refused (their statistics
  /// and ids no longer describe one expert each). Errors name `pass`.
  static mlir::FailureOr<StatisticsReader> openForExperts(llvm::StringRef path, ir::ModelOp model,
                                                          llvm::StringRef pass);

  /// `layers.<layer>.<name>` as doubles (F64, F32 or I64).
  mlir::FailureOr<std::vector<double>> layer(int64_t layer, llvm::StringRef name, mlir::Operation *op) const;
  /// Whether the file holds `layers.<layer>.<name>` (statistics that newer
  /// calibrations add).
  bool has(int64_t layer, llvm::StringRef name) const;
  /// Whether the file holds `layers.<layer>.experts.<expert>.<name>`.
  bool hasExpert(int64_t layer, int64_t expert, llvm::StringRef name) const;
  /// `layers.<layer>.experts.<expert>.<name>`.
  mlir::FailureOr<std::vector<double>> expert(int64_t layer, int64_t expert, llvm::StringRef name,
                                              mlir::Operation *op) const;
  /// Layer `layer`'s block input and output samples (`--block-samples`),
  /// checked against the model's hidden size.
  struct BlockSamples {
    int64_t count = 0;
    std::vector<float> input, output; ///< [count, hidden] each.
    BlockSamplesView view() const { return {input.data(), output.data(), count}; }
  };
  mlir::FailureOr<BlockSamples> blockSamples(int64_t layer, int64_t hiddenSize, mlir::Operation *op) const;
  const std::string &path() const { return file->path(); }

  /// Fills `decision.routed` (per expert op of `layer`, in order) and
  /// `calibrationTokens` from the statistics, for the module's history.
  mlir::LogicalResult fillRouting(int64_t index, ir::LayerOp layer, LayerDecision &decision) const;

private:
  mlir::FailureOr<std::vector<double>> read(const std::string &key, mlir::Operation *op) const;
  /// An F32 [rows, cols] statistic with its shape.
  mlir::FailureOr<std::vector<float>> floats(int64_t layer, llvm::StringRef name, mlir::Operation *op, int64_t &rows,
                                             int64_t &cols) const;
  std::shared_ptr<SafetensorsFile> file;
  std::string pass;
};

} // namespace moe

#endif // MOE_PASSES_LIB_STATISTICSREADER_H
