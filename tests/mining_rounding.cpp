// The semihard miner's selections when the values it selects on are off by up to their
// stated rounding (the contract of the simd path's product distances), built to the worst:
// exact distances on a grid finer than the rounding, so that values cross each other and
// the positives' thresholds; errors of +-0.999 bound (the product's bound is never reached:
// at exactly the bound the miner's own test of it would round either way), 0 and in
// between; exact ties, and negatives at exactly a positive's distance. Every
// selection must be the exact one (API.md: the nearest negative farther than the positive
// on exact distances, lowest row on ties; none farther: the farthest), on each regime of
// the miner: one scan per positive (k <= 16), buckets by binary search, and the bucket
// table of long rows (mining/cells.hpp), with and without positives beyond every negative.
// Mining::all the same way: which triplets are active is decided on exact distances.
// MultiSimilarityLoss's row the same way, on similarities: its kept sets are decided on exact
// similarities, and its simd row (which predicts each side's shift from the most extreme
// rounded similarity) must equal the scalar row bit for bit where the prediction is wrong.
#include "support.hpp"

#include <metricloss/backend/simd/multi_similarity_row.hpp>
#include <metricloss/detail/cross_classes.hpp>
#include <metricloss/detail/multi_similarity_math.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <utility>
#include <vector>

namespace mld = metricloss::detail;
using metricloss::Index;

namespace {

/// Q x N values off the exact squared distances by at most rounding(a, j).
struct RoundedDistances {
  Index n = 0;
  std::vector<double> approx, exact_values, bounds;
  Index widest_row = 0;
  const double* row(Index a) const { return approx.data() + a * n; }
  double exact(Index a, Index j) const { return exact_values[static_cast<std::size_t>(a * n + j)]; }
  double rounding(Index, Index j) const { return bounds[static_cast<std::size_t>(j)]; }
  Index widest() const { return widest_row; }
  /// The next value: `exact`, approximated with an error of +-0.999 bound, 0 or uniform within it.
  void add(double exact, double bound, std::mt19937_64& rng) {
    const int r = std::uniform_int_distribution<int>(0, 9)(rng);
    const double off = r < 7 ? (r < 3 ? 0.999 : r < 6 ? -0.999 : 0.0)
                             : std::uniform_real_distribution<double>(-1.0, 1.0)(rng);
    exact_values.push_back(exact);
    approx.push_back(exact + off * bound);
  }
};

/// The (anchor, negative) of every mined triplet, in the miner's order.
struct NegativeRecorder {
  const mld::CrossClasses* classes = nullptr;
  std::vector<std::pair<Index, Index>> negatives;
  bool enabled() const { return true; }
  void add(Index a, Index j, double) {
    if (classes->class_of(j) != classes->own_class(a)) negatives.emplace_back(a, j);
  }
  void add_row(Index, const double*, Index) {}
  template <class T>
  void add_row_lanes(Index, const T*, Index) {}
};

struct Case {
  Index queries, n, classes;
  bool beyond;  // some positives farther than every negative
};

/// API.md's semihard selection by brute force on exact distances.
std::vector<std::pair<Index, Index>> expected(const RoundedDistances& d, const std::vector<int>& yq,
                                              const std::vector<int>& yr) {
  std::vector<std::pair<Index, Index>> out;
  for (Index a = 0; a < static_cast<Index>(yq.size()); ++a) {
    std::vector<Index> pos, neg;
    for (Index j = 0; j < d.n; ++j) (yr[static_cast<std::size_t>(j)] == yq[static_cast<std::size_t>(a)] ? pos : neg).push_back(j);
    if (pos.empty() || neg.empty()) continue;
    std::stable_sort(pos.begin(), pos.end(), [&](Index x, Index y) { return d.exact(a, x) < d.exact(a, y); });
    for (Index p : pos) {
      Index best = -1;
      for (Index j : neg)
        if (d.exact(a, j) > d.exact(a, p) && (best < 0 || d.exact(a, j) < d.exact(a, best))) best = j;
      if (best < 0)
        for (Index j : neg)
          if (best < 0 || d.exact(a, j) > d.exact(a, best)) best = j;
      out.emplace_back(a, best);
    }
  }
  return out;
}

/// Labels and rounded distances of a case: exact squared distances on a grid of 0.01 in
/// [4, 8) (a tenth of the positives at [8, 12) where `beyond`), roundings of 0.004, 0.008
/// or 0.012 a row, and errors of +-0.999 bound, 0 or uniform within it.
struct Data {
  std::vector<int> yq, yr;
  RoundedDistances d;
  mld::CrossClasses classes;
  Data(const Case& c, unsigned seed) : yq(static_cast<std::size_t>(c.queries)), yr(static_cast<std::size_t>(c.n)) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int> grid(0, 399), label(0, static_cast<int>(c.classes) - 1), pick(0, 9);
    for (auto& y : yq) y = label(rng);
    for (auto& y : yr) y = label(rng);
    d.n = c.n;
    for (Index j = 0; j < c.n; ++j) d.bounds.push_back(0.004 * static_cast<double>(1 + j % 3));
    d.widest_row = 2;
    for (Index a = 0; a < c.queries; ++a)
      for (Index j = 0; j < c.n; ++j) {
        const bool positive = yr[static_cast<std::size_t>(j)] == yq[static_cast<std::size_t>(a)];
        const double e = (c.beyond && positive && pick(rng) == 0 ? 8.0 : 4.0) + 0.01 * grid(rng);
        d.add(e, d.bounds[static_cast<std::size_t>(j)], rng);
      }
    const mld::VectorView<int> q_view{yq.data(), c.queries, 1}, r_view{yr.data(), c.n, 1};
    REQUIRE(classes.assign(q_view, r_view, mld::SelfIndex{}));
  }
  bool positive(Index a, Index j) const {
    return yr[static_cast<std::size_t>(j)] == yq[static_cast<std::size_t>(a)];
  }
};

