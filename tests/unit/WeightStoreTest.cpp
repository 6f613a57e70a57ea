//===- WeightStoreTest.cpp - Append-only, crash-safe tensor store ---------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/WeightStore.h"

#include "TestSupport.h"

#include <cstring>
#include <filesystem>

using namespace moe;
using namespace moe::testing;

namespace {

std::vector<uint8_t> floats(std::initializer_list<float> values) {
  std::vector<uint8_t> bytes(values.size() * 4);
  std::memcpy(bytes.data(), values.begin(), bytes.size());
  return bytes;
}

} // namespace

TEST(WeightStore, AppendsReopensAndReplacesByKey) {
  TempDir dir;
  std::string path = dir.file("model.moestore");
  {
    auto store = WeightStore::open(path, true);
    ASSERT_TRUE(store.ok()) << store.status().message();
    ASSERT_TRUE((*store)->append("router", DType::F32, {2, 2}, floats({1, 2, 3, 4})).ok());
    ASSERT_TRUE((*store)->append("bias", DType::F32, {1}, floats({9})).ok());
    ASSERT_TRUE((*store)->append("router", DType::F32, {1, 2}, floats({5, 6})).ok());
  }
  auto store = WeightStore::open(path, false);
  ASSERT_TRUE(store.ok()) << store.status().message();
  EXPECT_EQ((*store)->keys(), (std::vector<std::string>{"bias", "router"}));
  std::vector<float> values;
  ASSERT_TRUE((*store)->loadF32("router", values).ok());
  EXPECT_EQ(values, (std::vector<float>{5, 6})) << "the newest record wins";
  EXPECT_EQ((*store)->find("router")->shape, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ((*store)->find("router")->dataOffset % 64, 0u) << "data is 64-byte aligned";
  EXPECT_EQ((*store)->ignoredTailBytes(), 0u);
  expectErrorContains((*store)->loadF32("nope", values), {"model.moestore", "'nope' not in the weight store"});
  expectErrorContains((*store)->append("bad", DType::F32, {3}, floats({1})), {"'bad'", "needs 12"});
}

TEST(WeightStore, AWriterKilledMidRecordLeavesEarlierContentReadable) {
  TempDir dir;
  std::string path = dir.file("model.moestore");
  {
    auto store = WeightStore::open(path, true);
    ASSERT_TRUE((*store)->append("first", DType::F32, {2}, floats({1, 2})).ok());
    ASSERT_TRUE((*store)->append("second", DType::F32, {3}, floats({3, 4, 5})).ok());
  }
  // Simulate a crash in the middle of writing the second record.
  uint64_t full = std::filesystem::file_size(path);
  std::filesystem::resize_file(path, full - 7);
  {
    auto store = WeightStore::open(path, false);
    ASSERT_TRUE(store.ok());
    EXPECT_EQ((*store)->keys(), (std::vector<std::string>{"first"}));
    EXPECT_GT((*store)->ignoredTailBytes(), 0u);
    // The next writer cuts the torn tail and appends cleanly.
    ASSERT_TRUE((*store)->append("third", DType::F32, {1}, floats({7})).ok());
  }
  auto store = WeightStore::open(path, false);
  ASSERT_TRUE(store.ok());
  EXPECT_EQ((*store)->keys(), (std::vector<std::string>{"first", "third"}));
  EXPECT_EQ((*store)->ignoredTailBytes(), 0u);
  std::vector<float> values;
  ASSERT_TRUE((*store)->loadF32("third", values).ok());
  EXPECT_EQ(values, (std::vector<float>{7}));
}

TEST(WeightStore, CorruptRecordsAndForeignFilesAreDetected) {
  TempDir dir;
  std::string path = dir.file("model.moestore");
  {
    auto store = WeightStore::open(path, true);
    ASSERT_TRUE((*store)->append("a", DType::F32, {2}, floats({1, 2})).ok());
    ASSERT_TRUE((*store)->append("b", DType::F32, {2}, floats({3, 4})).ok());
  }
  // Flip one data byte of the last record: its checksum no longer matches.
  std::string bytes = readFile(path);
  bytes[bytes.size() - 9] ^= 0x40;
  writeFile(path, bytes);
  auto store = WeightStore::open(path, false);
  ASSERT_TRUE(store.ok());
  EXPECT_EQ((*store)->keys(), (std::vector<std::string>{"a"}));

  writeFile(dir.file("other.bin"), "not a store at all");
  expectErrorContains(WeightStore::open(dir.file("other.bin"), false).status(), {"other.bin", "bad magic"});
  expectErrorContains(WeightStore::open(dir.file("absent.moestore"), false).status(),
                      {"absent.moestore", "cannot open"});
}
