//===- Progress.h - Progress lines with rate and ETA on stderr --*- C++ -*-===//
//
// Part of moec. Every step that can take longer than a second (evaluation
// and calibration windows, passes, GPTQ layers, emit) reports through a
// Progress: "label  37/120 layers  2.4 layers/s  ETA 35 s" on standard
// error. On a terminal the line is redrawn in place at most ten times a
// second; otherwise (with --progress) a line is printed every few seconds.
// Nothing is printed for a step that ends within its first second, and
// nothing at all under --quiet or when stderr is not a terminal unless
// --progress asked for it.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_PROGRESS_H
#define MOE_SUPPORT_PROGRESS_H

#include <chrono>
#include <cstdint>
#include <string>

namespace moe {

enum class ProgressMode { Auto, Always, Never };

/// Process-wide: Auto (a terminal on stderr), Always (--progress) or
/// Never (--quiet).
void setProgressMode(ProgressMode mode);
ProgressMode progressMode();
/// Whether progress lines are shown at all under the current mode.
bool progressEnabled();

class Progress {
public:
  /// `total` 0: unknown (no ETA). `unit` names what is counted ("windows").
  Progress(std::string label, int64_t total, std::string unit);
  ~Progress();
  Progress(const Progress &) = delete;
  Progress &operator=(const Progress &) = delete;

  void advance(int64_t count = 1) { update(done + count); }
  void update(int64_t done);
  /// Ends the line (called by the destructor).
  void finish();

private:
  void draw(bool final);

  std::string label, unit;
  int64_t total = 0, done = 0;
  std::chrono::steady_clock::time_point start, lastDraw;
  bool enabled = false, terminal = false, drawn = false, finished = false;
};

} // namespace moe

#endif // MOE_SUPPORT_PROGRESS_H
