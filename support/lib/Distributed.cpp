//===- Distributed.cpp - The processes of one job -------------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Support/Distributed.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#ifdef MOEC_HAVE_MPI
#include <mpi.h>
#endif

namespace moe::distributed {
namespace {

int jobRank = 0, jobSize = 1;
[[maybe_unused]] bool joined = false;

/// The job size a launcher announced in the environment (1: none).
int launchedSize() {
  for (const char *name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (const char *value = std::getenv(name))
      return std::max(1, std::atoi(value));
  return 1;
}

} // namespace

Status initialize(int *argc, char ***argv) {
  const int announced = launchedSize();
#ifdef MOEC_HAVE_MPI
  if (announced <= 1 && !std::getenv("OMPI_COMM_WORLD_RANK"))
    return Status::success(); // not launched by mpirun: a job of one
  if (MPI_Init(argc, argv) != MPI_SUCCESS)
    return Status::error("MPI_Init failed");
  joined = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &jobRank);
  MPI_Comm_size(MPI_COMM_WORLD, &jobSize);
  // Errors come back as codes (and become messages) instead of ending the
  // job silently.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  return Status::success();
#else
  (void)argc;
  (void)argv;
  if (announced > 1)
    return Status::error("launched as one of ", announced,
                         " processes, but this moec was built without MPI (install libopenmpi-dev and rebuild; "
                         "MOEC_ENABLE_MPI)");
  return Status::success();
#endif
}

int rank() { return jobRank; }
int size() { return jobSize; }

Expected<std::vector<std::vector<uint8_t>>> allGather(std::span<const uint8_t> mine) {
  if (jobSize == 1)
    return std::vector<std::vector<uint8_t>>{std::vector<uint8_t>(mine.begin(), mine.end())};
#ifdef MOEC_HAVE_MPI
  // Sizes first, then the bytes; counts are ints, so large payloads go in
  // pieces of at most 1 GiB per rank.
  const unsigned long long count = mine.size();
  std::vector<unsigned long long> counts(static_cast<size_t>(jobSize));
  if (MPI_Allgather(&count, 1, MPI_UNSIGNED_LONG_LONG, counts.data(), 1, MPI_UNSIGNED_LONG_LONG, MPI_COMM_WORLD) !=
      MPI_SUCCESS)
    return Status::error("MPI_Allgather of sizes failed");
  std::vector<std::vector<uint8_t>> all(static_cast<size_t>(jobSize));
  unsigned long long longest = 0;
  for (int r = 0; r < jobSize; ++r) {
    all[static_cast<size_t>(r)].resize(static_cast<size_t>(counts[static_cast<size_t>(r)]));
    longest = std::max(longest, counts[static_cast<size_t>(r)]);
  }
  constexpr unsigned long long kPiece = 1ull << 30;
  std::vector<uint8_t> receive;
  for (unsigned long long offset = 0; offset < longest; offset += kPiece) {
    std::vector<int> pieceCounts(static_cast<size_t>(jobSize)), displacements(static_cast<size_t>(jobSize));
    int total = 0;
    for (int r = 0; r < jobSize; ++r) {
      const unsigned long long have = counts[static_cast<size_t>(r)];
      pieceCounts[static_cast<size_t>(r)] = static_cast<int>(have > offset ? std::min(kPiece, have - offset) : 0);
      displacements[static_cast<size_t>(r)] = total;
      total += pieceCounts[static_cast<size_t>(r)];
    }
    receive.resize(static_cast<size_t>(total));
    const int send = pieceCounts[static_cast<size_t>(jobRank)];
    if (MPI_Allgatherv(send > 0 ? mine.data() + offset : nullptr, send, MPI_BYTE, receive.data(), pieceCounts.data(),
                       displacements.data(), MPI_BYTE, MPI_COMM_WORLD) != MPI_SUCCESS)
      return Status::error("MPI_Allgatherv failed");
    for (int r = 0; r < jobSize; ++r)
      std::copy_n(receive.data() + displacements[static_cast<size_t>(r)], pieceCounts[static_cast<size_t>(r)],
                  all[static_cast<size_t>(r)].data() + offset);
  }
  return all;
#else
  return Status::error("allGather: a job of more than one process without MPI");
#endif
}

void abortJob(int code) {
#ifdef MOEC_HAVE_MPI
  if (joined && jobSize > 1)
    MPI_Abort(MPI_COMM_WORLD, code);
#endif
  std::exit(code);
}

void finalize() {
#ifdef MOEC_HAVE_MPI
  if (joined)
    MPI_Finalize();
  joined = false;
#endif
}

} // namespace moe::distributed
