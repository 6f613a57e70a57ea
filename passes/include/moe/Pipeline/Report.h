//===- Report.h - What compression did, per layer and expert ----*- C++ -*-===//
//
// Part of moec. A report joins three things: what the model holds now (the
// summary of its ModelDescription: experts, widths, formats, bytes), what
// the passes decided and why (the module's history, moe/Lowering/History.h,
// which packages carry in their provenance), and, when a run measured them,
// perplexity before and after per domain, the comparison with the original
// (KL divergence, top-1 agreement) and routing frequency per domain. The
// JSON is for machines and tests; the HTML is one self-contained file with
// SVG pictures drawn here (no scripts, nothing fetched).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PIPELINE_REPORT_H
#define MOE_PIPELINE_REPORT_H

#include "moe/Support/Status.h"

#include <nlohmann/json.hpp>

#include <string>

namespace moe {

struct ReportInputs {
  std::string model;      ///< What the report is about (a path).
  nlohmann::json summary; ///< summarizeDescription of the model as it is.
  nlohmann::json history; ///< {"original", "decisions"} (History.h), or null.
  /// Optional measurements: {"before": EvalJson, "after": EvalJson,
  /// "compare": {...}} where EvalJson is {"perplexity", "domains":
  /// {name: {"perplexity"}}}.
  nlohmann::json quality;
  /// Optional: {domain: [[routed tokens per original expert] per layer]}
  /// and "tokens": {domain: tokens}, from the original model.
  nlohmann::json routing;
};

/// The report as JSON: {"model", "family", "bytes": {"before", "after",
/// "by_role": {role: {"before", "after"}}}, "layers": [{"index", "mlp",
/// "experts_before", "experts_after", "experts": [{"origin", "id" (null
/// when gone), "decision": "kept" | "pruned" | "merged" | "absent", "into",
/// "pass", "method", "score", "score_name", "frequency",
/// "calibration_tokens", "frequency_by_domain", "width_before",
/// "width_after", "formats", "bits", "bytes", "events"}]}], "quality",
/// "passes"}. Fails when the history contradicts the model (an expert the
/// history removed is still there, or one it kept is missing).
Expected<nlohmann::json> buildReport(const ReportInputs &inputs);

/// The report as one HTML page with inline SVG. A report may also (or
/// only, with just "model" and "family") hold "routing_analysis", what
/// `moec analyze` measured (moe/Calibration/RoutingAnalysis.h); the page
/// then has a section for it.
std::string renderReportHtml(const nlohmann::json &report);

/// Writes the report's JSON to `json` (default: beside `html`, with .json)
/// and its HTML to `html`, each atomically; either may be empty.
Status writeReportFiles(const nlohmann::json &report, const std::string &html, const std::string &json);

} // namespace moe

#endif // MOE_PIPELINE_REPORT_H
