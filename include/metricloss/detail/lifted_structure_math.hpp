#pragma once
// The maths of the lifted structured loss, shared by every backend (host and device): the
// per-row log-normaliser, the per-positive-pair term, and the weights dL/dD2 that the
// gradient is assembled from. The factorisation is derived in <metricloss/lifted_structure.hpp>.
#include <metricloss/config.hpp>

#include <cmath>
#include <limits>

namespace metricloss {
namespace detail {

/// log(exp(a) + exp(b)) without overflow; -inf when both are -inf; NaN propagates.
METRICLOSS_HOST_DEVICE inline double log_add_exp(double a, double b) {
  const double hi = a > b ? a : b;
  const double lo = a > b ? b : a;
  if (hi == -std::numeric_limits<double>::infinity()) return hi;
  return hi + log1p(exp(lo - hi));
}

/// a_i = log sum_{k: y_k != y_i} exp(margin - D_ik) of row i, from the row's smallest
/// negative distance and shifted_sum = sum_k exp(min_distance - D_ik) (>= 1, since the
/// nearest negative contributes exp(0)). No negatives (shifted_sum = 0): -inf.
METRICLOSS_HOST_DEVICE inline double lifted_log_normaliser(double margin, double min_distance,
                                                           double shifted_sum) {
  if (shifted_sum == 0.0) return -std::numeric_limits<double>::infinity();
  return margin - min_distance + log(shifted_sum);
}

/// One positive pair (i, j): hinge = max(J_ij, 0) with J_ij = logaddexp(a_i, a_j) + D_ij,
/// and the shares of the soft-max normaliser s_i + s_j that rows i and j hold,
/// share_i = s_i / (s_i + s_j) = sigmoid(a_i - a_j) (and share_j likewise, computed on its own
/// so that 1 - share_i never cancels). A pair with no negatives (a_i = a_j = -inf) has
/// J = -inf: hinge 0.
struct LiftedPair {
  double hinge;
  double share_i;
  double share_j;
};

METRICLOSS_HOST_DEVICE inline LiftedPair lifted_pair(double log_normaliser_i,
                                                     double log_normaliser_j, double distance) {
  const double j = log_add_exp(log_normaliser_i, log_normaliser_j) + distance;
  if (j != j) return {j, j, j};  // NaN propagates
  if (!(j > 0.0)) return {0.0, 0.0, 0.0};
  return {j, 1.0 / (1.0 + exp(log_normaliser_j - log_normaliser_i)),
          1.0 / (1.0 + exp(log_normaliser_i - log_normaliser_j))};
}

/// dL/dD2 from dL/dD: dD/dD2 = 1 / (2D). The subgradient at D = 0 is 0 (no epsilon).
METRICLOSS_HOST_DEVICE inline double weight_on_squared(double derivative, double distance) {
  return distance > 0.0 ? derivative / (2.0 * distance) : 0.0;
}

/// Weight (dL/dD2_ik, before the 1/|P| scale) of a negative k of row i: dL/dD_ik from row
/// i's pairs is -c_i p_ik with p_ik = shifted_exp / shifted_sum_i the soft-max weight and
/// c_i = sum_{j in P(i)} hinge_ij share_i(ij). `row_factor` = -c_i / shifted_sum_i.
METRICLOSS_HOST_DEVICE inline double lifted_negative_weight(double row_factor, double shifted_exp,
                                                            double distance) {
  return weight_on_squared(row_factor * shifted_exp, distance);
}

}  // namespace detail
}  // namespace metricloss
