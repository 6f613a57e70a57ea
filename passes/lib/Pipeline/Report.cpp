//===- Report.cpp - What compression did, per layer and expert ------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Pipeline/Report.h"
#include "moe/Support/AtomicFile.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

namespace moe {

using json = nlohmann::json;

namespace {

double real(const json &value, double otherwise = NAN) { return value.is_number() ? value.get<double>() : otherwise; }

/// One expert's story, replayed from the decisions of its layer.
struct ExpertStory {
  std::string decision = "kept";
  int64_t into = -1;
  json last = nullptr; ///< The event that decided (or the last one).
  json events = json::array();
  double routed = NAN;
  int64_t tokens = 0;
  int64_t widthBefore = 0;
};

/// Replays `decisions` for `layer`: origins 0..originalExperts-1.
std::map<int64_t, ExpertStory> replay(const json &decisions, int64_t layer, int64_t originalExperts,
                                      int64_t originalWidth) {
  std::map<int64_t, ExpertStory> stories;
  for (int64_t e = 0; e < originalExperts; ++e)
    stories[e].widthBefore = originalWidth;
  if (!decisions.is_array())
    return stories;
  for (const json &d : decisions) {
    if (d.value("layer", int64_t(-1)) != layer || !d.contains("experts"))
      continue;
    const json &experts = d["experts"];
    std::set<int64_t> removed;
    if (d.contains("removed"))
      for (const json &r : d["removed"])
        removed.insert(r.get<int64_t>());
    std::set<int64_t> protectedOnes;
    if (d.contains("protected"))
      for (const json &r : d["protected"])
        protectedOnes.insert(r.get<int64_t>());
    for (size_t i = 0; i < experts.size(); ++i) {
      const int64_t origin = experts[i].get<int64_t>();
      ExpertStory &story = stories[origin];
      json event = {{"pass", d.value("pass", "")}, {"method", d.value("method", "")}};
      if (d.contains("scores") && i < d["scores"].size())
        event["score"] = d["scores"][i];
      if (d.contains("score_name"))
        event["score_name"] = d["score_name"];
      if (d.contains("routed") && i < d["routed"].size() && std::isnan(story.routed)) {
        story.routed = real(d["routed"][i]);
        story.tokens = d.value("calibration_tokens", int64_t(0));
      }
      if (protectedOnes.count(origin))
        event["protected"] = true;
      if (d.contains("widths_after") && i < d["widths_after"].size()) {
        event["width_before"] = d["widths_before"][i];
        event["width_after"] = d["widths_after"][i];
      }
      std::string action = "kept";
      if (d.contains("into") && i < d["into"].size() && d["into"][i].get<int64_t>() != origin) {
        action = "merged";
        story.into = d["into"][i].get<int64_t>();
        event["into"] = story.into;
      } else if (removed.count(origin)) {
        // DERN folds the dropped experts' neurons into retained ones.
        action = d.value("method", "") == "dern" ? "merged" : "pruned";
      }
      event["action"] = action;
      story.events.push_back(event);
      if (story.decision == "kept") {
        story.decision = action;
        // An expert's deciding score is the removal or merge that took it,
        // else the last expert-level score (atom shares stay in events).
        if (action != "kept" || !event.contains("width_after") || story.last.is_null())
          story.last = event;
      }
    }
  }
  return stories;
}

/// Effective bits per weight of an expert (scales included).
double bitsPerWeight(const json &expert, int64_t hidden) {
  const double parameters = 3.0 * real(expert["width"], 0) * static_cast<double>(hidden);
  return parameters > 0 ? real(expert["bytes"], 0) * 8.0 / parameters : NAN;
}

} // namespace

Expected<json> buildReport(const ReportInputs &inputs) {
  const json &summary = inputs.summary;
  const json original = inputs.history.is_object() ? inputs.history.value("original", json()) : json();
  const json decisions = inputs.history.is_object() ? inputs.history.value("decisions", json::array()) : json::array();
  const int64_t hidden = summary.value("hidden", int64_t(0));
  json report = {{"model", inputs.model}, {"family", summary.value("family", "")}};

  json byRole = json::object();
  const json after = summary.value("bytes_by_role", json::object());
  const json before = original.is_object() ? original.value("bytes_by_role", json::object()) : json::object();
  for (const auto &[role, bytes] : before.items())
    byRole[role]["before"] = bytes;
  for (const auto &[role, bytes] : after.items())
    byRole[role]["after"] = bytes;
  for (auto &[role, entry] : byRole.items()) {
    if (!entry.contains("before"))
      entry["before"] = original.is_object() ? json(0) : json(nullptr);
    if (!entry.contains("after"))
      entry["after"] = 0;
  }
  report["bytes"] = {{"before", original.is_object() ? original.value("bytes", json(nullptr)) : json(nullptr)},
                     {"after", summary.value("bytes", json(0))},
                     {"by_role", byRole}};

  json layers = json::array();
  for (const json &layer : summary.value("layers", json::array())) {
    const int64_t index = layer.value("index", int64_t(0));
    json out = {{"index", index}, {"mlp", layer.value("mlp", "")}};
    if (layer.value("mlp", "") != "moe") {
      layers.push_back(out);
      continue;
    }
    std::map<int64_t, const json *> present; // by origin
    for (const json &expert : layer["experts"])
      present[expert.value("origin", expert.value("id", int64_t(0)))] = &expert;
    int64_t originalExperts = static_cast<int64_t>(layer["experts"].size());
    int64_t originalWidth = 0;
    if (original.is_object() && original.contains("experts") &&
        index < static_cast<int64_t>(original["experts"].size())) {
      originalExperts = original["experts"][index].get<int64_t>();
      originalWidth = original["expert_widths"][index].get<int64_t>();
    }
    if (!present.empty())
      originalExperts = std::max(originalExperts, present.rbegin()->first + 1);
    std::map<int64_t, ExpertStory> stories = replay(decisions, index, originalExperts, originalWidth);
    json experts = json::array();
    for (auto &[origin, story] : stories) {
      auto found = present.find(origin);
      const bool here = found != present.end();
      if (here && story.decision != "kept")
        return Status::error("layer ", index, " expert ", origin, ": the history says it was ", story.decision, " by ",
                             story.last.value("pass", "?"), ", but the model still holds it");
      if (!here && story.decision == "kept")
        story.decision = story.events.empty() ? "absent" : "missing";
      if (story.decision == "missing")
        return Status::error("layer ", index, " expert ", origin,
                             ": the history keeps it, but the model does not hold it");
      if (story.decision == "merged" && story.into >= 0 && !present.count(story.into))
        return Status::error("layer ", index, " expert ", origin, ": merged into expert ", story.into,
                             ", which the model does not hold");
      json entry = {{"origin", origin},
                    {"id", here ? (*found->second)["id"] : json(nullptr)},
                    {"decision", story.decision},
                    {"width_before", story.widthBefore > 0 ? json(story.widthBefore) : json(nullptr)},
                    {"events", story.events}};
      if (story.into >= 0)
        entry["into"] = story.into;
      if (!story.last.is_null()) {
        entry["pass"] = story.last["pass"];
        entry["method"] = story.last["method"];
        entry["score"] = story.last.value("score", json(nullptr));
        entry["score_name"] = story.last.value("score_name", json(nullptr));
      }
      if (!std::isnan(story.routed)) {
        entry["calibration_tokens"] = story.routed;
        entry["frequency"] = story.tokens > 0 ? json(story.routed / static_cast<double>(story.tokens)) : json(nullptr);
      }
      if (inputs.routing.is_object() && inputs.routing.contains("domains")) {
        json byDomain = json::object();
        for (const auto &[domain, perLayer] : inputs.routing["domains"].items()) {
          const double tokens = real(inputs.routing["tokens"].value(domain, json(0)), 0);
          if (index < static_cast<int64_t>(perLayer.size()) && origin < static_cast<int64_t>(perLayer[index].size()) &&
              tokens > 0)
            byDomain[domain] = real(perLayer[index][origin], 0) / tokens;
        }
        entry["frequency_by_domain"] = byDomain;
      }
      if (here) {
        const json &now = *found->second;
        entry["width_after"] = now["width"];
        entry["formats"] = now["formats"];
        entry["bytes"] = now["bytes"];
        const double bits = bitsPerWeight(now, hidden);
        entry["bits"] = std::isfinite(bits) ? json(bits) : json(nullptr);
      } else {
        entry["width_after"] = 0;
        entry["bytes"] = 0;
      }
      experts.push_back(entry);
    }
    out["experts_before"] = originalExperts;
    out["experts_after"] = layer["experts"].size();
    out["top_k"] = layer.value("top_k", json(nullptr));
    out["experts"] = experts;
    layers.push_back(out);
  }
  report["layers"] = layers;
  report["bytes_by_format"] = summary.value("bytes_by_format", json::object());
  if (summary.contains("task_sets"))
    report["task_sets"] = summary["task_sets"];
  if (!inputs.quality.is_null())
    report["quality"] = inputs.quality;
  std::set<std::string> passes;
  json passList = json::array();
  for (const json &d : decisions) {
    const std::string key = d.value("pass", "") + " " + d.value("method", "");
    if (passes.insert(key).second)
      passList.push_back({{"pass", d.value("pass", "")}, {"method", d.value("method", "")}});
  }
  report["passes"] = passList;
  return report;
}

//===----------------------------------------------------------------------===//
// HTML
//===----------------------------------------------------------------------===//

namespace {

std::string escape(const std::string &text) {
  std::string out;
  for (char c : text) {
    switch (c) {
    case '&':
      out += "&amp;";
      break;
    case '<':
      out += "&lt;";
      break;
    case '>':
      out += "&gt;";
      break;
    case '"':
      out += "&quot;";
      break;
    default:
      out += c;
    }
  }
  return out;
}

std::string format(const char *pattern, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, pattern, value);
  return buffer;
}

std::string bytesText(double bytes) {
  const char *units[] = {"B", "KB", "MB", "GB", "TB"};
  int unit = 0;
  while (bytes >= 1000 && unit < 4) {
    bytes /= 1000;
    ++unit;
  }
  return format(unit == 0 ? "%.0f" : "%.2f", bytes) + " " + units[unit];
}

/// A colour between two RGB endpoints, t in [0, 1].
std::string mix(double t, int r0, int g0, int b0, int r1, int g1, int b1) {
  t = std::clamp(std::isfinite(t) ? t : 0.0, 0.0, 1.0);
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, "#%02x%02x%02x", static_cast<int>(r0 + t * (r1 - r0)),
                static_cast<int>(g0 + t * (g1 - g0)), static_cast<int>(b0 + t * (b1 - b0)));
  return buffer;
}

