//===- Status.h - Error values without exceptions or LLVM -------*- C++ -*-===//
//
// Part of moec. The frontend and the runtime ship without LLVM, so they
// report failure through these two small value types instead of
// llvm::Error. A failed Status carries one message that names the file, the
// tensor or key, and what was expected.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_STATUS_H
#define MOE_SUPPORT_STATUS_H

#include <cassert>
#include <sstream>
#include <string>
#include <utility>
#include <variant>

namespace moe {

/// Concatenates every argument through operator<< into one string.
template <typename... Args> std::string concat(const Args &...args) {
  std::ostringstream stream;
  (stream << ... << args);
  return stream.str();
}

/// Success, or failure with a message.
class [[nodiscard]] Status {
public:
  Status() = default;
  static Status success() { return Status(); }
  /// A failure whose message is the concatenation of `args`.
  template <typename... Args> static Status error(const Args &...args) {
    Status status;
    status.failed = true;
    status.text = concat(args...);
    return status;
  }

  bool ok() const { return !failed; }
  const std::string &message() const { return text; }
  /// Prefixes the message with `context` and ": ", for callers that add where.
  Status withContext(const std::string &context) const {
    if (ok())
      return *this;
    return error(context, ": ", text);
  }

private:
  bool failed = false;
  std::string text;
};

/// A value of type T, or the failed Status explaining why there is none.
template <typename T> class [[nodiscard]] Expected {
public:
  Expected(T value) : storage(std::move(value)) {}
  Expected(Status status) : storage(std::move(status)) {
    assert(!std::get<Status>(storage).ok() && "Expected built from success");
  }

  bool ok() const { return std::holds_alternative<T>(storage); }
  explicit operator bool() const { return ok(); }

  T &operator*() { return std::get<T>(storage); }
  const T &operator*() const { return std::get<T>(storage); }
  T *operator->() { return &std::get<T>(storage); }
  const T *operator->() const { return &std::get<T>(storage); }
  T take() { return std::move(std::get<T>(storage)); }

  /// The failure; only valid when !ok().
  const Status &status() const { return std::get<Status>(storage); }

private:
  std::variant<T, Status> storage;
};

} // namespace moe

/// Returns the failed Status of `expr` (a Status) from the enclosing function.
#define MOE_RETURN_IF_ERROR(expr)                                                                                      \
  do {                                                                                                                 \
    ::moe::Status moeStatusTmp = (expr);                                                                               \
    if (!moeStatusTmp.ok())                                                                                            \
      return moeStatusTmp;                                                                                             \
  } while (false)

#endif // MOE_SUPPORT_STATUS_H
