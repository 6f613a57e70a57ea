//===- SafetensorsTest.cpp - Reader validation and writer round trips -----===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Safetensors.h"

#include "TestSupport.h"

#include <cstring>
#include <random>

using namespace moe;
using namespace moe::testing;

namespace {

Expected<SafetensorsHeader> parse(const std::string &bytes) {
  return parseSafetensorsHeader(reinterpret_cast<const uint8_t *>(bytes.data()), bytes.size(), "bad.safetensors");
}

std::vector<uint8_t> randomBytes(size_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> bytes(count);
  for (uint8_t &byte : bytes)
    byte = static_cast<uint8_t>(rng());
  return bytes;
}

} // namespace

TEST(SafetensorsWriter, RoundTripsEveryDtypeBitExactly) {
  TempDir dir;
  SafetensorsWriter writer;
  struct Case {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  std::vector<Case> cases = {
      {"a.f32", DType::F32, {3, 5}},      {"b.f16", DType::F16, {7}},      {"c.bf16", DType::BF16, {2, 3, 3}},
      {"d.fp8", DType::F8E4M3, {129, 3}}, {"e.fp8e5", DType::F8E5M2, {5}}, {"f.i8", DType::I8, {11}},
      {"g.u8", DType::U8, {1}},           {"h.i16", DType::I16, {4, 1}},   {"i.i32", DType::I32, {9}},
      {"j.i64", DType::I64, {2}},         {"k.bool", DType::Bool, {6}},    {"l.scalar", DType::F32, {}},
      {"m.empty", DType::BF16, {0, 4}},
  };
  std::map<std::string, std::vector<uint8_t>> expected;
  uint64_t seed = 1;
  for (const Case &c : cases) {
    std::vector<uint8_t> bytes = randomBytes(static_cast<size_t>(numElements(c.shape)) * dtypeBytes(c.dtype), seed++);
    expected[c.name] = bytes;
    ASSERT_TRUE(writer.addTensor(c.name, c.dtype, c.shape, bytes).ok());
  }
  writer.setMetadata("format", "pt");
  std::string path = dir.file("round.safetensors");
  ASSERT_TRUE(writer.write(path).ok());

  auto file = SafetensorsFile::open(path);
  ASSERT_TRUE(file.ok()) << file.status().message();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  ASSERT_EQ((*file)->tensors().size(), cases.size());
  for (const Case &c : cases) {
    const TensorInfo *info = (*file)->find(c.name);
    ASSERT_NE(info, nullptr) << c.name;
    EXPECT_EQ(info->dtype, c.dtype);
    EXPECT_EQ(info->shape, c.shape);
    std::span<const uint8_t> data = (*file)->data(*info);
    EXPECT_EQ(std::vector<uint8_t>(data.begin(), data.end()), expected[c.name]) << c.name;
    // Natural alignment of every tensor in the file.
    uintptr_t address = reinterpret_cast<uintptr_t>(data.data());
    EXPECT_EQ(address % dtypeBytes(c.dtype), 0u) << c.name;
  }
}

TEST(SafetensorsWriter, OutputIsDeterministicWhateverTheInsertionOrder) {
  auto build = [](bool reversed) {
    SafetensorsWriter writer;
    std::vector<std::string> names = {"z", "a", "m.weight", "b.bias"};
    if (reversed)
      std::reverse(names.begin(), names.end());
    for (const std::string &name : names) {
      DType dtype = name.size() % 2 ? DType::BF16 : DType::F32;
      size_t bytes = 6 * dtypeBytes(dtype);
      EXPECT_TRUE(writer.addTensor(name, dtype, {2, 3}, randomBytes(bytes, name.size())).ok());
    }
    writer.setMetadata("b", "2");
    writer.setMetadata("a", "1");
    return writer.serialize();
  };
  std::vector<uint8_t> first = build(false);
  EXPECT_EQ(first, build(true));
  uint64_t headerLength = 0;
  std::memcpy(&headerLength, first.data(), 8);
  EXPECT_EQ((8 + headerLength) % 64, 0u) << "data buffer starts 64-byte aligned";
}

TEST(SafetensorsWriter, RejectsInconsistentTensors) {
  SafetensorsWriter writer;
  expectErrorContains(writer.addTensor("w", DType::F32, {2, 2}, std::vector<uint8_t>(15)),
                      {"'w'", "15 bytes", "needs 16"});
  ASSERT_TRUE(writer.addTensor("w", DType::F32, {1}, std::vector<uint8_t>(4)).ok());
  expectErrorContains(writer.addTensor("w", DType::F32, {1}, std::vector<uint8_t>(4)), {"'w' added twice"});
  expectErrorContains(writer.addTensor("__metadata__", DType::F32, {1}, std::vector<uint8_t>(4)),
                      {"invalid tensor name"});
}

TEST(SafetensorsWriter, FailedWriteLeavesNoFile) {
  TempDir dir;
  SafetensorsWriter writer;
  ASSERT_TRUE(writer.addTensor("w", DType::F32, {1}, std::vector<uint8_t>(4)).ok());
  std::string path = dir.file("missing-dir/out.safetensors");
  expectErrorContains(writer.write(path), {path, "cannot create"});
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(SafetensorsReader, AcceptsMinimalValidFiles) {
  auto header = parse(rawSafetensors("{}", 0));
  ASSERT_TRUE(header.ok()) << header.status().message();
  EXPECT_TRUE(header->tensors.empty());
  // Trailing spaces pad the header; zero-sized tensors may share an offset.
  header =
      parse(rawSafetensors(R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
                           R"("b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}    )",
                           2));
  ASSERT_TRUE(header.ok()) << header.status().message();
  EXPECT_EQ(header->tensors.size(), 2u);
  EXPECT_EQ(header->metadata.at("format"), "pt");
}

