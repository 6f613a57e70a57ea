//===- PassOptions.h - The passes' enumerated options -----------*- C++ -*-===//
//
// Part of moec. Every option of a moe pass that takes one of a few words is an
// enum declared here with its spellings, once. The same table parses the
// option on the command line (moe-opt, a pass pipeline), parses it from a
// recipe (moe/Pipeline/Recipe.h) and prints it back; a wrong word is refused
// where it is read, with the words it could have been.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_TRANSFORMS_PASSOPTIONS_H
#define MOE_TRANSFORMS_PASSOPTIONS_H

#include "llvm/ADT/ArrayRef.h"
#include "llvm/ADT/StringRef.h"
#include "llvm/Support/CommandLine.h"
#include "llvm/Support/raw_ostream.h"

#include <optional>
#include <string>

namespace moe {

/// moe-prune-experts: how an expert is scored.
enum class ExpertScore { Frequency, GateWeight, EasyEp, Tcess, Reconstruction };
/// moe-prune-experts, moe-prune-atoms: within each layer or across the model.
enum class PruneScope { Layer, Global };
/// moe-merge-experts: M-SMoE or DERN.
enum class MergeMethod { Msmoe, Dern };
/// moe-merge-experts: what makes two experts alike.
enum class MergeSimilarity { RouterLogits, Weights };
/// moe-merge-experts (msmoe): neuron alignment before averaging.
enum class MergeAlign { None, Permutation };
/// moe-prune-atoms: how a neuron is scored.
enum class AtomScore { Camera, Heapr, CameraSum, Magnitude };
/// moe-quantize: round to nearest or GPTQ.
enum class QuantizeMethod { Rtn, Gptq };
/// moe-quantize, GPTQ: which weights a group's scales are computed from.
/// Static differs from the others whenever a row has more than one group;
/// block and running differ only when groups are smaller than the
/// lazy-update block.
enum class GptqGroupScales {
  /// The weights with every update so far, earlier columns of the same
  /// block included (moec's first choice).
  Running,
  /// The weights as of the start of the group's block: AutoGPTQ's
  /// find_params on W, which the lazy batch update refreshes per block.
  Block,
  /// The original weights, every group up front (GPTQModel's
  /// static_groups; always so with act-order).
  Static,
};
/// moe-quantize: GPTQ's arithmetic (the Hessian's factorisation and the
/// error updates): double, or float as AutoGPTQ and GPTQModel run it.
enum class GptqPrecision { F64, F32 };
/// moe-quantize: the type of group scales.
enum class ScaleKind { F16, BF16 };
/// moe-quantize: moec's group format (bits, group, sym, scale-type) or one
/// of llama.cpp's block formats, which GGUF exports copy byte for byte.
enum class QuantizeFormat { Group, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K };
/// moe-quantize: which matrices (All is experts, shared, attention, dense).
enum class QuantizeTarget { Experts, Shared, Attention, Dense, All, LmHead, Embedding };
/// moe-allocate-bits: what one unit of the allocation is.
enum class Granularity { Expert, Matrix, MicroExpert, Layer };
/// moe-allocate-bits: the loss of a unit at a width.
enum class AllocationObjective { McMoe, Hessian };

/// One spelling of an enumerated option.
template <typename E> struct Choice {
  llvm::StringLiteral name;
  E value;
};

/// The spellings of each enum (specialised in PassOptions.cpp).
template <typename E> llvm::ArrayRef<Choice<E>> choices();

/// The value spelled `text`, if it is one.
template <typename E> std::optional<E> parseChoice(llvm::StringRef text) {
  for (const Choice<E> &choice : choices<E>())
    if (choice.name == text)
      return choice.value;
  return std::nullopt;
}

/// The spelling of `value`.
template <typename E> llvm::StringRef choiceName(E value) {
  for (const Choice<E> &choice : choices<E>())
    if (choice.value == value)
      return choice.name;
  return "?";
}

/// "a, b or c": the spellings, for messages.
template <typename E> std::string choiceList() {
  std::string list;
  llvm::ArrayRef<Choice<E>> all = choices<E>();
  for (size_t i = 0; i < all.size(); ++i)
    list += (i == 0 ? "" : i + 1 == all.size() ? " or " : ", ") + all[i].name.str();
  return list;
}

/// The command-line parser of an enumerated option: a wrong word is an
/// error that lists the right ones (llvm::cl's own enum parser says only
/// "Cannot find option named").
template <typename E> class ChoiceParser : public llvm::cl::basic_parser<E> {
public:
  using llvm::cl::basic_parser<E>::basic_parser;
  bool parse(llvm::cl::Option &option, llvm::StringRef, llvm::StringRef text, E &value) {
    if (std::optional<E> parsed = parseChoice<E>(text)) {
      value = *parsed;
      return false;
    }
    return option.error("'" + text + "' is not " + choiceList<E>());
  }
  llvm::StringRef getValueName() const override { return "choice"; }
  void printOptionDiff(const llvm::cl::Option &option, E, const llvm::cl::OptionValue<E> &, size_t width) const {
    this->printOptionNoValue(option, width);
  }
  /// Used by mlir::PassOptions to print a pipeline back.
  static void print(llvm::raw_ostream &os, const E &value) { os << choiceName(value); }
};

} // namespace moe

/// Every enumerated pass option is parsed by ChoiceParser, so the passes'
/// generated option classes need no per-option parser.
#define MOE_CHOICE_PARSER(E)                                                                                           \
  template <> class llvm::cl::parser<E> : public moe::ChoiceParser<E> {                                                \
  public:                                                                                                              \
    using moe::ChoiceParser<E>::ChoiceParser;                                                                          \
  };
MOE_CHOICE_PARSER(moe::ExpertScore)
MOE_CHOICE_PARSER(moe::PruneScope)
MOE_CHOICE_PARSER(moe::GptqGroupScales)
MOE_CHOICE_PARSER(moe::GptqPrecision)
MOE_CHOICE_PARSER(moe::MergeMethod)
MOE_CHOICE_PARSER(moe::MergeSimilarity)
MOE_CHOICE_PARSER(moe::MergeAlign)
MOE_CHOICE_PARSER(moe::AtomScore)
MOE_CHOICE_PARSER(moe::QuantizeMethod)
MOE_CHOICE_PARSER(moe::ScaleKind)
MOE_CHOICE_PARSER(moe::QuantizeFormat)
MOE_CHOICE_PARSER(moe::QuantizeTarget)
MOE_CHOICE_PARSER(moe::Granularity)
MOE_CHOICE_PARSER(moe::AllocationObjective)
#undef MOE_CHOICE_PARSER

#endif // MOE_TRANSFORMS_PASSOPTIONS_H
