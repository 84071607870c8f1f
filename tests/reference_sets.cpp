// Reference sets (issue 15): BatchTripletLoss and LiftedStructureLoss of queries Q against
// candidates R. The reduction to the batch loss (R = Q, self = identity), invariance under
// permutations of R, a brute-force double reference from API.md's text (N_q != N_r both
// ways, queries with no positive or no negative in R, an empty P, a large common offset,
// the tie regime), finite differences for grad_q and grad_r, float against double, and
// bad input (nothing written).
#include "batch_triplet_reference.hpp"
#include "reference_sets_reference.hpp"
#include "support.hpp"

#include <metricloss/testing/gradcheck.hpp>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

using namespace mltest;
using ml::Distance;
using ml::Mining;

namespace {

using Option = CrossOption;

/// Whether `tag` runs the option's loss with reference sets (the paths land one by one).
template <class T, class Tag>
bool runs(Tag, const Option& o) {
  return o.lifted ? ml::detail::ReferenceBackend<ml::LiftedStructureLoss<T>, Tag>::available
                  : ml::detail::ReferenceBackend<ml::BatchTripletLoss<T>, Tag>::available;
}

/// One call of the option's loss on `tag` with a reference set.
template <class T, class Tag>
T cross_call(Tag tag, const Option& o, double margin, const Matrix<T>& q, const CrossLabels& yq,
             const Matrix<T>& r, const CrossLabels& yr, const SelfIndices& self, Matrix<T>& gq,
             Matrix<T>& gr, T top_diff = T(1)) {
  const auto ref = ml::reference(r, yr, self);
  if (o.lifted) {
    if constexpr (ml::detail::ReferenceBackend<ml::LiftedStructureLoss<T>, Tag>::available) {
      ml::LiftedStructureLoss<T> loss(static_cast<T>(margin));
      return loss.forward_backward(tag, q, yq, ref, gq, gr, top_diff);
    }
    FAIL("no reference-set path for this loss on this tag");
  }
  if constexpr (ml::detail::ReferenceBackend<ml::BatchTripletLoss<T>, Tag>::available) {
    ml::BatchTripletLoss<T> loss(static_cast<T>(margin), o.mining, o.distance, o.soft_margin);
    return loss.forward_backward(tag, q, yq, ref, gq, gr, top_diff);
  }
  FAIL("no reference-set path for this loss on this tag");
  return T(0);
}

template <class T, class Tag>
T batch_call(Tag tag, const Option& o, double margin, const Matrix<T>& x, const CrossLabels& y,
             Matrix<T>& g) {
  if (o.lifted) return ml::LiftedStructureLoss<T>(static_cast<T>(margin)).forward_backward(tag, x, y, g);
  ml::BatchTripletLoss<T> loss(static_cast<T>(margin), o.mining, o.distance, o.soft_margin);
  return loss.forward_backward(tag, x, y, g);
}

/// Loss and both gradients against the brute force, gradients relative to the largest
/// entry of either.
template <class T>
void check_against(const CrossReference& ref, T loss, const Matrix<T>& gq, const Matrix<T>& gr,
                   double loss_tol, double grad_tol) {
  CAPTURE(ref.loss, static_cast<double>(loss));
  CHECK(relatively_close(static_cast<double>(loss), ref.loss, loss_tol, 1e-300));
  const double scale = std::max(largest_entry(ref.grad_q, ref.grad_r), 1e-300);
  const Matrix<double> eq = gq.template cast<double>() - ref.grad_q;
  const Matrix<double> er = gr.template cast<double>() - ref.grad_r;
  CAPTURE(scale, largest_entry(eq, Matrix<double>()), largest_entry(er, Matrix<double>()));
  CHECK(largest_entry(eq, er) <= grad_tol * scale);
}

}  // namespace

TEST_CASE("reference sets: the brute force knows a small case by hand", "[reference]") {
  // q0 (class 0) against r = {0: class 0 at distance 1, 1: class 1 at distance 3}:
  // hard and semihard pick (r0, r1): max(1 - 3 + 0.5, 0) = 0; margin 2.5: 0.5.
  Matrix<double> q(1, 1), r(2, 1);
  q << 0;
  r << 1, 3;
  CrossLabels yq(1), yr(2);
  yq << 0;
  yr << 0, 1;
  for (Mining m : {Mining::all, Mining::hard, Mining::semihard}) {
    CHECK(cross_triplet_brute_force(q, yq, r, yr, no_self(1), 2.5, m, Distance::euclidean, false, 1).loss == 0.5);
    CHECK(cross_triplet_brute_force(q, yq, r, yr, no_self(1), 0.5, m, Distance::euclidean, false, 1).loss == 0.0);
  }
  // With self(0) = 0 the only positive is gone: nothing to average.
  SelfIndices self(1);
  self << 0;
  CHECK(cross_triplet_brute_force(q, yq, r, yr, self, 2.5, Mining::hard, Distance::euclidean, false, 1).loss == 0.0);
  // Lifted, one pair (q0, r0): J = log(e^{m - 3} + 0) + 1 with m = 3: J = 1, L = 1/2.
  CHECK(std::abs(cross_lifted_brute_force(q, yq, r, yr, no_self(1), 3.0, 1).loss - 0.5) < 1e-15);
}

