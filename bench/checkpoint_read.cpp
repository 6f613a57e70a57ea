//===- checkpoint_read.cpp - Checkpoint read + f32 conversion bandwidth ---===//
//
// Part of moec. Reads every tensor of a checkpoint and converts it to f32
// (FP8 weights with their block scales), then compares the bandwidth with
// the machine's page-cache copy bandwidth of the same files (read() into a
// user buffer, and memcpy out of the mapping). Two conversions: whole
// tensors into full f32 arrays (Checkpoint::loadF32, which writes 2-4x the
// bytes it reads to memory), and streaming row chunks through a reused
// buffer (Checkpoint::streamF32, what a layer-streaming pass consumes).
// Prints JSON.
//
//   checkpoint_read DIR [--threads N] [--repeat R]
//   checkpoint_read --generate DIR --dtype BF16|F16|F8_E4M3 --mib N
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Checkpoint.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <iostream>
#include <random>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

using namespace moe;
using Clock = std::chrono::steady_clock;

namespace {

double secondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

/// Writes `mib` MiB of random weights as 64 MiB shards of [rows, 4096]
/// matrices (FP8 ones with 128x128 block scales).
int generate(const std::string &dir, DType dtype, int64_t mib) {
  std::filesystem::create_directories(dir);
  std::mt19937_64 rng(5);
  const int64_t cols = 4096, rows = 4096;
  const int64_t matrixBytes = rows * cols * dtypeBytes(dtype);
  int64_t matrices = std::max<int64_t>(1, mib * 1024 * 1024 / matrixBytes);
  const int64_t perShard = std::max<int64_t>(1, 64 * 1024 * 1024 / matrixBytes);
  nlohmann::json weightMap = nlohmann::json::object();
  int shards = static_cast<int>((matrices + perShard - 1) / perShard);
  for (int shard = 0; shard < shards; ++shard) {
    SafetensorsWriter writer;
    std::string file = "bench-" + std::to_string(shard) + ".safetensors";
    for (int64_t m = shard * perShard; m < std::min(matrices, (shard + 1) * perShard); ++m) {
      std::vector<uint8_t> bytes(static_cast<size_t>(matrixBytes));
      for (size_t i = 0; i < bytes.size(); i += 8) {
        uint64_t word = rng();
        // Keep exponents tame: clear the top exponent bit of each element.
        if (dtype != DType::F8E4M3)
          word &= 0xBFFFBFFFBFFFBFFFull;
        else
          word &= 0xF7F7F7F7F7F7F7F7ull;
        std::memcpy(bytes.data() + i, &word, std::min<size_t>(8, bytes.size() - i));
      }
      std::string name = "layers." + std::to_string(m) + ".weight";
      if (!writer.addTensor(name, dtype, {rows, cols}, std::move(bytes)).ok())
        return 1;
      weightMap[name] = file;
      if (dtype == DType::F8E4M3) {
        std::vector<float> scales(static_cast<size_t>((rows / 128) * (cols / 128)), 0.01f);
        std::vector<uint8_t> scaleBytes(scales.size() * 4);
        std::memcpy(scaleBytes.data(), scales.data(), scaleBytes.size());
        if (!writer.addTensor(name + "_scale_inv", DType::F32, {rows / 128, cols / 128}, std::move(scaleBytes)).ok())
          return 1;
        weightMap[name + "_scale_inv"] = file;
      }
    }
    Status status = writer.write(dir + "/" + file);
    if (!status.ok()) {
      std::cerr << status.message() << "\n";
      return 1;
    }
  }
  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", weightMap}};
  std::string text = index.dump();
  Status status = writeTextAtomically(dir + "/model.safetensors.index.json", text);
  return status.ok() ? 0 : 1;
}

/// read() of every shard into one reused 8 MiB buffer: the kernel's copy out of
/// the page cache.
double readBandwidth(const Checkpoint &checkpoint, uint64_t totalBytes) {
  std::vector<char> buffer(8 << 20);
  auto start = Clock::now();
  for (const auto &shard : checkpoint.shards()) {
    int fd = open(shard->path().c_str(), O_RDONLY);
    while (read(fd, buffer.data(), buffer.size()) > 0) {
    }
    close(fd);
  }
  return totalBytes / secondsSince(start) / 1e9;
}

/// memcpy of every tensor out of the mapping into a reused buffer.
double memcpyBandwidth(const Checkpoint &checkpoint, uint64_t totalBytes, size_t largest) {
  std::vector<uint8_t> buffer(largest);
  auto start = Clock::now();
  for (const std::string &name : checkpoint.tensorNames()) {
    std::span<const uint8_t> bytes = checkpoint.find(name)->bytes();
    std::memcpy(buffer.data(), bytes.data(), bytes.size());
  }
  return totalBytes / secondsSince(start) / 1e9;
}

} // namespace

