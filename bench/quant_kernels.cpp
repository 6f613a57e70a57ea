//===- quant_kernels.cpp - Weight bandwidth of the decode kernels ---------===//
//
// Part of moec. For each quant format, the batch-1 GEMV over a matrix much
// larger than the caches: weight bytes streamed per second, single thread
// and with every core (rows split), against the machine's read bandwidth
// ("memory" lines, bench/Bandwidth.h: the goal's reference) and its copy
// bandwidth (memcpy of a same-sized buffer, bytes copied per second, which
// the issue 6 tables quote). Prints one JSON object per line.
//
// Where the machine reads them faster (rowTilesHelp), the GEMV also runs
// from row tiles made once (common/RowTiles.h; "layout": "tiles", the ISA
// the dispatcher picks), beside the stored rows ("layout": "rows"). With
// --tokens N, also prefill's integer GEMM (gemmRows) over N tokens, from
// the stored rows (tiles laid out per call) and from tiles made once:
// weight-token products per second, one thread and every core.
//
// Usage: quant_kernels [--rows N] [--cols N] [--repeat N] [--formats a,b]
//                      [--isas a,b]     (default: every format and ISA)
//                      [--layouts a,b]  (rows, tiles; default both)
//                      [--tokens N]     (default 0: no GEMM)
//
//===----------------------------------------------------------------------===//

#include "common/QuantFormat.h"
#include "common/RowTiles.h"
#include "cpu/QuantKernels.h"

#include "Bandwidth.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace moe::quant;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

/// Best of `repeat` runs of `body` split over `threads` row ranges.
template <typename Body> double bestSeconds(int repeat, int threads, int64_t rows, const Body &body) {
  double best = 1e30;
  for (int r = 0; r < repeat; ++r) {
    double start = now();
    std::vector<std::thread> workers;
    for (int t = 1; t < threads; ++t)
      workers.emplace_back([&, t] { body(rows * t / threads, rows * (t + 1) / threads); });
    body(0, rows / threads);
    for (std::thread &worker : workers)
      worker.join();
    best = std::min(best, now() - start);
  }
  return best;
}

} // namespace