TEMPLATE_TEST_CASE("reference sets with R = Q and self = identity reduce to the batch loss",
                   "[reference]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  const std::uint64_t seed = 1501;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (const Index d : {Index(1), Index(13)}) {
    const Index n = 37;
    const Matrix<T> x = uniform_matrix<T>(n, d, rng);
    const CrossLabels y = labels_of(random_labels(n, 5, rng));
    SelfIndices self(n);
    std::iota(self.data(), self.data() + n, std::int64_t(0));
    for (const Option& o : every_cross_option()) {
      if (!runs<T>(tag, o)) continue;
      CAPTURE(o.name(), d);
      const double margin = o.lifted ? 1.0 : 0.3;
      Matrix<T> gq(n, d), gr(n, d), g_scalar(n, d), g_simd(n, d);
      const T l = cross_call(tag, o, margin, x, y, x, y, self, gq, gr);
      const T l_scalar = batch_call(ml::scalar, o, margin, x, y, g_scalar);
      const T l_simd = batch_call(ml::simd, o, margin, x, y, g_simd);
      const Matrix<double> sum = (gq.template cast<double>() + gr.template cast<double>());
      const double tol = std::is_same<T, double>::value ? same_formula_tolerance : Tolerance<T>::gradient;
      const double ltol = std::is_same<T, double>::value ? same_formula_tolerance : Tolerance<T>::loss;
      for (const auto* g : {&g_scalar, &g_simd}) {
        const Matrix<double> batch = g->template cast<double>();
        CHECK((sum - batch).cwiseAbs().maxCoeff() <= tol * std::max(batch.cwiseAbs().maxCoeff(), 1e-300));
      }
      CHECK(relatively_close(l, l_scalar, ltol, 1e-300));
      CHECK(relatively_close(l, l_simd, ltol, 1e-300));
    }
  }
}

TEMPLATE_TEST_CASE("reference sets: permuting R (and self_index) leaves L and grad_q, permutes grad_r",
                   "[reference]", ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const std::uint64_t seed = 1502;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index nq = 19, nr = 31, d = 7;
  const Matrix<double> q = uniform_matrix<double>(nq, d, rng);
  Matrix<double> r = uniform_matrix<double>(nr, d, rng);
  CrossLabels yq = labels_of(random_labels(nq, 4, rng)), yr = labels_of(random_labels(nr, 4, rng));
  // Queries 0..4 are rows 3..7 of R.
  SelfIndices self = no_self(nq);
  for (Index a = 0; a < 5; ++a) {
    r.row(3 + a) = q.row(a);
    yr(3 + a) = yq(a);
    self(a) = 3 + a;
  }
  std::vector<Index> perm(static_cast<std::size_t>(nr));
  std::iota(perm.begin(), perm.end(), Index(0));
  std::shuffle(perm.begin(), perm.end(), rng);  // new row i is old row perm[i]
  Matrix<double> rp(nr, d);
  CrossLabels yrp(nr);
  std::vector<Index> where(static_cast<std::size_t>(nr));
  for (Index i = 0; i < nr; ++i) {
    rp.row(i) = r.row(perm[static_cast<std::size_t>(i)]);
    yrp(i) = yr(perm[static_cast<std::size_t>(i)]);
    where[static_cast<std::size_t>(perm[static_cast<std::size_t>(i)])] = i;
  }
  SelfIndices selfp = self;
  for (Index a = 0; a < nq; ++a)
    if (self(a) >= 0) selfp(a) = where[static_cast<std::size_t>(self(a))];
  for (const Option& o : every_cross_option()) {
    if (!runs<double>(tag, o)) continue;
    CAPTURE(o.name());
    const double margin = o.lifted ? 1.0 : 0.3;
    Matrix<double> gq(nq, d), gr(nr, d), gqp(nq, d), grp(nr, d);
    const double l = cross_call(tag, o, margin, q, yq, r, yr, self, gq, gr);
    const double lp = cross_call(tag, o, margin, q, yq, rp, yrp, selfp, gqp, grp);
    CHECK(relatively_close(lp, l, same_formula_tolerance, 1e-300));
    const double scale = std::max(largest_entry(gq, gr), 1e-300);
    CHECK((gqp - gq).cwiseAbs().maxCoeff() <= same_formula_tolerance * scale);
    double worst = 0.0;
    for (Index i = 0; i < nr; ++i)
      worst = std::max(worst, (grp.row(i) - gr.row(perm[static_cast<std::size_t>(i)])).cwiseAbs().maxCoeff());
    CHECK(worst <= same_formula_tolerance * scale);
    CHECK(scale > 0.0);
  }
}

