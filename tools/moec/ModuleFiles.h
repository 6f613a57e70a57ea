//===- ModuleFiles.h - Reading and writing moe modules for moec -*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOEC_TOOLS_MOEC_MODULEFILES_H
#define MOEC_TOOLS_MOEC_MODULEFILES_H

#include "moe/Runtime/Description.h"

#include <nlohmann/json.hpp>

#include "mlir/IR/BuiltinOps.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/IR/OwningOpRef.h"

#include <string>

namespace moe::cli {

/// True when `path` names a module file (.mlir) rather than a checkpoint directory.
bool isModuleFile(const std::string &path);

/// Parses the module at `path` with the moe dialect loaded; on failure
/// prints the diagnostics and an error, and returns null.
mlir::OwningOpRef<mlir::ModuleOp> readModuleFile(const std::string &path, mlir::MLIRContext &context);

/// What the runtime would run of the module at `path`: its first moe.model,
/// lowered (relative sources and store taken from the module's folder).
/// Errors name the file.
Expected<ModelDescription> readModuleDescription(const std::string &path);

/// A module, a package or a GGUF file moec wrote, as the runtime would run
/// it, with what compression did (History.h) where the file carries it.
struct CompiledModel {
  std::string kind; ///< "module", "package" or "GGUF file".
  ModelDescription description;
  nlohmann::json history;    ///< {"original", "decisions"}, or null.
  nlohmann::json provenance; ///< A package's provenance, or null.
};
Expected<CompiledModel> readCompiledModel(const std::string &path);

/// Prints `module` to `output` ("-" for stdout) through a temporary file
/// and a rename; returns the process exit code.
int writeModuleFile(mlir::ModuleOp module, const std::string &output);

} // namespace moe::cli

#endif // MOEC_TOOLS_MOEC_MODULEFILES_H
