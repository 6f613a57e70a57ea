//===- Progress.cpp - Progress lines with rate and ETA on stderr ----------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Support/Progress.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <unistd.h>

namespace moe {

namespace {
std::atomic<ProgressMode> mode{ProgressMode::Auto};

double secondsBetween(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::string duration(double seconds) {
  char buffer[32];
  if (seconds < 90)
    std::snprintf(buffer, sizeof buffer, "%.0f s", seconds);
  else if (seconds < 5400)
    std::snprintf(buffer, sizeof buffer, "%.0f min %02.0f s", std::floor(seconds / 60), std::fmod(seconds, 60));
  else
    std::snprintf(buffer, sizeof buffer, "%.1f h", seconds / 3600);
  return buffer;
}
} // namespace

void setProgressMode(ProgressMode value) { mode = value; }
ProgressMode progressMode() { return mode; }
bool progressEnabled() {
  const ProgressMode m = mode;
  return m == ProgressMode::Always || (m == ProgressMode::Auto && isatty(STDERR_FILENO));
}

Progress::Progress(std::string label, int64_t total, std::string unit)
    : label(std::move(label)), unit(std::move(unit)), total(total), start(std::chrono::steady_clock::now()),
      lastDraw(start), enabled(progressEnabled()), terminal(isatty(STDERR_FILENO)) {}

Progress::~Progress() { finish(); }

void Progress::update(int64_t value) {
  done = value;
  if (!enabled)
    return;
  const auto now = std::chrono::steady_clock::now();
  if (secondsBetween(start, now) < 1.0)
    return; // short steps stay silent
  if (secondsBetween(lastDraw, now) < (terminal ? 0.1 : 5.0) && drawn)
    return;
  lastDraw = now;
  draw(false);
}

void Progress::draw(bool final) {
  const double elapsed = secondsBetween(start, std::chrono::steady_clock::now());
  const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0.0;
  char line[512];
  int n = std::snprintf(line, sizeof line, "%s  %lld", label.c_str(), static_cast<long long>(done));
  if (total > 0)
    n += std::snprintf(line + n, sizeof line - n, "/%lld", static_cast<long long>(total));
  n += std::snprintf(line + n, sizeof line - n, " %s  %.3g %s/s", unit.c_str(), rate, unit.c_str());
  if (final)
    std::snprintf(line + n, sizeof line - n, "  in %s", duration(elapsed).c_str());
  else if (total > 0 && rate > 0)
    std::snprintf(line + n, sizeof line - n, "  ETA %s", duration(static_cast<double>(total - done) / rate).c_str());
  if (terminal)
    std::fprintf(stderr, "\r\033[K%s%s", line, final ? "\n" : "");
  else
    std::fprintf(stderr, "%s\n", line);
  std::fflush(stderr);
  drawn = true;
}

void Progress::finish() {
  if (finished)
    return;
  finished = true;
  if (enabled && drawn)
    draw(true);
}

} // namespace moe
