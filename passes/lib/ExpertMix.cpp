//===- ExpertMix.cpp - Experts as weighted sums of a layer's experts ------===//
//
// Part of moec. See moe/Transforms/ExpertMix.h.
//
//===----------------------------------------------------------------------===//

#include "moe/Transforms/ExpertMix.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace moe {

namespace {

std::vector<std::string_view> split(std::string_view text, char separator) {
  std::vector<std::string_view> parts;
  size_t begin = 0;
  while (begin <= text.size()) {
    size_t end = text.find(separator, begin);
    if (end == std::string_view::npos)
      end = text.size();
    parts.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return parts;
}

std::string_view trim(std::string_view text) {
  while (!text.empty() && text.front() == ' ')
    text.remove_prefix(1);
  while (!text.empty() && text.back() == ' ')
    text.remove_suffix(1);
  return text;
}

bool parseId(std::string_view text, int64_t &id) {
  text = trim(text);
  if (text.empty() || text.size() > 18 ||
      !std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return false;
  id = std::stoll(std::string(text));
  return true;
}

bool parseCoefficient(std::string_view text, float &value) {
  const std::string copy(trim(text));
  if (copy.empty())
    return false;
  char *end = nullptr;
  errno = 0;
  value = std::strtof(copy.c_str(), &end);
  return end == copy.c_str() + copy.size() && errno == 0 && std::isfinite(value);
}

} // namespace

Expected<ExpertMixes> parseExpertMixes(std::string_view text) {
  ExpertMixes mixes;
  for (std::string_view group : split(text, ';')) {
    if (trim(group).empty())
      continue;
    const size_t colon = group.find(':');
    int64_t layer = 0;
    if (colon == std::string_view::npos || !parseId(group.substr(0, colon), layer))
      return Status::error("expected 'layer:target=c*source|c*source,...', got '", group, "'");
    if (mixes.count(layer))
      return Status::error("layer ", layer, " is given twice");
    std::map<int64_t, std::vector<ExpertMixTerm>> &targets = mixes[layer];
    for (std::string_view entry : split(group.substr(colon + 1), ',')) {
      const size_t equals = entry.find('=');
      int64_t target = 0;
      if (equals == std::string_view::npos || !parseId(entry.substr(0, equals), target))
        return Status::error("expected 'target=c*source|c*source' in layer ", layer, ", got '", entry, "'");
      if (targets.count(target))
        return Status::error("expert ", target, " of layer ", layer, " is mixed twice");
      std::vector<ExpertMixTerm> &terms = targets[target];
      for (std::string_view termText : split(entry.substr(equals + 1), '|')) {
        const size_t star = termText.find('*');
        ExpertMixTerm term;
        if (star == std::string_view::npos || !parseCoefficient(termText.substr(0, star), term.coefficient) ||
            !parseId(termText.substr(star + 1), term.source))
          return Status::error("expected 'coefficient*source' (a finite number, an expert id) in expert ", target,
                               " of layer ", layer, ", got '", termText, "'");
        for (const ExpertMixTerm &other : terms)
          if (other.source == term.source)
            return Status::error("expert ", target, " of layer ", layer, " names source ", term.source, " twice");
        terms.push_back(term);
      }
    }
  }
  return mixes;
}

std::string formatExpertMixes(const ExpertMixes &mixes) {
  std::string text;
  for (const auto &[layer, targets] : mixes) {
    if (targets.empty())
      continue;
    text += (text.empty() ? "" : ";") + std::to_string(layer) + ":";
    bool firstTarget = true;
    for (const auto &[target, terms] : targets) {
      text += (firstTarget ? "" : ",") + std::to_string(target) + "=";
      firstTarget = false;
      for (size_t t = 0; t < terms.size(); ++t) {
        char number[32];
        std::snprintf(number, sizeof number, "%.9g", static_cast<double>(terms[t].coefficient));
        text += (t ? "|" : "") + std::string(number) + "*" + std::to_string(terms[t].source);
      }
    }
  }
  return text;
}

void mixMatrix(std::span<const ExpertMixTerm> terms, std::span<const std::span<const float>> sources,
               std::span<float> out) {
  std::fill(out.begin(), out.end(), 0.0f);
  for (size_t t = 0; t < terms.size(); ++t) {
    const float c = terms[t].coefficient;
    const float *source = sources[t].data();
    for (size_t i = 0; i < out.size(); ++i)
      out[i] += c * source[i];
  }
}

} // namespace moe
