//===- MoeOps.cpp - Verifiers of the moe dialect --------------------------===//
//
// Part of moec. Every invariant a pass could break is checked here: tensor
// references resolve to `moe.tensor` symbols of the right shape, expert
// widths agree with their matrices, the router has one row per live expert
// (or per remap entry), top-k does not exceed the live experts, remap
// tables point at existing experts.
//
//===----------------------------------------------------------------------===//

#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "common/WeightFormat.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/OpImplementation.h"
#include "llvm/ADT/DenseSet.h"

using namespace mlir;
using namespace moe::ir;

#include "moe/Dialect/Moe/IR/MoeOpsEnums.cpp.inc"

/// A router kind is written as its quoted name (`scoring "softmax"`); an
/// unknown name is a parse error listing the known ones.
template <typename Kind, typename KindAttr>
static ParseResult parseKind(OpAsmParser &parser, KindAttr &attr, StringRef what,
                             std::optional<Kind> (*symbolize)(StringRef), StringRef known) {
  SMLoc loc = parser.getCurrentLocation();
  std::string text;
  if (parser.parseString(&text))
    return failure();
  std::optional<Kind> kind = symbolize(text);
  if (!kind)
    return parser.emitError(loc) << what << " '" << text << "' is not " << known;
  attr = KindAttr::get(parser.getContext(), *kind);
  return success();
}

static ParseResult parseScoringKind(OpAsmParser &parser, ScoringKindAttr &attr) {
  return parseKind<ScoringKind>(parser, attr, "scoring", symbolizeScoringKind, "softmax, sigmoid or sparsemixer");
}
static void printScoringKind(OpAsmPrinter &printer, Operation *, ScoringKindAttr attr) {
  printer << '"' << stringifyScoringKind(attr.getValue()) << '"';
}
static ParseResult parseSelectionKind(OpAsmParser &parser, SelectionKindAttr &attr) {
  return parseKind<SelectionKind>(parser, attr, "selection", symbolizeSelectionKind,
                                  "top-k, group-max or group-top2-sum");
}
static void printSelectionKind(OpAsmPrinter &printer, Operation *, SelectionKindAttr attr) {
  printer << '"' << stringifySelectionKind(attr.getValue()) << '"';
}

#define GET_OP_CLASSES
#include "moe/Dialect/Moe/IR/MoeOps.cpp.inc"

namespace {

ModelOp enclosingModel(Operation *op) { return op->getParentOfType<ModelOp>(); }

/// Resolves `symbol` to a moe.tensor in the enclosing model, or emits an
/// error naming `role` and returns null.
TensorOp lookupTensor(Operation *op, FlatSymbolRefAttr symbol, StringRef role) {
  ModelOp model = enclosingModel(op);
  if (!model) {
    op->emitOpError("must be inside a moe.model");
    return nullptr;
  }
  auto tensor = dyn_cast_or_null<TensorOp>(SymbolTable::lookupSymbolIn(model, symbol.getAttr()));
  if (!tensor)
    op->emitOpError() << role << " " << symbol << " does not name a moe.tensor";
  return tensor;
}

/// Checks that the tensor named by `symbol` has `shape`.
LogicalResult expectShape(Operation *op, FlatSymbolRefAttr symbol, StringRef role, ArrayRef<int64_t> shape) {
  TensorOp tensor = lookupTensor(op, symbol, role);
  if (!tensor)
    return failure();
  ArrayRef<int64_t> actual = tensor.getTensorType().getShape();
  if (actual != shape) {
    InFlightDiagnostic diagnostic = op->emitOpError() << role << " " << symbol << " has shape [";
    llvm::interleaveComma(actual, diagnostic);
    diagnostic << "], expected [";
    llvm::interleaveComma(shape, diagnostic);
    return diagnostic << "]";
  }
  return success();
}

LogicalResult verifyMlp(Operation *op, int64_t width, FlatSymbolRefAttr gate, FlatSymbolRefAttr up,
                        FlatSymbolRefAttr down) {
  ModelOp model = enclosingModel(op);
  if (!model)
    return op->emitOpError("must be inside a moe.model");
  if (width < 1)
    return op->emitOpError() << "width must be positive, got " << width;
  int64_t hidden = static_cast<int64_t>(model.getHidden());
  if (failed(expectShape(op, gate, "gate", {width, hidden})) || failed(expectShape(op, up, "up", {width, hidden})) ||
      failed(expectShape(op, down, "down", {hidden, width})))
    return failure();
  return success();
}

} // namespace

