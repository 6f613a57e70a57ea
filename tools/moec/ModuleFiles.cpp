//===- ModuleFiles.cpp - Reading and writing moe modules for moec ---------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "ModuleFiles.h"
#include "Commands.h"

#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Lowering/History.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Runtime/GgufModel.h"
#include "moe/Runtime/Package.h"

#include "mlir/Parser/Parser.h"
#include "llvm/Support/SourceMgr.h"
#include "llvm/Support/raw_ostream.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sys/stat.h>

namespace moe::cli {

bool isModuleFile(const std::string &path) { return path.size() > 5 && path.compare(path.size() - 5, 5, ".mlir") == 0; }

/// Why `path` cannot be a text module, or empty: a package, a weight
/// store, a safetensors file or any binary would otherwise be echoed to
/// the terminal line by line by the parser's diagnostics.
std::string notAModule(const std::string &path) {
  struct stat info;
  if (::stat(path.c_str(), &info) != 0)
    return path + ": cannot read: " + std::strerror(errno);
  if (S_ISDIR(info.st_mode))
    return path + ": is a directory; expected a module (.mlir) written by `moec import` or `moec opt` "
                  "(checkpoint directories are for import, compress, eval and generate)";
  std::ifstream stream(path, std::ios::binary);
  char head[4096] = {};
  stream.read(head, sizeof(head));
  const std::streamsize size = stream.gcount();
  if (size >= 6 && std::memcmp(head, "MOEPKG", 6) == 0)
    return path + ": is a moec package (.moepkg); this command reads a module (.mlir) written by `moec import` or "
                  "`moec opt`. Packages run with `moec eval` and `moec generate`";
  if (size >= 8 && std::memcmp(head, "MOESTOR1", 8) == 0)
    return path + ": is a weight store (.moestore), the tensors beside a module; give the module (.mlir) instead";
  if (std::memchr(head, 0, static_cast<size_t>(size)))
    return path + ": is a binary file, not a text module (.mlir); modules are written by `moec import` or `moec opt`";
  return "";
}

mlir::OwningOpRef<mlir::ModuleOp> readModuleFile(const std::string &path, mlir::MLIRContext &context) {
  if (std::string problem = notAModule(path); !problem.empty()) {
    printError(problem);
    return nullptr;
  }
  context.loadDialect<ir::MoeDialect>();
  llvm::SourceMgr sourceManager;
  mlir::SourceMgrDiagnosticHandler diagnostics(sourceManager, &context);
  mlir::OwningOpRef<mlir::ModuleOp> module = mlir::parseSourceFile<mlir::ModuleOp>(path, &context);
  if (!module)
    printError(path + ": cannot parse the module (see the diagnostics above)");
  return module;
}

int writeModuleFile(mlir::ModuleOp module, const std::string &output) {
  std::string text;
  llvm::raw_string_ostream os(text);
  module.print(os);
  os << "\n";
  os.flush();
  if (output == "-") {
    llvm::outs() << text;
    return 0;
  }
  Status status = writeTextAtomically(output, text);
  if (!status.ok()) {
    printError(status.message());
    return 1;
  }
  return 0;
}

Expected<ModelDescription> readModuleDescription(const std::string &path) {
  Expected<CompiledModel> compiled = readCompiledModel(path);
  if (!compiled)
    return compiled.status();
  return std::move(compiled->description);
}

Expected<CompiledModel> readCompiledModel(const std::string &path) {
  CompiledModel out;
  if (isPackagePath(path) || isGgufPath(path)) {
    out.kind = isGgufPath(path) ? "GGUF file" : "package";
    Expected<OpenedPackage> opened = isGgufPath(path) ? openGgufModel(path) : openPackage(path);
    if (!opened)
      return opened.status();
    out.description = std::move(opened->description);
    out.provenance = nlohmann::json::parse(
        opened->extras.provenanceJson.empty() ? "null" : opened->extras.provenanceJson, nullptr, false);
    if (out.provenance.is_discarded())
      out.provenance = nullptr;
    if (out.provenance.is_object())
      out.history = {{"original", out.provenance.value("original", nlohmann::json())},
                     {"decisions", out.provenance.value("decisions", nlohmann::json::array())}};
    return out;
  }
  out.kind = "module";
  mlir::MLIRContext context;
  mlir::OwningOpRef<mlir::ModuleOp> module = readModuleFile(path, context);
  if (!module)
    return Status::error(path, ": not a valid moe module");
  Expected<ir::ModelOp> found = findModel(*module);
  if (!found)
    return found.status().withContext(path);
  Expected<ModelDescription> description =
      lowerToDescription(*found, std::filesystem::path(path).parent_path().string());
  if (!description)
    return description.status().withContext(path);
  out.description = description.take();
  out.history = historyToJson(*found);
  return out;
}

} // namespace moe::cli
