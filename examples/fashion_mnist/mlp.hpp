#pragma once
// The embedding network: x -> relu(x W1 + b1) W2 + b2 [-> / ||.||], trained with Adam.
// Written out by hand so that the loss gradients from metricloss drive a real backward pass.
// Templated on the scalar: the example trains in float; the data-parallel test checks one
// step in double.
#include <metricloss/types.hpp>

#include <Eigen/Core>

#include <array>
#include <cmath>
#include <random>

namespace fashion_mnist {

/// One parameter tensor with its gradient and Adam moments.
template <class S>
struct BasicParameter {
  using Matrix = metricloss::RowMatrix<S>;
  Matrix value, gradient, first_moment, second_moment;

  explicit BasicParameter(Matrix initial)
      : value(std::move(initial)),
        gradient(Matrix::Zero(value.rows(), value.cols())),
        first_moment(Matrix::Zero(value.rows(), value.cols())),
        second_moment(Matrix::Zero(value.rows(), value.cols())) {}
};

template <class S>
struct BasicAdam {
  S learning_rate = S(1e-3);
  S beta1 = S(0.9), beta2 = S(0.999), epsilon = S(1e-8);
  long step = 0;

  /// Kingma & Ba (2015), Algorithm 1, with the bias corrections folded into the step size.
  void update(BasicParameter<S>& p) const {
    const S correction1 = S(1) - std::pow(beta1, S(step));
    const S correction2 = S(1) - std::pow(beta2, S(step));
    const S step_size = learning_rate * std::sqrt(correction2) / correction1;
    p.first_moment = beta1 * p.first_moment + (S(1) - beta1) * p.gradient;
    p.second_moment =
        beta2 * p.second_moment + (S(1) - beta2) * p.gradient.cwiseAbs2();
    p.value.array() -= step_size * p.first_moment.array() /
                       (p.second_moment.array().sqrt() + epsilon * std::sqrt(correction2));
  }
};

/// 1/||row||, and 0 for a zero row: a zero embedding stays zero (with zero gradient)
/// instead of becoming NaN.
template <class S>
Eigen::Matrix<S, Eigen::Dynamic, 1> inverse_row_norms(const metricloss::RowMatrix<S>& rows) {
  return rows.rowwise().norm().unaryExpr([](S n) { return n > S(0) ? S(1) / n : S(0); });
}

template <class S>
class BasicEmbeddingNetwork {
 public:
  using Matrix = metricloss::RowMatrix<S>;
  using Parameter = BasicParameter<S>;

  BasicEmbeddingNetwork(Eigen::Index inputs, Eigen::Index hidden, Eigen::Index outputs,
                   bool l2_normalize, std::mt19937& rng)
      : weights1_(he_normal(inputs, hidden, rng)),
        bias1_(Matrix::Zero(1, hidden)),
        weights2_(he_normal(hidden, outputs, rng)),
        bias2_(Matrix::Zero(1, outputs)),
        l2_normalize_(l2_normalize) {}

  /// Embeddings of a batch, keeping the activations that backward() needs.
  const Matrix& forward(const Matrix& input) {
    hidden_.noalias() = input * weights1_.value;
    hidden_ = (hidden_.rowwise() + bias1_.value.row(0)).cwiseMax(S(0));
    raw_output_.noalias() = hidden_ * weights2_.value;
    raw_output_.rowwise() += bias2_.value.row(0);
    if (!l2_normalize_) return raw_output_;
    inverse_norms_ = inverse_row_norms(raw_output_);
    output_ = inverse_norms_.asDiagonal() * raw_output_;
    return output_;
  }

  /// Embeddings of `input` for evaluation; leaves what backward() needs untouched.
  Matrix embed(const Matrix& input) const;

  /// Gradients of every parameter from d(loss)/d(embeddings), for the `input` of the last
  /// forward().
  void backward(const Matrix& input, const Matrix& output_gradient) {
    const Matrix* gradient = &output_gradient;
    if (l2_normalize_) {
      // y = z/||z||:  dL/dz = (g - y (y.g)) / ||z||
      const Eigen::Matrix<S, Eigen::Dynamic, 1> radial = (output_.cwiseProduct(output_gradient)).rowwise().sum();
      raw_gradient_ = inverse_norms_.asDiagonal() *
                      (output_gradient - radial.asDiagonal() * output_);
      gradient = &raw_gradient_;
    }
    weights2_.gradient.noalias() = hidden_.transpose() * *gradient;
    bias2_.gradient = column_sums(*gradient);
    hidden_gradient_.noalias() = *gradient * weights2_.value.transpose();
    hidden_gradient_ = (hidden_.array() > S(0)).select(hidden_gradient_, S(0));
    weights1_.gradient.noalias() = input.transpose() * hidden_gradient_;
    bias1_.gradient = column_sums(hidden_gradient_);
  }

  /// Column sums as a row. Eigen's colwise().sum() offsets a null pointer when there are no
  /// rows (undefined behaviour, which clang's UBSan reports: a rank with an empty shard), so
  /// that case is the zeros it sums to.
  static Matrix column_sums(const Matrix& m) {
    if (m.rows() == 0) return Matrix::Zero(1, m.cols());
    return m.colwise().sum();
  }

  void update(BasicAdam<S>& optimizer) {
    ++optimizer.step;
    for (Parameter* p : parameters()) optimizer.update(*p);
  }

  /// Every parameter, in a fixed order (what a data-parallel step sums across ranks).
  std::array<Parameter*, 4> parameters() { return {&weights1_, &bias1_, &weights2_, &bias2_}; }
  std::array<const Parameter*, 4> parameters() const {
    return {&weights1_, &bias1_, &weights2_, &bias2_};
  }

 private:
  /// He et al. (2015): N(0, 2/fan_in) keeps the ReLU activations' scale through the layers.
  static Matrix he_normal(Eigen::Index fan_in, Eigen::Index fan_out, std::mt19937& rng) {
    std::normal_distribution<S> normal(S(0), std::sqrt(S(2) / S(fan_in)));
    return Matrix::NullaryExpr(fan_in, fan_out, [&] { return normal(rng); });
  }

  Parameter weights1_, bias1_, weights2_, bias2_;
  bool l2_normalize_;
  // Activations of the last forward(), reused by backward().
  Matrix hidden_, raw_output_, output_, raw_gradient_, hidden_gradient_;
  Eigen::Matrix<S, Eigen::Dynamic, 1> inverse_norms_;
};

template <class S>
metricloss::RowMatrix<S> BasicEmbeddingNetwork<S>::embed(const Matrix& input) const {
  Matrix hidden = ((input * weights1_.value).rowwise() + bias1_.value.row(0)).cwiseMax(S(0));
  Matrix output = (hidden * weights2_.value).rowwise() + bias2_.value.row(0);
  if (l2_normalize_) output = inverse_row_norms(output).asDiagonal() * output;
  return output;
}

using Parameter = BasicParameter<float>;
using Adam = BasicAdam<float>;
using EmbeddingNetwork = BasicEmbeddingNetwork<float>;

}  // namespace fashion_mnist
