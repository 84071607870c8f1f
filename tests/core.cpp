// Core: tags, traits, views and the validation every loss shares.
#include "support.hpp"

#include <metricloss/detail/label_classes.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

using namespace mltest;
namespace mld = metricloss::detail;

TEST_CASE("execution tags are empty value types", "[core]") {
  STATIC_REQUIRE(std::is_empty<ml::scalar_tag>::value);
  STATIC_REQUIRE(std::is_empty<ml::simd_tag>::value);
  STATIC_REQUIRE(std::is_trivially_copyable<ml::simd_tag>::value);
  STATIC_REQUIRE(!std::is_same<ml::scalar_tag, ml::simd_tag>::value);
}

TEST_CASE("invalid_argument derives from std::invalid_argument", "[core]") {
  STATIC_REQUIRE(std::is_base_of<std::invalid_argument, ml::invalid_argument>::value);
}

TEST_CASE("version macros agree", "[core]") {
  STATIC_REQUIRE(METRICLOSS_VERSION == METRICLOSS_VERSION_MAJOR * 10000 +
                                           METRICLOSS_VERSION_MINOR * 100 +
                                           METRICLOSS_VERSION_PATCH);
}

TEST_CASE("argument traits classify labels and gradient outputs", "[core]") {
  using ml::detail::is_gradient_output_v;
  using ml::detail::is_label_vector_v;
  STATIC_REQUIRE(is_label_vector_v<Eigen::VectorXi>);
  STATIC_REQUIRE(is_label_vector_v<Eigen::Map<const Eigen::VectorXf>>);
  STATIC_REQUIRE(is_label_vector_v<Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>>);
  STATIC_REQUIRE(!is_label_vector_v<ml::RowMatrix<float>>);
  STATIC_REQUIRE(!is_label_vector_v<float>);
  STATIC_REQUIRE(is_gradient_output_v<ml::RowMatrix<float>&>);
  STATIC_REQUIRE(is_gradient_output_v<ml::RowMap<double>>);
  STATIC_REQUIRE(is_gradient_output_v<Eigen::Map<ml::RowMatrix<float>>>);
  STATIC_REQUIRE(is_gradient_output_v<const ml::skip_t&>);
  STATIC_REQUIRE(!is_gradient_output_v<Eigen::Map<const ml::RowMatrix<float>>>);
  STATIC_REQUIRE(!is_gradient_output_v<Eigen::VectorXf>);
  STATIC_REQUIRE(!is_gradient_output_v<float>);
}

TEST_CASE("views see any outer stride without copying", "[core]") {
  std::vector<float> storage(4 * 7, 0.0f);
  ml::ConstRowMap<float> map(storage.data(), 4, 5, Eigen::OuterStride<>(7));
  const auto view = ml::detail::input_view(map);
  CHECK(view.data == storage.data());
  CHECK(view.rows == 4);
  CHECK(view.cols == 5);
  CHECK(view.stride == 7);
  CHECK(view.extent_bytes() == (3 * 7 + 5) * sizeof(float));
  ml::RowMatrix<double> plain(3, 2);
  const auto plain_view = ml::detail::input_view(plain);
  CHECK(plain_view.data == plain.data());
  CHECK(plain_view.stride == 2);
}

TEST_CASE("validator messages name the function, the argument and the shapes", "[core]") {
  ml::detail::Validator check("SomeLoss", "double", "forward");
  ml::RowMatrix<double> x(3, 2), y(2, 2);
  const auto xv = ml::detail::input_view(x), yv = ml::detail::input_view(y);
  check.embeddings("x", xv);
  CHECK_THROWS_WITH(check.same_shape("y", yv, "x", xv),
                    "metricloss::SomeLoss<double>::forward: argument 'y' has shape 2x2, "
                    "expected 3x2 (the shape of 'x')");
  CHECK_THROWS_AS(check.margin(-0.5), ml::invalid_argument);
  CHECK_NOTHROW(check.margin(0.0));
}

