//===- SupportTest.cpp - Atomic outputs and signal handling ---------------===//
//
// Part of moec. The guarantees a CI step relies on: outputs appear whole or
// not at all, a crash ends the process promptly with a non-zero status
// (even after heap corruption), and an interrupt removes temporaries.
//
//===----------------------------------------------------------------------===//

#include "moe/Support/AtomicFile.h"
#include "moe/Support/HugePages.h"
#include "moe/Support/Signals.h"

#include "TestSupport.h"

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

using namespace moe;
using namespace moe::testing;

namespace {

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOEC_UNDER_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define MOEC_UNDER_ASAN 1
#endif

/// What a forked child printed to stderr and how it ended.
struct ChildResult {
  bool ended = false;
  int status = 0;
  std::string stderrText;
  double seconds = 0;
};

/// Runs `body` in a child process (stderr captured) and waits at most
/// `limitSeconds` for it to end; a child still running is killed.
template <typename Body> ChildResult runChild(Body body, double limitSeconds = 30) {
  int pipeEnds[2];
  EXPECT_EQ(::pipe(pipeEnds), 0);
  const auto start = std::chrono::steady_clock::now();
  pid_t child = ::fork();
  if (child == 0) {
    ::dup2(pipeEnds[1], STDERR_FILENO);
    ::close(pipeEnds[0]);
    body();
    ::_exit(0);
  }
  ::close(pipeEnds[1]);
  ChildResult result;
  while (true) {
    pid_t done = ::waitpid(child, &result.status, WNOHANG);
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (done == child) {
      result.ended = true;
      break;
    }
    if (result.seconds > limitSeconds) {
      ::kill(child, SIGKILL);
      ::waitpid(child, &result.status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  char buffer[4096];
  ssize_t n;
  while ((n = ::read(pipeEnds[0], buffer, sizeof(buffer))) > 0)
    result.stderrText.append(buffer, static_cast<size_t>(n));
  ::close(pipeEnds[0]);
  return result;
}

bool failed(const ChildResult &result) {
  return WIFSIGNALED(result.status) || (WIFEXITED(result.status) && WEXITSTATUS(result.status) != 0);
}

} // namespace

TEST(Signals, ASegfaultEndsTheProcessWithATrace) {
  ChildResult result = runChild([] {
    installSignalHandlers("moec-test");
    volatile int *nowhere = nullptr;
    *nowhere = 1;
  });
  ASSERT_TRUE(result.ended) << "the crashed process hung";
  EXPECT_TRUE(failed(result));
#ifndef MOEC_UNDER_ASAN
  EXPECT_TRUE(WIFSIGNALED(result.status) && WTERMSIG(result.status) == SIGSEGV);
  EXPECT_NE(result.stderrText.find("moec-test: fatal error: SIGSEGV"), std::string::npos) << result.stderrText;
#endif
}

TEST(Signals, HeapCorruptionEndsTheProcessInsteadOfHanging) {
  // Overwrite the malloc metadata after a block, then allocate: glibc
  // detects the corruption inside malloc and aborts. LLVM's handler then
  // called malloc again and could wait forever on the malloc lock.
  ChildResult result = runChild([] {
    installSignalHandlers("moec-test");
    std::thread([] {
      // Another thread, so glibc takes the arena lock (single-threaded
      // processes skip it).
    }).join();
    for (int round = 0; round < 64; ++round) {
      auto *block = static_cast<unsigned char *>(std::malloc(24));
      std::memset(block, 0xA5, 24 + 64); // past the block: the next chunk's header
      void *more = std::malloc(200);
      std::free(more);
      std::free(block);
    }
    std::abort(); // in case this glibc did not notice
  });
  ASSERT_TRUE(result.ended) << "the process hung after heap corruption";
  EXPECT_TRUE(failed(result));
  EXPECT_LT(result.seconds, 25.0);
}

TEST(Signals, AnInterruptRemovesTemporariesAndExitsNonZero) {
  TempDir dir;
  const std::string work = dir.file("work");
  ChildResult result = runChild([&] {
    installSignalHandlers("moec-test");
    std::filesystem::create_directories(work + "/inner");
    writeFile(work + "/inner/file", "partial");
    registerTemporaryPath(work);
    Expected<std::unique_ptr<AtomicFile>> file = AtomicFile::create(dir.file("out.bin"));
    if (!file.ok())
      ::_exit(9);
    (void)(*file)->write(std::span<const uint8_t>(reinterpret_cast<const uint8_t *>("abc"), 3));
    ::kill(::getpid(), SIGTERM);
    std::this_thread::sleep_for(std::chrono::seconds(20));
    ::_exit(0);
  });
  ASSERT_TRUE(result.ended);
  ASSERT_TRUE(WIFEXITED(result.status));
  EXPECT_EQ(WEXITSTATUS(result.status), 128 + SIGTERM);
  EXPECT_FALSE(std::filesystem::exists(work));
  int left = 0;
  for (const auto &entry : std::filesystem::directory_iterator(dir.path()))
    left += 1, ADD_FAILURE() << "left behind: " << entry.path();
  EXPECT_EQ(left, 0);
}

TEST(AtomicFile, AppearsWholeOnCommitAndNotAtAllOtherwise) {
  TempDir dir;
  const std::string path = dir.file("out.bin");
  {
    Expected<std::unique_ptr<AtomicFile>> file = AtomicFile::create(path);
    ASSERT_TRUE(file.ok());
    ASSERT_TRUE((*file)->write(std::span<const uint8_t>(reinterpret_cast<const uint8_t *>("half"), 4)).ok());
    EXPECT_FALSE(std::filesystem::exists(path));
  } // destroyed uncommitted
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));

  ASSERT_TRUE(writeFileAtomically(path, std::span<const uint8_t>(reinterpret_cast<const uint8_t *>("first"), 5)).ok());
  // Two writers of one path at once use different temporaries; the last
  // rename wins and the file is always one writer's whole output.
  Expected<std::unique_ptr<AtomicFile>> a = AtomicFile::create(path), b = AtomicFile::create(path);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE((*a)->write(std::span<const uint8_t>(reinterpret_cast<const uint8_t *>("AAAAAAAA"), 8)).ok());
  ASSERT_TRUE((*b)->write(std::span<const uint8_t>(reinterpret_cast<const uint8_t *>("BB"), 2)).ok());
  EXPECT_EQ(readFile(path), "first");
  ASSERT_TRUE((*b)->commit().ok());
  ASSERT_TRUE((*a)->commit().ok());
  EXPECT_EQ(readFile(path), "AAAAAAAA");
  int entries = 0;
  for ([[maybe_unused]] const auto &entry : std::filesystem::directory_iterator(dir.path()))
    ++entries;
  EXPECT_EQ(entries, 1);

  std::filesystem::create_directories(dir.file("adir"));
  expectErrorContains(writeFileAtomically(dir.file("adir"), {}), {"adir", "is a directory"});
}

TEST(AtomicDirectory, ReplacesAnEarlierOutputInOneStep) {
  TempDir dir;
  const std::string out = dir.file("export");
  for (const char *content : {"one", "two"}) {
    Expected<std::unique_ptr<AtomicDirectory>> staged = AtomicDirectory::create(out);
    ASSERT_TRUE(staged.ok());
    writeFile((*staged)->temporary() + "/config.json", content);
    if (std::string(content) == "two")
      EXPECT_EQ(readFile(out + "/config.json"), "one") << "the old output stays until commit";
    ASSERT_TRUE((*staged)->commit().ok());
    EXPECT_EQ(readFile(out + "/config.json"), content);
  }
  {
    Expected<std::unique_ptr<AtomicDirectory>> abandoned = AtomicDirectory::create(out);
    ASSERT_TRUE(abandoned.ok());
    writeFile((*abandoned)->temporary() + "/config.json", "three");
  }
  EXPECT_EQ(readFile(out + "/config.json"), "two");
  int entries = 0;
  for ([[maybe_unused]] const auto &entry : std::filesystem::directory_iterator(dir.path()))
    ++entries;
  EXPECT_EQ(entries, 1) << "no temporary directory is left";
  writeFile(dir.file("plain"), "x");
  expectErrorContains(AtomicDirectory::create(dir.file("plain")).status(), {"plain", "not a directory"});
}

namespace {

/// The VmFlags of the mapping of this process that holds `address`
/// (/proc/self/smaps), or "" when none does.
std::string mappingFlags(const void *address) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(address);
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    uintptr_t begin = 0, end = 0;
    char dash = 0;
    std::istringstream range(line);
    if (range >> std::hex >> begin >> dash >> end && dash == '-' && line.find(':') > line.find(' ')) {
      inside = at >= begin && at < end;
      continue;
    }
    if (inside && line.rfind("VmFlags:", 0) == 0)
      return line;
  }
  return "";
}

} // namespace

