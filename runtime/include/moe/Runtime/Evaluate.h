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

#include <nlohmann/json.hpp>

#include <functional>
#include <map>
#include <optional>
#include <span>
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
  /// When set, every window also runs through this model (the original),
  /// and the result compares the two next-token distributions
  /// (llama-perplexity's KL-divergence mode). Same tokenizer and vocabulary.
  Engine *reference = nullptr;
  /// Count, per domain, the router rows each token chose (routing frequency).
  bool countRouting = false;
  /// The progress line's label (moe/Support/Progress.h).
  std::string progressLabel = "evaluating";
  /// Called with each window's inputs before the window runs (each window
  /// is a request from an empty cache): `--task auto` retrieves a task set
  /// for it here. An error ends the evaluation.
  std::function<Status(std::span<const int32_t> inputs)> beforeWindow;
};

/// The evaluated model against the reference, over the same targets.
struct EvalComparison {
  int64_t tokens = 0;
  double klMean = 0; ///< Mean KL(P_reference || P_model), nats.
  double klMedian = 0, klP99 = 0, klMax = 0;
  double top1Agreement = 0; ///< Share of targets where both argmaxes agree.
  double referencePerplexity = 0;
  double perplexityRatio = 0; ///< Model perplexity / reference perplexity.
  std::map<std::string, double> domainKlMean;
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
  std::optional<EvalComparison> comparison; ///< With EvalOptions::reference.
  /// With countRouting: per domain, per layer, tokens that chose each
  /// router row; and the tokens run per domain.
  std::map<std::string, std::vector<std::vector<int64_t>>> routing;
  std::map<std::string, int64_t> routingTokens;
};

Expected<EvalResult> evaluate(Engine &engine, const std::vector<EvalStream> &streams, const EvalOptions &options);

/// {"perplexity", "bits_per_byte", "targets", "negative_log_likelihood",
/// "domains": {name: {...}}, "experts_per_token", "compare": {"kl_mean",
/// "kl_median", "kl_p99", "kl_max", "top1_agreement",
/// "original_perplexity", "perplexity_ratio", "tokens", "domain_kl_mean"}
/// (with a reference)}: what `moec eval --json` prints and reports hold.
nlohmann::json evalResultToJson(const EvalResult &result);

} // namespace moe

#endif // MOE_RUNTIME_EVALUATE_H
