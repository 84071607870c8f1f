// Sharded batch losses with ranks as MPI processes (metricloss::mpi_group), run by CTest as
// `mpiexec -n 3 --oversubscribe test_sharded_mpi`: the same body as tests/sharded.cpp on the
// layouts {7, 0, 11}, {6, 6, 6}, {1, 1, 16}, {18, 0, 0}. Every rank runs every case in the
// same order and uses CHECK only (a REQUIRE stopping one rank would leave the others in a
// collective; CTest's TIMEOUT guards that). Each rank reports its own failures; the process
// exit status is that of Catch2 on every rank, and mpiexec fails if any rank does. Reference
// sets (tests/sharded_reference.cpp's body) on the same layouts, in double.
#define CATCH_CONFIG_RUNNER
#include "sharded_check.hpp"
#include "sharded_reference_check.hpp"

#include <metricloss/mpi.hpp>

#include <mpi.h>

namespace {

using namespace mltest;
using mltest::sharded::Record;

const std::vector<std::vector<Index>> layouts = {{7, 0, 11}, {6, 6, 6}, {1, 1, 16}, {18, 0, 0}};

template <class T>
void check_all_layouts(ml::mpi_group& group, bool integer) {
  for (const auto& shards : layouts)
    for (Index d : {Index(5), Index(33)}) {
      std::vector<Record> records;
      sharded::check_layout<T>(group, ml::scalar.sharded(group), "scalar", shards, d, integer, records);
      sharded::check_layout<T>(group, ml::simd.sharded(group), "simd", shards, d, integer, records);
      sharded::check_records(records);
    }
}

}  // namespace

TEST_CASE("sharded over MPI: every batch loss, double and float, 3 processes", "[sharded][mpi]") {
  ml::mpi_group group(MPI_COMM_WORLD);
  REQUIRE(group.size() == 3);  // every rank sees the same size: all stop or none
  for (bool integer : {false, true}) {
    check_all_layouts<double>(group, integer);
    check_all_layouts<float>(group, integer);
  }
}

TEST_CASE("sharded over MPI: reference sets (queries sharded, R on every rank), double",
          "[sharded][mpi][reference]") {
  ml::mpi_group group(MPI_COMM_WORLD);
  REQUIRE(group.size() == 3);
  int l = 0;
  for (bool integer : {false, true})
    for (const auto& shards : layouts) {
      const auto mode = static_cast<sharded::SelfMode>(l++ % 3);
      std::vector<sharded::ReferenceRecord> records;
      sharded::check_reference_layout<double>(group, ml::scalar.sharded(group), "scalar", shards,
                                              5, integer, mode, records);
      sharded::check_reference_layout<double>(group, ml::simd.sharded(group), "simd", shards, 33,
                                              integer, mode, records);
      sharded::check_reference_records(records);
    }
}

TEST_CASE("sharded over MPI: a malformed call on one rank makes every rank throw",
          "[sharded][mpi][errors]") {
  ml::mpi_group group(MPI_COMM_WORLD);
  for (int bad = 0; bad < group.size(); ++bad)
    for (bool wrong_d : {false, true}) {
      if (wrong_d && bad == 0) continue;  // D is compared with rank 0's
      const std::string m = sharded::malformed_call<double>(group, ml::simd.sharded(group), bad, wrong_d);
      CAPTURE(group.rank(), bad, wrong_d, m);
      CHECK(m.find("metricloss::BatchTripletLoss<double>::forward_backward: ") == 0);
      CHECK(m.find("rank " + std::to_string(bad) + " of 3") != std::string::npos);
      // The same message on every rank.
      const int length = static_cast<int>(m.size());
      int lengths[3] = {0, 0, 0};
      MPI_Allgather(&length, 1, MPI_INT, lengths, 1, MPI_INT, MPI_COMM_WORLD);
      CHECK(lengths[0] == length);
      CHECK(lengths[1] == length);
      CHECK(lengths[2] == length);
    }
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int status = Catch::Session().run(argc, argv);
  int worst = 0;
  MPI_Allreduce(&status, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
