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

/// a b + c, rounded once where the target has an FMA instruction. Written out because the
/// compiler's own contraction of a b + c depends on the surrounding code (which outputs a
/// caller stores), and so would the result's bits; without FMA nothing is contracted.
template <class T>
METRICLOSS_HOST_DEVICE inline T multiply_add(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#elif defined(FP_FAST_FMA) || defined(__FP_FAST_FMA)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

/// d(q) and dd/dq. Euclidean: d = sqrt(q), dd/dq = 1 / (2 d), and 0 at q = 0 (the zero
/// subgradient at zero distance; no epsilon). Squared: d = q, dd/dq = 1.
struct DistanceTerm {
  double value;
  double derivative;
};

/// dd/dq at distance d.
METRICLOSS_HOST_DEVICE inline double distance_derivative(double d, Distance distance) {
  if (distance == Distance::squared_euclidean) return 1.0;
  // 0.5 / d, and 0 at d = 0 (or NaN) by dividing by infinity: a select, not a branch, so
  // that loops over a row vectorise.
  return 0.5 / (d > 0.0 ? d : static_cast<double>(INFINITY));
}

METRICLOSS_HOST_DEVICE inline DistanceTerm distance_from_squared(double squared,
                                                                 Distance distance) {
  const double d = distance == Distance::squared_euclidean ? squared : sqrt(squared);
  return {d, distance_derivative(d, distance)};
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
