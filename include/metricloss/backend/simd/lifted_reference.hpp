#pragma once
// The SIMD path of LiftedStructureLoss over queries Q against a reference set R: Q x R
// distances by one product on the jointly centred rows (CrossDistances), row normalisers over
// R and column normalisers over Q from sweeps of that matrix in T lanes, one J per ordered
// positive pair on exact distances, W = dL/dD2 on the same matrix, and dQ, dR by
// CrossDistances' two products (backend/simd/lifted_reference_pass.hpp). No R x R. A float
// call whose weighted distances float cannot give to the tolerance runs in double.
#include <metricloss/backend/simd/lifted_reference_pass.hpp>
#include <metricloss/detail/backend_slot.hpp>
#include <metricloss/detail/batch_common.hpp>
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/cross_classes.hpp>
#include <metricloss/detail/lifted_structure_math.hpp>
#include <metricloss/detail/numerics.hpp>
#include <metricloss/lifted_structure.hpp>
#include <metricloss/reference.hpp>

#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace metricloss {
namespace detail {

/// What the simd reference-set path of the lifted loss keeps (in the functor's slot): the
/// buffers of T, and for a float call run in double, the double ones and the widened rows.
struct SimdLiftedReferenceScratch : BackendSlot::Contents {
  CrossClasses classes;
  LiftedReferenceWork<float> narrow;
  LiftedReferenceWork<double> wide;
  AlignedBuffer<double> q_wide, r_wide, gq_wide, gr_wide;
};

/// The loss in T; grad_q and grad_r (either may be empty) written. False, with nothing
/// written, where T cannot give the weighted distances to the tolerance (precise()).
template <class T>
bool simd_lifted_reference(LiftedReferenceWork<T>& work, const CrossClasses& classes, double margin,
                           const MatrixView<const T>& q, const MatrixView<const T>& r,
                           const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, double top_diff,
                           double& value) {
  const double pairs = static_cast<double>(classes.positive_pairs());
  value = 0.0;
  if (pairs == 0.0) {
    fill_rows(grad_q, T(0));
    fill_rows(grad_r, T(0));
    return true;
  }
  LiftedReferencePass<T> pass(work, classes, q, r, margin);
  pass.distances();
  if (!pass.precise()) return false;
  pass.normalisers();
  const bool gradient = !grad_q.empty() || !grad_r.empty();
  value = pass.pair_terms(gradient) / (2.0 * pairs);
  if (!gradient) return true;
  pass.weights();
  work.cross.gradients(static_cast<T>(top_diff / pairs), grad_q, grad_r);
  return true;
}

template <class T>
struct ReferenceBackend<LiftedStructureLoss<T>, simd_tag> {
  static constexpr bool available = true;

  template <class L, class LR>
  static T forward_backward(LiftedStructureLoss<T>& loss, simd_tag, const MatrixView<const T>& q,
                            const VectorView<L>& labels, const ReferenceView<T, LR>& ref,
                            const MatrixView<T>& grad_q, const MatrixView<T>& grad_r, T top_diff) {
    auto& work = scratch_of<SimdLiftedReferenceScratch>(loss);
    if (reference_not_finite(work.classes, q, labels, ref, grad_q, grad_r))
      return std::numeric_limits<T>::quiet_NaN();
    const double margin = static_cast<double>(loss.margin);
    double value = 0.0;
    if constexpr (std::is_same<T, double>::value) {
      simd_lifted_reference(work.wide, work.classes, margin, q, ref.r, grad_q, grad_r, top_diff, value);
      return value;
    } else {
      if (simd_lifted_reference(work.narrow, work.classes, margin, q, ref.r, grad_q, grad_r,
                                static_cast<double>(top_diff), value))
        return static_cast<T>(value);
      // Large scales: the call in double.
      const auto widened = [](AlignedBuffer<double>& buffer, const MatrixView<const T>& m) {
        double* out = buffer.data(static_cast<std::size_t>(m.rows * m.cols));
        for (Index i = 0; i < m.rows; ++i)
          for (Index c = 0; c < m.cols; ++c) out[i * m.cols + c] = static_cast<double>(m(i, c));
        return MatrixView<const double>{out, m.rows, m.cols, m.cols};
      };
      const auto wide_gradient = [](AlignedBuffer<double>& buffer, const MatrixView<T>& g) {
        if (g.empty()) return MatrixView<double>{};
        return MatrixView<double>{buffer.data(static_cast<std::size_t>(g.rows * g.cols)), g.rows,
                                  g.cols, g.cols};
      };
      const MatrixView<double> gq = wide_gradient(work.gq_wide, grad_q);
      const MatrixView<double> gr = wide_gradient(work.gr_wide, grad_r);
      simd_lifted_reference(work.wide, work.classes, margin, widened(work.q_wide, q),
                            widened(work.r_wide, ref.r), gq, gr, static_cast<double>(top_diff), value);
      const auto narrow = [](const MatrixView<double>& from, const MatrixView<T>& to) {
        for (Index i = 0; i < from.rows; ++i)
          for (Index c = 0; c < from.cols; ++c) to(i, c) = static_cast<T>(from(i, c));
      };
      narrow(gq, grad_q);
      narrow(gr, grad_r);
      return static_cast<T>(value);
    }
  }
};

}  // namespace detail
}  // namespace metricloss