TEMPLATE_TEST_CASE("reference sets match the brute force", "[reference]", ALL_CASES) {
  using T = typename TestType::T;
  const typename TestType::Tag tag{};
  struct Shape {
    Index nq, nr, d;
    double offset;
  };
  // R larger and smaller than Q, D = 1, a large common offset.
  const Shape shapes[] = {{9, 40, 5, 0.0}, {33, 6, 3, 0.0}, {17, 17, 1, 0.0}, {12, 25, 8, 100.0}};
  std::uint64_t seed = 1503;
  for (const Shape& s : shapes) {
    for (const Option& o : every_cross_option()) {
      if (!runs<T>(tag, o)) continue;
      CAPTURE(s.nq, s.nr, s.d, s.offset, o.name(), seed);
      std::mt19937_64 rng(seed++);
      const double lo = s.offset - (s.offset > 0 ? 0.05 : 1.0), hi = s.offset + (s.offset > 0 ? 0.05 : 1.0);
      // Labels 0..3 in R, 0..4 in Q: queries of class 4 have no positive in R.
      const CrossLabels yq = labels_of(random_labels(s.nq, 5, rng));
      CrossLabels yr = labels_of(random_labels(s.nr, 4, rng));
      const double margin = o.lifted ? 1.0 : 0.05 * static_cast<double>(s.d);
      // Float: draw until every decision is 1e-4 from a tie (relative to the distances).
      Matrix<T> q, r;
      SelfIndices self = no_self(s.nq);
      for (int attempt = 0; attempt < 40; ++attempt) {
        q = uniform_matrix<T>(s.nq, s.d, rng, lo, hi);
        r = uniform_matrix<T>(s.nr, s.d, rng, lo, hi);
        if (s.nr > 4) {  // a query that is a row of R
          r.row(2) = q.row(1);
          yr(2) = yq(1);
          self(1) = 2;
        }
        const CrossReference b = cross_brute_force(o, margin, q.template cast<double>(), yq,
                                                r.template cast<double>(), yr, self);
        if (std::is_same<T, double>::value || o.lifted || b.gap > 1e-4 * (s.offset > 0 ? 0.01 : 1.0)) break;
      }
      Matrix<T> gq(s.nq, s.d), gr(s.nr, s.d);
      const T top_diff = T(0.75);
      const T l = cross_call(tag, o, margin, q, yq, r, yr, self, gq, gr, top_diff);
      const CrossReference b = cross_brute_force(o, margin, q.template cast<double>(), yq,
                                              r.template cast<double>(), yr, self, 0.75);
      check_against(b, l, gq, gr, Tolerance<T>::loss, Tolerance<T>::gradient);
    }
  }
}

TEMPLATE_TEST_CASE("reference sets: degenerate sets", "[reference]", ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const Index d = 4;
  std::mt19937_64 rng(1504);
  const Matrix<double> q = uniform_matrix<double>(6, d, rng), r = uniform_matrix<double>(5, d, rng);
  CrossLabels yq(6), yr(5);
  for (const Option& o : every_cross_option()) {
    if (!runs<double>(tag, o)) continue;
    CAPTURE(o.name());
    Matrix<double> gq = Matrix<double>::Constant(6, d, 7.0), gr = Matrix<double>::Constant(5, d, 7.0);
    // No query has a positive in R: an empty P.
    yq << 0, 0, 1, 1, 2, 2;
    yr << 5, 5, 6, 6, 7;
    CHECK(cross_call(tag, o, 0.5, q, yq, r, yr, no_self(6), gq, gr) == 0.0);
    CHECK(gq.cwiseAbs().maxCoeff() == 0.0);
    CHECK(gr.cwiseAbs().maxCoeff() == 0.0);
    // R is one class: positives only for queries of it, no negatives for them.
    yr << 1, 1, 1, 1, 1;
    const double l = cross_call(tag, o, 0.5, q, yq, r, yr, no_self(6), gq, gr);
    const CrossReference b = cross_brute_force(o, 0.5, q, yq, r, yr, no_self(6));
    check_against(b, l, gq, gr, 1e-12, 1e-12);
    // Mixed: some queries without a positive, some without a negative.
    yr << 1, 1, 0, 9, 9;
    const double l2 = cross_call(tag, o, 0.5, q, yq, r, yr, no_self(6), gq, gr);
    check_against(cross_brute_force(o, 0.5, q, yq, r, yr, no_self(6)), l2, gq, gr, 1e-12, 1e-12);
    // One query, one candidate, coincident: D = 0, its own positive only through self = -1.
    Matrix<double> q1 = q.topRows(1), r1 = q.topRows(1), g1(1, d), h1(1, d);
    CrossLabels y1(1);
    y1 << 3;
    const double l3 = cross_call(tag, o, 0.5, q1, y1, r1, y1, no_self(1), g1, h1);
    CHECK(l3 == 0.0);  // no negative: nothing to average (triplets), J = -inf (lifted)
    CHECK(g1.cwiseAbs().maxCoeff() == 0.0);
    CHECK(h1.cwiseAbs().maxCoeff() == 0.0);
  }
}

