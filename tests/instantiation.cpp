// Explicit instantiation: every member of every functor is compiled for float and double
// (a member template is instantiated here through each overload below).
#include "support.hpp"

template class metricloss::ContrastiveLoss<float>;
template class metricloss::ContrastiveLoss<double>;

namespace {
template <class T, class Tag>
void instantiate_contrastive() {
  using namespace mltest;
  Matrix<T> a = Matrix<T>::Ones(2, 3), b = Matrix<T>::Zero(2, 3), ga(2, 3), gb(2, 3);
  Eigen::VectorXi s = Eigen::VectorXi::Ones(2);
  Eigen::Map<const Matrix<T>> am(a.data(), 2, 3);
  ml::ConstRowMap<T> bm(b.data(), 2, 3, Eigen::OuterStride<>(3));
  Eigen::Map<Matrix<T>> gam(ga.data(), 2, 3);
  ml::RowMap<T> gbm(gb.data(), 2, 3, Eigen::OuterStride<>(3));
  ml::ContrastiveLoss<T> loss(T(1), ml::ContrastiveForm::legacy);
  loss.margin = T(2);
  loss.form = ml::ContrastiveForm::hadsell;
  const Tag tag{};
  CHECK(loss.forward(tag, am, bm, s) == loss.forward(tag, a, b, s, s));
  loss.forward_backward(tag, am, bm, s, gam, gbm, T(0.5));
  loss.forward_backward(tag, a, b, s, s, ga, ml::skip);
  loss.forward_backward(tag, a, b, s, ml::skip, gb);
}
}  // namespace

TEST_CASE("every loss compiles for float and double on every CPU tag", "[instantiation]") {
  instantiate_contrastive<float, metricloss::scalar_tag>();
  instantiate_contrastive<double, metricloss::scalar_tag>();
  instantiate_contrastive<float, metricloss::simd_tag>();
  instantiate_contrastive<double, metricloss::simd_tag>();
}

template class metricloss::TripletLoss<float>;
template class metricloss::TripletLoss<double>;

namespace {
template <class T, class Tag>
void instantiate_triplet() {
  using namespace mltest;
  Matrix<T> a = Matrix<T>::Ones(2, 3), p = Matrix<T>::Zero(2, 3), n = Matrix<T>::Zero(2, 3);
  Matrix<T> ga(2, 3), gp(2, 3), gn(2, 3);
  Eigen::Map<const Matrix<T>> am(a.data(), 2, 3);
  ml::ConstRowMap<T> pm(p.data(), 2, 3, Eigen::OuterStride<>(3));
  Eigen::Map<Matrix<T>> gam(ga.data(), 2, 3);
  ml::RowMap<T> gpm(gp.data(), 2, 3, Eigen::OuterStride<>(3));
  ml::TripletLoss<T> loss(T(1), ml::Distance::euclidean);
  loss.margin = T(2);
  loss.distance = ml::Distance::squared_euclidean;
  const Tag tag{};
  CHECK(loss.forward(tag, am, pm, n) == loss.forward(tag, a, p, n));
  loss.forward_backward(tag, am, pm, n, gam, gpm, gn, T(0.5));
  loss.forward_backward(tag, a, p, n, ml::skip, ml::skip, gn);
}
}  // namespace

TEST_CASE("TripletLoss compiles for float and double on every CPU tag", "[instantiation]") {
  instantiate_triplet<float, metricloss::scalar_tag>();
  instantiate_triplet<double, metricloss::scalar_tag>();
  instantiate_triplet<float, metricloss::simd_tag>();
  instantiate_triplet<double, metricloss::simd_tag>();
}

template class metricloss::LiftedStructureLoss<float>;
template class metricloss::LiftedStructureLoss<double>;

namespace {
template <class T, class Tag>
void instantiate_lifted_structure() {
  using namespace mltest;
  Matrix<T> x = Matrix<T>::Identity(3, 2), gx(3, 2);
  Eigen::VectorXf labels(3);
  labels << 1.0f, 1.0f, 2.0f;
  Eigen::Map<const Matrix<T>> xm(x.data(), 3, 2);
  ml::RowMap<T> gxm(gx.data(), 3, 2, Eigen::OuterStride<>(2));
  ml::LiftedStructureLoss<T> loss(T(0.5));
  loss.margin = T(1);
  const Tag tag{};
  CHECK(loss.forward(tag, xm, labels) == loss.forward(tag, x, labels.cast<int>().eval()));
  loss.forward_backward(tag, xm, labels, gxm, T(0.5));
  loss.forward_backward(tag, x, labels, gx);
  loss.forward_backward(tag, x, labels, ml::skip);
}
}  // namespace

