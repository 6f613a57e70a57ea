//===- WeightStoreTest.cpp - Append-only, crash-safe tensor store ---------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/WeightStore.h"

#include "TestSupport.h"

#include <cstring>
#include <filesystem>
#include <sys/wait.h>
#include <unistd.h>

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
  // Flip one data byte of the first record: it fails its checksum. That is
  // damage, not a torn tail: reported with the record and its offset, and
  // neither dropped nor overwritten by the next writer.
  std::string bytes = readFile(path);
  const size_t firstData = 8 + 64; // magic, then the first record's data at the next 64-byte boundary
  bytes[firstData] ^= 0x40;
  writeFile(path, bytes);
  expectErrorContains(WeightStore::open(path, false).status(),
                      {"model.moestore", "record 0 at offset 8 fails its checksum", "damaged"});
  expectErrorContains(WeightStore::open(path, true).status(), {"record 0 at offset 8"});
  EXPECT_EQ(readFile(path), bytes);

  // The last record damaged the same way is damage too (it is complete).
  bytes[firstData] ^= 0x40;
  bytes[bytes.size() - 9] ^= 0x40;
  writeFile(path, bytes);
  expectErrorContains(WeightStore::open(path, false).status(), {"record 1 at offset", "fails its checksum"});

  // A flipped length byte that makes a record reach past the end, with a
  // valid record after it, is damage, not a torn tail to cut.
  bytes[bytes.size() - 9] ^= 0x40;
  bytes[12] = 0x7f; // the first record's header length
  writeFile(path, bytes);
  {
    auto opened = WeightStore::open(path, false);
    ASSERT_FALSE(opened.ok());
    expectErrorContains(opened.status(), {"record 0 at offset 8"});
  }
  EXPECT_EQ(readFile(path), bytes);

  writeFile(dir.file("other.bin"), "not a store at all");
  expectErrorContains(WeightStore::open(dir.file("other.bin"), false).status(), {"other.bin", "bad magic"});
  expectErrorContains(WeightStore::open(dir.file("absent.moestore"), false).status(),
                      {"absent.moestore", "cannot open"});
}

TEST(WeightStore, ConcurrentWritersNeverLoseOrShareRecords) {
  TempDir dir;
  std::string path = dir.file("model.moestore");
  // Both writers open the store before either appends (what two `moec opt`
  // runs on one module do), then put different contents under the same
  // names, many times: every record survives, and each writer's key reads
  // back its own bytes.
  constexpr int kWriters = 4, kRecords = 25;
  ASSERT_TRUE(WeightStore::open(path, true).ok());
  std::vector<pid_t> children;
  for (int writer = 0; writer < kWriters; ++writer) {
    pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      auto store = WeightStore::open(path, true);
      if (!store.ok())
        _exit(10);
      usleep(20000); // let every writer open before any appends
      for (int i = 0; i < kRecords; ++i) {
        const float value = static_cast<float>(writer * 1000 + i);
        Expected<std::string> key = (*store)->put(concat("t", i % 5), DType::F32, {2}, floats({value, value}));
        if (!key.ok())
          _exit(11);
        auto check = WeightStore::open(path, false);
        std::vector<float> back;
        if (!check.ok() || !(*check)->loadF32(*key, back).ok() || back != std::vector<float>{value, value})
          _exit(12);
      }
      _exit(0);
    }
    children.push_back(child);
  }
  for (pid_t child : children) {
    int status = 0;
    ASSERT_EQ(waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0);
  }
  auto store = WeightStore::open(path, false);
  ASSERT_TRUE(store.ok()) << store.status().message();
  EXPECT_EQ((*store)->keys().size(), static_cast<size_t>(kWriters * kRecords));
  EXPECT_EQ((*store)->ignoredTailBytes(), 0u);
}

TEST(WeightStore, PutReusesIdenticalContentsAndVersionsOthers) {
  TempDir dir;
  auto store = WeightStore::open(dir.file("s.moestore"), true);
  ASSERT_TRUE(store.ok());
  EXPECT_EQ(*(*store)->put("w", DType::F32, {1}, floats({1})), "w");
  EXPECT_EQ(*(*store)->put("w", DType::F32, {1}, floats({1})), "w");
  EXPECT_EQ(*(*store)->put("w", DType::F32, {1}, floats({2})), "w.v2");
  EXPECT_EQ(*(*store)->put("w", DType::F32, {2}, floats({2, 3})), "w.v3");
  EXPECT_EQ(*(*store)->put("w", DType::F32, {1}, floats({2})), "w.v2");
}