TEMPLATE_TEST_CASE("reference sets follow the tie rules on tie-heavy data", "[reference][ties]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  for (std::uint64_t seed = 1600; seed < 1640; ++seed) {
    CAPTURE(seed);
    std::mt19937_64 rng(seed);
    const Index nq = 14, nr = 23, d = 3;
    const double offset = seed % 2 ? 1000.0 : 0.0;
    const Matrix<double> q = tied_matrix<double>(nq, d, rng, -2, 2, offset);
    Matrix<double> r = tied_matrix<double>(nr, d, rng, -2, 2, offset);
    const CrossLabels yq = labels_of(tied_labels(nq, 3, rng));
    CrossLabels yr = labels_of(tied_labels(nr, 3, rng));
    SelfIndices self = no_self(nq);
    for (Index a = 0; a < nq; a += 3) {  // a third of the queries are rows of R, copied
      r.row(a) = q.row(a);
      yr(a) = yq(a);
      self(a) = a;
    }
    for (const Option& o : every_cross_option()) {
      if (!runs<double>(tag, o)) continue;
      CAPTURE(o.name());
      const double margin = 1.0;  // an integer: hinges at exactly 0
      Matrix<double> gq(nq, d), gr(nr, d);
      const double l = cross_call(tag, o, margin, q, yq, r, yr, self, gq, gr);
      check_against(cross_brute_force(o, margin, q, yq, r, yr, self), l, gq, gr, 1e-10, 1e-10);
    }
  }
}

TEMPLATE_TEST_CASE("reference sets follow the tie rules with many positives (bucket sweeps)",
                   "[reference][ties]", ml::scalar_tag, ml::simd_tag) {
  // Over 16 positives per query the miner takes its bucket sweeps (semihard's ties settled
  // through the buckets, all's counts by bucket): the same tie rules on integer data.
  const TestType tag{};
  for (std::uint64_t seed = 1640; seed < 1652; ++seed) {
    CAPTURE(seed);
    std::mt19937_64 rng(seed);
    const Index nq = 9, nr = 160, d = seed % 3 == 0 ? 1 : 3;
    const double offset = seed % 2 ? 1000.0 : 0.0;
    const Matrix<double> q = tied_matrix<double>(nq, d, rng, -3, 3, offset);
    Matrix<double> r = tied_matrix<double>(nr, d, rng, -3, 3, offset);
    const CrossLabels yq = labels_of(random_labels(nq, 2, rng));
    CrossLabels yr = labels_of(tied_labels(nr, 2, rng));
    SelfIndices self = no_self(nq);
    for (Index a = 0; a < nq; a += 2) {
      r.row(a) = q.row(a);
      yr(a) = yq(a);
      self(a) = a;
    }
    Index fewest = nr;
    for (Index a = 0; a < nq; ++a) fewest = std::min(fewest, Index((yr.array() == yq(a)).count()));
    REQUIRE(fewest > 17);  // every query takes the bucket sweeps
    for (const Option& o : every_cross_option()) {
      if (!runs<double>(tag, o)) continue;
      CAPTURE(o.name());
      const double margin = 1.0;
      Matrix<double> gq(nq, d), gr(nr, d);
      const double l = cross_call(tag, o, margin, q, yq, r, yr, self, gq, gr);
      check_against(cross_brute_force(o, margin, q, yq, r, yr, self), l, gq, gr, 1e-10, 1e-10);
    }
  }
}

