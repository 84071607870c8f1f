// Regression tests for what fuzz/fuzz_losses.cpp found, one TEST_CASE per finding. A
// finding whose fix has not landed yet is hidden ("[.]"; run it by name) so that the suite
// stays green; its TEST_CASE says what is open.
#include "support.hpp"

#include <cmath>

namespace {

using mltest::Matrix;
using mltest::ml::Index;
namespace ml = metricloss;

/// 16 rows in 1-D: a cluster near 0 in classes 0..3, and one far row (1e20) in class 4:
/// every row's nearest negative is near, its farthest 1e20 away, so the shifted exponent
/// nearest - D_ik is about -1e20.
Matrix<double> far_apart(Eigen::VectorXi& labels) {
  const Index n = 16;
  Matrix<double> x(n, 1);
  labels.resize(n);
  for (Index i = 0; i < n; ++i) {
    x(i, 0) = 0.125 * static_cast<double>(i);
    labels[i] = static_cast<int>(i % 4);
  }
  x(n - 1, 0) = 1e20;
  labels[n - 1] = 4;
  return x;
}

template <class Loss>
void check_finite_and_paths_agree(Loss& loss, const Matrix<double>& x, const Eigen::VectorXi& labels) {
  Matrix<double> g_scalar(x.rows(), x.cols()), g_simd(x.rows(), x.cols());
  const double scalar = loss.forward_backward(ml::scalar, x, labels, g_scalar);
  const double simd = loss.forward_backward(ml::simd, x, labels, g_simd);
  CHECK(std::isfinite(scalar));
  CHECK(std::isfinite(simd));
  CHECK(g_simd.allFinite());
  CHECK(mltest::relatively_close(simd, scalar, mltest::Tolerance<double>::loss));
  const auto comparison = ml::testing::compare_gradients(g_simd, g_scalar);
  CHECK(comparison.relative() <= mltest::Tolerance<double>::gradient);
}

}  // namespace

// Finding 1 (open; reported to the owner of backend/simd/lifted_structure.hpp): xsimd 8.1's
// exp for double batches on AVX-512 converts its exponent with a scalar double -> int64
// cast, undefined behaviour for arguments below about -6.4e18 (and NaN). The SIMD lifted
// loss takes exp(min_k D_ik - D_ik) of every entry of a row, so finite data whose distances
// differ by more than that (representable in double) execute it. UBSan
// (-fsanitize=float-cast-overflow) reports it; x86 happens to give a value that exp's
// range select then discards. Fix: clamp the argument (e.g. max(arg, -1000): exp is 0 below
// -745 either way) before xsimd::exp.
TEST_CASE("fuzz finding 1: lifted structure (double, simd) with distances 1e20 apart",
          "[.][fuzz][lifted_structure]") {
  Eigen::VectorXi labels;
  const Matrix<double> x = far_apart(labels);
  ml::LiftedStructureLoss<double> loss(1.0);
  check_finite_and_paths_agree(loss, x, labels);
}

// Finding 1, second site (open; same cause): the soft margin of BatchTripletLoss<double>
// (simd, Mining::all) takes xsimd::exp(-|t - d_an|) over rows of negatives.
TEST_CASE("fuzz finding 1: batch triplet soft margin (double, simd) with distances 1e20 apart",
          "[.][fuzz][batch_triplet]") {
  Eigen::VectorXi labels;
  const Matrix<double> x = far_apart(labels);
  for (auto distance : {ml::Distance::euclidean, ml::Distance::squared_euclidean}) {
    CAPTURE(static_cast<int>(distance));
    ml::BatchTripletLoss<double> loss(0.2, ml::Mining::all, distance, /*soft_margin=*/true);
    check_finite_and_paths_agree(loss, x, labels);
  }
}
