//===- StatisticsReader.cpp - Calibration statistics read by passes -------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "StatisticsReader.h"
#include "ExpertEditing.h"
#include "moe/Calibration/StatisticNames.h"
#include "moe/Support/HugePages.h"

#include <cstring>

using namespace mlir;

namespace moe {

FailureOr<StatisticsReader> StatisticsReader::open(StringRef path, Operation *op, StringRef pass) {
  if (path.empty())
    return op->emitError() << pass << ": the stats option (a moec calibrate file) is required", failure();
  Expected<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::open(path.str());
  if (!file)
    return op->emitError() << pass << ": " << file.status().message(), failure();
  StatisticsReader stats;
  stats.file = std::shared_ptr<SafetensorsFile>(file.take());
  stats.pass = pass.str();
  return stats;
}

FailureOr<StatisticsReader> StatisticsReader::openForExperts(StringRef path, ir::ModelOp model, StringRef pass) {
  if (failed(refuseSplitExperts(model, pass)))
    return failure();
  return open(path, model, pass);
}

FailureOr<std::vector<double>> StatisticsReader::read(const std::string &key, Operation *op) const {
  const TensorInfo *info = file->find(key);
  if (!info || (info->dtype != DType::F64 && info->dtype != DType::I64 && info->dtype != DType::F32)) {
    op->emitError() << pass << ": " << file->path() << " has no statistic '" << key
                    << "'; was it written by moec calibrate for this model (with the options this method needs)?";
    return failure();
  }
  std::vector<double> values;
  resizeLarge(values, static_cast<size_t>(info->numElements()));
  const uint8_t *bytes = file->data(*info).data();
  for (size_t i = 0; i < values.size(); ++i) {
    if (info->dtype == DType::F64) {
      std::memcpy(&values[i], bytes + 8 * i, 8);
    } else if (info->dtype == DType::F32) {
      float value;
      std::memcpy(&value, bytes + 4 * i, 4);
      values[i] = value;
    } else {
      int64_t value;
      std::memcpy(&value, bytes + 8 * i, 8);
      values[i] = static_cast<double>(value);
    }
  }
  // The values are copied: the file's pages need not stay resident (a
  // layer's moments are read once, and under --max-memory they would
  // count twice).
  file->releasePages(*info);
  return values;
}

bool StatisticsReader::has(int64_t layer, StringRef name) const {
  return file->find(concat("layers.", layer, ".", name.str())) != nullptr;
}

bool StatisticsReader::hasExpert(int64_t layer, int64_t expert, StringRef name) const {
  return file->find(concat("layers.", layer, ".experts.", expert, ".", name.str())) != nullptr;
}

FailureOr<std::vector<double>> StatisticsReader::layer(int64_t layer, StringRef name, Operation *op) const {
  return read(concat("layers.", layer, ".", name.str()), op);
}

FailureOr<std::vector<double>> StatisticsReader::expert(int64_t layer, int64_t expert, StringRef name,
                                                        Operation *op) const {
  return read(concat("layers.", layer, ".experts.", expert, ".", name.str()), op);
}

FailureOr<std::vector<float>> StatisticsReader::floats(int64_t layer, StringRef name, Operation *op, int64_t &rows,
                                                       int64_t &cols) const {
  std::string key = concat("layers.", layer, ".", name.str());
  const TensorInfo *info = file->find(key);
  if (!info || info->dtype != DType::F32 || info->shape.size() != 2) {
    op->emitError() << pass << ": " << file->path() << " has no F32 matrix '" << key
                    << "'; calibrate with --block-samples N";
    return failure();
  }
  rows = info->shape[0];
  cols = info->shape[1];
  std::vector<float> values(static_cast<size_t>(rows * cols));
  std::memcpy(values.data(), file->data(*info).data(), values.size() * sizeof(float));
  file->releasePages(*info);
  return values;
}

FailureOr<StatisticsReader::BlockSamples> StatisticsReader::blockSamples(int64_t layer, int64_t hiddenSize,
                                                                         Operation *op) const {
  BlockSamples samples;
  int64_t inputRows, inputCols, outputRows, outputCols;
  FailureOr<std::vector<float>> input = floats(layer, stats::kBlockInput, op, inputRows, inputCols);
  FailureOr<std::vector<float>> output = floats(layer, stats::kBlockOutput, op, outputRows, outputCols);
  if (failed(input) || failed(output))
    return failure();
  if (inputCols != hiddenSize || outputCols != hiddenSize || inputRows != outputRows)
    return op->emitError() << pass << ": block samples of layer " << layer << " have width " << inputCols
                           << ", the model's hidden size is " << hiddenSize,
           failure();
  if (inputRows <= 0)
    return op->emitError() << pass << ": " << file->path() << " has no block samples for layer " << layer
                           << "; calibrate with --block-samples N (N > 0)",
           failure();
  samples.count = inputRows;
  samples.input = std::move(*input);
  samples.output = std::move(*output);
  return samples;
}

LogicalResult StatisticsReader::fillRouting(int64_t index, ir::LayerOp layer, LayerDecision &decision) const {
  FailureOr<std::vector<double>> routed = this->layer(index, stats::kRoutedTokens, layer);
  if (failed(routed))
    return failure();
  // The token count is optional (statistics written by other tools).
  decision.calibrationTokens = 0;
  if (file->find(concat("layers.", index, ".", stats::kTokens))) {
    FailureOr<std::vector<double>> tokens = this->layer(index, stats::kTokens, layer);
    if (failed(tokens))
      return failure();
    decision.calibrationTokens = tokens->empty() ? 0 : static_cast<int64_t>((*tokens)[0]);
  }
  decision.routed.clear();
  layer.walk([&](ir::ExpertOp expert) {
    if (expert.getPartOffset().value_or(0) != 0)
      return;
    const size_t id = static_cast<size_t>(expert.getId());
    decision.routed.push_back(id < routed->size() ? (*routed)[id] : 0.0);
  });
  return success();
}

} // namespace moe