TEMPLATE_TEST_CASE("reference-set gradients match finite differences", "[reference][gradcheck]",
                   ml::scalar_tag, ml::simd_tag) {
  const TestType tag{};
  const std::uint64_t seed = 1505;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index nq = 7, nr = 11, d = 4;
  const CrossLabels yq = labels_of({0, 1, 2, 0, 1, 3, 0});
  const CrossLabels yr = labels_of({0, 1, 2, 0, 1, 2, 0, 1, 4, 0, 2});
  SelfIndices self = no_self(nq);
  self(0) = 0;
  for (const Option& o : every_cross_option()) {
    if (!runs<double>(tag, o)) continue;
    CAPTURE(o.name());
    const double margin = o.lifted ? 1.0 : 0.4;
    Matrix<double> q, r;
    for (int attempt = 0; attempt < 40; ++attempt) {
      q = uniform_matrix<double>(nq, d, rng);
      r = uniform_matrix<double>(nr, d, rng);
      r.row(0) = q.row(0);
      if (cross_brute_force(o, margin, q, yq, r, yr, self).gap > 1e-3) break;
    }
    Matrix<double> gq(nq, d), gr(nr, d);
    const double top_diff = 1.3;
    cross_call(tag, o, margin, q, yq, r, yr, self, gq, gr, top_diff);
    // r.row(0) is q.row(0) by value only: each varies on its own.
    const auto fq = [&](const Matrix<double>& z) {
      Matrix<double> a(nq, d), b(nr, d);
      return cross_call(tag, o, margin, z, yq, r, yr, self, a, b);
    };
    const auto fr = [&](const Matrix<double>& z) {
      Matrix<double> a(nq, d), b(nr, d);
      return cross_call(tag, o, margin, q, yq, z, yr, self, a, b);
    };
    const Matrix<double> nq_grad = top_diff * ml::testing::numerical_gradient(fq, q);
    const Matrix<double> nr_grad = top_diff * ml::testing::numerical_gradient(fr, r);
    CHECK(largest_entry(gq, gr) > 0);
    CHECK(ml::testing::compare_gradients(gq, nq_grad).relative() <= Tolerance<double>::finite_difference);
    CHECK(ml::testing::compare_gradients(gr, nr_grad).relative() <= Tolerance<double>::finite_difference);
  }
}

TEST_CASE("reference sets: forward equals forward_backward, grad_r may be skipped", "[reference]") {
  std::mt19937_64 rng(1506);
  const Index nq = 10, nr = 14, d = 5;
  const Matrix<float> q = uniform_matrix<float>(nq, d, rng), r = uniform_matrix<float>(nr, d, rng);
  const CrossLabels yq = labels_of(random_labels(nq, 3, rng));
  const Eigen::VectorXf yr = labels_of(random_labels(nr, 3, rng)).cast<float>();
  ml::BatchTripletLoss<float> batch(0.3f, Mining::semihard);
  ml::LiftedStructureLoss<float> lifted;
  Matrix<float> gq(nq, d), gq2(nq, d), gr(nr, d);
  const auto ref = ml::reference(r, yr);
  const float l1 = batch.forward_backward(ml::scalar, q, yq, ref, gq, gr);
  CHECK(batch.forward(ml::scalar, q, yq, ref) == l1);
  CHECK(batch.forward_backward(ml::scalar, q, yq, ref, gq2, ml::skip) == l1);
  CHECK(gq2 == gq);
  const float l2 = lifted.forward_backward(ml::scalar, q, yq, ref, gq, gr);
  CHECK(lifted.forward(ml::scalar, q, yq, ref) == l2);
  CHECK(lifted.forward_backward(ml::scalar, q, yq, ref, ml::skip, gr) == l2);
}