int main(int argc, char **argv) {
  int64_t rows = 8192, cols = 8192;
  int repeat = 5;
  int64_t tokens = 0;
  std::string formats, isas, layouts;
  auto listed = [](const std::string &list, const std::string &name) {
    return list.empty() || ("," + list + ",").find("," + name + ",") != std::string::npos;
  };
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--rows")
      rows = std::stoll(argv[i + 1]);
    else if (flag == "--cols")
      cols = std::stoll(argv[i + 1]);
    else if (flag == "--repeat")
      repeat = std::stoi(argv[i + 1]);
    else if (flag == "--formats")
      formats = argv[i + 1];
    else if (flag == "--isas")
      isas = argv[i + 1];
    else if (flag == "--layouts")
      layouts = argv[i + 1];
    else if (flag == "--tokens")
      tokens = std::stoll(argv[i + 1]);
    else {
      std::cerr << "quant_kernels: unknown option " << flag << "\n";
      return 1;
    }
  }
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> matrix(static_cast<size_t>(rows * cols)), x(static_cast<size_t>(cols));
  for (float &v : matrix)
    v = normal(rng);
  for (float &v : x)
    v = normal(rng) * 50.0f;

  // Read and copy bandwidth of this machine in this run, one and all cores.
  for (int threads : {1, cores}) {
    const moe::bench::Bandwidth measured = moe::bench::memoryBandwidth(static_cast<unsigned>(threads));
    std::cout << nlohmann::json{{"kernel", "memory"},
                                {"threads", threads},
                                {"read_gb_per_s", measured.readGbPerS},
                                {"copy_gb_per_s", measured.copyGbPerS}}
                     .dump()
              << std::endl;
  }
  // Copy bandwidth: one and all cores, 1 GiB-class buffers (larger than caches).
  const size_t copyBytes = static_cast<size_t>(rows * cols) * 2;
  std::vector<uint8_t> from(copyBytes, 1), to(copyBytes, 0);
  for (int threads : {1, cores}) {
    double seconds = bestSeconds(repeat, threads, static_cast<int64_t>(copyBytes), [&](int64_t begin, int64_t end) {
      std::memcpy(to.data() + begin, from.data() + begin, static_cast<size_t>(end - begin));
    });
    std::cout << nlohmann::json{{"kernel", "memcpy"},
                                {"threads", threads},
                                {"bytes", copyBytes},
                                {"gb_per_s", static_cast<double>(copyBytes) / seconds / 1e9}}
                     .dump()
              << std::endl;
  }

  for (int bits : {2, 3, 4, 8})
    for (int group : {32, 128})
      for (bool symmetric : {true, false}) {
        QuantFormat format{bits, group, symmetric, ScaleType::F16};
        if (!listed(formats, format.name()))
          continue;
        std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
        quantizeReference(format, matrix.data(), rows, cols, packed.data());
        QuantMatrixView view{format, packed.data(), rows, cols};
        QuantizedActivation activation;
        std::vector<float> y(static_cast<size_t>(rows));
        // Row tiles, made once (as the engine does at load) and timed.
        std::vector<uint8_t> tiles;
        double packSeconds = 0;
        if (rowTilesHelp(format)) {
          tiles.resize(rowTileLayout(format, rows, cols).totalBytes);
          double start = now();
          packRowTiles(view, tiles.data());
          packSeconds = now() - start;
        }
        QuantMatrixView tiled = view;
        tiled.tiles = tiles.empty() ? nullptr : tiles.data();
        std::vector<std::pair<std::string, const QuantMatrixView *>> forms;
        if (listed(layouts, "rows"))
          forms.push_back({"rows", &view});
        if (tiled.tiles && listed(layouts, "tiles"))
          forms.push_back({"tiles", &tiled});
        std::vector<std::pair<std::string, std::string>> runs; // layout, isa
        for (const auto &form : forms)
          for (const char *isa : availableIsas())
            if (listed(isas, isa) && (form.first == "rows" || isa == std::string(kernelIsa())))
              runs.push_back({form.first, isa});
        for (const auto &[layout, isa] : runs)
          for (int threads : {1, cores}) {
            const QuantMatrixView &matrix = layout == "tiles" ? tiled : view;
            // The activation is quantized once per matmul; timed separately.
            double start = now();
            quantizeActivation(x.data(), cols, group, activation);
            double quantizeSeconds = now() - start;
            double seconds = bestSeconds(repeat, threads, rows, [&](int64_t begin, int64_t end) {
              if (layout == "tiles")
                gemvRows(matrix, activation, begin, end, y.data() + begin);
              else
                gemvRowsWithIsa(isa.c_str(), matrix, activation, begin, end, y.data() + begin);
            });
            std::cout << nlohmann::json{{"kernel", "gemv"},
                                        {"isa", isa},
                                        {"layout", layout},
                                        {"tile_pack_seconds", layout == "tiles" ? packSeconds : 0.0},
                                        {"format", format.name()},
                                        {"threads", threads},
                                        {"rows", rows},
                                        {"cols", cols},
                                        {"weight_bytes", packed.size()},
                                        {"bits_per_weight",
                                         8.0 * static_cast<double>(packed.size()) / static_cast<double>(rows * cols)},
                                        {"seconds", seconds},
                                        {"activation_quantize_seconds", quantizeSeconds},
                                        {"gb_per_s", static_cast<double>(packed.size()) / seconds / 1e9},
                                        {"weights_per_s", static_cast<double>(rows * cols) / seconds}}
                             .dump()
                      << std::endl;
          }
        if (tokens <= 0)
          continue;
        // Prefill: every token's activation quantized (untimed), then the
        // GEMM over rows split across the threads.
        std::vector<QuantizedActivation> activations(static_cast<size_t>(tokens));
        std::vector<float> xt(static_cast<size_t>(cols));
        for (QuantizedActivation &each : activations) {
          for (float &v : xt)
            v = normal(rng) * 50.0f;
          quantizeActivation(xt.data(), cols, group, each);
        }
        std::vector<float> out(static_cast<size_t>(tokens * rows));
        for (const auto &[layout, matrix] : forms)
          for (int threads : {1, cores}) {
            double seconds = bestSeconds(repeat, threads, rows, [&](int64_t begin, int64_t end) {
              gemmRows(*matrix, activations.data(), tokens, begin, end, out.data() + begin, rows);
            });
            std::cout << nlohmann::json{{"kernel", "gemm"},
                                        {"isa", kernelIsa()},
                                        {"layout", layout},
                                        {"format", format.name()},
                                        {"threads", threads},
                                        {"rows", rows},
                                        {"cols", cols},
                                        {"tokens", tokens},
                                        {"seconds", seconds},
                                        {"products_per_s", static_cast<double>(rows * cols * tokens) / seconds}}
                             .dump()
                      << std::endl;
          }
      }
  return 0;
}
