//===- Analyze.cpp - moec analyze: how a model routes ---------------------===//
//
// Part of moec. Runs data through a model, records which experts each token
// ran at every MoE layer, and reports local routing consistency (SRP and
// SCH, moe/Calibration/RoutingAnalysis.h), an LRU cache beside SCH, expert
// usage and co-activation, and per-domain usage with the Jensen-Shannon
// divergence between domains; as the report format `moec report` and
// `moec compress --report` write (JSON and one HTML page with pictures).
//
//===----------------------------------------------------------------------===//

#include "Commands.h"

#include "moe/Calibration/RoutingAnalysis.h"
#include "moe/Pipeline/Report.h"
#include "moe/Runtime/Model.h"

#include <cstdio>
#include <filesystem>
#include <iostream>

namespace moe::cli {
namespace {

struct AnalyzeOptions {
  ModelOptions model;
  std::string data, html, json;
  int64_t tokens = 0, sequenceLength = 512;
  std::vector<int64_t> segments = {4, 16, 64, 256};
  std::vector<double> cacheRatios = {1, 2};
};

int runAnalyze(const AnalyzeOptions &options) {
  Expected<ModelAndData> opened = openModelAndData(options.model, options.data);
  if (!opened) {
    printError(opened.status().message());
    return 1;
  }
  LoadedModel &model = opened->model;
  const std::vector<EvalStream> &streams = opened->streams;
  RoutingAnalysisOptions analysisOptions{options.segments, options.cacheRatios};
  // Options are checked before the model runs: a bad one fails at once.
  if (Status checked = checkRoutingAnalysisOptions(analysisOptions, options.sequenceLength); !checked.ok()) {
    printError(checked.message());
    return 1;
  }
  RoutingRecordOptions record{options.sequenceLength, options.tokens};
  Expected<RoutingTrace> trace = recordRouting(*model.engine, streams, record);
  if (!trace) {
    printError(options.data + ": " + trace.status().message());
    return 1;
  }
  Expected<nlohmann::json> analysis = analyzeRouting(*trace, analysisOptions);
  if (!analysis) {
    printError(analysis.status().message());
    return 1;
  }
  (*analysis)["data"] = options.data;
  // A module or package moec wrote: its compression report with the
  // analysis added; a checkpoint: the analysis alone.
  nlohmann::json report = {{"model", options.model.path}, {"family", std::string(familyName(model.spec.family))}};
  if (!std::filesystem::is_directory(options.model.path)) {
    Expected<nlohmann::json> compiled = compiledModelReport(options.model.path);
    if (!compiled) {
      printError(compiled.status().message());
      return 1;
    }
    report = compiled.take();
  }
  report["routing_analysis"] = *analysis;
  Status status = writeReportFiles(report, options.html, options.json);
  if (!status.ok()) {
    printError(status.message());
    return 1;
  }
  if (options.html.empty() && options.json.empty()) {
    std::cout << report.dump(2) << "\n";
    return 0;
  }
  // A table on stdout: per layer SRP at the headline segment length (16,
  // else the first), SCH and LRU at the largest cache ratio.
  const nlohmann::json &a = *analysis;
  const std::string m = a["segment_lengths"].size() > 1 ? "16" : std::to_string(a["segment_lengths"][0].get<int64_t>());
  const std::string segment = a["model"]["srp"].contains(m) ? m : a["model"]["srp"].begin().key();
  char ratio[32];
  std::snprintf(ratio, sizeof ratio, "%g", options.cacheRatios.back());
  std::printf("routing of %lld tokens (%lld samples of %lld) through %zu MoE layers\n",
              static_cast<long long>(a["tokens"].get<int64_t>()), static_cast<long long>(a["samples"].get<int64_t>()),
              static_cast<long long>(options.sequenceLength), a["layers"].size());
  std::printf("%-8s %8s %6s %10s %10s %10s\n", "layer", "experts", "top-k", ("SRP m=" + segment).c_str(),
              ("SCH x" + std::string(ratio)).c_str(), ("LRU x" + std::string(ratio)).c_str());
  auto row = [&](const std::string &name, const nlohmann::json &entry, const std::string &experts,
                 const std::string &topK) {
    std::printf("%-8s %8s %6s %10.4f %10.4f %10.4f\n", name.c_str(), experts.c_str(), topK.c_str(),
                entry["srp"][segment]["srp"].get<double>(), entry["sch"][segment][ratio].get<double>(),
                entry["lru"][ratio].get<double>());
  };
  for (const nlohmann::json &layer : a["layers"])
    row(std::to_string(layer["index"].get<int64_t>()), layer, std::to_string(layer["experts"].get<int64_t>()),
        std::to_string(layer["top_k"].get<int64_t>()));
  row("model", a["model"], "", "");
  if (!options.html.empty())
    std::printf("report: %s\n", options.html.c_str());
  return 0;
}

} // namespace

Command registerAnalyze(CLI::App &app) {
  auto options = std::make_shared<AnalyzeOptions>();
  CLI::App *command = app.add_subcommand(
      "analyze", "How a model routes: local routing consistency (SRP, SCH) per layer, cache hit rates, expert usage "
                 "and co-activation, per-domain usage and its divergence (HTML with pictures, JSON)");
  addModelOptions(command, options->model);
  command->add_option("--data", options->data, "Data to route (text, .jsonl with \"domain\", or .u32)")->required();
  command->add_option("-o,--html", options->html,
                      "Write the HTML report here (and the JSON beside it, same name with .json)");
  command->add_option("--json", options->json, "Write the JSON report here (default: stdout when no -o)");
  command->add_option("--max-tokens,--tokens", options->tokens, "Tokens per domain (default: every complete sample)")
      ->check(CLI::PositiveNumber);
  command->add_option("--seq-len", options->sequenceLength, "Sample length (the paper's 512)")
      ->check(CLI::PositiveNumber);
  command->add_option("--segment", options->segments, "Segment lengths m for SRP and SCH's lookahead")
      ->delimiter(',')
      ->capture_default_str();
  command->add_option("--cache-ratio", options->cacheRatios, "Cache sizes per layer in units of top-k (SCH and LRU)")
      ->delimiter(',')
      ->capture_default_str();
  return {command, [options] { return runAnalyze(*options); }};
}

} // namespace moe::cli