std::string decisionColour(const std::string &decision) {
  if (decision == "pruned")
    return "#d9534f";
  if (decision == "merged")
    return "#f0ad4e";
  if (decision == "absent")
    return "#bbbbbb";
  return "#5cb85c";
}

std::string bitsColour(double bits) {
  if (!std::isfinite(bits))
    return "#eeeeee";
  // 2 bits red .. 16 bits blue, on a log scale.
  const double t = (std::log2(std::clamp(bits, 2.0, 16.0)) - 1.0) / 3.0;
  return mix(t, 0xd7, 0x30, 0x27, 0x45, 0x75, 0xb4);
}

/// A grid of rows x columns squares; `cell(row, column)` gives each fill
/// and tooltip (an empty fill leaves the square out).
template <typename Cell>
std::string grid(const std::string &title, const std::vector<std::string> &rowLabels, int64_t columns,
                 const std::string &axis, const Cell &cell) {
  const int64_t rows = static_cast<int64_t>(rowLabels.size());
  if (rows == 0 || columns == 0)
    return "";
  const int size = columns > 64 ? 6 : columns > 32 ? 10 : columns > 16 ? 16 : 22;
  const int left = 110, top = 24;
  const int width = std::max(left + static_cast<int>(columns) * size + 10, 300),
            height = top + static_cast<int>(rows) * size + 24;
  std::string svg = "<figure><figcaption>" + escape(title) + "</figcaption><svg width=\"" + std::to_string(width) +
                    "\" height=\"" + std::to_string(height) + "\" class=\"heat\">";
  for (int64_t r = 0; r < rows; ++r) {
    const int y = top + static_cast<int>(r) * size;
    svg += "<text x=\"" + std::to_string(left - 6) + "\" y=\"" + std::to_string(y + size - 4) +
           "\" text-anchor=\"end\" font-size=\"11\">" + escape(rowLabels[static_cast<size_t>(r)]) + "</text>";
    for (int64_t c = 0; c < columns; ++c) {
      auto [fill, tip] = cell(r, c);
      if (fill.empty())
        continue;
      svg += "<rect x=\"" + std::to_string(left + c * size) + "\" y=\"" + std::to_string(y) + "\" width=\"" +
             std::to_string(size - 1) + "\" height=\"" + std::to_string(size - 1) + "\" fill=\"" + fill + "\"><title>" +
             escape(rowLabels[static_cast<size_t>(r)]) + ", " + escape(tip) + "</title></rect>";
    }
  }
  svg += "<text x=\"" + std::to_string(left) + "\" y=\"" + std::to_string(height - 6) + "\" font-size=\"11\">" +
         escape(axis) + " &#8594;</text></svg></figure>";
  return svg;
}

