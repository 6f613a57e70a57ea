//===- GgufModel.h - A GGUF file moec wrote, as a model description -*- C++ -*-===//
//
// Part of moec. `moec eval model.gguf` and `moec generate model.gguf` run a
// file `moec export --format gguf` wrote: its config.json and tokenizer
// travel in moec.* keys (which llama.cpp ignores), its tensors are read in
// place from the mapped file (ggml block formats decoded by the GEMV as it
// goes; llama's interleaved q/k rows put back as values), and the description is
// validated like a package's. GGUF files from elsewhere lack those keys and
// are refused with a message that says so.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_GGUFMODEL_H
#define MOE_RUNTIME_GGUFMODEL_H

#include "moe/Runtime/Package.h"

#include <string>

namespace moe {

/// The description (and config and tokenizer texts) of a GGUF file moec wrote.
Expected<OpenedPackage> openGgufModel(const std::string &path);

/// True when `path` names a GGUF file (by its extension).
bool isGgufPath(const std::string &path);

} // namespace moe

#endif // MOE_RUNTIME_GGUFMODEL_H