// Large fresh buffers get huge-page advice before their first write, and
// keep std::vector's meaning: resize keeps the elements and zeroes the
// new ones, assign fills; small ones are plain vectors.
TEST(HugePages, LargeBuffersKeepVectorMeaningAndAreAdvised) {
  std::vector<float> values = {1.0f, 2.0f, 3.0f};
  const size_t count = (size_t{16} << 20) / sizeof(float);
  resizeLarge(values, count);
  ASSERT_EQ(values.size(), count);
  EXPECT_EQ(values[0], 1.0f);
  EXPECT_EQ(values[2], 3.0f);
  EXPECT_EQ(values[3], 0.0f);
  EXPECT_EQ(values[count - 1], 0.0f);
  std::vector<double> filled;
  assignLarge(filled, count, 0.5);
  ASSERT_EQ(filled.size(), count);
  EXPECT_EQ(filled.front(), 0.5);
  EXPECT_EQ(filled.back(), 0.5);
  assignLarge(filled, 3, 2.0); // shrinking: std::vector's assign
  EXPECT_EQ(filled, std::vector<double>(3, 2.0));
  std::vector<int> small;
  resizeLarge(small, 10);
  EXPECT_EQ(small, std::vector<int>(10, 0));
  std::vector<uint8_t> copiedSmall;
  const uint8_t three[] = {1, 2, 3};
  copyLarge(copiedSmall, three, 3);
  EXPECT_EQ(copiedSmall, std::vector<uint8_t>({1, 2, 3}));
  // An element of the vector itself as the fill: read before the storage goes.
  std::vector<double> self = {4.0};
  assignLarge(self, count, self[0]);
  EXPECT_EQ(self.back(), 4.0);

  // Where the kernel has transparent huge pages, the large buffer's whole
  // 2 MiB pages carry the advice (smaps' "hg" flag).
  std::ifstream modes("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string mode;
  std::getline(modes, mode);
  if (mode.empty() || mode.find("[never]") != std::string::npos)
    GTEST_SKIP() << "no transparent huge pages here (" << mode << ")";
  const uintptr_t page = uintptr_t{2} << 20;
  auto expectAdvised = [&](const void *data, const char *how) {
    const void *inside = reinterpret_cast<const void *>((reinterpret_cast<uintptr_t>(data) + page - 1) & ~(page - 1));
    const std::string flags = mappingFlags(inside);
    ASSERT_FALSE(flags.empty()) << how << ": no mapping holds the buffer";
    EXPECT_NE((flags + " ").find(" hg "), std::string::npos) << how << ": " << flags;
  };
  std::vector<double> assigned;
  assignLarge(assigned, count, 1.0);
  expectAdvised(assigned.data(), "assignLarge");
  std::vector<float> resized;
  resizeLarge(resized, count);
  expectAdvised(resized.data(), "resizeLarge");
  std::vector<double> copied;
  copyLarge(copied, assigned.data(), assigned.size());
  EXPECT_EQ(copied, assigned);
  expectAdvised(copied.data(), "copyLarge");
}