LogicalResult ModelOp::verify() {
  if (static_cast<int64_t>(getHidden()) < 1)
    return emitOpError() << "hidden size must be positive, got " << static_cast<int64_t>(getHidden());
  llvm::DenseSet<int64_t> layers;
  for (Operation &op : getBody().front())
    if (auto layer = dyn_cast<LayerOp>(op))
      if (!layers.insert(static_cast<int64_t>(layer.getIndex())).second)
        return layer.emitOpError() << "layer " << layer.getIndex() << " appears twice";
  return success();
}

LogicalResult TensorOp::verify() {
  ModelOp model = (*this)->getParentOfType<ModelOp>();
  if (std::optional<int64_t> source = getSource())
    if (*source < 0 || *source >= static_cast<int64_t>(model.getSources().size()))
      return emitOpError() << "source " << *source << " is not one of the model's " << model.getSources().size()
                           << " source files";
  if (!getTensorType().hasStaticShape())
    return emitOpError("tensor type must have a static shape");
  if (std::optional<ArrayRef<int64_t>> slice = getSlice()) {
    if (slice->size() != 4 || (*slice)[0] < 0 || (*slice)[1] < 0 || (*slice)[2] < 1 ||
        ((*slice)[3] != 0 && (*slice)[3] != 1))
      return emitOpError("slice must be [matrix >= 0, first row >= 0, rows >= 1, transposed 0|1]");
    if (getTensorType().getRank() != 2 || getTensorType().getShape()[0] != (*slice)[2])
      return emitOpError() << "a slice of " << (*slice)[2] << " rows needs a 2-D type with " << (*slice)[2] << " rows";
  }
  if (QuantAttr quant = getQuantAttr()) {
    if (quant.getBits() < 2 || quant.getBits() > 8)
      return emitOpError() << "quantisation bits must be in [2, 8], got " << quant.getBits();
    if (quant.getGroup() < 1)
      return emitOpError() << "quantisation group must be positive, got " << quant.getGroup();
    // The format names a layout of kernels/common and must agree with the fields.
    std::optional<::moe::quant::WeightFormat> format = ::moe::quant::parseWeightFormat(quant.getFormat().str());
    if (!format)
      return emitOpError() << "unknown quantisation format '" << quant.getFormat()
                           << "' (expected e.g. q4_g128_asym or q4_k; see kernels/common/WeightFormat.h)";
    if (format->bits() != quant.getBits() || format->block() != quant.getGroup() ||
        format->scheme() != quant.getScheme())
      return emitOpError() << "quantisation format '" << quant.getFormat()
                           << "' disagrees with bits = " << quant.getBits() << ", group = " << quant.getGroup()
                           << ", scheme = \"" << quant.getScheme() << "\"";
    if (getTensorType().getRank() != 2)
      return emitOpError("only matrices can be quantised");
    if (std::string problem = format->checkColumns(getTensorType().getShape()[1]); !problem.empty())
      return emitOpError() << "quantisation format '" << quant.getFormat() << "': " << problem;
  }
  return success();
}

LogicalResult LayerOp::verify() {
  int64_t blocks = 0;
  for (Operation &op : getBody().front())
    blocks += isa<MoeBlockOp>(op);
  if (blocks > 1)
    return emitOpError() << "has " << blocks << " moe.moe_block ops, expected at most one";
  return success();
}

LogicalResult DenseOp::verify() {
  for (NamedAttribute entry : getTensors()) {
    auto symbol = dyn_cast<FlatSymbolRefAttr>(entry.getValue());
    if (!symbol)
      return emitOpError() << "tensor '" << entry.getName().getValue() << "' must be a symbol reference";
    if (!lookupTensor(*this, symbol, entry.getName().getValue()))
      return failure();
  }
  return success();
}