namespace {

/// LabelClasses against its definition: rows sorted by (label, row), dense class ids in
/// increasing label order, |P| from the class sizes.
template <class L>
void check_label_classes(const std::vector<L>& labels) {
  const Index n = static_cast<Index>(labels.size());
  CAPTURE(n);
  mld::LabelClasses classes;
  REQUIRE(classes.assign(mld::VectorView<L>{labels.data(), n, 1}));
  std::vector<Index> want(labels.size());
  for (Index i = 0; i < n; ++i) want[static_cast<std::size_t>(i)] = i;
  std::stable_sort(want.begin(), want.end(), [&](Index a, Index b) {
    return labels[static_cast<std::size_t>(a)] < labels[static_cast<std::size_t>(b)];
  });
  Index c = -1, pairs = 0, size = 0;
  for (std::size_t r = 0; r < want.size(); ++r) {
    const Index i = want[r];
    if (r == 0 || labels[static_cast<std::size_t>(want[r - 1])] != labels[static_cast<std::size_t>(i)]) {
      pairs += size * (size - 1) / 2;
      size = 0;
      ++c;
      REQUIRE(*classes.class_begin(c) == i);
    }
    ++size;
    CAPTURE(r, i);
    REQUIRE(classes.class_of(i) == c);
    REQUIRE(classes.class_begin(0)[r] == i);
  }
  pairs += size * (size - 1) / 2;
  REQUIRE(classes.classes() == c + 1);
  REQUIRE(classes.positive_pairs() == pairs);
  for (Index k = 0; k <= c; ++k)
    REQUIRE(classes.find(mld::VectorView<L>{labels.data(), n, 1}, labels[static_cast<std::size_t>(*classes.class_begin(k))]) == k);
}

}  // namespace

TEST_CASE("label classes: rows by (label, row), counted or sorted, every label type", "[core]") {
  std::mt19937_64 rng(57);
  CAPTURE(57);
  for (const Index n : {Index(0), Index(1), Index(2), Index(7), Index(300), Index(5000)}) {
    std::uniform_int_distribution<int> small(-5, 40), wide(-2000000000, 2000000000);
    std::vector<int> a(static_cast<std::size_t>(n)), b(a.size());
    for (auto& v : a) v = small(rng);  // counted
    for (auto& v : b) v = wide(rng);   // sorted (the span is far above 2N + 1024)
    check_label_classes(a);
    check_label_classes(b);
    // Spans at the counting limit, 2N + 1024 values, either side.
    for (const long long span : {2 * static_cast<long long>(n) + 1023, 2 * static_cast<long long>(n) + 1024}) {
      std::vector<long long> c(a.size());
      std::uniform_int_distribution<long long> within(0, span);
      for (auto& v : c) v = within(rng) - 7;
      if (n >= 2) c[0] = -7, c[1] = span - 7;
      check_label_classes(c);
    }
    // Extremes: the span of int64 and of uint64 (differences must not overflow).
    std::vector<std::int64_t> e(a.size());
    std::vector<std::uint64_t> u(a.size());
    for (std::size_t i = 0; i < e.size(); ++i) {
      e[i] = i % 3 == 0 ? std::numeric_limits<std::int64_t>::min()
             : i % 3 == 1 ? std::numeric_limits<std::int64_t>::max() : std::int64_t(small(rng));
      u[i] = i % 2 == 0 ? std::numeric_limits<std::uint64_t>::max() - std::uint64_t(i % 5) : std::uint64_t(i % 5);
    }
    check_label_classes(e);
    check_label_classes(u);
    std::vector<std::int64_t> near(a.size());  // a narrow span at int64's minimum: counted
    for (auto& v : near) v = std::numeric_limits<std::int64_t>::min() + (small(rng) + 5);
    check_label_classes(near);
    std::vector<unsigned char> bytes(a.size());
    for (auto& v : bytes) v = static_cast<unsigned char>(small(rng) + 5);
    check_label_classes(bytes);
    std::vector<float> f(a.size());  // floating labels: always sorted
    for (auto& v : f) v = static_cast<float>(small(rng)) * 0.5f;
    check_label_classes(f);
  }
}
