// Core: tags, traits, views and the validation every loss shares.
#include "support.hpp"

#include <type_traits>

using namespace mltest;

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
