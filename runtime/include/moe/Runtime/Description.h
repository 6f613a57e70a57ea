//===- Description.h - A model as the runtime executes it -------*- C++ -*-===//
//
// Part of moec. The in-memory description of a (compressed) model that the
// backend lowers a moe module to (DESIGN.md "Who may depend on whom"): the
// ModelSpec, where every tensor's bytes are (a source checkpoint file, a
// slice of a fused tensor, or the WeightStore), and per MoE layer the
// expert table (ids, widths that atomic pruning makes differ), the router
// (per-layer top-k and groups), the remap of router rows to experts that
// merging leaves, and the dynamic-skip threshold. The runtime executes it
// without knowing about MLIR.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_DESCRIPTION_H
#define MOE_RUNTIME_DESCRIPTION_H

#include "moe/Frontend/ModelSpec.h"
#include "moe/Runtime/TaskSets.h"
#include "moe/Runtime/Weights.h"
#include "moe/Support/MappedFile.h"

#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace moe {

/// TensorRef::source of a tensor inside the package the model was loaded from.
constexpr int64_t kPackageSource = -2;

/// A read-only mapping of a whole .moepkg file (kept alive by every
/// quantised matrix that reads its codes in place).
struct PackageMapping {
  std::unique_ptr<MappedFile> file;
  std::string path;
  const uint8_t *data = nullptr;
  size_t size = 0;
};

/// Where one tensor's bytes are.
struct TensorRef {
  std::string name;           ///< For messages (the IR symbol).
  int64_t source = -1;        ///< Index into ModelDescription::sources; -1: the WeightStore.
  std::string key;            ///< Key in that file or store.
  std::vector<int64_t> slice; ///< Empty, or {index, first row, rows, transposed} of a 3-D tensor.
  std::vector<int64_t> shape; ///< The shape the model uses.
  std::string scaleKey;       ///< FP8 block scales (`<key>_scale_inv`), or empty.
  int64_t scaleSource = -1;   ///< The source holding them.
  std::string format;         ///< Quantisation format (WeightFormat::name()) of the stored bytes, or empty.
  /// A nested matrix's recorded cost of its low bits (moe-quantize
  /// nested-cost: routed tokens x squared value difference), or -1.
  double nestedCost = -1;
  /// Rows stored interleaved per head, as llama.cpp's rope for "llama" wants
  /// (GGUF): within each of this many heads of D rows, stored row 2i + j is
  /// row j * D/2 + i. Undone when loaded; 0: rows in order.
  int64_t interleavedHeads = 0;
  // In a package (source == kPackageSource): where, and the stored dtype of unquantised tensors.
  uint64_t offset = 0, size = 0;
  DType dtype = DType::BF16;
};

/// A further neuron segment of a split expert (micro-expert mixed precision).
struct ExpertPart {
  int64_t width = 0;
  TensorRef gate, up, down;
};

struct ExpertEntry {
  int64_t id = 0, width = 0; ///< width: all parts together.
  int64_t origin = 0;        ///< The id it had in the imported checkpoint (equal to id unless renumbered).
  TensorRef gate, up, down;  ///< The first part (the whole expert unless split).
  std::vector<ExpertPart> moreParts;
  /// A factored expert (moe-factor-experts): empty, or the right factors
  /// {gate b, up b, down b}. Then gate, up and down above are the left
  /// factors a ([out, rank]) and each matrix is the layer's base plus a b.
  std::vector<TensorRef> lowRank;
};

struct LayerEntry {
  /// Every tensor of the layer but the routed experts, by role.
  std::vector<std::pair<TensorRole, TensorRef>> tensors;
  std::vector<ExpertEntry> experts; ///< In slot order; RoutingPlan::remap indexes slots.
  /// The base of factored experts (width: every expert's), or none.
  std::optional<ExpertPart> expertBase;
  RoutingPlan routing;
};

struct ModelDescription {
  ModelSpec spec;
  std::vector<std::string> sources;              ///< Safetensors files, absolute or relative to the process.
  std::string store;                             ///< WeightStore path, or empty.
  std::string assetDirectory;                    ///< Where tokenizer.json etc. are (the first source's directory).
  std::string configText;                        ///< The original config.json (ModelSpec before per-layer changes).
  std::shared_ptr<const PackageMapping> package; ///< Set for models loaded from a .moepkg.
  std::vector<std::pair<TensorRole, TensorRef>> globals;
  std::vector<LayerEntry> layers; ///< One per decoder layer.
  /// Task-adaptive expert sets (TaskSets.h), or none.
  std::vector<TaskExpertSet> taskSets;
  /// Run quantised tensors as their dequantised f32 values (the simulated
  /// model) instead of through the integer kernels.
  bool dequantizeQuantized = false;
  /// Routed experts (layer, slot) whose nested-format matrices
  /// (quant::NestedFormat) load at their low bits, reading only the low
  /// part; every other nested matrix loads at its high bits.
  std::set<std::pair<int64_t, int64_t>> nestedLow;
};

/// Per routed expert, the precision of its nested matrices that fits a
/// memory budget (HOBBIT's mixed precision, D2MoE's matryoshka budgets).
struct NestedPrecisions {
  std::set<std::pair<int64_t, int64_t>> low; ///< Experts at their low bits.
  int64_t nestedExperts = 0;                 ///< Experts with nested matrices.
  uint64_t highBytes = 0;                    ///< Layer weights with every expert high.
  uint64_t bytes = 0;                        ///< Layer weights as chosen.
  bool recordedCosts = false;                ///< Chosen by recorded costs (nested-cost).
};

/// Chooses which experts of a package (`description.package`) load their
/// nested matrices at the low bits so that the layer weights fit in
/// `budgetBytes`: every expert high when that fits; else experts go low in
/// increasing order of what it costs per byte saved, until the rest fits
/// (all low when even that does not: the layer cache streams the rest).
/// The cost is the recorded one (TensorRef::nestedCost) when every nested
/// matrix has it, else the squared difference between their high and low
/// values.
NestedPrecisions chooseNestedPrecisions(const ModelDescription &description, uint64_t budgetBytes);

/// Checks `description` against its ModelSpec before anything runs or is
/// written: every role's shape for the family (attention, norms, dense and
/// shared MLPs, embedding, lm_head), required roles present and none twice,
/// routed experts' ids in range and unique, widths and part widths
/// matching their matrices, the router's rows matching the experts (or the
/// remap table), top-k, groups, scaling and skip thresholds in range. The
/// package loader and the lowering of modules (every place a description
/// is made) call it, so no path reaches the engine, or the package
/// writer, unchecked. `where` names the file or
/// module in messages.
Status validateDescription(const ModelDescription &description, const std::string &where);

/// Reads the stored bytes of a description's tensors (the package writer's
/// input): raw bytes in the stored dtype, except FP8 with block scales,
/// which comes back dequantised as F32.
class TensorReader {
public:
  explicit TensorReader(ModelDescription description);
  ~TensorReader();
  Status read(const TensorRef &tensor, DType &dtype, std::vector<uint8_t> &bytes);
  /// The dtype and byte count read() would give, from headers only.
  Status size(const TensorRef &tensor, DType &dtype, uint64_t &bytes);

private:
  std::unique_ptr<WeightProvider> provider;
};

/// Reads the tensors of `description` (every float dtype, FP8 with block
/// scales, slices, WeightStore records), checking each against its shape.
std::unique_ptr<WeightProvider> makeDescriptionWeightProvider(ModelDescription description);

} // namespace moe

#endif // MOE_RUNTIME_DESCRIPTION_H
