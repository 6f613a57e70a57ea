//===- Evaluate.cpp - Perplexity and bits per byte ------------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Evaluate.h"
#include "moe/Support/File.h"
#include "moe/Support/Progress.h"

#include "Kernels.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

namespace moe {

double EvalScore::perplexity() const {
  return targets ? std::exp(negativeLogLikelihood / static_cast<double>(targets)) : 0.0;
}

double EvalScore::bitsPerByte() const {
  if (textBytes == 0 || streamTokens <= 1)
    return 0.0;
  // The bytes behind the scored targets, in proportion when windows leave
  // a tail unscored.
  double scoredBytes =
      static_cast<double>(textBytes) * static_cast<double>(targets) / static_cast<double>(streamTokens - 1);
  return negativeLogLikelihood / std::log(2.0) / scoredBytes;
}

Expected<std::vector<EvalStream>> readEvalData(const std::string &path, const Tokenizer *tokenizer,
                                               std::optional<int32_t> endOfText) {
  Expected<std::string> read = readWholeFile(path);
  if (!read)
    return read.status();
  const std::string content = read.take();
  auto endsWith = [&](const char *suffix) {
    size_t n = std::strlen(suffix);
    return path.size() >= n && path.compare(path.size() - n, n, suffix) == 0;
  };
  auto needTokenizer = [&]() -> Status {
    if (!tokenizer)
      return Status::error(path, ": text data needs the model's tokenizer.json");
    return Status::success();
  };

  if (endsWith(".u32")) {
    if (content.size() % 4 != 0)
      return Status::error(path, ": size ", content.size(), " is not a multiple of 4 (little-endian uint32 ids)");
    EvalStream all{"all", {}, 0};
    all.ids.resize(content.size() / 4);
    for (size_t i = 0; i < all.ids.size(); ++i) {
      uint32_t id;
      std::memcpy(&id, content.data() + 4 * i, 4);
      if (id > static_cast<uint32_t>(INT32_MAX))
        return Status::error(path, ": id ", id, " at index ", i, " is out of range");
      all.ids[i] = static_cast<int32_t>(id);
    }
    all.source = path;
    return std::vector<EvalStream>{std::move(all)};
  }

  if (endsWith(".jsonl")) {
    std::map<std::string, EvalStream> byDomain;
    std::vector<std::string> order;
    std::istringstream lines(content);
    std::string line;
    int64_t lineNumber = 0;
    while (std::getline(lines, line)) {
      ++lineNumber;
      if (line.find_first_not_of(" \t\r") == std::string::npos)
        continue;
      nlohmann::json record;
      try {
        record = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception &error) {
        // nlohmann's message says what is wrong (ill-formed UTF-8, a syntax error) and where.
        std::string reason = error.what();
        if (size_t at = reason.find("] "); at != std::string::npos)
          reason = reason.substr(at + 2);
        return Status::error(path, ":", lineNumber, ": not valid JSON (", reason,
                             "); each line must be a JSON object in UTF-8");
      }
      if (!record.is_object())
        return Status::error(path, ":", lineNumber,
                             ": not a JSON object; each line must be {\"text\": ...} or "
                             "{\"ids\": [...]}");
      std::string domain = "all";
      if (record.contains("domain")) {
        if (!record["domain"].is_string())
          return Status::error(path, ":", lineNumber, ": \"domain\" must be a string");
        domain = record["domain"].get<std::string>();
      }
      if (!byDomain.count(domain)) {
        byDomain[domain].domain = domain;
        byDomain[domain].source = path;
        order.push_back(domain);
      }
      EvalStream &target = byDomain[domain];
      if (record.contains("ids")) {
        if (!record["ids"].is_array())
          return Status::error(path, ":", lineNumber, ": \"ids\" must be a list of token ids");
        for (const auto &id : record["ids"]) {
          if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
            return Status::error(path, ":", lineNumber, ": \"ids\" must hold non-negative integers");
          target.ids.push_back(id.get<int32_t>());
        }
      } else if (record.contains("text") && record["text"].is_string()) {
        MOE_RETURN_IF_ERROR(needTokenizer());
        const std::string text = record["text"].get<std::string>();
        Expected<std::vector<int32_t>> ids = tokenizer->encode(text);
        if (!ids)
          return ids.status().withContext(concat(path, ":", lineNumber));
        target.ids.insert(target.ids.end(), ids->begin(), ids->end());
        target.textBytes += static_cast<int64_t>(text.size());
      } else {
        return Status::error(path, ":", lineNumber, ": expected a \"text\" string or an \"ids\" list");
      }
      if (endOfText)
        target.ids.push_back(*endOfText);
    }
    std::vector<EvalStream> streams;
    for (const std::string &domain : order)
      streams.push_back(std::move(byDomain[domain]));
    if (streams.empty())
      return Status::error(path, ": no records");
    return streams;
  }

  MOE_RETURN_IF_ERROR(needTokenizer());
  Expected<std::vector<int32_t>> ids = tokenizer->encode(content);
  if (!ids)
    return ids.status().withContext(path);
  return std::vector<EvalStream>{{"all", ids.take(), static_cast<int64_t>(content.size()), path}};
}

namespace {

/// Counts the router rows each token chose, per layer.
class RoutingCounter : public EngineObserver {
public:
  std::vector<std::vector<int64_t>> counts;
  void onRouter(int64_t layer, int64_t tokens, std::span<const float> logits, std::span<const int32_t> chosen,
                std::span<const float>, std::span<const int32_t>) override {
    if (tokens <= 0)
      return;
    const size_t rows = logits.size() / static_cast<size_t>(tokens);
    if (counts.size() <= static_cast<size_t>(layer))
      counts.resize(static_cast<size_t>(layer) + 1);
    std::vector<int64_t> &row = counts[static_cast<size_t>(layer)];
    row.resize(std::max(row.size(), rows), 0);
    for (int32_t c : chosen)
      if (c >= 0 && static_cast<size_t>(c) < rows)
        ++row[static_cast<size_t>(c)];
  }
};

/// log-softmax normaliser of a row: max + log(sum exp(x - max)).
double logNormaliser(const float *row, int64_t V) {
  const float maximum = *std::max_element(row, row + V);
  double sum = 0.0;
  for (int64_t v = 0; v < V; ++v)
    sum += std::exp(static_cast<double>(row[v] - maximum));
  return maximum + std::log(sum);
}

} // namespace

Expected<EvalResult> evaluate(Engine &engine, const std::vector<EvalStream> &streams, const EvalOptions &options) {
  const int64_t L = options.sequenceLength;
  const int64_t S = options.stride > 0 ? options.stride : L;
  if (L < 1)
    return Status::error("--seq-len must be positive, got ", L);
  if (S > L)
    return Status::error("--stride (", S, ") must not exceed --seq-len (", L, ")");
  const int64_t V = engine.spec().vocabSize;
  if (options.reference && options.reference->spec().vocabSize != V)
    return Status::error("the original model's vocabulary (", options.reference->spec().vocabSize,
                         ") differs from the model's (", V, "); they cannot be compared token by token");
  EvalResult result;
  engine.resetRoutingCounters();
  auto start = std::chrono::steady_clock::now();
  std::vector<float> logits, referenceLogits;
  std::vector<float> divergences; // per target, for the percentiles
  int64_t agreements = 0;
  double referenceNll = 0;
  RoutingCounter counter;
  int64_t plannedTargets = 0;
  for (const EvalStream &stream : streams) {
    const int64_t targets = std::max<int64_t>(0, static_cast<int64_t>(stream.ids.size()) - 1);
    // maxTokens stops after the window that reaches it.
    plannedTargets += options.maxTokens > 0 ? std::min(targets, (options.maxTokens + L - 1) / L * L) : targets;
  }
  Progress progress(options.progressLabel, plannedTargets, "tokens");
  if (options.reference)
    result.comparison.emplace();
  for (const EvalStream &stream : streams) {
    counter.counts.clear();
    if (options.countRouting)
      engine.setObserver(&counter);
    struct Detach {
      Engine &engine;
      bool attached;
      ~Detach() {
        if (attached)
          engine.setObserver(nullptr);
      }
    } detach{engine, options.countRouting};
    const int64_t N = static_cast<int64_t>(stream.ids.size());
    // Messages name the data file and the domain.
    const std::string where =
        concat(stream.source.empty() ? std::string() : stream.source + ": ", "domain '", stream.domain, "'");
    for (int32_t id : stream.ids)
      if (id >= V)
        return Status::error(where, ": token id ", id, " is outside the model's vocabulary of ", V,
                             " (ids must be below config.json's vocab_size; was the data tokenized for another "
                             "model?)");
    EvalScore score;
    score.streamTokens = N;
    score.textBytes = stream.textBytes;
    // Windows: [begin, end) inputs and [begin + 1, end + 1) targets. The
    // default takes floor((N-1)/L) full windows; a stride S < L slides
    // windows by S and scores only targets from `scoredFrom` on.
    int64_t scoredFrom = 1;
    for (int64_t begin = 0; begin < N - 1; begin += S) {
      int64_t end = std::min(begin + L, N - 1);
      if (options.secondHalfOnly) {
        // Inputs [begin, begin + L); targets of positions L/2 .. L-2.
        if (begin + L > N)
          break;
        end = begin + L - 1;
        scoredFrom = begin + L / 2 + 1;
      }
      if (S == L && end - begin < L && !options.secondHalfOnly)
        break; // the default windowing drops the incomplete tail
      KvCache cache = engine.newCache();
      const std::span<const int32_t> inputs = std::span(stream.ids).subspan(begin, end - begin);
      if (options.beforeWindow)
        MOE_RETURN_IF_ERROR(options.beforeWindow(inputs));
      Status status = engine.forward(inputs, cache, logits);
      // (secondHalfOnly: the window's last input predicts nothing inside it
      // and is not run; llama-perplexity computes but never reads it.)
      if (!status.ok())
        return status;
      if (options.reference) {
        KvCache referenceCache = options.reference->newCache();
        MOE_RETURN_IF_ERROR(options.reference->forward(inputs, referenceCache, referenceLogits));
      }
      result.routingTokens[stream.domain] += end - begin;
      const int64_t targetsBefore = score.targets;
      // Each target's terms over the pool (a vocabulary's exponentials
      // each), then added in order as one thread would.
      const int64_t first = std::max(begin, scoredFrom - 1), count = std::max<int64_t>(0, end - first);
      struct Terms {
        double logLikelihood = 0, referenceLogLikelihood = 0, kl = 0;
        bool agrees = false;
      };
      std::vector<Terms> terms(static_cast<size_t>(count));
      kernels::parallelRows(count, count * V * (options.reference ? 3 : 1), [&](int64_t from, int64_t to) {
        for (int64_t i = from; i < to; ++i) {
          const int64_t t = first + i;
          Terms &term = terms[static_cast<size_t>(i)];
          const float *row = logits.data() + (t - begin) * V;
          const double normaliser = logNormaliser(row, V);
          term.logLikelihood = row[stream.ids[t + 1]] - normaliser;
          if (options.reference) {
            // KL(P_ref || P) = sum_v p_ref(v) (log p_ref(v) - log p(v)).
            const float *reference = referenceLogits.data() + (t - begin) * V;
            const double referenceNormaliser = logNormaliser(reference, V);
            for (int64_t v = 0; v < V; ++v) {
              const double logRef = reference[v] - referenceNormaliser;
              term.kl += std::exp(logRef) * (logRef - (row[v] - normaliser));
            }
            term.agrees =
                std::max_element(row, row + V) - row == std::max_element(reference, reference + V) - reference;
            term.referenceLogLikelihood = reference[stream.ids[t + 1]] - referenceNormaliser;
          }
        }
      });
      for (const Terms &term : terms) {
        score.negativeLogLikelihood -= term.logLikelihood;
        ++score.targets;
        if (options.reference) {
          divergences.push_back(static_cast<float>(std::max(0.0, term.kl)));
          result.comparison->domainKlMean[stream.domain] += std::max(0.0, term.kl);
          agreements += term.agrees;
          referenceNll -= term.referenceLogLikelihood;
        }
      }
      progress.advance(score.targets - targetsBefore);
      // NaN or infinite logits: the model is broken, and a NaN perplexity
      // must never pass for a result.
      if (!std::isfinite(score.negativeLogLikelihood))
        return Status::error(where, ", window at token ", begin,
                             ": the model computes non-finite values (NaN or infinity); its weights or config "
                             "are broken");
      scoredFrom = end + 1;
      if ((end == N - 1 && !options.secondHalfOnly) || (options.maxTokens > 0 && score.targets >= options.maxTokens))
        break;
    }
    result.domains[stream.domain] = score;
    if (options.countRouting) {
      std::vector<std::vector<int64_t>> &counts = result.routing[stream.domain];
      counts.resize(std::max(counts.size(), counter.counts.size()));
      for (size_t l = 0; l < counter.counts.size(); ++l) {
        counts[l].resize(std::max(counts[l].size(), counter.counts[l].size()), 0);
        for (size_t r = 0; r < counter.counts[l].size(); ++r)
          counts[l][r] += counter.counts[l][r];
      }
    }
    if (options.reference && score.targets > 0)
      result.comparison->domainKlMean[stream.domain] /= static_cast<double>(score.targets);
    result.overall.negativeLogLikelihood += score.negativeLogLikelihood;
    result.overall.targets += score.targets;
    result.overall.streamTokens += score.streamTokens;
    result.overall.textBytes += score.textBytes;
  }
  progress.finish();
  if (options.reference && !divergences.empty()) {
    EvalComparison &c = *result.comparison;
    c.tokens = static_cast<int64_t>(divergences.size());
    double sum = 0;
    for (float d : divergences)
      sum += d;
    c.klMean = sum / static_cast<double>(c.tokens);
    std::vector<float> sorted = divergences;
    std::sort(sorted.begin(), sorted.end());
    // Percentiles by linear interpolation between order statistics.
    auto percentile = [&](double p) {
      const double position = p * static_cast<double>(sorted.size() - 1);
      const size_t below = static_cast<size_t>(std::floor(position));
      const size_t above = std::min(below + 1, sorted.size() - 1);
      return sorted[below] + (position - static_cast<double>(below)) * (sorted[above] - sorted[below]);
    };
    c.klMedian = percentile(0.5);
    c.klP99 = percentile(0.99);
    c.klMax = sorted.back();
    c.top1Agreement = static_cast<double>(agreements) / static_cast<double>(c.tokens);
    c.referencePerplexity = std::exp(referenceNll / static_cast<double>(c.tokens));
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.expertsPerToken = engine.routingCounters().expertsPerToken();
  if (result.overall.targets == 0)
    return Status::error("no complete window of ", L, " tokens in the data (", result.overall.streamTokens,
                         " tokens); use a smaller --seq-len");
  if (result.comparison)
    result.comparison->perplexityRatio = result.overall.perplexity() / result.comparison->referencePerplexity;
  return result;
}

nlohmann::json evalResultToJson(const EvalResult &result) {
  using json = nlohmann::json;
  auto scoreJson = [](const EvalScore &score) {
    return json{{"perplexity", score.perplexity()},
                {"bits_per_byte", score.bitsPerByte()},
                {"targets", score.targets},
                {"negative_log_likelihood", score.negativeLogLikelihood}};
  };
  json out = scoreJson(result.overall);
  json domains = json::object();
  for (const auto &[name, score] : result.domains)
    domains[name] = scoreJson(score);
  out["domains"] = domains;
  out["experts_per_token"] = result.expertsPerToken;
  if (result.comparison) {
    const EvalComparison &c = *result.comparison;
    out["compare"] = {{"tokens", c.tokens},
                      {"kl_mean", c.klMean},
                      {"kl_median", c.klMedian},
                      {"kl_p99", c.klP99},
                      {"kl_max", c.klMax},
                      {"top1_agreement", c.top1Agreement},
                      {"original_perplexity", c.referencePerplexity},
                      {"perplexity_ratio", c.perplexityRatio},
                      {"domain_kl_mean", c.domainKlMean}};
  }
  return out;
}

} // namespace moe
