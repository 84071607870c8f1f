// BatchTripletLoss and LiftedStructureLoss behind kernels.hpp (no torch headers here), on one
// batch or on queries against a reference set.
#include "kernels_common.hpp"

namespace metricloss_python {

/// forward_backward of the queries q against the reference set ref (either gradient skipped).
template <class T, class Loss>
double run_reference(Loss& loss, const Rows& q, const Labels& labels_q, const Reference& ref,
                     const Grad& gq, const Grad& gr) {
  return with_reference<T>(ref, [&](const auto& set) {
    return with_grad<T>(gq, [&](auto&& grad_q) {
      return with_grad<T>(gr, [&](auto&& grad_r) {
        return static_cast<double>(
            loss.forward_backward(ml::simd, map<T>(q), map(labels_q), set, grad_q, grad_r));
      });
    });
  });
}

/// forward_backward of one batch x.
template <class T, class Loss>
double run_batch(Loss& loss, const Rows& x, const Labels& labels, const Grad& gx) {
  return with_grad<T>(gx, [&](auto&& grad_x) {
    return static_cast<double>(loss.forward_backward(ml::simd, map<T>(x), map(labels), grad_x));
  });
}

struct BatchTriplet::Impl {
  std::unique_ptr<ml::BatchTripletLoss<float>> f32;
  std::unique_ptr<ml::BatchTripletLoss<double>> f64;

  /// The functor of scalar s with the options set, passed to call (a generic lambda).
  template <class Call>
  double run(Scalar s, double margin, int mining, int distance, bool soft_margin, Call&& call) {
    auto configured = [&](auto& loss) {
      using T = typename std::decay_t<decltype(loss)>::scalar_type;
      loss.margin = static_cast<T>(margin);
      loss.mining = static_cast<ml::Mining>(mining);
      loss.distance = static_cast<ml::Distance>(distance);
      loss.soft_margin = soft_margin;
      return call(loss);
    };
    return s == Scalar::f32 ? configured(functor(f32)) : configured(functor(f64));
  }
};

BatchTriplet::BatchTriplet() : impl_(std::make_unique<Impl>()) {}
BatchTriplet::~BatchTriplet() = default;

double BatchTriplet::run(Scalar s, double margin, int mining, int distance, bool soft_margin,
                         Rows x, Labels labels, Grad gx) {
  return impl_->run(s, margin, mining, distance, soft_margin, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_batch<T>(loss, x, labels, gx);
  });
}

double BatchTriplet::run(Scalar s, double margin, int mining, int distance, bool soft_margin,
                         Rows q, Labels labels_q, Reference ref, Grad gq, Grad gr) {
  return impl_->run(s, margin, mining, distance, soft_margin, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_reference<T>(loss, q, labels_q, ref, gq, gr);
  });
}

struct Lifted::Impl {
  std::unique_ptr<ml::LiftedStructureLoss<float>> f32;
  std::unique_ptr<ml::LiftedStructureLoss<double>> f64;

  template <class Call>
  double run(Scalar s, double margin, Call&& call) {
    auto configured = [&](auto& loss) {
      using T = typename std::decay_t<decltype(loss)>::scalar_type;
      loss.margin = static_cast<T>(margin);
      return call(loss);
    };
    return s == Scalar::f32 ? configured(functor(f32)) : configured(functor(f64));
  }
};

Lifted::Lifted() : impl_(std::make_unique<Impl>()) {}
Lifted::~Lifted() = default;

double Lifted::run(Scalar s, double margin, Rows x, Labels labels, Grad gx) {
  return impl_->run(s, margin, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_batch<T>(loss, x, labels, gx);
  });
}

double Lifted::run(Scalar s, double margin, Rows q, Labels labels_q, Reference ref, Grad gq,
                   Grad gr) {
  return impl_->run(s, margin, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_reference<T>(loss, q, labels_q, ref, gq, gr);
  });
}

}  // namespace metricloss_python