template <class Kernels>
void check_semihard(const Case& c, unsigned seed) {
  CAPTURE(c.queries, c.n, c.classes, c.beyond, seed);
  Data data(c, seed);
  const RoundedDistances& d = data.d;
  mld::mining::Scratch scratch;
  NegativeRecorder recorder;
  recorder.classes = &data.classes;
  // Soft margin: every mined triplet adds its negative's weight, so every one is seen.
  mld::mining::semihard<Kernels>(scratch, data.classes, d, 0.2,
                                 metricloss::Distance::squared_euclidean, true, recorder);
  const auto want = expected(d, data.yq, data.yr);
  REQUIRE(recorder.negatives.size() == want.size());
  for (std::size_t t = 0; t < want.size(); ++t) {
    CAPTURE(t, want[t].first, want[t].second, recorder.negatives[t].second);
    const Index a = want[t].first, w = want[t].second, g = recorder.negatives[t].second;
    CAPTURE(d.exact(a, w), d.row(a)[w], d.exact(a, g), d.row(a)[g]);
    REQUIRE(recorder.negatives[t] == want[t]);
  }
}

/// Mining::all's rows of slopes (add_row, or add_row_lanes where the kernels run lanes),
/// one per anchor.
struct RowRecorder {
  std::vector<std::vector<double>> rows;
  bool enabled() const { return true; }
  void add(Index, Index, double) {}
  void add_row(Index, const double* v, Index n) { rows.emplace_back(v, v + n); }
  template <class T>
  void add_row_lanes(Index, const T* v, Index n) {
    rows.emplace_back(v, v + n);
  }
};

/// Mining::all with the hinge: the active triplets (d_an < d_ap + m on exact distances)
/// counted, and each negative's number of active positives in its slope, exactly.
template <class Kernels>
void check_all(const Case& c, metricloss::Distance distance, unsigned seed) {
  CAPTURE(c.queries, c.n, c.classes, c.beyond, distance == metricloss::Distance::euclidean, seed);
  Data data(c, seed);
  const RoundedDistances& d = data.d;
  const double margin = 0.2;
  const bool squared = distance == metricloss::Distance::squared_euclidean;
  mld::mining::Scratch scratch;
  RowRecorder recorder;
  const mld::MiningResult result = mld::mining::all<Kernels>(scratch, data.classes, d, margin,
                                                             distance, false, recorder);
  double count = 0.0;
  std::size_t row = 0;
  for (Index a = 0; a < c.queries; ++a) {
    std::vector<double> thresholds;
    Index negatives = 0;
    for (Index j = 0; j < c.n; ++j) {
      if (data.positive(a, j)) thresholds.push_back((squared ? d.exact(a, j) : std::sqrt(d.exact(a, j))) + margin);
      else ++negatives;
    }
    if (thresholds.empty() || negatives == 0) continue;
    REQUIRE(row < recorder.rows.size());
    for (Index j = 0; j < c.n; ++j) {
      if (data.positive(a, j)) continue;
      const double dn = squared ? d.exact(a, j) : std::sqrt(d.exact(a, j));
      double active = 0.0;
      for (double t : thresholds) active += dn < t ? 1.0 : 0.0;
      count += active;
      // slope = -active * dd/dD2 (1, or 0.5 / d on values within 0.1% of exact)
      const double slope = recorder.rows[row][static_cast<std::size_t>(j)];
      CAPTURE(a, j, d.exact(a, j), d.row(a)[j], active, slope);
      REQUIRE(std::round(squared ? -slope : -slope * 2.0 * dn) == active);
    }
    ++row;
  }
  REQUIRE(row == recorder.rows.size());
  REQUIRE(result.count == count);
}

}  // namespace

