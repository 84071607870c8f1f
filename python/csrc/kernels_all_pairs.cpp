// BatchContrastiveLoss and MultiSimilarityLoss (pytorch-metric-learning's all-pairs losses,
// issue 17) behind kernels.hpp (no torch headers here), on one batch or on queries against a
// reference set.
#include "kernels_common.hpp"

namespace metricloss_python {

struct BatchContrastive::Impl {
  std::unique_ptr<ml::BatchContrastiveLoss<float>> f32;
  std::unique_ptr<ml::BatchContrastiveLoss<double>> f64;

  /// The functor of scalar s with the options set, passed to call (a generic lambda).
  template <class Call>
  double run(Scalar s, const BatchContrastiveOptions& o, Call&& call) {
    auto configured = [&](auto& loss) {
      configure(loss, o);
      return call(loss);
    };
    return s == Scalar::f32 ? configured(functor(f32)) : configured(functor(f64));
  }
};

BatchContrastive::BatchContrastive() : impl_(std::make_unique<Impl>()) {}
BatchContrastive::~BatchContrastive() = default;

double BatchContrastive::run(Scalar s, const BatchContrastiveOptions& o, Rows x, Labels labels,
                             Grad gx, const Group* group) {
  return impl_->run(s, o, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_batch<T>(loss, x, labels, gx, group);
  });
}

double BatchContrastive::run(Scalar s, const BatchContrastiveOptions& o, Rows q, Labels labels_q,
                             Reference ref, Grad gq, Grad gr, const Group* group) {
  return impl_->run(s, o, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_reference<T>(loss, q, labels_q, ref, gq, gr, group);
  });
}

struct MultiSimilarity::Impl {
  std::unique_ptr<ml::MultiSimilarityLoss<float>> f32;
  std::unique_ptr<ml::MultiSimilarityLoss<double>> f64;

  template <class Call>
  double run(Scalar s, const MultiSimilarityOptions& o, Call&& call) {
    auto configured = [&](auto& loss) {
      configure(loss, o);
      return call(loss);
    };
    return s == Scalar::f32 ? configured(functor(f32)) : configured(functor(f64));
  }
};

MultiSimilarity::MultiSimilarity() : impl_(std::make_unique<Impl>()) {}
MultiSimilarity::~MultiSimilarity() = default;

double MultiSimilarity::run(Scalar s, const MultiSimilarityOptions& o, Rows x, Labels labels,
                            Grad gx, const Group* group) {
  return impl_->run(s, o, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_batch<T>(loss, x, labels, gx, group);
  });
}

double MultiSimilarity::run(Scalar s, const MultiSimilarityOptions& o, Rows q, Labels labels_q,
                            Reference ref, Grad gq, Grad gr, const Group* group) {
  return impl_->run(s, o, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_reference<T>(loss, q, labels_q, ref, gq, gr, group);
  });
}

}  // namespace metricloss_python