LogicalResult MoeBlockOp::verify() {
  RouterOp router;
  ExpertBaseOp base;
  llvm::DenseSet<int64_t> ids, origins;
  int64_t experts = 0, shared = 0;
  ExpertOp previous;
  int64_t nextOffset = 0; // where the next part of `previous`'s expert starts
  for (Operation &op : getBody().front()) {
    if (!isa<ExpertOp>(op))
      previous = ExpertOp(); // parts are consecutive
    if (auto r = dyn_cast<RouterOp>(op)) {
      if (router)
        return r.emitOpError("is the second router of its moe.moe_block");
      router = r;
    } else if (auto expert = dyn_cast<ExpertOp>(op)) {
      const int64_t id = static_cast<int64_t>(expert.getId());
      const std::optional<uint64_t> offset = expert.getPartOffset();
      const bool continues = previous && static_cast<int64_t>(previous.getId()) == id;
      if (continues) {
        // A further part of a split expert: both carry part_offset, and
        // the parts tile the expert's neurons in order.
        if (!offset || !previous.getPartOffset())
          return expert.emitOpError() << "expert id " << id << " appears twice (the parts of a split expert "
                                      << "carry part_offset)";
        if (static_cast<int64_t>(*offset) != nextOffset)
          return expert.emitOpError() << "part_offset " << *offset << " of expert " << id << ", expected " << nextOffset
                                      << " (the parts tile the neurons in order)";
        if (expert.getOriginalId() != previous.getOriginalId())
          return expert.emitOpError() << "the parts of expert " << id << " have different origins ("
                                      << previous.getOriginalId() << ", " << expert.getOriginalId() << ")";
      } else {
        if (!ids.insert(id).second)
          return expert.emitOpError() << "expert id " << id << " appears twice";
        if (!origins.insert(expert.getOriginalId()).second)
          return expert.emitOpError() << "origin " << expert.getOriginalId() << " of expert " << id
                                      << " is another expert's (an imported expert has one id)";
        if (offset && *offset != 0)
          return expert.emitOpError() << "the first part of expert " << id << " has part_offset " << *offset
                                      << ", expected 0";
        nextOffset = 0;
        ++experts;
      }
      nextOffset += static_cast<int64_t>(expert.getWidth());
      previous = expert;
      continue;
    } else if (isa<SharedExpertOp>(op)) {
      ++shared;
    } else if (auto b = dyn_cast<ExpertBaseOp>(op)) {
      if (base)
        return b.emitOpError("is the second expert_base of its moe.moe_block");
      base = b;
    }
  }
  // A base serves factored experts of its width, and only those.
  for (ExpertOp expert : getBody().getOps<ExpertOp>())
    if (static_cast<bool>(base) != static_cast<bool>(expert.getLowRank()))
      return expert.emitOpError() << "expert " << expert.getId()
                                  << (base ? " is not factored, but its block has a moe.expert_base"
                                           : " has low_rank factors, but its block has no moe.expert_base");
    else if (base && expert.getWidth() != base.getWidth())
      return expert.emitOpError() << "expert " << expert.getId() << " has width " << expert.getWidth()
                                  << ", its block's base " << base.getWidth();
  if (!router)
    return emitOpError("needs a moe.router");
  if (experts == 0)
    return emitOpError("needs at least one moe.expert");
  if (shared > 1)
    return emitOpError() << "has " << shared << " moe.shared_expert ops, expected at most one";
  // Merged experts keep every router row (a remap entry each), so top-k
  // chooses among rows, and several rows may share an expert.
  const int64_t choices = router.getRemap() ? static_cast<int64_t>(router.getRemap()->size()) : experts;
  if (static_cast<int64_t>(router.getTopK()) > choices)
    return router.emitOpError() << "top_k " << router.getTopK() << " exceeds the " << choices
                                << (router.getRemap() ? " router rows" : " live experts");
  if (std::optional<ArrayRef<int64_t>> remap = router.getRemap())
    for (int64_t target : *remap)
      if (!ids.contains(target))
        return router.emitOpError() << "remap entry " << target << " is not a live expert id";
  return success();
}