/// A layer x expert grid of the report's layers; `cell` gives each
/// expert's fill and tooltip.
template <typename Cell> std::string heatmap(const json &layers, const std::string &title, const Cell &cell) {
  std::vector<const json *> rows;
  std::vector<std::string> labels;
  int64_t columns = 0;
  for (const json &layer : layers)
    if (layer.contains("experts")) {
      rows.push_back(&layer);
      labels.push_back("layer " + std::to_string(layer["index"].get<int64_t>()));
      for (const json &expert : layer["experts"])
        columns = std::max(columns, expert["origin"].get<int64_t>() + 1);
    }
  return grid(title, labels, columns, "experts (by id in the original checkpoint)", [&](int64_t r, int64_t c) {
    const json &layer = *rows[static_cast<size_t>(r)];
    for (const json &expert : layer["experts"])
      if (expert["origin"].get<int64_t>() == c) {
        auto [fill, tip] = cell(layer, expert);
        return std::pair<std::string, std::string>(fill, "expert " + std::to_string(c) + ": " + tip);
      }
    return std::pair<std::string, std::string>();
  });
}

/// Horizontal bars, one group per label and one bar per series.
std::string seriesChart(const std::string &title, const std::vector<std::string> &labels,
                        const std::vector<std::string> &series, const std::vector<std::vector<double>> &values,
                        const std::vector<std::string> &colours, const std::string &unit, bool bytes) {
  double largest = 0;
  for (const std::vector<double> &group : values)
    for (double v : group)
      largest = std::max(largest, std::isfinite(v) ? v : 0.0);
  if (labels.empty() || largest <= 0)
    return "";
  const int left = 130, barWidth = 420, barHeight = 12;
  const int rowHeight = static_cast<int>(series.size()) * (barHeight + 1) + 8;
  const int height = 30 + static_cast<int>(labels.size()) * rowHeight;
  std::string svg = "<figure><figcaption>" + escape(title) + "</figcaption><svg width=\"" +
                    std::to_string(left + barWidth + 150) + "\" height=\"" + std::to_string(height) +
                    "\" class=\"bars\">";
  auto label = [&](double v) {
    return !std::isfinite(v) ? std::string("n/a") : bytes ? bytesText(v) : format("%.3f", v) + unit;
  };
  for (size_t i = 0; i < labels.size(); ++i) {
    const int y = 10 + static_cast<int>(i) * rowHeight;
    svg += "<text x=\"" + std::to_string(left - 6) + "\" y=\"" + std::to_string(y + 18) +
           "\" text-anchor=\"end\" font-size=\"12\">" + escape(labels[i]) + "</text>";
    for (size_t k = 0; k < series.size(); ++k) {
      const double raw = k < values[i].size() ? values[i][k] : NAN;
      const double v = std::isfinite(raw) ? raw : 0.0;
      const int w = static_cast<int>(std::round(v / largest * barWidth));
      const int by = y + static_cast<int>(k) * (barHeight + 1);
      svg += "<rect x=\"" + std::to_string(left) + "\" y=\"" + std::to_string(by) + "\" width=\"" +
             std::to_string(std::max(w, 1)) + "\" height=\"" + std::to_string(barHeight) + "\" fill=\"" +
             colours[k % colours.size()] + "\"><title>" + escape(series[k]) + ": " + escape(label(raw)) +
             "</title></rect>";
      svg += "<text x=\"" + std::to_string(left + w + 4) + "\" y=\"" + std::to_string(by + 10) +
             "\" font-size=\"10\">" + escape(series[k]) + " " + escape(label(raw)) + "</text>";
    }
  }
  return svg + "</svg></figure>";
}