// k ~ n / classes positives a query: 5 (scans), 20 over 600 rows (buckets by binary search),
// 20 and 25 over 4096 rows (the bucket table: 1024 cells, >= 32 a threshold).
const Case cases[] = {{7, 300, 60, false},  {7, 600, 30, false},   {7, 600, 30, true},
                      {9, 4096, 200, false}, {9, 4096, 160, true}, {5, 4096, 200, true}};

TEST_CASE("semihard mining: exact selections under the stated rounding, every regime",
          "[batch_triplet][mining]") {
  unsigned seed = 91;
  for (const Case& c : cases) {
    check_semihard<mld::SimdMiningKernels>(c, seed);
    check_semihard<mld::ScalarMiningKernels>(c, seed);
    ++seed;
  }
}

TEST_CASE("all mining: exact active triplets under the stated rounding, every regime",
          "[batch_triplet][mining]") {
  unsigned seed = 191;
  for (const Case& c : cases)
    for (auto distance : {metricloss::Distance::squared_euclidean, metricloss::Distance::euclidean}) {
      check_all<mld::SimdMiningKernels>(c, distance, seed);
      check_all<mld::ScalarMiningKernels>(c, distance, seed);
      ++seed;
    }
}

namespace {

/// Q x N similarities off the exact ones by at most rounding(a, j): CrossSimilarities'
/// contract (backend/simd/similarities.hpp), with the rounding made large.
struct RoundedSimilarities : RoundedDistances {
  double widest_rounding(Index) const { return 0.012; }
};

/// Exact similarities on a grid of 0.001 about base = 0.5; roundings of 0.004, 0.008 or
/// 0.012 a column and errors of +-0.999 bound, 0 or uniform within it, so that the rounded
/// order of two pairs often inverts their exact one near a kept-set limit. Rows of three
/// kinds: positives in [0.49, 0.52] over negatives in [0.46, 0.493] (few positives kept, the
/// smallest rounded one often not: its side's shift mispredicted), the mirror image about
/// 0.51 for the negatives, and both in a broad overlapping band.
struct SimilarityData {
  std::vector<int> yq, yr;
  RoundedSimilarities s;
  mld::CrossClasses classes;
  SimilarityData(Index queries, Index n, int labels, unsigned seed)
      : yq(static_cast<std::size_t>(queries)), yr(static_cast<std::size_t>(n)) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int> narrow(0, 30), broad(0, 60), label(0, labels - 1);
    for (auto& y : yq) y = label(rng);
    for (auto& y : yr) y = label(rng);
    s.n = n;
    for (Index j = 0; j < n; ++j) s.bounds.push_back(0.004 * static_cast<double>(1 + j % 3));
    for (Index a = 0; a < queries; ++a)
      for (Index j = 0; j < n; ++j) {
        const bool positive = yr[static_cast<std::size_t>(j)] == yq[static_cast<std::size_t>(a)];
        double e = 0.0;
        switch (a % 3) {
          case 0: e = positive ? 0.49 + 0.001 * narrow(rng) : 0.463 + 0.001 * narrow(rng); break;
          case 1: e = positive ? 0.507 + 0.001 * narrow(rng) : 0.48 + 0.001 * narrow(rng); break;
          default: e = (positive ? 0.48 : 0.46) + 0.001 * broad(rng);
        }
        s.add(e, s.bounds[static_cast<std::size_t>(j)], rng);
      }
    const mld::VectorView<int> q_view{yq.data(), queries, 1}, r_view{yr.data(), n, 1};
    REQUIRE(classes.assign(q_view, r_view, mld::SelfIndex{}));
  }
};

