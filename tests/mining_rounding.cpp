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
#include "support.hpp"

#include <metricloss/detail/cross_classes.hpp>

#include <algorithm>
#include <cmath>
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
    std::uniform_real_distribution<double> unit(-1.0, 1.0);
    for (auto& y : yq) y = label(rng);
    for (auto& y : yr) y = label(rng);
    d.n = c.n;
    for (Index j = 0; j < c.n; ++j) d.bounds.push_back(0.004 * static_cast<double>(1 + j % 3));
    d.widest_row = 2;
    for (Index a = 0; a < c.queries; ++a)
      for (Index j = 0; j < c.n; ++j) {
        const bool positive = yr[static_cast<std::size_t>(j)] == yq[static_cast<std::size_t>(a)];
        const double e = (c.beyond && positive && pick(rng) == 0 ? 8.0 : 4.0) + 0.01 * grid(rng);
        const int r = pick(rng);
        const double off = r < 3 ? 0.999 : r < 6 ? -0.999 : r < 7 ? 0.0 : unit(rng);
        d.exact_values.push_back(e);
        d.approx.push_back(e + off * d.bounds[static_cast<std::size_t>(j)]);
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
