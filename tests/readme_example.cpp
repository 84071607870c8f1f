#include <metricloss/metricloss.hpp>

#include <cstdio>

int main() {
  namespace ml = metricloss;
  using Mat = ml::RowMatrix<float>;
  const Eigen::Index n = 4, d = 3;

  Mat a = Mat::Zero(n, d), b = Mat::Ones(n, d), ga(n, d), gb(n, d);
  Eigen::VectorXf sim(n);
  sim << 1, 0, 1, 0;  // nonzero = similar pair (Caffe's convention)

  ml::ContrastiveLoss<float> loss(/*margin=*/2.0f, ml::ContrastiveForm::hadsell);
  float value = loss.forward(ml::simd, a, b, sim);                  // loss only
  value = loss.forward_backward(ml::simd, a, b, sim, ga, gb, 1.0f);  // and both gradients
  loss.forward_backward(ml::simd, a, b, sim, ga, ml::skip);          // only grad_a

  // d = sqrt(3): similar pairs add 3, dissimilar (2 - sqrt(3))^2; L = sum / (2N).
  std::printf("loss = %.6f\n", value);
  return value > 0.767f && value < 0.769f ? 0 : 1;
}
