//===- Distributed.h - The processes of one job -----------------*- C++ -*-===//
//
// Part of moec. `mpirun -n N moec compress ...` runs N processes (ranks) of
// one job over MPI (Open MPI, optional at build time: MOEC_ENABLE_MPI). This
// is all moec asks of it: who am I, how many are we, everyone's bytes to
// everyone, and end the whole job. Launched without mpirun, or built without
// MPI, a process is a job of one and nothing here talks to anyone.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_DISTRIBUTED_H
#define MOE_SUPPORT_DISTRIBUTED_H

#include "moe/Support/Status.h"

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

namespace moe::distributed {

/// Joins the job when mpirun (or another PMI launcher) started this
/// process; a build without MPI launched so with more than one process is
/// refused (each would write the same output on its own).
Status initialize(int *argc, char ***argv);
/// This process's rank and the job's size (0 and 1 outside a job).
int rank();
int size();
/// A benchmark's stand-in for one rank: launched outside mpirun with
/// MOEC_BENCH_RANK=r/N, this process does rank r's part of an N-rank job
/// alone (rank() is r, size() N): its own chunks and share, timed as a
/// machine of the job would run them. The other ranks' bytes never arrive
/// (broadcastEach hands this rank its own only), so compress writes no
/// package, only its summary.
bool simulated();
/// Every rank's `mine`, one rank at a time in rank order (a broadcast from
/// each): `take(rank, bytes)` sees each, its own too, and the bytes live
/// only during the call, so one rank's share is held at a time.
/// Collective: every rank calls it. `take`'s error is returned.
Status broadcastEach(std::span<const uint8_t> mine, const std::function<Status(int, std::span<const uint8_t>)> &take);
/// Waits for every rank (collective): a rank that failed before ends the
/// job instead.
Status barrier();
/// Ends every process of the job with `code` (MPI_Abort), or this one.
[[noreturn]] void abortJob(int code);
/// Leaves the job (MPI_Finalize) after a successful command.
void finalize();

} // namespace moe::distributed

#endif // MOE_SUPPORT_DISTRIBUTED_H