/// Grouped bars before and after.
std::string barChart(const std::string &title, const std::vector<std::string> &labels,
                     const std::vector<std::pair<double, double>> &values, const std::string &unit, bool bytes) {
  std::vector<std::vector<double>> groups;
  for (const auto &[a, b] : values)
    groups.push_back({a, b});
  return seriesChart(title, labels, {"before", "after"}, groups, {"#9aa7b8", "#2c7fb8"}, unit, bytes);
}

/// The `moec analyze` section: local routing consistency, caches, usage,
/// co-activation and domains.
std::string routingAnalysisHtml(const json &a) {
  std::string html = "<h2>Routing analysis</h2>";
  const json &model = a["model"];
  const std::vector<int64_t> lengths = a["segment_lengths"].get<std::vector<int64_t>>();
  const std::vector<double> ratios = a["cache_ratios"].get<std::vector<double>>();
  std::string m = std::to_string(lengths.front());
  for (int64_t length : lengths)
    if (length == 16)
      m = "16";
  const std::string ratio = format("%g", ratios.back());
  html += "<p>" + std::to_string(a["tokens"].get<int64_t>()) + " tokens in " +
          std::to_string(a["samples"].get<int64_t>()) + " samples of " +
          std::to_string(a["sequence_length"].get<int64_t>()) + " from " + escape(a.value("data", "")) +
          ". SRP (segment routing best performance) is the best F1 with which one expert set per segment of m "
          "tokens predicts every token's experts; SCH (segment cache best hit rate) is the hit rate of a cache of "
          "ratio &#215; top-k experts per layer that evicts the expert used least in the next m tokens; LRU is the "
          "same cache without foresight (Liang et al. 2025, as their released code computes them).</p><div>";
  html += "<div class=\"kpi\">SRP, m = " + m + "<b>" + format("%.4f", real(model["srp"][m]["srp"])) +
          "</b>expert sets " + format("%.2f", real(model["srp"][m]["set_ratio"])) + " &#215; top-k</div>";
  html += "<div class=\"kpi\">SCH, m = " + m + ", cache " + ratio + " &#215; top-k<b>" +
          format("%.4f", real(model["sch"][m][ratio])) + "</b>" +
          std::to_string(model["cache_experts"][ratio].get<int64_t>()) + " experts over all layers</div>";
  html += "<div class=\"kpi\">LRU, same cache<b>" + format("%.4f", real(model["lru"][ratio])) + "</b></div>";
  html += "<div class=\"kpi\">experts active per token<b>" + format("%.2f%%", 100 * real(model["activation_ratio"])) +
          "</b>of each layer's experts</div></div>";

  std::vector<std::string> labels;
  std::vector<std::vector<double>> values;
  for (const json &layer : a["layers"]) {
    labels.push_back("layer " + std::to_string(layer["index"].get<int64_t>()));
    values.push_back({real(layer["srp"][m]["srp"]), real(layer["sch"][m][ratio]), real(layer["lru"][ratio])});
  }
  labels.push_back("model");
  values.push_back({real(model["srp"][m]["srp"]), real(model["sch"][m][ratio]), real(model["lru"][ratio])});
  html += seriesChart("per layer: SRP (m = " + m + "), SCH and LRU (cache " + ratio + " x top-k)", labels,
                      {"SRP", "SCH", "LRU"}, values, {"#2c7fb8", "#31a354", "#9aa7b8"}, "", false);

  // Every measure at every m and ratio.
  html += "<table><tr><th>layer</th><th>experts</th><th>top-k</th><th>active per token</th>";
  for (int64_t length : lengths)
    html += "<th>SRP m=" + std::to_string(length) + "</th>";
  for (int64_t length : lengths)
    for (double r : ratios)
      html += "<th>SCH m=" + std::to_string(length) + " x" + format("%g", r) + "</th>";
  for (double r : ratios)
    html += "<th>LRU x" + format("%g", r) + "</th>";
  html += "</tr>";
  auto tableRow = [&](const std::string &name, const json &entry, const std::string &experts, const std::string &topK,
                      double active) {
    html += "<tr><td class=\"l\">" + escape(name) + "</td><td>" + experts + "</td><td>" + topK + "</td><td>" +
            (std::isfinite(active) ? format("%.2f", active) : "") + "</td>";
    for (int64_t length : lengths)
      html += "<td>" + format("%.4f", real(entry["srp"][std::to_string(length)]["srp"])) + "</td>";
    for (int64_t length : lengths)
      for (double r : ratios)
        html += "<td>" + format("%.4f", real(entry["sch"][std::to_string(length)][format("%g", r)])) + "</td>";
    for (double r : ratios)
      html += "<td>" + format("%.4f", real(entry["lru"][format("%g", r)])) + "</td>";
    html += "</tr>";
  };
  for (const json &layer : a["layers"])
    tableRow("layer " + std::to_string(layer["index"].get<int64_t>()), layer,
             std::to_string(layer["experts"].get<int64_t>()), std::to_string(layer["top_k"].get<int64_t>()),
             real(layer["activations_per_token"]));
  tableRow("model", model, "", "", NAN);
  html += "</table>";

  // Usage per layer and slot.
  int64_t columns = 0;
  std::vector<std::string> layerLabels;
  for (const json &layer : a["layers"]) {
    columns = std::max(columns, layer["experts"].get<int64_t>());
    layerLabels.push_back("layer " + std::to_string(layer["index"].get<int64_t>()));
  }
  html += "<div style=\"display:flex;flex-wrap:wrap;gap:24px\">";
  html += grid("share of each layer's activations (white 0 .. dark 2/experts)", layerLabels, columns, "experts",
               [&](int64_t r, int64_t c) {
                 const json &layer = a["layers"][static_cast<size_t>(r)];
                 const json &usage = layer["usage"];
                 if (c >= static_cast<int64_t>(usage.size()))
                   return std::pair<std::string, std::string>();
                 double total = 0;
                 for (const json &u : usage)
                   total += u.get<double>();
                 const double share = total > 0 ? usage[static_cast<size_t>(c)].get<double>() / total : 0.0;
                 return std::pair<std::string, std::string>(
                     mix(share * static_cast<double>(usage.size()) / 2, 0xff, 0xff, 0xff, 0x08, 0x30, 0x6b),
                     "expert " + std::to_string(c) + ": " + format("%.2f%% of activations", 100 * share));
               });
  const std::vector<std::string> domains = a["domains"]["names"].get<std::vector<std::string>>();
  if (domains.size() > 1) {
    const json &divergence = a["domains"]["js_divergence"];
    double largest = 1e-12;
    for (const json &row : divergence)
      for (const json &v : row)
        largest = std::max(largest, v.get<double>());
    html +=
        grid("Jensen-Shannon divergence of expert usage between domains, mean over layers (white 0 .. dark " +
                 format("%.3f", largest) + ")",
             domains, static_cast<int64_t>(domains.size()), "domains (same order)", [&](int64_t r, int64_t c) {
               const double v = divergence[static_cast<size_t>(r)][static_cast<size_t>(c)].get<double>();
               return std::pair<std::string, std::string>(mix(v / largest, 0xff, 0xff, 0xff, 0xb3, 0x00, 0x00),
                                                          domains[static_cast<size_t>(c)] + format(": %.4f bits", v));
             });
  }
  html += "</div><h2>Per layer: co-activation and domains</h2>";
  bool first = true;
  for (const json &layer : a["layers"]) {
    const std::string name = "layer " + std::to_string(layer["index"].get<int64_t>());
    const int64_t experts = layer["experts"].get<int64_t>();
    html += std::string(first ? "<details open>" : "<details>") + "<summary>" + name + "</summary>";
    first = false;
    html += "<div style=\"display:flex;flex-wrap:wrap;gap:24px\">";
    if (layer.contains("coactivation")) {
      const json &matrix = layer["coactivation"];
      double largest = 1e-12;
      for (int64_t i = 0; i < experts; ++i)
        for (int64_t j = 0; j < experts; ++j)
          if (i != j)
            largest = std::max(largest, matrix[static_cast<size_t>(i)][static_cast<size_t>(j)].get<double>());
      std::vector<std::string> rows;
      for (int64_t i = 0; i < experts; ++i)
        rows.push_back("expert " + std::to_string(i));
      html += grid(name + ": tokens that ran both experts (white 0 .. dark " + format("%.0f", largest) + ")", rows,
                   experts, "experts", [&](int64_t r, int64_t c) {
                     if (r == c)
                       return std::pair<std::string, std::string>("#eeeeee", "itself");
                     const double v = matrix[static_cast<size_t>(r)][static_cast<size_t>(c)].get<double>();
                     return std::pair<std::string, std::string>(mix(v / largest, 0xff, 0xff, 0xff, 0x54, 0x27, 0x88),
                                                                "with expert " + std::to_string(c) +
                                                                    format(": %.0f tokens", v));
                   });
    }
    if (domains.size() > 1) {
      html += grid(name + ": share of each domain's activations (white 0 .. dark 2/experts)", domains, experts,
                   "experts", [&](int64_t r, int64_t c) {
                     const json &usage = layer["domains"][domains[static_cast<size_t>(r)]];
                     double total = 0;
                     for (const json &u : usage)
                       total += u.get<double>();
                     const double share = total > 0 ? usage[static_cast<size_t>(c)].get<double>() / total : 0.0;
                     return std::pair<std::string, std::string>(
                         mix(share * static_cast<double>(experts) / 2, 0xff, 0xff, 0xff, 0x08, 0x30, 0x6b),
                         "expert " + std::to_string(c) + format(": %.2f%%", 100 * share));
                   });
    }
    html += "</div><table><tr><th>expert pair</th><th>tokens</th><th>lift over independence</th></tr>";
    for (const json &pair : layer["top_pairs"])
      html += "<tr><td>" + std::to_string(pair["a"].get<int64_t>()) + " + " + std::to_string(pair["b"].get<int64_t>()) +
              "</td><td>" + format("%.0f", real(pair["tokens"])) + "</td><td>" + format("%.2f", real(pair["lift"])) +
              "</td></tr>";
    html += "</table></details>";
  }
  return html;
}