struct BadHeaderCase {
  std::string description;
  std::string file;
  std::vector<std::string> fragments;
};

void PrintTo(const BadHeaderCase &c, std::ostream *os) { *os << c.description; }

class SafetensorsBadInput : public ::testing::TestWithParam<BadHeaderCase> {};

TEST_P(SafetensorsBadInput, NamesTheFileTheTensorAndWhatWasExpected) {
  const BadHeaderCase &c = GetParam();
  auto header = parse(c.file);
  ASSERT_FALSE(header.ok()) << c.description;
  EXPECT_NE(header.status().message().find("bad.safetensors"), std::string::npos) << header.status().message();
  for (const std::string &fragment : c.fragments)
    EXPECT_NE(header.status().message().find(fragment), std::string::npos)
        << c.description << ": " << header.status().message() << "\nmissing: " << fragment;
}

static const std::string okTensor = R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

INSTANTIATE_TEST_SUITE_P(
    Cases, SafetensorsBadInput,
    ::testing::Values(
        BadHeaderCase{"truncated before the length", std::string("\x10\x00\x00", 3), {"too short", "truncated"}},
        BadHeaderCase{"header length beyond the file",
                      rawSafetensors("{" + okTensor + "}", 8, 4096),
                      {"header length 4096", "beyond the end of the file"}},
        BadHeaderCase{"header length over the limit", rawSafetensors("{}", 0, 200'000'000), {"exceeds the limit"}},
        BadHeaderCase{"header not JSON", rawSafetensors("{not json", 0), {"not valid", "JSON"}},
        BadHeaderCase{"header a JSON array", rawSafetensors("[1,2]", 0), {"'{'"}},
        BadHeaderCase{"header JSON but not an object", rawSafetensors("{} 5", 0), {"JSON"}},
        BadHeaderCase{"unknown dtype",
                      rawSafetensors(R"({"w":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", 8),
                      {"tensor 'w'", "unknown or unsupported dtype 'F17'", "supported: BOOL"}},
        BadHeaderCase{"size not matching the shape",
                      rawSafetensors(R"({"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}})", 8),
                      {"tensor 'w'", "span 8 bytes", "[3] of BF16 needs 6 bytes"}},
        BadHeaderCase{"overlapping offsets",
                      rawSafetensors(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                                     R"("b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
                                     6),
                      {"tensor 'b'", "overlap tensor 'a'"}},
        BadHeaderCase{"hole between tensors",
                      rawSafetensors(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                                     R"("b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})",
                                     6),
                      {"hole", "bytes [2, 4)", "tensor 'b'"}},
        BadHeaderCase{"offsets beyond the buffer (truncated data)",
                      rawSafetensors("{" + okTensor + "}", 5),
                      {"tensor 'w'", "beyond the data buffer of 5 bytes", "truncated"}},
        BadHeaderCase{
            "trailing bytes after the last tensor", rawSafetensors("{" + okTensor + "}", 12), {"trailing bytes"}},
        BadHeaderCase{"end before begin",
                      rawSafetensors(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}})", 4),
                      {"tensor 'w'", "end before they begin"}},
        BadHeaderCase{"negative shape",
                      rawSafetensors(R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})", 0),
                      {"tensor 'w'", "non-negative"}},
        BadHeaderCase{"missing dtype",
                      rawSafetensors(R"({"w":{"shape":[1],"data_offsets":[0,1]}})", 1),
                      {"tensor 'w'", "'dtype'"}},
        BadHeaderCase{"offsets not a pair",
                      rawSafetensors(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", 1),
                      {"tensor 'w'", "data_offsets"}},
        BadHeaderCase{
            "duplicate tensor names", rawSafetensors("{" + okTensor + "," + okTensor + "}", 8), {"duplicate key 'w'"}},
        BadHeaderCase{"metadata with a non-string value",
                      rawSafetensors(R"({"__metadata__":{"format":1}})", 0),
                      {"__metadata__", "'format'", "string"}},
        BadHeaderCase{"overflowing element count",
                      rawSafetensors(
                          R"({"w":{"dtype":"F64","shape":[281474976710655,281474976710655],"data_offsets":[0,8]}})", 8),
                      {"tensor 'w'", "too many elements"}},
        BadHeaderCase{"invalid UTF-8 in a name",
                      rawSafetensors("{\"w\xff\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1),
                      {"not valid UTF-8 JSON"}}),
    [](const ::testing::TestParamInfo<BadHeaderCase> &info) { return testNameFrom(info.param.description); });

TEST(SafetensorsReader, OpenNamesMissingAndTruncatedFiles) {
  TempDir dir;
  std::string missing = dir.file("nope.safetensors");
  expectErrorContains(SafetensorsFile::open(missing).status(), {missing, "cannot open"});

  // A valid file cut short: the header promises more data than is there.
  SafetensorsWriter writer;
  ASSERT_TRUE(writer.addTensor("layer.weight", DType::F32, {64}, std::vector<uint8_t>(256)).ok());
  std::vector<uint8_t> bytes = writer.serialize();
  std::string path = dir.file("cut.safetensors");
  writeFile(path, std::string(bytes.begin(), bytes.end() - 100));
  expectErrorContains(SafetensorsFile::open(path).status(),
                      {path, "'layer.weight'", "beyond the data buffer", "truncated"});

  std::string empty = dir.file("empty.safetensors");
  writeFile(empty, "");
  expectErrorContains(SafetensorsFile::open(empty).status(), {empty, "too short"});
  expectErrorContains(SafetensorsFile::open(dir.path()).status(), {dir.path(), "not a regular file"});
}
