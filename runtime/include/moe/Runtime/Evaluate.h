//===- Evaluate.h - Perplexity and bits per byte ----------------*- C++ -*-===//
//
// Part of moec. The evaluation every quality number in moec comes from.
// Windowing, so numbers compare across tools: a token stream of N ids and
// sequence length L gives windows w = 0 .. floor((N-1)/L)-1 with inputs
// ids[wL .. wL+L-1] and targets ids[wL+1 .. wL+L], each from an empty KV
// cache; perplexity = exp(mean NLL over all targets). With a stride S < L,
// windows start every S tokens and each scores only targets no earlier
// window scored.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_EVALUATE_H
#define MOE_RUNTIME_EVALUATE_H

#include "moe/Runtime/Engine.h"
#include "moe/Runtime/Tokenizer.h"

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace moe {

/// A token stream of one domain, with the UTF-8 bytes it was made from
/// (0 when it came as ids).
struct EvalStream {
  std::string domain;
  std::vector<int32_t> ids;
  int64_t textBytes = 0;
  std::string source; ///< The file the ids came from, for messages.
};

/// Reads evaluation data: `.u32` (little-endian uint32 ids, one stream),
/// `.jsonl` (objects with "text" or "ids" and an optional "domain"; the
/// documents of a domain are concatenated, each followed by `endOfText`
/// when given), or anything else as plain text (one stream). Text needs a
/// tokenizer.
Expected<std::vector<EvalStream>> readEvalData(const std::string &path, const Tokenizer *tokenizer,
                                               std::optional<int32_t> endOfText);

struct EvalOptions {
  int64_t sequenceLength = 256;
  int64_t stride = 0;    ///< 0: equal to the sequence length.
  int64_t maxTokens = 0; ///< 0: all; else stop after this many targets per stream.
  /// llama-perplexity's protocol: windows of sequenceLength tokens side by
  /// side, each scoring only the targets of its second half (the first
  /// half is context), so numbers compare with llama.cpp's.
  bool secondHalfOnly = false;
};

struct EvalScore {
  double negativeLogLikelihood = 0; ///< Sum over targets, nats.
  int64_t targets = 0;
  int64_t streamTokens = 0;
  int64_t textBytes = 0;
  double perplexity() const;
  /// Bits per UTF-8 byte of the scored part of the text (0 without text).
  double bitsPerByte() const;
};

struct EvalResult {
  EvalScore overall;
  std::map<std::string, EvalScore> domains;
  double seconds = 0;
  /// Routed experts that ran per token per MoE layer, on average.
  double expertsPerToken = 0;
};

Expected<EvalResult> evaluate(Engine &engine, const std::vector<EvalStream> &streams, const EvalOptions &options);

} // namespace moe

#endif // MOE_RUNTIME_EVALUATE_H