TEST_CASE("reference sets: bad input throws and writes nothing", "[reference][errors]") {
  std::mt19937_64 rng(1507);
  const Index nq = 4, nr = 6, d = 3;
  Matrix<double> q = uniform_matrix<double>(nq, d, rng), r = uniform_matrix<double>(nr, d, rng);
  CrossLabels yq(nq), yr(nr);
  yq << 0, 1, 0, 1;
  yr << 0, 1, 0, 1, 2, 2;
  ml::BatchTripletLoss<double> loss;
  Matrix<double> gq = Matrix<double>::Constant(nq, d, 5.0), gr = Matrix<double>::Constant(nr, d, 5.0);
  const Matrix<double> before = gq;
  const auto call = [&](const auto& ref) { return [&, ref] { loss.forward_backward(ml::scalar, q, yq, ref, gq, gr); }; };
  SelfIndices long_self = no_self(nq + 1);
  expect_invalid(call(ml::reference(r, yr, long_self)), {"BatchTripletLoss<double>::forward_backward", "'self_index'", "length 5", "expected 4"}, gq, before);
  SelfIndices self = no_self(nq);
  self(2) = nr;
  expect_invalid(call(ml::reference(r, yr, self)), {"self_index[2] = 6", "neither -1 (none) nor a row of 'r' (0 to 5"}, gq, before);
  self(2) = -2;
  expect_invalid(call(ml::reference(r, yr, self)), {"self_index[2] = -2"}, gq, before);
  self(2) = 1;  // labels_r[1] = 1, labels_q[2] = 0
  expect_invalid(call(ml::reference(r, yr, self)), {"labels_r[1] differs from labels_q[2]"}, gq, before);
  const Matrix<double> wide = uniform_matrix<double>(nr, d + 1, rng);
  expect_invalid(call(ml::reference(wide, yr)), {"'r' has shape 6x4", "expected 3 columns"}, gq, before);
  const CrossLabels short_labels = yr.head(nr - 1);
  expect_invalid(call(ml::reference(r, short_labels)), {"'labels_r' has length 5", "expected 6"}, gq, before);
  // grad_r overlapping r, and grad_q of the wrong shape.
  ml::LiftedStructureLoss<double> lifted;
  expect_invalid([&] { lifted.forward_backward(ml::scalar, q, yq, ml::reference(r, yr), gq, r); },
                 {"LiftedStructureLoss<double>::forward_backward", "'grad_r' overlaps argument 'r'"}, gq, before);
  Matrix<double> wrong(nq + 1, d);
  const Matrix<double> gr_before = gr;
  expect_invalid([&] { lifted.forward_backward(ml::scalar, q, yq, ml::reference(r, yr), wrong, gr); },
                 {"'grad_q' has shape 5x3", "expected 4x3"}, gr, gr_before);
}

TEST_CASE("reference sets: NaN labels and non-finite data give NaN", "[reference]") {
  std::mt19937_64 rng(1508);
  Matrix<double> q = uniform_matrix<double>(4, 2, rng), r = uniform_matrix<double>(5, 2, rng);
  Eigen::VectorXd yq(4), yr(5);
  yq << 0, 1, 0, 1;
  yr << 0, 1, 0, 1, 0;
  Matrix<double> gq(4, 2), gr(5, 2);
  ml::BatchTripletLoss<double> loss;
  r(3, 1) = std::numeric_limits<double>::infinity();
  CHECK(std::isnan(loss.forward_backward(ml::scalar, q, yq, ml::reference(r, yr), gq, gr)));
  CHECK(gq.array().isNaN().all());
  CHECK(gr.array().isNaN().all());
  r(3, 1) = 0.0;
  yq(2) = std::numeric_limits<double>::quiet_NaN();
  ml::LiftedStructureLoss<double> lifted;
  CHECK(std::isnan(lifted.forward_backward(ml::scalar, q, yq, ml::reference(r, yr), gq, gr)));
  CHECK(gr.array().isNaN().all());
}

TEST_CASE("cross-batch memory: a FIFO ring of the last rows", "[reference][memory]") {
  const std::uint64_t seed = 1509;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index capacity = 10, d = 3;
  for (const Index b : {Index(3), Index(4), Index(7), Index(13)}) {  // none divides 10; 13 > 10
    CAPTURE(b);
    ml::CrossBatchMemory<double> memory(capacity, d);
    CHECK(memory.size() == 0);
    Matrix<double> all(0, d);
    CrossLabels all_labels(0);
    for (int k = 1; k <= 9; ++k) {
      CAPTURE(k);
      const Matrix<double> x = uniform_matrix<double>(b, d, rng);
      CrossLabels y(b);
      for (Index i = 0; i < b; ++i) y(i) = static_cast<std::int64_t>((k * 7 + i) % 3);  // label 0 too
      const auto slots = memory.enqueue(x, y);
      all.conservativeResize(all.rows() + b, d);
      all.bottomRows(b) = x;
      all_labels.conservativeResize(all_labels.rows() + b);
      all_labels.tail(b) = y;
      const Index valid = std::min<Index>(k * b, capacity);
      REQUIRE(memory.size() == valid);
      // The valid rows are exactly the last `valid` rows enqueued, each once.
      std::vector<int> seen(static_cast<std::size_t>(valid), 0);
      for (Index s = 0; s < valid; ++s) {
        Index found = -1;
        for (Index i = 0; i < valid; ++i)
          if (all.row(all.rows() - valid + i) == memory.rows().row(s)) found = i;
        REQUIRE(found >= 0);
        ++seen[static_cast<std::size_t>(found)];
        CHECK(memory.labels()(s) == all_labels(all.rows() - valid + found));
      }
      CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
      // Slots: the kept rows of this batch where they are; -1 for rows not kept.
      REQUIRE(slots.size() == b);
      for (Index i = 0; i < b; ++i) {
        if (i < b - capacity) {
          CHECK(slots[i] == -1);
        } else {
          REQUIRE(slots[i] >= 0);
          REQUIRE(slots[i] < memory.size());
          CHECK(memory.rows().row(slots[i]) == x.row(i));
          CHECK(memory.labels()(slots[i]) == y(i));
        }
      }
    }
  }
}