TEST_CASE("LiftedStructureLoss compiles for float and double on every CPU tag", "[instantiation]") {
  instantiate_lifted_structure<float, metricloss::scalar_tag>();
  instantiate_lifted_structure<double, metricloss::scalar_tag>();
  instantiate_lifted_structure<float, metricloss::simd_tag>();
  instantiate_lifted_structure<double, metricloss::simd_tag>();
}

template class metricloss::BatchTripletLoss<float>;
template class metricloss::BatchTripletLoss<double>;

namespace {
template <class T, class Tag>
void instantiate_batch_triplet() {
  using namespace mltest;
  Matrix<T> x = Matrix<T>::Random(4, 3), g(4, 3);
  Eigen::VectorXi y(4);
  y << 0, 0, 1, 1;
  Eigen::Map<const Matrix<T>> xm(x.data(), 4, 3);
  ml::RowMap<T> gm(g.data(), 4, 3, Eigen::OuterStride<>(3));
  ml::BatchTripletLoss<T> loss(T(1), ml::Mining::all, ml::Distance::squared_euclidean, true);
  loss.margin = T(2);
  loss.mining = ml::Mining::semihard;
  loss.distance = ml::Distance::euclidean;
  loss.soft_margin = false;
  const Tag tag{};
  CHECK(loss.forward(tag, xm, y) == loss.forward(tag, x, y));
  loss.forward_backward(tag, xm, y.cast<float>().eval(), gm, T(0.5));
  loss.forward_backward(tag, x, y, ml::skip);
}
}  // namespace

TEST_CASE("BatchTripletLoss compiles for float and double on every CPU tag", "[instantiation]") {
  instantiate_batch_triplet<float, metricloss::scalar_tag>();
  instantiate_batch_triplet<double, metricloss::scalar_tag>();
  instantiate_batch_triplet<float, metricloss::simd_tag>();
  instantiate_batch_triplet<double, metricloss::simd_tag>();
}

template class metricloss::BatchContrastiveLoss<float>;
template class metricloss::BatchContrastiveLoss<double>;
template class metricloss::MultiSimilarityLoss<float>;
template class metricloss::MultiSimilarityLoss<double>;

namespace {
/// Every overload of a pair loss (batch and reference-set forms, maps and matrices, skip).
template <class T, class Tag, class Loss>
void instantiate_pair_loss(Loss loss) {
  using namespace mltest;
  Matrix<T> x = Matrix<T>::Random(4, 3), r = Matrix<T>::Random(5, 3), g(4, 3), gr(5, 3);
  Eigen::VectorXi y(4), yr(5), self(4);
  y << 0, 0, 1, 1;
  yr << 0, 1, 0, 1, 2;
  self << -1, -1, -1, -1;
  Eigen::Map<const Matrix<T>> xm(x.data(), 4, 3);
  ml::RowMap<T> gm(g.data(), 4, 3, Eigen::OuterStride<>(3));
  const Tag tag{};
  CHECK(loss.forward(tag, xm, y) == loss.forward(tag, x, y));
  loss.forward_backward(tag, xm, y.cast<float>().eval(), gm, T(0.5));
  loss.forward_backward(tag, x, y, ml::skip);
  loss.normalize = true;
  loss.forward_backward(tag, x, y, ml::reference(r, yr, self), g, gr, T(2));
  loss.forward_backward(tag, x, y, ml::reference(r, yr), ml::skip, gr);
  CHECK(std::isfinite(loss.forward(tag, x, y, ml::reference(r, yr))));
}
}  // namespace

TEST_CASE("BatchContrastiveLoss and MultiSimilarityLoss compile for float and double on every CPU tag",
          "[instantiation]") {
  metricloss::BatchContrastiveLoss<float> cf(0.1f, 0.9f, metricloss::Distance::squared_euclidean);
  cf.reduction = metricloss::Reduction::mean;
  instantiate_pair_loss<float, metricloss::scalar_tag>(cf);
  instantiate_pair_loss<float, metricloss::simd_tag>(cf);
  instantiate_pair_loss<double, metricloss::scalar_tag>(metricloss::BatchContrastiveLoss<double>());
  instantiate_pair_loss<double, metricloss::simd_tag>(metricloss::BatchContrastiveLoss<double>());
  instantiate_pair_loss<float, metricloss::scalar_tag>(metricloss::MultiSimilarityLoss<float>());
  instantiate_pair_loss<float, metricloss::simd_tag>(metricloss::MultiSimilarityLoss<float>(1, 5, 0, INFINITY));
  instantiate_pair_loss<double, metricloss::scalar_tag>(metricloss::MultiSimilarityLoss<double>());
  instantiate_pair_loss<double, metricloss::simd_tag>(metricloss::MultiSimilarityLoss<double>());
}
