//===- GgufTest.cpp - The GGUF container: round trip and hostile files ----===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Gguf.h"

#include "TestSupport.h"

#include <cstring>

using namespace moe;
using namespace moe::testing;
using quant::GgmlType;

namespace {

/// A small file with every value kind and three tensors of different types.
std::string writeSample(const TempDir &dir) {
  GgufWriter writer;
  writer.set("general.architecture", GgufValue::string("llama"));
  writer.set("llama.block_count", GgufValue::u32(4));
  writer.set("llama.rope.freq_base", GgufValue::f32(10000.0f));
  writer.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(false));
  writer.set("tokenizer.ggml.tokens", GgufValue::stringArray({"<s>", "a", "b c", ""}));
  writer.set("tokenizer.ggml.token_type", GgufValue::i32Array({3, 1, 1, -1}));
  writer.set("general.size", GgufValue::u64(uint64_t(1) << 40));
  EXPECT_TRUE(writer.addTensor("a", {4, 3}, GgmlType::F32).ok());
  EXPECT_TRUE(writer.addTensor("b", {32, 2}, GgmlType::Q8_0).ok());
  EXPECT_TRUE(writer.addTensor("c", {256, 1, 2}, GgmlType::Q4_K).ok());
  const std::string path = dir.file("x.gguf");
  Status status = writer.write(path, [&](size_t index, std::vector<uint8_t> &bytes) {
    bytes.resize(writer.tensors()[index].bytes);
    for (size_t i = 0; i < bytes.size(); ++i)
      bytes[i] = static_cast<uint8_t>(index * 31 + i);
    return Status::success();
  });
  EXPECT_TRUE(status.ok()) << status.message();
  return path;
}

} // namespace

TEST(Gguf, WrittenFileReadsBackKeyForKeyAndByteForByte) {
  TempDir dir;
  const std::string path = writeSample(dir);
  auto file = GgufFile::open(path);
  ASSERT_TRUE(file.ok()) << file.status().message();
  EXPECT_EQ((*file)->version(), 3u);
  ASSERT_EQ((*file)->keys().size(), 7u);
  EXPECT_EQ((*file)->keys()[0].first, "general.architecture");
  EXPECT_EQ((*file)->find("general.architecture")->text, "llama");
  EXPECT_EQ((*file)->find("llama.block_count")->integer, 4);
  EXPECT_EQ((*file)->find("llama.rope.freq_base")->real, 10000.0);
  EXPECT_EQ((*file)->find("tokenizer.ggml.add_bos_token")->integer, 0);
  EXPECT_EQ((*file)->find("tokenizer.ggml.tokens")->strings, (std::vector<std::string>{"<s>", "a", "b c", ""}));
  EXPECT_EQ((*file)->find("tokenizer.ggml.token_type")->integers, (std::vector<int64_t>{3, 1, 1, -1}));
  EXPECT_EQ((*file)->find("general.size")->integer, int64_t(1) << 40);
  ASSERT_EQ((*file)->tensors().size(), 3u);
  const GgufTensorInfo *c = (*file)->tensor("c");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->ne, (std::vector<int64_t>{256, 1, 2}));
  EXPECT_EQ(c->type, GgmlType::Q4_K);
  EXPECT_EQ(c->bytes, 2u * 144u);
  EXPECT_EQ(c->offset % 32, 0u);
  for (size_t t = 0; t < 3; ++t) {
    const GgufTensorInfo &info = (*file)->tensors()[t];
    const uint8_t *bytes = (*file)->data(info);
    for (size_t i = 0; i < info.bytes; ++i)
      ASSERT_EQ(bytes[i], static_cast<uint8_t>(t * 31 + i)) << info.name;
  }
}

TEST(Gguf, WriterRefusesRowsThatAreNotWholeBlocksAndWrongSizes) {
  GgufWriter writer;
  Status status = writer.addTensor("x", {160, 4}, GgmlType::Q4_K);
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message().find("not whole Q4_K blocks of 256"), std::string::npos) << status.message();
  EXPECT_FALSE(writer.addTensor("y", {0}, GgmlType::F32).ok());
  ASSERT_TRUE(writer.addTensor("z", {32}, GgmlType::Q4_0).ok());
  EXPECT_FALSE(writer.addTensor("z", {32}, GgmlType::Q4_0).ok());
  TempDir dir;
  status = writer.write(dir.file("w.gguf"), [](size_t, std::vector<uint8_t> &bytes) {
    bytes.resize(17);
    return Status::success();
  });
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message().find("has 17 bytes, its type and shape need 18"), std::string::npos) << status.message();
  EXPECT_FALSE(std::filesystem::exists(dir.file("w.gguf"))) << "no half-written file";
}

// Every truncation is an error (never a crash or a read past the end), and
// damaged headers name what is wrong.
TEST(Gguf, HostileFilesAreRefusedWithTheField) {
  TempDir dir;
  const std::string good = readFile(writeSample(dir));
  for (size_t cut = 0; cut < good.size(); cut += (cut < 600 ? 1 : 97)) {
    writeFile(dir.file("cut.gguf"), good.substr(0, cut));
    auto file = GgufFile::open(dir.file("cut.gguf"));
    EXPECT_FALSE(file.ok()) << "cut at " << cut;
  }
  auto expectError = [&](std::string bytes, const std::string &fragment) {
    writeFile(dir.file("bad.gguf"), bytes);
    auto file = GgufFile::open(dir.file("bad.gguf"));
    ASSERT_FALSE(file.ok()) << fragment;
    EXPECT_NE(file.status().message().find(fragment), std::string::npos) << file.status().message();
    EXPECT_NE(file.status().message().find("bad.gguf"), std::string::npos) << file.status().message();
  };
  std::string bytes = good;
  bytes[0] = 'X';
  expectError(bytes, "not a GGUF file");
  bytes = good;
  bytes[4] = 9;
  expectError(bytes, "GGUF version 9");
  bytes = good;
  bytes[8 + 7] = 0x7f; // tensor count ~2^63
  expectError(bytes, "tensors and");
  // The key count says more keys than there are.
  bytes = good;
  bytes[16] = 100;
  expectError(bytes, "");
  // The string array's length is absurd.
  bytes = good;
  const size_t tokens = bytes.find("tokenizer.ggml.tokens") + std::strlen("tokenizer.ggml.tokens") + 4 + 4;
  std::memset(&bytes[tokens], 0xff, 7);
  expectError(bytes, "does not fit in the file");
  // A tensor of an unknown type.
  bytes = good;
  const size_t name = bytes.rfind(std::string("\x01\x00\x00\x00\x00\x00\x00\x00"
                                              "c",
                                              9));
  ASSERT_NE(name, std::string::npos);
  const size_t type = name + 9 + 4 + 3 * 8;
  bytes[type] = 99;
  expectError(bytes, "ggml type 99 is not one moec reads");
}
