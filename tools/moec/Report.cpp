//===- Report.cpp - moec report: what compression did, as JSON and HTML ---===//
//
// Part of moec. The report of a module or package (moe/Pipeline/Report.h):
// per layer and expert what the passes decided and why, what is stored
// now, and bytes by role before and after. `moec compress --report` writes
// the same with perplexity and the comparison with the original added.
//
//===----------------------------------------------------------------------===//

#include "Commands.h"
#include "ModuleFiles.h"

#include "moe/Pipeline/Report.h"
#include "moe/Runtime/DescriptionSummary.h"

#include <iostream>

namespace moe::cli {

Expected<nlohmann::json> compiledModelReport(const std::string &path) {
  Expected<CompiledModel> compiled = readCompiledModel(path);
  if (!compiled)
    return compiled.status();
  Expected<nlohmann::json> summary = summarizeDescription(compiled->description);
  if (!summary)
    return Status::error(path, ": ", summary.status().message());
  ReportInputs inputs;
  inputs.model = path;
  inputs.summary = summary.take();
  inputs.history = compiled->history;
  Expected<nlohmann::json> report = buildReport(inputs);
  if (!report)
    return Status::error(path, ": ", report.status().message());
  return report;
}

namespace {

struct ReportOptions {
  std::string model;
  std::string html;
  std::string json;
};

int runReport(const ReportOptions &options) {
  Expected<nlohmann::json> report = compiledModelReport(options.model);
  if (!report) {
    printError(report.status().message());
    return 1;
  }
  Status status = writeReportFiles(*report, options.html, options.json);
  if (!status.ok()) {
    printError(status.message());
    return 1;
  }
  if (options.html.empty() && options.json.empty())
    std::cout << report->dump(2) << "\n";
  return 0;
}

} // namespace

Command registerReport(CLI::App &app) {
  auto options = std::make_shared<ReportOptions>();
  CLI::App *command = app.add_subcommand(
      "report", "What compression did to a module or package: per layer and expert the decision, its score and "
                "method, width, format, bits and bytes; bytes by role before and after (HTML with pictures, JSON)");
  command->add_option("model", options->model, "Module (.mlir), package (.moepkg) or GGUF file moec wrote")->required();
  command->add_option("-o,--html", options->html,
                      "Write the HTML report here (and the JSON beside it, same name with .json)");
  command->add_option("--json", options->json, "Write the JSON report here (default: stdout when no -o)");
  return {command, [options] { return runReport(*options); }};
}

} // namespace moe::cli
