//===- Distributed.cpp - The processes of one job -------------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Support/Distributed.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#ifdef MOEC_HAVE_MPI
#include <mpi.h>
#endif

namespace moe::distributed {
namespace {

int jobRank = 0, jobSize = 1;
[[maybe_unused]] bool joined = false;
bool standIn = false; ///< MOEC_BENCH_RANK: one rank's part, alone (simulated()).

/// The job size a launcher announced in the environment (1: none).
int launchedSize() {
  for (const char *name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (const char *value = std::getenv(name))
      return std::max(1, std::atoi(value));
  return 1;
}

/// MOEC_BENCH_RANK's value, or null when unset or empty.
const char *standInValue() {
  const char *value = std::getenv("MOEC_BENCH_RANK");
  return value && *value ? value : nullptr;
}

/// MOEC_BENCH_RANK=r/N, when set: digits, a slash, digits.
Status readStandIn() {
  const char *value = standInValue();
  if (!value)
    return Status::success();
  const std::string text = value;
  auto number = [](const std::string &digits) {
    if (digits.empty() || digits.size() > 6 ||
        !std::all_of(digits.begin(), digits.end(), [](unsigned char c) { return std::isdigit(c) != 0; }))
      return -1;
    return std::atoi(digits.c_str());
  };
  const size_t slash = text.find('/');
  const int r = slash == std::string::npos ? -1 : number(text.substr(0, slash));
  const int n = slash == std::string::npos ? -1 : number(text.substr(slash + 1));
  if (n < 2 || r < 0 || r >= n)
    return Status::error("MOEC_BENCH_RANK: expected r/N with N >= 2 and 0 <= r < N (rank r of an N-rank job, "
                         "alone, for benchmarks), got '",
                         text, "'");
  jobRank = r;
  jobSize = n;
  standIn = true;
  return Status::success();
}

} // namespace

Status initialize(int *argc, char ***argv) {
  const int announced = launchedSize();
  if (standInValue() &&
      (announced > 1 || std::getenv("OMPI_COMM_WORLD_RANK") || std::getenv("PMI_RANK") || std::getenv("PMIX_RANK")))
    return Status::error("MOEC_BENCH_RANK stands in for one rank outside mpirun; unset it under mpirun");
#ifdef MOEC_HAVE_MPI
  if (announced <= 1 && !std::getenv("OMPI_COMM_WORLD_RANK"))
    return readStandIn(); // not launched by mpirun: a job of one (or one rank's stand-in)
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
  return readStandIn();
#endif
}

int rank() { return jobRank; }
int size() { return jobSize; }
bool simulated() { return standIn; }

Status broadcastEach(std::span<const uint8_t> mine, const std::function<Status(int, std::span<const uint8_t>)> &take) {
  if (jobSize == 1 || standIn)
    return take(jobRank, mine);
#ifdef MOEC_HAVE_MPI
  std::vector<uint8_t> theirs;
  for (int root = 0; root < jobSize; ++root) {
    unsigned long long count = root == jobRank ? mine.size() : 0;
    if (MPI_Bcast(&count, 1, MPI_UNSIGNED_LONG_LONG, root, MPI_COMM_WORLD) != MPI_SUCCESS)
      return Status::error("MPI_Bcast of a size from rank ", root, " failed");
    uint8_t *data = nullptr;
    if (root == jobRank) {
      data = const_cast<uint8_t *>(mine.data()); // only sent from
    } else {
      theirs.resize(static_cast<size_t>(count));
      data = theirs.data();
    }
    // Counts are ints: pieces of at most 1 GiB.
    constexpr unsigned long long kPiece = 1ull << 30;
    for (unsigned long long offset = 0; offset < count; offset += kPiece) {
      const int piece = static_cast<int>(std::min(kPiece, count - offset));
      if (MPI_Bcast(data + offset, piece, MPI_BYTE, root, MPI_COMM_WORLD) != MPI_SUCCESS)
        return Status::error("MPI_Bcast from rank ", root, " failed");
    }
    MOE_RETURN_IF_ERROR(take(root, root == jobRank ? mine : std::span<const uint8_t>(theirs.data(), count)));
  }
  return Status::success();
#else
  return Status::error("broadcastEach: a job of more than one process without MPI");
#endif
}

Status barrier() {
#ifdef MOEC_HAVE_MPI
  if (joined && jobSize > 1 && MPI_Barrier(MPI_COMM_WORLD) != MPI_SUCCESS)
    return Status::error("MPI_Barrier failed");
#endif
  return Status::success();
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
