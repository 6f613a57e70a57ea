//===- Tokenizer.cpp - Hugging Face tokenizer.json, BPE -------------------===//
//
// Part of moec. The pipeline of the `tokenizers` library for BPE models:
// added tokens split the input first; each remaining segment is normalised,
// pre-tokenised into pieces, and each piece is encoded by BPE merges in
// rank order (leftmost first on ties). Decoding runs the decoder chain.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Tokenizer.h"
#include "moe/Support/File.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <queue>
#include <sstream>
#include <unordered_map>

namespace moe {

using json = nlohmann::json;

namespace {

//===-- UTF-8 helpers ------------------------------------------------------===//

/// Length of the UTF-8 sequence starting with byte `lead` (1 for invalid).
size_t utf8Length(unsigned char lead) {
  if (lead < 0x80)
    return 1;
  if ((lead >> 5) == 0x6)
    return 2;
  if ((lead >> 4) == 0xE)
    return 3;
  if ((lead >> 3) == 0x1E)
    return 4;
  return 1;
}

std::string encodeCodepoint(uint32_t codepoint) {
  std::string out;
  if (codepoint < 0x80) {
    out += static_cast<char>(codepoint);
  } else if (codepoint < 0x800) {
    out += static_cast<char>(0xC0 | (codepoint >> 6));
    out += static_cast<char>(0x80 | (codepoint & 0x3F));
  } else if (codepoint < 0x10000) {
    out += static_cast<char>(0xE0 | (codepoint >> 12));
    out += static_cast<char>(0x80 | ((codepoint >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (codepoint & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (codepoint >> 18));
    out += static_cast<char>(0x80 | ((codepoint >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((codepoint >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (codepoint & 0x3F));
  }
  return out;
}

/// Splits valid UTF-8 into its characters.
std::vector<std::string> characters(std::string_view text) {
  std::vector<std::string> out;
  for (size_t i = 0; i < text.size();) {
    size_t length = std::min(utf8Length(static_cast<unsigned char>(text[i])), text.size() - i);
    out.emplace_back(text.substr(i, length));
    i += length;
  }
  return out;
}

/// Bytes to text, replacing invalid UTF-8 by U+FFFD (like from_utf8_lossy).
std::string lossyUtf8(const std::string &bytes) {
  std::string out;
  const auto *data = reinterpret_cast<const utf8proc_uint8_t *>(bytes.data());
  utf8proc_ssize_t size = static_cast<utf8proc_ssize_t>(bytes.size());
  for (utf8proc_ssize_t i = 0; i < size;) {
    utf8proc_int32_t codepoint;
    utf8proc_ssize_t length = utf8proc_iterate(data + i, size - i, &codepoint);
    if (length <= 0) {
      out += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    out.append(bytes, static_cast<size_t>(i), static_cast<size_t>(length));
    i += length;
  }
  return out;
}

bool isValidUtf8(std::string_view text, size_t &badOffset) {
  const auto *data = reinterpret_cast<const utf8proc_uint8_t *>(text.data());
  utf8proc_ssize_t size = static_cast<utf8proc_ssize_t>(text.size());
  for (utf8proc_ssize_t i = 0; i < size;) {
    utf8proc_int32_t codepoint;
    utf8proc_ssize_t length = utf8proc_iterate(data + i, size - i, &codepoint);
    if (length <= 0) {
      badOffset = static_cast<size_t>(i);
      return false;
    }
    i += length;
  }
  return true;
}

void replaceAll(std::string &text, const std::string &from, const std::string &to) {
  if (from.empty())
    return;
  std::string out;
  size_t position = 0;
  for (size_t found; (found = text.find(from, position)) != std::string::npos; position = found + from.size())
    out.append(text, position, found - position).append(to);
  out.append(text, position, std::string::npos);
  text = std::move(out);
}

/// GPT-2's byte <-> unicode table: printable bytes map to themselves, the
/// other 68 to U+0100 + n in increasing order.
struct ByteTable {
  std::array<std::string, 256> toText;
  std::unordered_map<std::string, uint8_t> toByte;
  ByteTable() {
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      uint32_t codepoint = printable ? static_cast<uint32_t>(b) : 0x100u + extra++;
      toText[b] = encodeCodepoint(codepoint);
      toByte[toText[b]] = static_cast<uint8_t>(b);
    }
  }
};

const ByteTable &byteTable() {
  static const ByteTable table;
  return table;
}

//===-- Regex (PCRE2) --------------------------------------------------------===//

class Regex {
public:
  static Expected<std::shared_ptr<Regex>> compile(const std::string &pattern) {
    int errorCode;
    PCRE2_SIZE errorOffset;
    pcre2_code *code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP, &errorCode, &errorOffset, nullptr);
    if (!code) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(errorCode, message, sizeof(message));
      return Status::error("regex '", pattern, "' does not compile at offset ", errorOffset, ": ",
                           reinterpret_cast<const char *>(message));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE); // optional speed-up
    auto regex = std::shared_ptr<Regex>(new Regex());
    regex->code = code;
    regex->data = pcre2_match_data_create_from_pattern(code, nullptr);
    return regex;
  }
  ~Regex() {
    pcre2_match_data_free(data);
    pcre2_code_free(code);
  }
  /// [begin, end) byte ranges of all non-overlapping matches in `text`.
  std::vector<std::pair<size_t, size_t>> findAll(std::string_view text) const {
    std::vector<std::pair<size_t, size_t>> matches;
    size_t offset = 0;
    while (offset <= text.size()) {
      int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), offset, PCRE2_NO_UTF_CHECK,
                           data, nullptr);
      if (rc < 0)
        break;
      PCRE2_SIZE *vector = pcre2_get_ovector_pointer(data);
      size_t begin = vector[0], end = vector[1];
      if (end == begin) {
        // Empty match: skip one character.
        if (begin >= text.size())
          break;
        offset = begin + utf8Length(static_cast<unsigned char>(text[begin]));
        continue;
      }
      matches.emplace_back(begin, end);
      offset = end;
    }
    return matches;
  }

private:
  Regex() = default;
  pcre2_code *code = nullptr;
  pcre2_match_data *data = nullptr;
};

/// A `{"String": s}` or `{"Regex": r}` pattern as a regex.
Expected<std::shared_ptr<Regex>> patternRegex(const json &pattern, const std::string &where) {
  if (pattern.is_object() && pattern.contains("Regex") && pattern["Regex"].is_string())
    return Regex::compile(pattern["Regex"].get<std::string>());
  if (pattern.is_object() && pattern.contains("String") && pattern["String"].is_string()) {
    std::string literal = pattern["String"].get<std::string>();
    return Regex::compile("\\Q" + literal + "\\E");
  }
  return Status::error(where, ": pattern must be {\"String\": ...} or {\"Regex\": ...}");
}

const char *kGpt2Pattern = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

//===-- Pipeline components ------------------------------------------------===//

struct Normalizer {
  enum Kind { Nfc, Nfd, Nfkc, Nfkd, Prepend, Replace, Lowercase, Strip } kind;
  std::string text, content;
  std::shared_ptr<Regex> regex;
  bool left = false, right = false;
};

struct PreTokenizer {
  enum Kind { Split, ByteLevel, Metaspace, Digits } kind;
  std::shared_ptr<Regex> regex;
  enum Behavior { Isolated, Removed, MergedWithPrevious, MergedWithNext } behavior = Isolated;
  bool invert = false;
  bool addPrefixSpace = false, useRegex = false;
  std::string replacement;
  enum Prepend { Always, First, Never } prepend = Always;
  bool split = true;
  bool individualDigits = false;
};

struct DecoderStep {
  enum Kind { ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip } kind;
  std::string text, content;
  size_t start = 0, stop = 0;
  bool prependFirst = true;
};

struct AddedToken {
  int32_t id;
  std::string content;
  bool special = false, lstrip = false, rstrip = false, singleWord = false;
};

/// One pre-tokenised piece of a segment.
struct Piece {
  std::string text;
};

bool isWordCharacter(unsigned char c) { return std::isalnum(c) || c == '_' || c >= 0x80; }

} // namespace

struct Tokenizer::Impl {
  std::vector<Normalizer> normalizers;
  std::vector<PreTokenizer> preTokenizers;
  std::vector<DecoderStep> decoders;
  std::vector<AddedToken> addedTokens; ///< Longest content first.
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> idToToken;
  std::vector<bool> isSpecial;
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  std::unordered_map<uint64_t, Merge> merges;
  std::optional<int32_t> unknown;
  bool byteFallback = false, fuseUnknown = false, ignoreMerges = false;
  std::array<int32_t, 256> byteTokens{};
  std::vector<int32_t> templateBefore, templateAfter; ///< Special ids around $A.

  static uint64_t pairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  std::string normalize(std::string text) const {
    for (const Normalizer &n : normalizers) {
      switch (n.kind) {
      case Normalizer::Nfc:
      case Normalizer::Nfd:
      case Normalizer::Nfkc:
      case Normalizer::Nfkd: {
        const auto *input = reinterpret_cast<const utf8proc_uint8_t *>(text.c_str());
        utf8proc_uint8_t *output = n.kind == Normalizer::Nfc    ? utf8proc_NFC(input)
                                   : n.kind == Normalizer::Nfd  ? utf8proc_NFD(input)
                                   : n.kind == Normalizer::Nfkc ? utf8proc_NFKC(input)
                                                                : utf8proc_NFKD(input);
        if (output) {
          text = reinterpret_cast<char *>(output);
          std::free(output);
        }
        break;
      }
      case Normalizer::Prepend:
        if (!text.empty())
          text = n.text + text;
        break;
      case Normalizer::Replace: {
        std::string out;
        size_t position = 0;
        for (auto [begin, end] : n.regex->findAll(text)) {
          out.append(text, position, begin - position).append(n.content);
          position = end;
        }
        text = out.append(text, position, std::string::npos);
        break;
      }
      case Normalizer::Lowercase: {
        std::string out;
        for (const std::string &ch : characters(text)) {
          utf8proc_int32_t codepoint;
          utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t *>(ch.data()),
                           static_cast<utf8proc_ssize_t>(ch.size()), &codepoint);
          out += encodeCodepoint(static_cast<uint32_t>(utf8proc_tolower(codepoint)));
        }
        text = out;
        break;
      }
      case Normalizer::Strip: {
        size_t first = 0, last = text.size();
        if (n.left)
          while (first < last && std::isspace(static_cast<unsigned char>(text[first])))
            ++first;
        if (n.right)
          while (last > first && std::isspace(static_cast<unsigned char>(text[last - 1])))
            --last;
        text = text.substr(first, last - first);
        break;
      }
      }
    }
    return text;
  }

  /// Splits each piece around the matches of `regex` per `behavior`.
  static std::vector<Piece> splitPieces(const std::vector<Piece> &pieces, const Regex &regex,
                                        PreTokenizer::Behavior behavior, bool invert) {
    std::vector<Piece> out;
    for (const Piece &piece : pieces) {
      // Alternating (isMatch, range) parts covering the piece.
      std::vector<std::pair<bool, std::pair<size_t, size_t>>> parts;
      size_t position = 0;
      for (auto match : regex.findAll(piece.text)) {
        if (match.first > position)
          parts.push_back({invert, {position, match.first}});
        parts.push_back({!invert, match});
        position = match.second;
      }
      if (position < piece.text.size())
        parts.push_back({invert, {position, piece.text.size()}});
      std::string pending;
      for (size_t i = 0; i < parts.size(); ++i) {
        auto [isMatch, range] = parts[i];
        std::string text = piece.text.substr(range.first, range.second - range.first);
        switch (behavior) {
        case PreTokenizer::Isolated:
          out.push_back({text});
          break;
        case PreTokenizer::Removed:
          if (!isMatch)
            out.push_back({text});
          break;
        case PreTokenizer::MergedWithPrevious:
          if (isMatch && !out.empty() && i > 0 && !parts[i - 1].first)
            out.back().text += text;
          else
            out.push_back({text});
          break;
        case PreTokenizer::MergedWithNext:
          if (isMatch) {
            pending += text;
          } else {
            out.push_back({pending + text});
            pending.clear();
          }
          break;
        }
      }
      if (!pending.empty())
        out.push_back({pending});
    }
    return out;
  }

  std::vector<Piece> preTokenize(const std::string &segment, bool atStart) const {
    std::vector<Piece> pieces = {{segment}};
    for (const PreTokenizer &p : preTokenizers) {
      switch (p.kind) {
      case PreTokenizer::Split:
        pieces = splitPieces(pieces, *p.regex, p.behavior, p.invert);
        break;
      case PreTokenizer::Digits: {
        static const std::shared_ptr<Regex> runs = *Regex::compile("\\p{Nd}+");
        static const std::shared_ptr<Regex> single = *Regex::compile("\\p{Nd}");
        pieces = splitPieces(pieces, p.individualDigits ? *single : *runs, PreTokenizer::Isolated, false);
        break;
      }
      case PreTokenizer::ByteLevel: {
        if (p.addPrefixSpace)
          for (Piece &piece : pieces)
            if (!piece.text.empty() && piece.text[0] != ' ')
              piece.text = " " + piece.text;
        if (p.useRegex) {
          static const std::shared_ptr<Regex> gpt2 = *Regex::compile(kGpt2Pattern);
          pieces = splitPieces(pieces, *gpt2, PreTokenizer::Isolated, false);
        }
        const ByteTable &table = byteTable();
        for (Piece &piece : pieces) {
          std::string mapped;
          for (unsigned char byte : piece.text)
            mapped += table.toText[byte];
          piece.text = std::move(mapped);
        }
        break;
      }
      case PreTokenizer::Metaspace: {
        for (Piece &piece : pieces)
          replaceAll(piece.text, " ", p.replacement);
        if (!pieces.empty() && (p.prepend == PreTokenizer::Always || (p.prepend == PreTokenizer::First && atStart)))
          if (pieces[0].text.rfind(p.replacement, 0) != 0)
            pieces[0].text = p.replacement + pieces[0].text;
        if (p.split) {
          std::vector<Piece> out;
          for (const Piece &piece : pieces) {
            size_t position = 0;
            while (position < piece.text.size()) {
              size_t next = piece.text.find(p.replacement, position + 1);
              if (next == std::string::npos)
                next = piece.text.size();
              out.push_back({piece.text.substr(position, next - position)});
              position = next;
            }
          }
          pieces = std::move(out);
        }
        break;
      }
      }
    }
    return pieces;
  }

  /// BPE of one piece.
  void encodePiece(const std::string &piece, std::vector<int32_t> &out) const {
    if (piece.empty())
      return;
    if (ignoreMerges) {
      auto it = vocab.find(piece);
      if (it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    std::vector<int32_t> symbols;
    bool previousUnknown = false;
    for (const std::string &ch : characters(piece)) {
      auto it = vocab.find(ch);
      if (it != vocab.end()) {
        symbols.push_back(it->second);
        previousUnknown = false;
        continue;
      }
      if (byteFallback) {
        bool allBytes =
            std::all_of(ch.begin(), ch.end(), [&](char c) { return byteTokens[static_cast<unsigned char>(c)] >= 0; });
        if (allBytes) {
          for (char c : ch)
            symbols.push_back(byteTokens[static_cast<unsigned char>(c)]);
          previousUnknown = false;
          continue;
        }
      }
      if (unknown && !(fuseUnknown && previousUnknown))
        symbols.push_back(*unknown);
      previousUnknown = true;
    }

    // Merge the lowest-ranked adjacent pair first, leftmost on ties; a
    // linked list over the symbols and a heap of candidate pairs.
    const size_t n = symbols.size();
    std::vector<int64_t> previous(n), next(n);
    for (size_t i = 0; i < n; ++i) {
      previous[i] = static_cast<int64_t>(i) - 1;
      next[i] = i + 1 < n ? static_cast<int64_t>(i + 1) : -1;
    }
    using Candidate = std::tuple<int32_t, int64_t, int32_t, int32_t>; // rank, left, leftId, rightId
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
    auto consider = [&](int64_t left) {
      if (left < 0 || next[left] < 0)
        return;
      auto it = merges.find(pairKey(symbols[left], symbols[next[left]]));
      if (it != merges.end())
        heap.push({it->second.rank, left, symbols[left], symbols[next[left]]});
    };
    for (size_t i = 0; i + 1 < n; ++i)
      consider(static_cast<int64_t>(i));
    std::vector<bool> removed(n, false);
    while (!heap.empty()) {
      auto [rank, left, leftId, rightId] = heap.top();
      heap.pop();
      int64_t right = next[left];
      if (removed[left] || right < 0 || symbols[left] != leftId || symbols[right] != rightId)
        continue; // stale
      symbols[left] = merges.at(pairKey(leftId, rightId)).result;
      removed[right] = true;
      next[left] = next[right];
      if (next[right] >= 0)
        previous[next[right]] = left;
      consider(previous[left]);
      consider(left);
    }
    for (size_t i = 0; i < n; ++i)
      if (!removed[i])
        out.push_back(symbols[i]);
  }

  /// Longest added token matching at `position`, honouring single_word.
  const AddedToken *matchAdded(std::string_view text, size_t position) const {
    for (const AddedToken &token : addedTokens) {
      if (text.compare(position, token.content.size(), token.content) != 0)
        continue;
      if (token.singleWord) {
        size_t end = position + token.content.size();
        if ((position > 0 && isWordCharacter(text[position - 1])) || (end < text.size() && isWordCharacter(text[end])))
          continue;
      }
      return &token;
    }
    return nullptr;
  }

  void encode(std::string_view text, std::vector<int32_t> &out) const {
    size_t segmentStart = 0, position = 0;
    auto flush = [&](size_t end) {
      if (end > segmentStart) {
        std::string normalized = normalize(std::string(text.substr(segmentStart, end - segmentStart)));
        for (const Piece &piece : preTokenize(normalized, segmentStart == 0))
          encodePiece(piece.text, out);
      }
    };
    while (position < text.size()) {
      const AddedToken *token = matchAdded(text, position);
      if (!token) {
        position += utf8Length(static_cast<unsigned char>(text[position]));
        continue;
      }
      size_t begin = position, end = position + token->content.size();
      if (token->lstrip)
        while (begin > segmentStart && std::isspace(static_cast<unsigned char>(text[begin - 1])))
          --begin;
      if (token->rstrip)
        while (end < text.size() && std::isspace(static_cast<unsigned char>(text[end])))
          ++end;
      flush(begin);
      out.push_back(token->id);
      segmentStart = position = end;
    }
    flush(text.size());
  }

  std::string decode(std::span<const int32_t> ids, bool skipSpecial) const {
    std::vector<std::string> tokens;
    for (int32_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= idToToken.size())
        continue;
      if (skipSpecial && isSpecial[static_cast<size_t>(id)])
        continue;
      tokens.push_back(idToToken[static_cast<size_t>(id)]);
    }
    for (const DecoderStep &step : decoders)
      tokens = applyDecoder(step, std::move(tokens));
    std::string out;
    for (const std::string &token : tokens)
      out += token;
    return out;
  }

  static std::vector<std::string> applyDecoder(const DecoderStep &step, std::vector<std::string> tokens) {
    switch (step.kind) {
    case DecoderStep::ByteLevel: {
      const ByteTable &table = byteTable();
      std::string bytes;
      for (const std::string &token : tokens)
        for (const std::string &ch : characters(token)) {
          auto it = table.toByte.find(ch);
          if (it != table.toByte.end())
            bytes += static_cast<char>(it->second);
          else
            bytes += ch;
        }
      return {lossyUtf8(bytes)};
    }
    case DecoderStep::Replace:
      for (std::string &token : tokens)
        replaceAll(token, step.text, step.content);
      return tokens;
    case DecoderStep::ByteFallback: {
      std::vector<std::string> out;
      std::string pendingBytes;
      size_t pendingCount = 0;
      auto flush = [&] {
        if (pendingCount == 0)
          return;
        size_t bad;
        if (isValidUtf8(pendingBytes, bad))
          out.push_back(pendingBytes);
        else
          for (size_t i = 0; i < pendingCount; ++i)
            out.push_back("\xEF\xBF\xBD");
        pendingBytes.clear();
        pendingCount = 0;
      };
      for (const std::string &token : tokens) {
        if (token.size() == 6 && token.rfind("<0x", 0) == 0 && token[5] == '>' &&
            std::isxdigit(static_cast<unsigned char>(token[3])) &&
            std::isxdigit(static_cast<unsigned char>(token[4]))) {
          pendingBytes += static_cast<char>(std::stoi(token.substr(3, 2), nullptr, 16));
          ++pendingCount;
          continue;
        }
        flush();
        out.push_back(token);
      }
      flush();
      return out;
    }
    case DecoderStep::Fuse: {
      std::string joined;
      for (const std::string &token : tokens)
        joined += token;
      return {joined};
    }
    case DecoderStep::Strip:
      for (std::string &token : tokens) {
        std::vector<std::string> chars = characters(token);
        size_t first = 0, last = chars.size();
        while (first < step.start && first < last && chars[first] == step.content)
          ++first;
        size_t stripped = 0;
        while (stripped < step.stop && last > first && chars[last - 1] == step.content) {
          --last;
          ++stripped;
        }
        std::string out;
        for (size_t i = first; i < last; ++i)
          out += chars[i];
        token = out;
      }
      return tokens;
    case DecoderStep::Metaspace:
      for (size_t i = 0; i < tokens.size(); ++i) {
        replaceAll(tokens[i], step.text, " ");
        if (i == 0 && step.prependFirst && !tokens[i].empty() && tokens[i][0] == ' ')
          tokens[i].erase(0, 1);
      }
      return tokens;
    }
    return tokens;
  }
};

namespace {

/// Flattens a component that may be a Sequence into its list of parts.
std::vector<const json *> flatten(const json &component, const char *listKey) {
  std::vector<const json *> parts;
  if (component.is_null())
    return parts;
  if (component.value("type", "") == "Sequence" && component.contains(listKey)) {
    for (const json &part : component[listKey])
      for (const json *inner : flatten(part, listKey))
        parts.push_back(inner);
    return parts;
  }
  parts.push_back(&component);
  return parts;
}

Status parseNormalizers(const json &root, const std::string &source, Tokenizer::Impl &impl) {
  // Keep the component alive: flatten() returns pointers into it.
  const json component = root.value("normalizer", json());
  for (const json *n : flatten(component, "normalizers")) {
    std::string type = n->value("type", "");
    Normalizer normalizer{Normalizer::Nfc, "", "", nullptr};
    if (type == "NFC")
      normalizer.kind = Normalizer::Nfc;
    else if (type == "NFD")
      normalizer.kind = Normalizer::Nfd;
    else if (type == "NFKC")
      normalizer.kind = Normalizer::Nfkc;
    else if (type == "NFKD")
      normalizer.kind = Normalizer::Nfkd;
    else if (type == "Lowercase")
      normalizer.kind = Normalizer::Lowercase;
    else if (type == "Prepend") {
      normalizer.kind = Normalizer::Prepend;
      normalizer.text = n->value("prepend", "");
    } else if (type == "Replace") {
      normalizer.kind = Normalizer::Replace;
      auto regex = patternRegex(n->value("pattern", json()), source + ": normalizer Replace");
      if (!regex)
        return regex.status();
      normalizer.regex = regex.take();
      normalizer.content = n->value("content", "");
    } else if (type == "Strip") {
      normalizer.kind = Normalizer::Strip;
      normalizer.left = n->value("strip_left", false);
      normalizer.right = n->value("strip_right", false);
    } else {
      return Status::error(source, ": unsupported normalizer '", type,
                           "'; supported: NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace, Strip, Sequence");
    }
    impl.normalizers.push_back(std::move(normalizer));
  }
  return Status::success();
}

Status parsePreTokenizers(const json &root, const std::string &source, Tokenizer::Impl &impl) {
  // Keep the component alive: flatten() returns pointers into it.
  const json component = root.value("pre_tokenizer", json());
  for (const json *p : flatten(component, "pretokenizers")) {
    std::string type = p->value("type", "");
    PreTokenizer pre{PreTokenizer::Split};
    if (type == "Split") {
      auto regex = patternRegex(p->value("pattern", json()), source + ": pre_tokenizer Split");
      if (!regex)
        return regex.status();
      pre.regex = regex.take();
      std::string behavior = p->value("behavior", "Isolated");
      if (behavior == "Isolated")
        pre.behavior = PreTokenizer::Isolated;
      else if (behavior == "Removed")
        pre.behavior = PreTokenizer::Removed;
      else if (behavior == "MergedWithPrevious")
        pre.behavior = PreTokenizer::MergedWithPrevious;
      else if (behavior == "MergedWithNext")
        pre.behavior = PreTokenizer::MergedWithNext;
      else
        return Status::error(source, ": unsupported Split behavior '", behavior, "'");
      pre.invert = p->value("invert", false);
    } else if (type == "ByteLevel") {
      pre.kind = PreTokenizer::ByteLevel;
      pre.addPrefixSpace = p->value("add_prefix_space", false);
      pre.useRegex = p->value("use_regex", true);
    } else if (type == "Metaspace") {
      pre.kind = PreTokenizer::Metaspace;
      pre.replacement = p->value("replacement", "\xE2\x96\x81");
      std::string scheme = p->value("prepend_scheme", p->value("add_prefix_space", true) ? "always" : "never");
      pre.prepend = scheme == "first"   ? PreTokenizer::First
                    : scheme == "never" ? PreTokenizer::Never
                                        : PreTokenizer::Always;
      pre.split = p->value("split", true);
    } else if (type == "Digits") {
      pre.kind = PreTokenizer::Digits;
      pre.individualDigits = p->value("individual_digits", false);
    } else {
      return Status::error(source, ": unsupported pre_tokenizer '", type,
                           "'; supported: Split, ByteLevel, Metaspace, Digits, Sequence");
    }
    impl.preTokenizers.push_back(std::move(pre));
  }
  return Status::success();
}

Status parseDecoders(const json &root, const std::string &source, Tokenizer::Impl &impl) {
  // Keep the component alive: flatten() returns pointers into it.
  const json component = root.value("decoder", json());
  for (const json *d : flatten(component, "decoders")) {
    std::string type = d->value("type", "");
    DecoderStep step{DecoderStep::Fuse};
    if (type == "ByteLevel")
      step.kind = DecoderStep::ByteLevel;
    else if (type == "ByteFallback")
      step.kind = DecoderStep::ByteFallback;
    else if (type == "Fuse")
      step.kind = DecoderStep::Fuse;
    else if (type == "Strip") {
      step.kind = DecoderStep::Strip;
      step.content = d->value("content", " ");
      step.start = d->value("start", 0);
      step.stop = d->value("stop", 0);
    } else if (type == "Replace") {
      step.kind = DecoderStep::Replace;
      const json pattern = d->value("pattern", json());
      if (!pattern.is_object() || !pattern.contains("String"))
        return Status::error(source, ": decoder Replace supports only String patterns");
      step.text = pattern["String"].get<std::string>();
      step.content = d->value("content", "");
    } else if (type == "Metaspace") {
      step.kind = DecoderStep::Metaspace;
      step.text = d->value("replacement", "\xE2\x96\x81");
      step.prependFirst = d->value("prepend_scheme", "always") != "never";
    } else {
      return Status::error(source, ": unsupported decoder '", type,
                           "'; supported: ByteLevel, ByteFallback, Fuse, Strip, Replace, Metaspace, Sequence");
    }
    impl.decoders.push_back(std::move(step));
  }
  return Status::success();
}

/// The largest token id a tokenizer.json may use (as the config's vocab_size bound).
constexpr int64_t kMaxTokenId = int64_t(1) << 24;

Status parseModel(const json &root, const std::string &source, Tokenizer::Impl &impl) {
  const json model = root.value("model", json());
  if (!model.is_object() || model.value("type", "BPE") != "BPE" || !model.contains("vocab"))
    return Status::error(source, ": model must be BPE with a vocab (got ",
                         model.is_object() ? model.value("type", "?") : std::string("none"), ")");
  if (!model.value("continuing_subword_prefix", json()).is_null() ||
      !model.value("end_of_word_suffix", json()).is_null())
    return Status::error(source, ": BPE continuing_subword_prefix/end_of_word_suffix are not supported");
  if (!model["vocab"].is_object())
    return Status::error(source, ": model.vocab must be an object of token -> id");
  int32_t maxId = -1;
  for (auto &[token, id] : model["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > kMaxTokenId)
      return Status::error(source, ": vocab entry '", token, "' has id ", id.dump(), "; expected an integer in [0, ",
                           kMaxTokenId, "]");
    impl.vocab[token] = id.get<int32_t>();
    maxId = std::max(maxId, id.get<int32_t>());
  }
  // Added tokens are checked before any table is sized by their ids: an id
  // of -5 or 2^31-1 must be an error, not a wild index or a 3 GB table.
  const json addedTokens = root.value("added_tokens", json::array());
  if (!addedTokens.is_array())
    return Status::error(source, ": added_tokens must be a list");
  for (size_t i = 0; i < addedTokens.size(); ++i) {
    const json &added = addedTokens[i];
    if (!added.is_object() || !added.contains("content") || !added["content"].is_string() || !added.contains("id"))
      return Status::error(source, ": added_tokens[", i, "] needs a string \"content\" and an integer \"id\"");
    const json &id = added["id"];
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > kMaxTokenId)
      return Status::error(source, ": added_tokens[", i, "] ('", added["content"].get<std::string>(), "') has id ",
                           id.dump(), "; expected an integer in [0, ", kMaxTokenId, "]");
    for (const char *flag : {"special", "lstrip", "rstrip", "single_word", "normalized"})
      if (added.contains(flag) && !added[flag].is_boolean())
        return Status::error(source, ": added_tokens[", i, "].", flag, " must be true or false");
    maxId = std::max(maxId, id.get<int32_t>());
  }
  impl.idToToken.assign(static_cast<size_t>(maxId + 1), "");
  impl.isSpecial.assign(impl.idToToken.size(), false);
  for (const auto &[token, id] : impl.vocab)
    impl.idToToken[static_cast<size_t>(id)] = token;

  int32_t rank = 0;
  for (const json &merge : model.value("merges", json::array())) {
    std::string left, right;
    if (merge.is_string()) {
      std::string line = merge.get<std::string>();
      size_t space = line.find(' ');
      if (space == std::string::npos)
        return Status::error(source, ": merge '", line, "' is not \"a b\"");
      left = line.substr(0, space);
      right = line.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      return Status::error(source, ": merge ", rank, " must be \"a b\" or [\"a\", \"b\"]");
    }
    auto a = impl.vocab.find(left), b = impl.vocab.find(right), c = impl.vocab.find(left + right);
    if (a == impl.vocab.end() || b == impl.vocab.end() || c == impl.vocab.end())
      return Status::error(source, ": merge ", rank, " ('", left, "', '", right,
                           "') uses a token missing from the vocab");
    impl.merges.emplace(Tokenizer::Impl::pairKey(a->second, b->second), Tokenizer::Impl::Merge{rank, c->second});
    ++rank;
  }
  impl.byteFallback = model.value("byte_fallback", false);
  impl.fuseUnknown = model.value("fuse_unk", false);
  impl.ignoreMerges = model.value("ignore_merges", false);
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto it = impl.vocab.find(model["unk_token"].get<std::string>());
    if (it != impl.vocab.end())
      impl.unknown = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto it = impl.vocab.find(name);
    impl.byteTokens[b] = it == impl.vocab.end() ? -1 : it->second;
  }

  for (const json &added : addedTokens) {
    if (!added.is_object() || !added.contains("content") || !added.contains("id"))
      return Status::error(source, ": added_tokens entries need content and id");
    AddedToken token{added["id"].get<int32_t>(),    added["content"].get<std::string>(),
                     added.value("special", false), added.value("lstrip", false),
                     added.value("rstrip", false),  added.value("single_word", false)};
    if (token.content.empty())
      continue;
    impl.idToToken[static_cast<size_t>(token.id)] = token.content;
    impl.isSpecial[static_cast<size_t>(token.id)] = token.special;
    impl.addedTokens.push_back(token);
  }
  std::stable_sort(impl.addedTokens.begin(), impl.addedTokens.end(),
                   [](const AddedToken &a, const AddedToken &b) { return a.content.size() > b.content.size(); });
  return Status::success();
}

Status parsePostProcessor(const json &root, const std::string &source, Tokenizer::Impl &impl) {
  const json processor = root.value("post_processor", json());
  for (const json *p : flatten(processor, "processors")) {
    std::string type = p->value("type", "");
    if (type == "ByteLevel")
      continue; // offsets only
    if (type != "TemplateProcessing")
      return Status::error(source, ": unsupported post_processor '", type,
                           "'; supported: TemplateProcessing, ByteLevel, Sequence");
    bool afterSequence = false;
    for (const json &item : p->value("single", json::array())) {
      if (item.contains("Sequence")) {
        afterSequence = true;
        continue;
      }
      if (!item.contains("SpecialToken"))
        continue;
      std::string name = item["SpecialToken"].value("id", "");
      const json special = p->value("special_tokens", json::object()).value(name, json());
      if (!special.is_object() || !special.contains("ids"))
        return Status::error(source, ": template token '", name, "' has no ids");
      for (const json &id : special["ids"]) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
            id.get<int64_t>() >= static_cast<int64_t>(impl.idToToken.size()))
          return Status::error(source, ": template token '", name, "' has id ", id.dump(), "; expected one of the ",
                               impl.idToToken.size(), " token ids");
        (afterSequence ? impl.templateAfter : impl.templateBefore).push_back(id.get<int32_t>());
      }
    }
  }
  return Status::success();
}

} // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Expected<std::unique_ptr<Tokenizer>> Tokenizer::fromJson(std::string_view text, const std::string &source) {
  json root = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object())
    return Status::error(source, ": not a JSON object");
  auto impl = std::make_unique<Impl>();
  // nlohmann's value() throws on type mismatches; report them instead.
  try {
    MOE_RETURN_IF_ERROR(parseModel(root, source, *impl));
    MOE_RETURN_IF_ERROR(parseNormalizers(root, source, *impl));
    MOE_RETURN_IF_ERROR(parsePreTokenizers(root, source, *impl));
    MOE_RETURN_IF_ERROR(parseDecoders(root, source, *impl));
    MOE_RETURN_IF_ERROR(parsePostProcessor(root, source, *impl));
  } catch (const json::exception &error) {
    return Status::error(source, ": malformed tokenizer.json: ", error.what());
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

Expected<std::unique_ptr<Tokenizer>> Tokenizer::fromFile(const std::string &path) {
  Expected<std::string> text = readWholeFile(path);
  if (!text)
    return text.status();
  return fromJson(*text, path);
}

Expected<std::vector<int32_t>> Tokenizer::encode(std::string_view text, bool addSpecialTokens) const {
  size_t bad;
  if (!isValidUtf8(text, bad))
    return Status::error("input text is not valid UTF-8 (byte offset ", bad, ")");
  std::vector<int32_t> ids;
  if (addSpecialTokens)
    ids = impl->templateBefore;
  impl->encode(text, ids);
  if (addSpecialTokens)
    ids.insert(ids.end(), impl->templateAfter.begin(), impl->templateAfter.end());
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skipSpecialTokens) const {
  return impl->decode(ids, skipSpecialTokens);
}

int64_t Tokenizer::vocabSize() const { return static_cast<int64_t>(impl->idToToken.size()); }

std::optional<int32_t> Tokenizer::tokenId(std::string_view content) const {
  for (const AddedToken &token : impl->addedTokens)
    if (token.content == content)
      return token.id;
  auto it = impl->vocab.find(std::string(content));
  if (it == impl->vocab.end())
    return std::nullopt;
  return it->second;
}

} // namespace moe
