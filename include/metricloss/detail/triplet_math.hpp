#pragma once
// The maths of one triplet, shared by every backend of TripletLoss and BatchTripletLoss
// (host and device). Everything works from squared distances q = ||x - y||^2, so that a
// backend computes q however it likes (by differences, or from a product) and the distance,
// the hinge and their derivatives are decided here only.
#include <metricloss/config.hpp>
#include <metricloss/options.hpp>

#include <cmath>

namespace metricloss {
namespace detail {

/// d(q) and dd/dq. Euclidean: d = sqrt(q), dd/dq = 1 / (2 d), and 0 at q = 0 (the zero
/// subgradient at zero distance; no epsilon). Squared: d = q, dd/dq = 1.
struct DistanceTerm {
  double value;
  double derivative;
};

METRICLOSS_HOST_DEVICE inline DistanceTerm distance_from_squared(double squared,
                                                                 Distance distance) {
  if (distance == Distance::squared_euclidean) return {squared, 1.0};
  const double d = sqrt(squared);
  return {d, d > 0.0 ? 0.5 / d : 0.0};
}

/// h(x) and dh/dx for the hinge max(x, 0) (subgradient 0 at x = 0), or, with soft_margin,
/// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|) and its derivative, the sigmoid,
/// both written so that neither overflows. NaN propagates into both.
struct HingeTerm {
  double value;
  double slope;
};

METRICLOSS_HOST_DEVICE inline HingeTerm hinge(double x, bool soft_margin) {
  if (soft_margin) {
    const double e = exp(-fabs(x));  // in (0, 1] for finite x
    const double value = (x > 0.0 ? x : 0.0) + log1p(e);
    const double slope = x >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
    return {value, slope};
  }
  if (x > 0.0) return {x, 1.0};
  if (x != x) return {x, x};
  return {0.0, 0.0};
}

/// One triplet from q_ap = ||a - p||^2 and q_an = ||a - n||^2:
///   loss = h(d(q_ap) - d(q_an) + margin),
///   positive_weight = d loss / d q_ap,  negative_weight = -d loss / d q_an  (both >= 0),
/// so that d loss/da = 2 w_p (a - p) - 2 w_n (a - n), d loss/dp = -2 w_p (a - p) and
/// d loss/dn = 2 w_n (a - n).
struct TripletTerm {
  double loss;
  double positive_weight;
  double negative_weight;
};

METRICLOSS_HOST_DEVICE inline TripletTerm triplet_term(double squared_positive,
                                                       double squared_negative, double margin,
                                                       Distance distance, bool soft_margin) {
  const DistanceTerm positive = distance_from_squared(squared_positive, distance);
  const DistanceTerm negative = distance_from_squared(squared_negative, distance);
  const HingeTerm h = hinge(positive.value - negative.value + margin, soft_margin);
  return {h.value, h.slope * positive.derivative, h.slope * negative.derivative};
}

}  // namespace detail
}  // namespace metricloss
