//===- Tokenizer.h - Hugging Face tokenizer.json, BPE ------------*- C++ -*-===//
//
// Part of moec. Encodes and decodes with the BPE tokenizers that MoE
// checkpoints ship: byte-level BPE (GPT-2, Qwen, DeepSeek, OLMoE: Split regex
// pre-tokenizers through PCRE2, ByteLevel, NFC where declared) and
// SentencePiece-style BPE (Metaspace or Prepend+Replace normaliser, byte
// fallback <0xXX>, fuse_unk). Added and special tokens are matched first.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_TOKENIZER_H
#define MOE_RUNTIME_TOKENIZER_H

#include "moe/Support/Status.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

class Tokenizer {
public:
  /// Reads a tokenizer.json; unsupported components are an error naming them.
  static Expected<std::unique_ptr<Tokenizer>> fromFile(const std::string &path);
  static Expected<std::unique_ptr<Tokenizer>> fromJson(std::string_view text, const std::string &source);
  ~Tokenizer();

  /// Token ids of `text`; with `addSpecialTokens`, the post-processor's
  /// template (e.g. a BOS) is applied as transformers does by default.
  Expected<std::vector<int32_t>> encode(std::string_view text, bool addSpecialTokens = false) const;
  /// Text of `ids`; special tokens are skipped when `skipSpecialTokens`.
  std::string decode(std::span<const int32_t> ids, bool skipSpecialTokens = false) const;

  int64_t vocabSize() const;
  /// Id of token `content`, if it exists.
  std::optional<int32_t> tokenId(std::string_view content) const;

  struct Impl;

private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl;
};

} // namespace moe

#endif // MOE_RUNTIME_TOKENIZER_H
