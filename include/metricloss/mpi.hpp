#pragma once
// Ranks as MPI processes: a group for sharded batch losses (API.md, "Global batches").
//
//   #include <metricloss/mpi.hpp>       // link MPI::MPI_CXX (find_package(MPI))
//   metricloss::mpi_group group(MPI_COMM_WORLD);
//   double L = loss.forward_backward(metricloss::simd.sharded(group), x_r, y_r, g_r, top_diff);
//
// The communicator is viewed, not owned or duplicated: every rank of it must make the same
// sequence of sharded calls (as with any MPI collective). Its MPI_Allgatherv counts are
// ints: a rank's rows may hold at most INT_MAX bytes. Nothing is allocated after
// construction.
#include <metricloss/errors.hpp>

#include <mpi.h>

#include <climits>
#include <cstddef>
#include <memory>
#include <string>

namespace metricloss {

class mpi_group {
 public:
  explicit mpi_group(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    counts_ = std::make_unique<int[]>(static_cast<std::size_t>(size_));
    offsets_ = std::make_unique<int[]>(static_cast<std::size_t>(size_));
  }
  mpi_group(const mpi_group&) = delete;
  mpi_group& operator=(const mpi_group&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  MPI_Comm comm() const { return comm_; }

  /// Rank q's `counts[q]` bytes land at recv + offsets[q], on every rank. Every rank knows
  /// every count (the sharded calls exchange sizes first), so an oversized exchange throws on
  /// all ranks alike, before any of them enters MPI.
  void allgatherv(const void* send, std::size_t bytes, void* recv, const std::size_t* counts,
                  const std::size_t* offsets) {
    for (int q = 0; q < size_; ++q) {
      if (counts[q] > static_cast<std::size_t>(INT_MAX) ||
          offsets[q] > static_cast<std::size_t>(INT_MAX))
        throw invalid_argument("metricloss::mpi_group::allgatherv: rank " + std::to_string(q) +
                               " sends " + std::to_string(counts[q]) + " bytes at offset " +
                               std::to_string(offsets[q]) +
                               "; MPI_Allgatherv counts bytes in int (at most " +
                               std::to_string(INT_MAX) + ")");
      counts_[q] = static_cast<int>(counts[q]);
      offsets_[q] = static_cast<int>(offsets[q]);
    }
    MPI_Allgatherv(bytes == 0 ? nullptr : send, static_cast<int>(bytes), MPI_BYTE, recv,
                   counts_.get(), offsets_.get(), MPI_BYTE, comm_);
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  std::unique_ptr<int[]> counts_, offsets_;
};

}  // namespace metricloss