int main(int argc, char **argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() >= 2 && args[0] == "--generate") {
    DType dtype = DType::BF16;
    int64_t mib = 1024;
    for (size_t i = 2; i + 1 < args.size(); i += 2) {
      if (args[i] == "--dtype")
        dtype = parseDType(args[i + 1]).value_or(DType::BF16);
      else if (args[i] == "--mib")
        mib = std::stoll(args[i + 1]);
    }
    return generate(args[1], dtype, mib);
  }
  if (args.empty()) {
    std::cerr << "usage: checkpoint_read DIR [--threads N] [--repeat R]\n"
                 "       checkpoint_read --generate DIR --dtype BF16|F16|F8_E4M3 --mib N\n";
    return 2;
  }
  unsigned threads = 1;
  int repeat = 3;
  for (size_t i = 1; i + 1 < args.size(); i += 2) {
    if (args[i] == "--threads")
      threads = static_cast<unsigned>(std::stoul(args[i + 1]));
    else if (args[i] == "--repeat")
      repeat = std::stoi(args[i + 1]);
  }
  auto opened = Checkpoint::open(args[0]);
  if (!opened) {
    std::cerr << "checkpoint_read: error: " << opened.status().message() << "\n";
    return 1;
  }
  const Checkpoint &checkpoint = **opened;
  std::vector<std::string> names;
  uint64_t totalBytes = 0;
  size_t largest = 0;
  std::map<std::string, uint64_t> bytesByDtype;
  for (const std::string &name : checkpoint.tensorNames()) {
    const TensorInfo &info = *checkpoint.find(name)->info;
    totalBytes += info.byteSize();
    largest = std::max<size_t>(largest, info.byteSize());
    bytesByDtype[std::string(dtypeName(info.dtype))] += info.byteSize();
    // Scale tensors are consumed with their weight.
    if (name.size() > kScaleInvSuffix.size() &&
        name.compare(name.size() - kScaleInvSuffix.size(), kScaleInvSuffix.size(), kScaleInvSuffix) == 0)
      continue;
    names.push_back(name);
  }
  readBandwidth(checkpoint, totalBytes); // warm the page cache

  double bestRead = 0, bestCopy = 0, bestConvert = 0, bestStream = 0;
  for (int r = 0; r < repeat; ++r) {
    bestRead = std::max(bestRead, readBandwidth(checkpoint, totalBytes));
    bestCopy = std::max(bestCopy, memcpyBandwidth(checkpoint, totalBytes, largest));
    // Convert: threads take whole tensors in turn, each into its own buffer.
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    auto start = Clock::now();
    std::vector<std::thread> workers;
    for (unsigned t = 0; t < threads; ++t)
      workers.emplace_back([&] {
        std::vector<float> values;
        for (size_t i = next++; i < names.size(); i = next++)
          if (!checkpoint.loadF32(names[i], values).ok())
            failed = true;
      });
    for (std::thread &worker : workers)
      worker.join();
    if (failed) {
      std::cerr << "checkpoint_read: conversion failed\n";
      return 1;
    }
    bestConvert = std::max(bestConvert, totalBytes / secondsSince(start) / 1e9);

    // Stream: each tensor in row chunks of about 256 KiB of f32 through one
    // buffer per thread, as a layer-streaming consumer reads weights.
    next = 0;
    start = Clock::now();
    workers.clear();
    for (unsigned t = 0; t < threads; ++t)
      workers.emplace_back([&] {
        for (size_t i = next++; i < names.size(); i = next++) {
          const TensorInfo &info = *checkpoint.find(names[i])->info;
          int64_t rowElements = info.shape.size() < 2 ? info.numElements() : info.numElements() / info.shape[0];
          int64_t rows = std::max<int64_t>(1, (256 << 10) / 4 / std::max<int64_t>(1, rowElements));
          Status status =
              checkpoint.streamF32(names[i], rows, [](int64_t, int64_t, const float *) { return Status::success(); });
          if (!status.ok())
            failed = true;
        }
      });
    for (std::thread &worker : workers)
      worker.join();
    if (failed) {
      std::cerr << "checkpoint_read: streaming failed\n";
      return 1;
    }
    bestStream = std::max(bestStream, totalBytes / secondsSince(start) / 1e9);
  }
  nlohmann::json out = {{"benchmark", "checkpoint_read"},
                        {"checkpoint", args[0]},
                        {"bytes", totalBytes},
                        {"tensors", checkpoint.tensorCount()},
                        {"bytes_by_dtype", bytesByDtype},
                        {"threads", threads},
                        {"repeat", repeat},
                        {"page_cache_read_gb_per_s", bestRead},
                        {"mmap_memcpy_gb_per_s", bestCopy},
                        {"convert_to_f32_gb_per_s", bestConvert},
                        {"convert_vs_page_cache_read", bestConvert / bestRead},
                        {"stream_to_f32_gb_per_s", bestStream},
                        {"stream_vs_page_cache_read", bestStream / bestRead},
                        {"note", "GB/s of checkpoint bytes; best of repeat; page cache warm"}};
  std::cout << out.dump(2) << "\n";
  return 0;
}
