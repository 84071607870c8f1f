// BatchTripletLoss and LiftedStructureLoss behind kernels.hpp (no torch headers here), on one
// batch or on queries against a reference set.
#include "kernels_common.hpp"

namespace metricloss_python {

struct BatchTriplet::Impl {
  std::unique_ptr<ml::BatchTripletLoss<float>> f32;
  std::unique_ptr<ml::BatchTripletLoss<double>> f64;

  /// The functor of scalar s with the options set, passed to call (a generic lambda).
  template <class Call>
  double run(Scalar s, double margin, int mining, int distance, bool soft_margin, bool normalize,
             Call&& call) {
    auto configured = [&](auto& loss) {
      configure(loss, margin, mining, distance, soft_margin, normalize);
      return call(loss);
    };
    return s == Scalar::f32 ? configured(functor(f32)) : configured(functor(f64));
  }
};

BatchTriplet::BatchTriplet() : impl_(std::make_unique<Impl>()) {}
BatchTriplet::~BatchTriplet() = default;

double BatchTriplet::run(Scalar s, double margin, int mining, int distance, bool soft_margin,
                         bool normalize, Rows x, Labels labels, Grad gx, const Group* group) {
  return impl_->run(s, margin, mining, distance, soft_margin, normalize, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_batch<T>(loss, x, labels, gx, group);
  });
}

double BatchTriplet::run(Scalar s, double margin, int mining, int distance, bool soft_margin,
                         bool normalize, Rows q, Labels labels_q, Reference ref, Grad gq,
                         Grad gr, const Group* group) {
  return impl_->run(s, margin, mining, distance, soft_margin, normalize, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_reference<T>(loss, q, labels_q, ref, gq, gr, group);
  });
}

struct Lifted::Impl {
  std::unique_ptr<ml::LiftedStructureLoss<float>> f32;
  std::unique_ptr<ml::LiftedStructureLoss<double>> f64;

  template <class Call>
  double run(Scalar s, double margin, bool normalize, Call&& call) {
    auto configured = [&](auto& loss) {
      configure(loss, margin, normalize);
      return call(loss);
    };
    return s == Scalar::f32 ? configured(functor(f32)) : configured(functor(f64));
  }
};

Lifted::Lifted() : impl_(std::make_unique<Impl>()) {}
Lifted::~Lifted() = default;

double Lifted::run(Scalar s, double margin, bool normalize, Rows x, Labels labels, Grad gx,
                   const Group* group) {
  return impl_->run(s, margin, normalize, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_batch<T>(loss, x, labels, gx, group);
  });
}

double Lifted::run(Scalar s, double margin, bool normalize, Rows q, Labels labels_q,
                   Reference ref, Grad gq, Grad gr, const Group* group) {
  return impl_->run(s, margin, normalize, [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return run_reference<T>(loss, q, labels_q, ref, gq, gr, group);
  });
}

}  // namespace metricloss_python