TEST_CASE("cross-batch memory: the loss against the memory equals the loss against the explicit set",
          "[reference][memory]") {
  const std::uint64_t seed = 1510;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Index capacity = 23, d = 6, b = 8;
  ml::CrossBatchMemory<float> memory(capacity, d);
  std::vector<Matrix<float>> batches;
  std::vector<CrossLabels> labels;
  for (int k = 0; k < 5; ++k) {
    CAPTURE(k);
    batches.push_back(uniform_matrix<float>(b, d, rng));
    labels.push_back(labels_of(random_labels(b, 3, rng)));
    const Matrix<float>& x = batches.back();
    const CrossLabels& y = labels.back();
    const auto slots = memory.enqueue(x, y);
    // The explicit set: every past row still held, oldest first, this batch's rows marked.
    const Index valid = memory.size();
    Matrix<float> r(valid, d);
    CrossLabels yr(valid);
    SelfIndices self = no_self(b);
    Index row = 0;
    for (std::size_t j = 0; j < batches.size(); ++j)
      for (Index i = 0; i < b; ++i) {
        const Index age = static_cast<Index>(batches.size() - 1 - j) * b + (b - 1 - i);
        if (age >= valid) continue;
        r.row(row) = batches[j].row(i);
        yr(row) = labels[j](i);
        if (j + 1 == batches.size()) self(i) = row;
        ++row;
      }
    REQUIRE(row == valid);
    for (const Option& o : every_cross_option()) {
      CAPTURE(o.name());
      const double margin = o.lifted ? 1.0 : 0.3;
      Matrix<float> gq(b, d), gq_explicit(b, d), gr_explicit(valid, d);
      float l;
      if (o.lifted) {
        ml::LiftedStructureLoss<float> loss(1.0f);
        l = loss.forward_backward(ml::scalar, x, y, memory.reference(slots), gq, ml::skip);
      } else {
        ml::BatchTripletLoss<float> loss(0.3f, o.mining, o.distance, o.soft_margin);
        l = loss.forward_backward(ml::scalar, x, y, memory.reference(slots), gq, ml::skip);
      }
      const float le = cross_call(ml::scalar, o, margin, x, y, r, yr, self, gq_explicit, gr_explicit);
      CHECK(relatively_close(l, le, Tolerance<float>::loss, 1e-30));
      CHECK((gq - gq_explicit).cwiseAbs().maxCoeff() <=
            Tolerance<float>::gradient * std::max(gq_explicit.cwiseAbs().maxCoeff(), 1e-30f));
    }
  }
}

TEST_CASE("cross-batch memory: bad input", "[reference][memory][errors]") {
  CHECK_THROWS_AS(ml::CrossBatchMemory<float>(0, 4), ml::invalid_argument);
  CHECK_THROWS_AS(ml::CrossBatchMemory<float>(4, 0), ml::invalid_argument);
  ml::CrossBatchMemory<float> memory(5, 3);
  std::mt19937_64 rng(1511);
  const Matrix<float> wide = uniform_matrix<float>(2, 4, rng);
  const CrossLabels y = labels_of({0, 1});
  try {
    memory.enqueue(wide, y);
    FAIL("no exception");
  } catch (const ml::invalid_argument& e) {
    CHECK(std::string(e.what()).find("CrossBatchMemory<float>::enqueue: argument 'x' has shape 2x4, expected 3 columns") != std::string::npos);
  }
  const Matrix<float> x = uniform_matrix<float>(3, 3, rng);
  CHECK_THROWS_AS(memory.enqueue(x, y), ml::invalid_argument);  // 2 labels for 3 rows
  CHECK(memory.size() == 0);
}