/// API.md's multi-similarity row by brute force: kept sets on exact similarities, exponents
/// on the values given; L_a and w_j = scale dL_a/dS_aj.
double expected_row(const mld::MultiSimilarityRule& rule, const SimilarityData& data, Index a,
                    double scale, std::vector<double>& w, int& mispredicted) {
  const RoundedSimilarities& s = data.s;
  constexpr double inf = std::numeric_limits<double>::infinity();
  const auto positive = [&](Index j) {
    return data.yr[static_cast<std::size_t>(j)] == data.yq[static_cast<std::size_t>(a)];
  };
  double min_pos = inf, max_neg = -inf;
  Index most_pos = -1, most_neg = -1;  // the most extreme rounded similarity of each side
  for (Index j = 0; j < s.n; ++j) {
    if (positive(j)) {
      min_pos = std::min(min_pos, s.exact(a, j));
      if (most_pos < 0 || s.row(a)[j] < s.row(a)[most_pos]) most_pos = j;
    } else {
      max_neg = std::max(max_neg, s.exact(a, j));
      if (most_neg < 0 || s.row(a)[j] > s.row(a)[most_neg]) most_neg = j;
    }
  }
  const auto kept = [&](Index j) {
    return positive(j) ? s.exact(a, j) < max_neg + rule.epsilon : s.exact(a, j) > min_pos - rule.epsilon;
  };
  double pos_sum = 0.0, neg_sum = 0.0, pos_top = -inf, neg_top = -inf;
  w.assign(static_cast<std::size_t>(s.n), 0.0);
  for (Index j = 0; j < s.n; ++j) {
    if (!kept(j)) continue;
    const double v = s.row(a)[j];
    const double z = positive(j) ? -rule.alpha * (v - rule.base) : rule.beta * (v - rule.base);
    w[static_cast<std::size_t>(j)] = std::exp(z);
    (positive(j) ? pos_sum : neg_sum) += std::exp(z);
    (positive(j) ? pos_top : neg_top) = std::max(positive(j) ? pos_top : neg_top, z);
  }
  // The case the simd row's shift prediction gets wrong: the side's most extreme rounded
  // similarity is not kept, another is, and the shift would be > 0.
  if (most_pos >= 0 && !kept(most_pos) && pos_top > 0.0) ++mispredicted;
  if (most_neg >= 0 && !kept(most_neg) && neg_top > 0.0) ++mispredicted;
  for (Index j = 0; j < s.n; ++j)
    w[static_cast<std::size_t>(j)] *= positive(j) ? -scale / (1.0 + pos_sum) : scale / (1.0 + neg_sum);
  return std::log1p(pos_sum) / rule.alpha + std::log1p(neg_sum) / rule.beta;
}

}  // namespace

TEST_CASE("multi-similarity row: exact kept sets under the stated rounding, simd row == scalar row",
          "[multi_similarity][mining]") {
  unsigned seed = 291;
  int mispredicted = 0;
  for (const double epsilon : {0.0, 0.003})
    for (const Index n : {Index(37), Index(300), Index(1031)})
      for (const int labels : {2, 5}) {
        const mld::MultiSimilarityRule rule(2.0, 50.0, 0.5, epsilon);
        const Index queries = 40;
        CAPTURE(epsilon, n, labels, seed);
        const SimilarityData data(queries, n, labels, seed++);
        mld::MultiSimilarityRowBuffers buffers;
        std::vector<double> z(static_cast<std::size_t>(n)), w_scalar(z.size()), w_lanes(z.size()), w_want;
        const double scale = 0.75;
        for (Index a = 0; a < queries; ++a) {
          CAPTURE(a);
          mld::MultiSimilarityRowStats scalar_stats, lanes_stats;
          const double scalar = mld::multi_similarity_row(rule, data.classes, data.s, a, n, z.data(),
                                                          w_scalar.data(), scale, &scalar_stats);
          const double lanes = mld::multi_similarity_row_lanes(rule, data.classes, data.s, a, n, buffers,
                                                               w_lanes.data(), scale, &lanes_stats);
          const double want = expected_row(rule, data, a, scale, w_want, mispredicted);
          // The same kept sets and shifts; the exponentials (xsimd's) and their sums (in
          // lane order) may differ from the scalar row's in the last bits.
          REQUIRE(lanes_stats.pos_shift == scalar_stats.pos_shift);
          REQUIRE(lanes_stats.neg_shift == scalar_stats.neg_shift);
          REQUIRE(lanes_stats.pos_sum == Approx(scalar_stats.pos_sum).epsilon(1e-14));
          REQUIRE(lanes_stats.neg_sum == Approx(scalar_stats.neg_sum).epsilon(1e-14));
          REQUIRE(lanes == Approx(scalar).epsilon(1e-14));
          for (Index j = 0; j < n; ++j) {
            const double l = w_lanes[static_cast<std::size_t>(j)], r = w_scalar[static_cast<std::size_t>(j)];
            CAPTURE(j, l, r);
            REQUIRE((l == 0.0) == (r == 0.0));
            REQUIRE(l == Approx(r).epsilon(1e-14));
          }
          REQUIRE(scalar == Approx(want).epsilon(1e-12));
          for (Index j = 0; j < n; ++j) {
            CAPTURE(j, data.s.exact(a, j), data.s.row(a)[j], w_want[static_cast<std::size_t>(j)]);
            REQUIRE(w_scalar[static_cast<std::size_t>(j)] ==
                    Approx(w_want[static_cast<std::size_t>(j)]).epsilon(1e-12).margin(1e-300));
          }
        }
      }
  // The data must reach the wrong prediction, or this test would not guard its repeat.
  CAPTURE(mispredicted);
  REQUIRE(mispredicted >= 10);
}
