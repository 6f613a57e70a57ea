//===- TestSupport.h - Helpers shared by the unit tests ---------*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_TESTS_UNIT_TESTSUPPORT_H
#define MOE_TESTS_UNIT_TESTSUPPORT_H

#include <gtest/gtest.h>

#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace moe::testing {

/// A fresh directory removed when the test ends.
class TempDir {
public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "moec-test-XXXXXX").string();
    path_ = mkdtemp(pattern.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string &path() const { return path_; }
  std::string file(const std::string &name) const { return path_ + "/" + name; }

private:
  std::string path_;
};

/// Directory of committed test data (tests/data).
inline std::string dataDir() { return MOEC_TEST_DATA_DIR; }

inline void writeFile(const std::string &path, const std::string &bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

inline std::string readFile(const std::string &path) {
  std::ifstream stream(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(stream), {});
}

/// A GoogleTest parameter name from a description: non-alphanumerics -> '_'.
inline std::string testNameFrom(const std::string &description) {
  std::string name;
  for (char ch : description)
    name += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
  return name;
}

/// A safetensors file from raw header text and a data buffer of `dataBytes`.
inline std::string rawSafetensors(const std::string &header, size_t dataBytes, uint64_t declaredLength = UINT64_MAX) {
  uint64_t length = declaredLength == UINT64_MAX ? header.size() : declaredLength;
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i)
    bytes[i] = static_cast<char>((length >> (8 * i)) & 0xFF);
  return bytes + header + std::string(dataBytes, '\x01');
}

/// Expects `status` (a Status or the status() of an Expected) to have failed
/// with a message containing every one of `fragments`.
template <typename S> void expectErrorContains(const S &status, std::initializer_list<std::string> fragments) {
  ASSERT_FALSE(status.ok()) << "expected an error";
  for (const std::string &fragment : fragments)
    EXPECT_NE(status.message().find(fragment), std::string::npos)
        << "message: " << status.message() << "\nmissing: " << fragment;
}

} // namespace moe::testing

#endif // MOE_TESTS_UNIT_TESTSUPPORT_H
