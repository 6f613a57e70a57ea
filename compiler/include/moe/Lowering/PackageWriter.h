//===- PackageWriter.h - A model description to a .moepkg file --*- C++ -*-===//
//
// Part of moec. The backend's package writer; the format and its reader
// are the runtime's (moe/Runtime/Package.h).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_LOWERING_PACKAGEWRITER_H
#define MOE_LOWERING_PACKAGEWRITER_H

#include "moe/Runtime/Package.h"

namespace moe {

/// Writes `description` (every tensor read through TensorReader) to `path`.
/// Descriptions are validated where they are made (the lowering, the
/// package reader), so what this writes is what openPackage accepts.
/// Quantised tensors keep their codes; FP8 tensors are stored dequantised
/// as f32; other float tensors keep their dtype.
Status writePackage(const ModelDescription &description, const PackageExtras &extras, const std::string &path);

} // namespace moe

#endif // MOE_LOWERING_PACKAGEWRITER_H