LogicalResult RouterOp::verify() {
  ModelOp model = enclosingModel(*this);
  auto block = (*this)->getParentOfType<MoeBlockOp>();
  if (!model || !block)
    return emitOpError("must be inside a moe.moe_block of a moe.model");
  if (static_cast<int64_t>(getTopK()) < 1)
    return emitOpError() << "top_k must be positive, got " << getTopK();
  // Distinct experts (the parts of a split expert count once).
  llvm::DenseSet<int64_t> expertIds;
  for (Operation &op : block.getBody().front())
    if (auto expert = dyn_cast<ExpertOp>(op))
      expertIds.insert(static_cast<int64_t>(expert.getId()));
  const int64_t experts = static_cast<int64_t>(expertIds.size());
  // One router row per expert, or per remap entry after merging.
  int64_t rows = getRemap() ? static_cast<int64_t>(getRemap()->size()) : experts;
  if (failed(expectShape(*this, getWeightAttr(), "weight", {rows, static_cast<int64_t>(model.getHidden())})))
    return failure();
  if (FlatSymbolRefAttr bias = getCorrectionBiasAttr())
    if (failed(expectShape(*this, bias, "correction_bias", {rows})))
      return failure();
  if (getScoring() == ScoringKind::SparseMixer && getTopK() != 2)
    return emitOpError() << "sparsemixer scoring selects exactly 2 experts, top_k is " << getTopK();
  const int64_t groups = static_cast<int64_t>(getGroups()), topKGroups = static_cast<int64_t>(getTopKGroups());
  if (getSelection() != SelectionKind::TopK &&
      (groups < 1 || rows % groups != 0 || topKGroups < 1 || topKGroups > groups))
    return emitOpError() << "group-limited selection needs groups dividing the " << rows
                         << " router rows and 1 <= top_k_groups <= groups";
  return success();
}

LogicalResult ExpertOp::verify() {
  if (getOriginalId() < 0)
    return emitOpError() << "origin " << getOriginalId() << " is negative";
  std::optional<ArrayAttr> lowRank = getLowRank();
  if (!lowRank)
    return verifyMlp(*this, static_cast<int64_t>(getWidth()), getGateAttr(), getUpAttr(), getDownAttr());
  // Factored: left factors [out, rank], right factors [rank, in].
  ModelOp model = enclosingModel(*this);
  if (!model)
    return emitOpError("must be inside a moe.model");
  if (lowRank->size() != 3)
    return emitOpError() << "low_rank names " << lowRank->size() << " right factors, expected 3 (gate, up, down)";
  if (getPartOffset())
    return emitOpError("a factored expert is not split into parts");
  const int64_t width = static_cast<int64_t>(getWidth()), hidden = static_cast<int64_t>(model.getHidden());
  const FlatSymbolRefAttr left[3] = {getGateAttr(), getUpAttr(), getDownAttr()};
  const char *names[3] = {"gate", "up", "down"};
  const int64_t outs[3] = {width, width, hidden}, ins[3] = {hidden, hidden, width};
  for (int m = 0; m < 3; ++m) {
    TensorOp tensor = lookupTensor(*this, left[m], names[m]);
    if (!tensor)
      return failure();
    ArrayRef<int64_t> shape = tensor.getTensorType().getShape();
    if (shape.size() != 2 || shape[0] != outs[m] || shape[1] < 1 || shape[1] > std::min(outs[m], ins[m]))
      return emitOpError() << names[m] << " left factor " << left[m] << " must be [" << outs[m]
                           << ", rank] with 1 <= rank <= " << std::min(outs[m], ins[m]);
    if (failed(expectShape(*this, cast<FlatSymbolRefAttr>((*lowRank)[m]), (names[m] + std::string(" right factor")),
                           {shape[1], ins[m]})))
      return failure();
  }
  return success();
}

LogicalResult ExpertBaseOp::verify() {
  return verifyMlp(*this, static_cast<int64_t>(getWidth()), getGateAttr(), getUpAttr(), getDownAttr());
}

LogicalResult SharedExpertOp::verify() {
  if (failed(verifyMlp(*this, static_cast<int64_t>(getWidth()), getGateAttr(), getUpAttr(), getDownAttr())))
    return failure();
  if (FlatSymbolRefAttr gate = getGatedByAttr())
    return expectShape(*this, gate, "gated_by", {1, static_cast<int64_t>(enclosingModel(*this).getHidden())});
  return success();
}
