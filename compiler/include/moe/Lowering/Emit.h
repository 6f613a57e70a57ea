//===- Emit.h - moe module to a .moepkg package -----------------*- C++ -*-===//
//
// Part of moec. The package backend: lowers the module and writes the
// description, every tensor's bytes and the tokenizer files as one package.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_LOWERING_EMIT_H
#define MOE_LOWERING_EMIT_H

#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "moe/Support/Status.h"

#include <string>

namespace moe {

/// Writes `model` to `path` (through a temporary file). `provenanceJson` is
/// a JSON object recorded in the manifest (may be empty).
Status emitPackage(ir::ModelOp model, const std::string &baseDirectory, const std::string &path,
                   const std::string &provenanceJson);

} // namespace moe

#endif // MOE_LOWERING_EMIT_H