/// What compression did: headline numbers, bytes, perplexity, the expert
/// grids and the tables (a report from buildReport).
std::string compressionHtml(const json &report) {
  const json &layers = report["layers"];
  std::string html;
  // Headline numbers.
  const json &bytes = report["bytes"];
  html += "<div>";
  if (bytes["before"].is_number())
    html += "<div class=\"kpi\">size<b>" + bytesText(real(bytes["before"])) + " &#8594; " +
            bytesText(real(bytes["after"])) + "</b>" +
            format("%.2fx smaller", real(bytes["before"]) / std::max(1.0, real(bytes["after"]))) + "</div>";
  else
    html += "<div class=\"kpi\">size<b>" + bytesText(real(bytes["after"])) + "</b></div>";
  int64_t before = 0, after = 0;
  for (const json &layer : layers)
    if (layer.contains("experts")) {
      before += layer["experts_before"].get<int64_t>();
      after += layer["experts_after"].get<int64_t>();
    }
  html += "<div class=\"kpi\">routed experts<b>" + std::to_string(before) + " &#8594; " + std::to_string(after) +
          "</b></div>";
  const json quality = report.value("quality", json::object());
  if (quality.contains("before") && quality.contains("after"))
    html +=
        "<div class=\"kpi\">perplexity<b>" + format("%.3f", real(quality["before"]["perplexity"])) + " &#8594; " +
        format("%.3f", real(quality["after"]["perplexity"])) + "</b>" +
        format("%+.2f%%", (real(quality["after"]["perplexity"]) / real(quality["before"]["perplexity"]) - 1) * 100) +
        "</div>";
  if (quality.contains("compare")) {
    const json &c = quality["compare"];
    html += "<div class=\"kpi\">KL divergence to the original<b>" + format("%.4f", real(c["kl_mean"])) +
            "</b>99th percentile " + format("%.4f", real(c["kl_p99"])) + "</div>";
    html += "<div class=\"kpi\">top-1 agreement<b>" + format("%.2f%%", 100 * real(c["top1_agreement"])) + "</b></div>";
  }
  html += "</div>\n";

  // Bytes by role.
  std::vector<std::string> roles;
  std::vector<std::pair<double, double>> roleBytes;
  for (const auto &[role, entry] : bytes["by_role"].items()) {
    roles.push_back(role);
    roleBytes.push_back({real(entry["before"]), real(entry["after"])});
  }
  html += "<h2>Bytes by role</h2>" + barChart("stored bytes, before and after", roles, roleBytes, "", true);

  // Perplexity.
  if (quality.contains("before") && quality.contains("after")) {
    std::vector<std::string> names = {"all"};
    std::vector<std::pair<double, double>> values = {
        {real(quality["before"]["perplexity"]), real(quality["after"]["perplexity"])}};
    const json domainsBefore = quality["before"].value("domains", json::object());
    const json domainsAfter = quality["after"].value("domains", json::object());
    for (const auto &[domain, score] : domainsBefore.items()) {
      names.push_back(domain);
      values.push_back({real(score["perplexity"]),
                        real(domainsAfter.value(domain, json::object()).value("perplexity", json(nullptr)))});
    }
    html += "<h2>Perplexity before and after</h2>" +
            barChart("perplexity per domain (lower is better)", names, values, "", false);
  }

  // Heatmaps.
  html +=
      "<h2>Experts, layer by layer</h2><div class=\"legend\">decision:<span style=\"background:#5cb85c\"></span>kept"
      "<span style=\"background:#f0ad4e\"></span>merged<span style=\"background:#d9534f\"></span>pruned"
      "<span style=\"background:#bbbbbb\"></span>absent (no record)</div>";
  html += "<div style=\"display:flex;flex-wrap:wrap;gap:24px\">";
  html += heatmap(layers, "what became of each expert", [](const json &, const json &e) {
    std::string tip = e["decision"].get<std::string>();
    if (e.contains("into"))
      tip += " into expert " + std::to_string(e["into"].get<int64_t>());
    if (e.contains("method"))
      tip += " (" + e["pass"].get<std::string>() + " " + e["method"].get<std::string>() + ")";
    if (e.contains("score") && e["score"].is_number())
      tip += format(", score %.4g", e["score"].get<double>());
    return std::pair<std::string, std::string>(decisionColour(e["decision"].get<std::string>()), tip);
  });
  double largestFrequency = 0, smallestFrequency = INFINITY;
  bool haveFrequency = false;
  for (const json &layer : layers)
    if (layer.contains("experts"))
      for (const json &e : layer["experts"])
        if (e.contains("frequency") && e["frequency"].is_number()) {
          largestFrequency = std::max(largestFrequency, e["frequency"].get<double>());
          smallestFrequency = std::min(smallestFrequency, e["frequency"].get<double>());
          haveFrequency = true;
        }
  if (haveFrequency)
    html += heatmap(layers,
                    "routing frequency on the calibration data (" + format("%.1f%%", 100 * smallestFrequency) +
                        " light .. " + format("%.1f%%", 100 * largestFrequency) + " dark)",
                    [&](const json &, const json &e) {
                      const double f = real(e.value("frequency", json(nullptr)));
                      return std::pair<std::string, std::string>(
                          std::isfinite(f)
                              ? mix((f - smallestFrequency) / std::max(largestFrequency - smallestFrequency, 1e-12),
                                    0xde, 0xeb, 0xf7, 0x08, 0x30, 0x6b)
                              : "#eeeeee",
                          std::isfinite(f) ? format("%.2f%% of tokens", 100 * f) : "not measured");
                    });
  html +=
      heatmap(layers, "bits per weight (scales included; red 2 bits .. blue 16 bits)", [](const json &, const json &e) {
        const double bits = real(e.value("bits", json(nullptr)));
        return std::pair<std::string, std::string>(bitsColour(bits),
                                                   std::isfinite(bits) ? format("%.2f bits", bits) : "not stored");
      });
  html += heatmap(layers, "width kept (neurons after / before)", [](const json &, const json &e) {
    const double b = real(e["width_before"], NAN), a = real(e["width_after"], 0);
    const double t = std::isfinite(b) && b > 0 ? a / b : (a > 0 ? 1.0 : 0.0);
    return std::pair<std::string, std::string>(mix(t, 0xff, 0xff, 0xff, 0x31, 0xa3, 0x54),
                                               format("%.0f", a) + " of " +
                                                   (std::isfinite(b) ? format("%.0f", b) : "?") + " neurons");
  });

  html += "</div>";

  // Task expert sets: per set, the experts it keeps in each MoE layer.
  if (report.contains("task_sets")) {
    html += "<h2>Task expert sets</h2><table><tr><th>task</th><th>calibration tokens</th><th>experts kept "
            "per MoE layer</th></tr>";
    for (const json &set : report["task_sets"]) {
      std::string kept;
      for (const json &layer : set["kept"])
        kept += (kept.empty() ? "" : ", ") + std::to_string(layer["layer"].get<int64_t>()) + ": " +
                std::to_string(layer["experts"].get<int64_t>());
      html += "<tr><td class=\"l\">" + escape(set["name"].get<std::string>()) + "</td><td>" +
              std::to_string(set["tokens"].get<int64_t>()) + "</td><td class=\"l\">" + escape(kept) + "</td></tr>";
    }
    html += "</table>";
  }

  // Tables.
  html += "<h2>Every expert</h2>";
  bool firstTable = true;
  for (const json &layer : layers) {
    if (!layer.contains("experts"))
      continue;
    html += std::string(firstTable ? "<details open>" : "<details>") + "<summary>layer " +
            std::to_string(layer["index"].get<int64_t>()) + ": " +
            std::to_string(layer["experts_before"].get<int64_t>()) + " &#8594; " +
            std::to_string(layer["experts_after"].get<int64_t>()) +
            " experts</summary><table><tr><th>expert</th><th>now</th><th>decision</th><th>by</th><th>score</th>"
            "<th>frequency</th><th>width</th><th>formats</th><th>bits</th><th>bytes</th></tr>";
    for (const json &e : layer["experts"]) {
      std::string decision = e["decision"].get<std::string>();
      if (e.contains("into"))
        decision += " into " + std::to_string(e["into"].get<int64_t>());
      std::string formats;
      if (e.contains("formats"))
        for (const json &f : e["formats"])
          formats += (formats.empty() ? "" : " ") + f.get<std::string>();
      html +=
          "<tr><td>" + std::to_string(e["origin"].get<int64_t>()) + "</td><td>" +
          (e["id"].is_number() ? std::to_string(e["id"].get<int64_t>()) : "") + "</td><td class=\"l\">" +
          escape(decision) + "</td><td class=\"l\">" +
          escape(e.contains("method") ? e["pass"].get<std::string>() + " " + e["method"].get<std::string>() : "") +
          "</td><td>" + (e.value("score", json(nullptr)).is_number() ? format("%.4g", e["score"].get<double>()) : "") +
          "</td><td>" +
          (e.value("frequency", json(nullptr)).is_number() ? format("%.2f%%", 100 * e["frequency"].get<double>())
                                                           : "") +
          "</td><td>" +
          (e["width_before"].is_number() ? std::to_string(e["width_before"].get<int64_t>()) + " &#8594; " : "") +
          std::to_string(e["width_after"].get<int64_t>()) + "</td><td class=\"l\">" + escape(formats) + "</td><td>" +
          (e.value("bits", json(nullptr)).is_number() ? format("%.2f", e["bits"].get<double>()) : "") + "</td><td>" +
          bytesText(real(e["bytes"], 0)) + "</td></tr>";
    }
    html += "</table></details>";
    firstTable = false;
  }
  return html;
}

} // namespace

