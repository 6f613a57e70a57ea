//===- ModelSummary.cpp - Parameter and byte counts of a model ------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/ModelSummary.h"
#include "moe/Frontend/Checkpoint.h"

namespace moe {
namespace {

/// Adds one tensor of `parameters` elements stored in `bytes` bytes.
void addTensor(ModelSummary &summary, const ModelSpec &spec, const TensorSpec &tensor, int64_t bytes, DType dtype) {
  int64_t parameters = numElements(tensor.shape);
  RoleGroup group = roleGroup(tensor.role);
  SizeCount &count = summary.groups[static_cast<int>(group)];
  count.parameters += parameters;
  count.bytes += bytes;
  count.tensors += 1;
  summary.totalParameters += parameters;
  summary.totalBytes += bytes;
  SizeCount &byDtype = summary.dtypes[std::string(dtypeName(dtype))];
  byDtype.parameters += parameters;
  byDtype.bytes += bytes;
  byDtype.tensors += 1;
  if (group == RoleGroup::RoutedExperts) {
    const LayerSpec &layer = spec.layers[static_cast<size_t>(tensor.layer)];
    // Exact: every routed expert of a layer has the same size.
    summary.activeParameters += parameters * spec.router.topK / layer.numExperts;
  } else {
    summary.activeParameters += parameters;
  }
}

/// Scale tensors count as bytes of their weight's group, not as parameters.
void addScaleBytes(ModelSummary &summary, const TensorSpec &tensor, int64_t bytes, DType dtype) {
  summary.groups[static_cast<int>(roleGroup(tensor.role))].bytes += bytes;
  summary.totalBytes += bytes;
  SizeCount &byDtype = summary.dtypes[std::string(dtypeName(dtype))];
  byDtype.bytes += bytes;
  byDtype.tensors += 1;
}

} // namespace

ModelSummary summarizeFromConfig(const ModelSpec &spec) {
  ModelSummary summary;
  for (const TensorSpec &tensor : spec.tensors()) {
    int64_t count = numElements(tensor.shape);
    bool fp8 = spec.fp8BlockScaled && tensor.isLinearWeight;
    DType dtype = fp8 ? DType::F8E4M3 : spec.configDType;
    addTensor(summary, spec, tensor, count * dtypeBytes(dtype), dtype);
    if (fp8)
      addScaleBytes(summary, tensor, numElements(fp8ScaleShape(tensor.shape)) * 4, DType::F32);
  }
  return summary;
}

ModelSummary summarizeCheckpoint(const ModelSpec &spec, const Checkpoint &checkpoint) {
  ModelSummary summary;
  for (const TensorSpec &tensor : spec.tensors()) {
    const TensorLocation *location = checkpoint.find(tensor.name);
    if (!location)
      continue; // bindCheckpoint has rejected this already.
    addTensor(summary, spec, tensor, static_cast<int64_t>(location->info->byteSize()), location->info->dtype);
    if (tensor.isLinearWeight)
      if (const TensorLocation *scale = checkpoint.find(scaleInvName(tensor.name)))
        addScaleBytes(summary, tensor, static_cast<int64_t>(scale->info->byteSize()), scale->info->dtype);
  }
  return summary;
}

} // namespace moe
