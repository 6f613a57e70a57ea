//===- Blas.h - OpenBLAS's threads, scoped ---------------------*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_BLAS_H
#define MOE_RUNTIME_BLAS_H

#include <dlfcn.h>

extern "C" {
void openblas_set_num_threads(int threads);
int openblas_get_num_threads(void);
}

namespace moe {

/// Ends OpenBLAS's worker threads (idle ones spin for about 2^28 cycles
/// before they sleep) through `blas_thread_shutdown_`, the hook a pthreads
/// build runs before fork, looked up rather than linked (absent elsewhere:
/// then nothing). OpenBLAS starts them again when it next needs them or
/// its count is set.
inline void stopBlasWorkers() {
  using Shutdown = int (*)();
  if (auto shutdown = reinterpret_cast<Shutdown>(dlsym(RTLD_DEFAULT, "blas_thread_shutdown_")))
    shutdown();
}

/// While one lives, BLAS calls (OpenBLAS) use `threads` threads; the count
/// before it is restored after, and back at one thread the workers are
/// ended (stopBlasWorkers), so none spins beside the engine's pool. Nothing
/// is set when the count is already the one asked for: OpenBLAS starts its
/// workers again at any setting once they have been ended.
///
/// Who owns the threads: the engine's worker pool, from its start on, with
/// OpenBLAS on one thread (its own workers spin for about 2^28 cycles after
/// their start and after each call, on the cores the pool needs; two-thread
/// decode of a fixture ran at a third of the one-thread rate). Work that
/// wants OpenBLAS's threads asks for them here: calibration's moments, the
/// gradients' products. GPTQ's concurrent matrices ask for one
/// (SingleThreadedBlas): each would otherwise start every BLAS thread and
/// oversubscribe the cores (1.4-1.5x slower, bench/gptq_expert), and
/// OpenBLAS's potrf/trtri choose another blocking with more than one
/// thread, so results would depend on the thread count. (OpenBLAS's
/// pthreads build, Debian's default; an OpenMP build ignores the setting
/// from other threads.)
class ScopedBlasThreads {
public:
  explicit ScopedBlasThreads(int threads) : previous(openblas_get_num_threads()), wanted(threads) {
    if (wanted != previous)
      openblas_set_num_threads(wanted);
  }
  ~ScopedBlasThreads() {
    if (wanted == previous)
      return;
    openblas_set_num_threads(previous);
    if (previous == 1)
      stopBlasWorkers();
  }
  ScopedBlasThreads(const ScopedBlasThreads &) = delete;
  ScopedBlasThreads &operator=(const ScopedBlasThreads &) = delete;

private:
  int previous, wanted;
};

/// OpenBLAS on the calling thread alone while it lives.
class SingleThreadedBlas : public ScopedBlasThreads {
public:
  SingleThreadedBlas() : ScopedBlasThreads(1) {}
};

} // namespace moe

#endif // MOE_RUNTIME_BLAS_H