std::string renderReportHtml(const json &report) {
  std::string html =
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>moec report: " +
      escape(report.value("model", "")) +
      "</title><style>body{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}"
      "h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}"
      "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}"
      "th{background:#f4f4f4}td.l{text-align:left}figure{margin:10px 0}figcaption{font-weight:bold;font-size:13px}"
      ".kpi{display:inline-block;margin:0 28px 10px 0}.kpi b{display:block;font-size:20px}"
      ".legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}"
      "details{margin:6px 0}</style></head><body>\n";
  html +=
      "<h1>moec report: " + escape(report.value("model", "")) + " (" + escape(report.value("family", "")) + ")</h1>\n";

  if (report.contains("layers"))
    html += compressionHtml(report);
  if (report.contains("routing_analysis"))
    html += routingAnalysisHtml(report["routing_analysis"]);
  html += "<p style=\"font-size:11px;color:#777\">Written by moec.";
  if (report.contains("layers"))
    html += " Scores are each method's own (see docs/MoePasses.md); frequency is the share of calibration tokens "
            "routed to the expert.";
  html += "</p></body></html>\n";
  return html;
}

Status writeReportFiles(const json &report, const std::string &html, const std::string &jsonPath) {
  std::string path = jsonPath;
  if (path.empty() && !html.empty())
    path = std::filesystem::path(html).replace_extension(".json").string();
  if (!path.empty())
    MOE_RETURN_IF_ERROR(writeTextAtomically(path, report.dump(2) + "\n"));
  if (!html.empty())
    MOE_RETURN_IF_ERROR(writeTextAtomically(html, renderReportHtml(report)));
  return Status::success();
}

} // namespace moe
