//===- Signals.cpp - Fatal signals end the process; interrupts clean up ---===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Support/Signals.h"

#include <cerrno>
#include <csignal>
#include <cstring>
#include <execinfo.h>
#include <fcntl.h>
#include <filesystem>
#include <mutex>
#include <pthread.h>
#include <set>
#include <thread>
#include <unistd.h>

namespace moe {

namespace {

/// Seconds a crashing process may spend printing its trace before SIGALRM
/// ends it: the trace is a courtesy, ending is the point.
constexpr unsigned kCrashTraceSeconds = 10;

const char *toolNameForCrash = "moec";

std::mutex &temporaryMutex() {
  static std::mutex mutex;
  return mutex;
}
std::set<std::string> &temporaryPaths() {
  static std::set<std::string> paths;
  return paths;
}

void writeText(const char *text) {
  size_t length = std::strlen(text);
  while (length > 0) {
    ssize_t written = ::write(STDERR_FILENO, text, length);
    if (written <= 0)
      return;
    text += written;
    length -= static_cast<size_t>(written);
  }
}

const char *signalName(int signal) {
  switch (signal) {
  case SIGSEGV:
    return "SIGSEGV (invalid memory access)";
  case SIGBUS:
    return "SIGBUS (bus error; a mapped file may have shrunk)";
  case SIGILL:
    return "SIGILL (illegal instruction)";
  case SIGFPE:
    return "SIGFPE (arithmetic error)";
  case SIGABRT:
    return "SIGABRT (aborted)";
  default:
    return "a fatal signal";
  }
}

void onFatalSignal(int signal) {
  // Whatever happens below, the process ends: SIGALRM's default action
  // terminates it should the trace stall.
  ::alarm(kCrashTraceSeconds);
  writeText(toolNameForCrash);
  writeText(": fatal error: ");
  writeText(signalName(signal));
  writeText(". This is a bug in moec; please report it with the command line. Stack:\n");
  void *frames[64];
  const int count = ::backtrace(frames, 64);
  ::backtrace_symbols_fd(frames, count, STDERR_FILENO);
  // SA_RESETHAND restored the default action: returning re-executes the
  // faulting instruction (or abort() raises again) and the process ends
  // with this signal, as a shell or CI runner expects.
  if (signal != SIGSEGV && signal != SIGBUS && signal != SIGILL && signal != SIGFPE)
    ::raise(signal);
}

/// The write end of the pipe the interrupt handler signals through.
int interruptPipe[2] = {-1, -1};

/// Async-signal-safe: hands the signal to the cleanup thread. Any thread
/// may receive it (libraries start threads before main, so blocking the
/// signals in main is not enough).
void onInterrupt(int signal) {
  const int saved = errno;
  (void)::write(interruptPipe[1], &signal, sizeof(signal));
  errno = saved;
}

void interruptThread() {
  int signal = 0;
  while (::read(interruptPipe[0], &signal, sizeof(signal)) != static_cast<ssize_t>(sizeof(signal))) {
    if (errno != EINTR)
      return;
  }
  {
    std::lock_guard<std::mutex> lock(temporaryMutex());
    for (const std::string &path : temporaryPaths()) {
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  }
  writeText(toolNameForCrash);
  writeText(": interrupted; temporary files removed\n");
  ::_exit(128 + signal);
}

} // namespace

void installSignalHandlers(const char *toolName) {
  toolNameForCrash = toolName;
  // Load the unwinder now: backtrace() would otherwise dlopen (and malloc)
  // it on first use, inside the handler.
  void *warm[4];
  (void)::backtrace(warm, 4);

  // An alternate stack, so a stack overflow can still report.
  static char alternateStack[1 << 16];
  stack_t stack{};
  stack.ss_sp = alternateStack;
  stack.ss_size = sizeof(alternateStack);
  ::sigaltstack(&stack, nullptr);
  struct sigaction action {};
  action.sa_handler = onFatalSignal;
  action.sa_flags = SA_RESETHAND | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  for (int signal : {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT})
    ::sigaction(signal, &action, nullptr);

  if (::pipe2(interruptPipe, O_CLOEXEC) == 0) {
    std::thread(interruptThread).detach();
    struct sigaction interrupt {};
    interrupt.sa_handler = onInterrupt;
    sigemptyset(&interrupt.sa_mask);
    interrupt.sa_flags = SA_RESTART;
    for (int signal : {SIGINT, SIGTERM, SIGHUP})
      ::sigaction(signal, &interrupt, nullptr);
  }
}

void registerTemporaryPath(const std::string &path) {
  std::lock_guard<std::mutex> lock(temporaryMutex());
  temporaryPaths().insert(path);
}

void unregisterTemporaryPath(const std::string &path) {
  std::lock_guard<std::mutex> lock(temporaryMutex());
  temporaryPaths().erase(path);
}

} // namespace moe
