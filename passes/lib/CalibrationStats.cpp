//===- CalibrationStats.cpp - Reading moec calibrate files in passes ------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "CalibrationStats.h"
#include "moe/Lowering/Lowering.h"

#include <algorithm>
#include <cmath>
#include <cstring>

using namespace mlir;

namespace moe {

FailureOr<CalibrationStats> CalibrationStats::open(StringRef path, Operation *op, StringRef pass) {
  if (path.empty())
    return op->emitError() << pass << ": the stats option (a moec calibrate file) is required", failure();
  Expected<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::open(path.str());
  if (!file)
    return op->emitError() << pass << ": " << file.status().message(), failure();
  CalibrationStats stats;
  stats.file = std::shared_ptr<SafetensorsFile>(file.take());
  stats.pass = pass.str();
  return stats;
}

FailureOr<std::vector<double>> CalibrationStats::read(const std::string &key, Operation *op) const {
  const TensorInfo *info = file->find(key);
  if (!info || (info->dtype != DType::F64 && info->dtype != DType::I64 && info->dtype != DType::F32)) {
    op->emitError() << pass << ": " << file->path() << " has no statistic '" << key
                    << "'; was it written by moec calibrate for this model (with the options this method needs)?";
    return failure();
  }
  std::vector<double> values(static_cast<size_t>(info->numElements()));
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
  return values;
}

FailureOr<std::vector<double>> CalibrationStats::layer(int64_t layer, StringRef name, Operation *op) const {
  return read(concat("layers.", layer, ".", name.str()), op);
}

FailureOr<std::vector<double>> CalibrationStats::expert(int64_t layer, int64_t expert, StringRef name,
                                                        Operation *op) const {
  return read(concat("layers.", layer, ".experts.", expert, ".", name.str()), op);
}

FailureOr<std::vector<float>> CalibrationStats::floats(int64_t layer, StringRef name, Operation *op, int64_t &rows,
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
  return values;
}

FailureOr<CalibrationStats::BlockSamples> CalibrationStats::blockSamples(int64_t layer, int64_t hiddenSize,
                                                                        Operation *op) const {
  BlockSamples samples;
  int64_t inputRows, inputCols, outputRows, outputCols;
  FailureOr<std::vector<float>> input = floats(layer, "block_input", op, inputRows, inputCols);
  FailureOr<std::vector<float>> output = floats(layer, "block_output", op, outputRows, outputCols);
  if (failed(input) || failed(output))
    return failure();
  if (inputCols != hiddenSize || outputCols != hiddenSize || inputRows != outputRows)
    return op->emitError() << pass << ": block samples of layer " << layer << " have width " << inputCols
                           << ", the model's hidden size is " << hiddenSize,
           failure();
  samples.count = inputRows;
  samples.input = std::move(*input);
  samples.output = std::move(*output);
  return samples;
}

double blockOutputError(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &weights,
                        const CalibrationStats::BlockSamples &samples, const MoeBlockHooks &hooks,
                        std::vector<float> &scratch) {
  scratch.resize(samples.output.size());
  moeBlockForward(spec, layer, weights, samples.input.data(), samples.count, scratch.data(), hooks);
  double error = 0;
  for (size_t i = 0; i < scratch.size(); ++i) {
    const double difference = static_cast<double>(samples.output[i]) - scratch[i];
    error += difference * difference;
  }
  return std::sqrt(error);
}

std::set<std::pair<int64_t, int64_t>>
findSuperExperts(const std::vector<std::pair<double, std::pair<int64_t, int64_t>>> &maxOutputs) {
  std::set<std::pair<int64_t, int64_t>> found;
  if (maxOutputs.empty())
    return found;
  std::vector<double> sorted;
  for (const auto &entry : maxOutputs)
    sorted.push_back(entry.first);
  std::sort(sorted.begin(), sorted.end());
  double percentile = sorted[static_cast<size_t>(std::floor(0.995 * static_cast<double>(sorted.size() - 1)))];
  double largest = sorted.back();
  for (const auto &[value, where] : maxOutputs)
    if (value > percentile && value > 0.1 * largest)
      found.insert(where);
  if (found.empty() && sorted.size() > 1 && largest > 10.0 * sorted[sorted.size() - 2])
    for (const auto &[value, where] : maxOutputs)
      if (value == largest)
        found.insert(where);
  return found;
}

BlockParts blockParts(ir::LayerOp layer) {
  BlockParts parts;
  for (ir::MoeBlockOp block : layer.getBody().getOps<ir::MoeBlockOp>()) {
    parts.block = block;
    for (ir::RouterOp router : block.getBody().getOps<ir::RouterOp>())
      parts.router = router;
    for (ir::ExpertOp expert : block.getBody().getOps<ir::ExpertOp>())
      parts.experts.push_back(expert);
  }
  return parts;
}

FailureOr<LayerLoader> LayerLoader::create(ir::ModelOp model, StringRef pass) {
  Expected<ModelDescription> description = lowerToDescription(model, "");
  if (!description)
    return model.emitError() << pass << ": " << description.status().message(), failure();
  LayerLoader loader;
  loader.modelSpec = description->spec;
  loader.provider = makeDescriptionWeightProvider(description.take());
  loader.pass = pass.str();
  return loader;
}

FailureOr<LayerWeights> LayerLoader::load(ir::LayerOp layer) {
  LayerWeights weights;
  Status status = provider->loadLayer(static_cast<int64_t>(layer.getIndex()), weights);
  if (!status.ok())
    return layer.emitError() << pass << ": " << status.message(), failure();
  return weights;
}

} // namespace moe