TEMPLATE_TEST_CASE("reference sets: simd agrees with scalar over sizes and strides", "[reference]",
                   float, double) {
  using T = TestType;
  const double tol = std::is_same<T, float>::value ? Tolerance<float>::gradient : 1e-10;
  std::uint64_t seed = 1700;
  for (const Index nq : {Index(1), Index(5), Index(33)})
    for (const Index nr : {Index(2), Index(17), Index(70)})
      for (const Index d : {Index(1), Index(3), Index(37)}) {
        CAPTURE(nq, nr, d, seed);
        std::mt19937_64 rng(seed++);
        const Matrix<T> q = uniform_matrix<T>(nq, d, rng), r = uniform_matrix<T>(nr, d, rng);
        const CrossLabels yq = labels_of(random_labels(nq, 3, rng)), yr = labels_of(random_labels(nr, 3, rng));
        // Strided inputs and outputs, padding filled with a sentinel.
        const Strided<T> qs(q, 3, T(-7)), rs(r, 2, T(-7));
        for (const Option& o : every_cross_option()) {
          if (!runs<T>(ml::simd, o)) continue;
          CAPTURE(o.name());
          ml::BatchTripletLoss<T> batch(T(0.3), o.mining, o.distance, o.soft_margin);
          ml::LiftedStructureLoss<T> lifted(T(1));
          const auto run = [&](auto tag, const auto& qm, const auto& rm, auto&& gqm, auto&& grm) {
            return o.lifted ? lifted.forward_backward(tag, qm, yq, ml::reference(rm, yr), gqm, grm)
                            : batch.forward_backward(tag, qm, yq, ml::reference(rm, yr), gqm, grm);
          };
          Matrix<T> gq(nq, d), gr(nr, d);
          const T l = run(ml::scalar, q, r, gq, gr);
          Strided<T> gqs(Matrix<T>::Zero(nq, d), 5, T(-9)), grs(Matrix<T>::Zero(nr, d), 1, T(-9));
          const T ls = run(ml::simd, qs.cmap(), rs.cmap(), gqs.map(), grs.map());
          CHECK(relatively_close(ls, l, std::is_same<T, float>::value ? Tolerance<float>::loss : 1e-10, 1e-30));
          const double scale = std::max(largest_entry(gq.template cast<double>(), gr.template cast<double>()), 1e-30);
          CHECK((Matrix<T>(gqs.map()) - gq).template cast<double>().cwiseAbs().maxCoeff() <= tol * scale);
          CHECK((Matrix<T>(grs.map()) - gr).template cast<double>().cwiseAbs().maxCoeff() <= tol * scale);
          CHECK(gqs.padding_is(T(-9)));
          CHECK(grs.padding_is(T(-9)));
        }
      }
}

TEST_CASE("reference sets: lifted in float on simd, large sets and scales float cannot hold",
          "[reference][lifted]") {
  // The float path keeps its distances in float where every negative that carries weight is
  // within lifted_tolerance; otherwise the call runs in double. Each case is checked against
  // the brute force at API.md's float bounds:
  //   - large sets: row sums over several lane blocks, column sums over several flushes;
  //   - a negative close to its query (the global bound fails, each entry passes: float);
  //   - R a cloud 1e4 away from Q (D ~ 2.6e4, float holds D to ~3e-3: in double);
  //   - ordinary data with one far row of R (its column's weighted entries: in double).
  struct Case {
    const char* name;
    Index nq, nr, d;
    double offset;
    bool close_negative, far_row;
  };
  const Case cases[] = {{"large sets", 70, 600, 19, 0.0, false, false},
                        {"a close negative", 20, 90, 32, 0.0, true, false},
                        {"R far from Q", 20, 90, 7, 1e4, false, false},
                        {"one far row of R", 20, 90, 7, 0.0, false, true}};
  std::uint64_t seed = 1800;
  for (const Case& c : cases) {
    CAPTURE(c.name, seed);
    std::mt19937_64 rng(seed++);
    const Matrix<float> q = uniform_matrix<float>(c.nq, c.d, rng);
    Matrix<float> r = uniform_matrix<float>(c.nr, c.d, rng, c.offset - 1.0, c.offset + 1.0);
    const CrossLabels yq = labels_of(random_labels(c.nq, 6, rng));
    CrossLabels yr = labels_of(random_labels(c.nr, 6, rng));
    if (c.close_negative) {  // r_0 = q_0 + 0.2 e_0, of another class
      r.row(0) = q.row(0);
      r(0, 0) += 0.2f;
      yr(0) = yq(0) + 1;
    }
    if (c.far_row) {
      r.row(5).setConstant(3000.0f);
      yr(5) = yq(0) + 1;
    }
    ml::LiftedStructureLoss<float> loss(1.0f);
    Matrix<float> gq(c.nq, c.d), gr(c.nr, c.d);
    const float l = loss.forward_backward(ml::simd, q, yq, ml::reference(r, yr), gq, gr, 0.5f);
    const CrossReference b = cross_lifted_brute_force(q.cast<double>(), yq, r.cast<double>(), yr,
                                                      no_self(c.nq), 1.0, 0.5);
    check_against(b, l, gq, gr, Tolerance<float>::loss, Tolerance<float>::gradient);
    CHECK(loss.forward(ml::simd, q, yq, ml::reference(r, yr)) == l);
  }
}
