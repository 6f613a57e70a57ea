//===- rank_split.cpp - How a distributed compress splits a model's experts -===//
//
// Part of moec. For each MoE layer of a checkpoint, the split of its routed
// experts over N processes that `mpirun -n N moec compress` makes
// (splitExpertsOverRanks), with each rank's share of the matrices outside the
// experts (moe-quantize{shares}), and each rank's estimated time with T GPTQ
// threads (its work over T, no less than its longest matrix) in units of one
// routed expert's GPTQ on one thread, beside an even split's.
// Shapes only: the checkpoint's weights are not read (a synthetic one from
// moec-synth --config serves). Prints one JSON object per MoE layer.
//
//   rank_split CHECKPOINT [--ranks N] [--threads T] [--targets experts,attention,shared]
//
//===----------------------------------------------------------------------===//

#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Importer/Importer.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Transforms/QuantizeWork.h"

#include "mlir/IR/MLIRContext.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>
#include <unistd.h>

using namespace moe;

int main(int argc, char **argv) {
  std::string checkpoint, targetText = "experts,attention,shared";
  int64_t ranks = 8, threads = 2;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--ranks" || arg == "--threads" || arg == "--targets") && i + 1 < argc) {
      const std::string value = argv[++i];
      if (arg == "--targets")
        targetText = value;
      else
        (arg == "--ranks" ? ranks : threads) = std::atoll(value.c_str());
    } else if (checkpoint.empty() && !arg.starts_with("--")) {
      checkpoint = arg;
    } else {
      std::cerr << "usage: rank_split CHECKPOINT [--ranks N] [--threads T] [--targets LIST]\n";
      return 2;
    }
  }
  if (checkpoint.empty() || ranks < 1 || threads < 1) {
    std::cerr << "usage: rank_split CHECKPOINT [--ranks N] [--threads T] [--targets LIST]\n";
    return 2;
  }
  std::vector<QuantizeTarget> targets;
  std::stringstream words(targetText);
  for (std::string word; std::getline(words, word, ',');) {
    if (word == "experts")
      targets.push_back(QuantizeTarget::Experts);
    else if (word == "attention")
      targets.push_back(QuantizeTarget::Attention);
    else if (word == "shared")
      targets.push_back(QuantizeTarget::Shared);
    else {
      std::cerr << "rank_split: --targets takes experts, attention and shared, got '" << word << "'\n";
      return 2;
    }
  }
  const std::string store =
      (std::filesystem::temp_directory_path() / ("rank_split." + std::to_string(getpid()) + ".moestore")).string();
  mlir::MLIRContext context;
  Expected<ImportedCheckpoint> imported = importCheckpoint(checkpoint, store, context);
  std::filesystem::remove(store);
  if (!imported) {
    std::cerr << "rank_split: " << imported.status().message() << "\n";
    return 1;
  }
  Expected<ir::ModelOp> model = findModel(*imported->module);
  if (!model) {
    std::cerr << "rank_split: " << model.status().message() << "\n";
    return 1;
  }
  int64_t layers = 0;
  model->walk([&](ir::LayerOp) { ++layers; });
  for (int64_t layer = 0; layer < layers; ++layer) {
    const QuantizeWork work = estimateQuantizeWork(*model, targets, true, layer, ranks);
    const int64_t experts = static_cast<int64_t>(work.expertCost.size());
    if (experts < ranks)
      continue; // a dense layer, or fewer experts than ranks (compress refuses those)
    const double unit = *std::max_element(work.expertCost.begin(), work.expertCost.end());
    if (unit <= 0)
      continue; // routed experts not targeted: nothing is split
    auto timeOf = [&](const std::vector<int64_t> &bounds, int64_t r) {
      double sum = work.shareCost[static_cast<size_t>(r)];
      for (int64_t e = bounds[static_cast<size_t>(r)]; e < bounds[static_cast<size_t>(r) + 1]; ++e)
        sum += work.expertCost[static_cast<size_t>(e)];
      const double longest = std::max(work.shareLongest[static_cast<size_t>(r)], work.expertLongest);
      return std::max(sum / static_cast<double>(threads), longest) / unit;
    };
    const std::vector<int64_t> bounds = splitExpertsOverRanks(work, ranks);
    std::vector<int64_t> even(static_cast<size_t>(ranks + 1));
    for (int64_t r = 0; r <= ranks; ++r)
      even[static_cast<size_t>(r)] = experts * r / ranks;
    nlohmann::json counts = nlohmann::json::array(), times = nlohmann::json::array(),
                   evenTimes = nlohmann::json::array(), shares = nlohmann::json::array();
    double slowest = 0, evenSlowest = 0;
    for (int64_t r = 0; r < ranks; ++r) {
      counts.push_back(bounds[static_cast<size_t>(r) + 1] - bounds[static_cast<size_t>(r)]);
      times.push_back(timeOf(bounds, r));
      evenTimes.push_back(timeOf(even, r));
      shares.push_back(work.shareCost[static_cast<size_t>(r)] / unit);
      slowest = std::max(slowest, timeOf(bounds, r));
      evenSlowest = std::max(evenSlowest, timeOf(even, r));
    }
    std::cout << nlohmann::json{{"layer", layer},
                                {"ranks", ranks},
                                {"threads", threads},
                                {"experts", experts},
                                {"rank_experts", counts},
                                {"share_cost_experts", shares},
                                {"rank_time_experts", times},
                                {"even_rank_time_experts", evenTimes},
                                {"slowest", slowest},
                                {"even_slowest", evenSlowest}}
                     .dump()
              << "\n";
  }
  return 0;
}
