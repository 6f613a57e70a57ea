//===- Signals.h - Fatal signals end the process; interrupts clean up -*- C++ -*-===//
//
// Part of moec. A tool run unattended (a CI step) must end, and end with a
// non-zero status, whatever goes wrong. LLVM's crash handler prints a stack
// trace from inside the signal handler through malloc; after heap
// corruption the malloc lock may be held and the process waits forever.
// These handlers use only async-signal-safe calls (write, backtrace into a
// preloaded unwinder, backtrace_symbols_fd) under an alarm that kills the
// process should even that stall.
//
// SIGINT, SIGTERM and SIGHUP are handed (through a pipe, the only safe way
// out of a handler) to a thread that removes the registered temporary
// files and directories and exits with 128 + signal, so an interrupted run
// leaves nothing behind.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_SIGNALS_H
#define MOE_SUPPORT_SIGNALS_H

#include <string>

namespace moe {

/// Installs both kinds of handler; call first thing in main.
void installSignalHandlers(const char *toolName);

/// A temporary file or directory to remove if the process is interrupted.
/// Unregister it once it was renamed into place or removed.
void registerTemporaryPath(const std::string &path);
void unregisterTemporaryPath(const std::string &path);

} // namespace moe

#endif // MOE_SUPPORT_SIGNALS_H
