// BatchTripletLoss and LiftedStructureLoss behind kernels.hpp (no torch headers here).
#include "kernels_common.hpp"

namespace metricloss_python {

struct BatchTriplet::Impl {
  std::unique_ptr<ml::BatchTripletLoss<float>> f32;
  std::unique_ptr<ml::BatchTripletLoss<double>> f64;

  template <class T>
  double run(std::unique_ptr<ml::BatchTripletLoss<T>>& slot, double margin, int mining,
             int distance, bool soft_margin, const Rows& x, const Labels& labels, Grad gx) {
    auto& loss = functor(slot);
    loss.margin = static_cast<T>(margin);
    loss.mining = static_cast<ml::Mining>(mining);
    loss.distance = static_cast<ml::Distance>(distance);
    loss.soft_margin = soft_margin;
    return with_grad<T>(gx, [&](auto&& grad_x) {
      return static_cast<double>(loss.forward_backward(ml::simd, map<T>(x), map(labels), grad_x));
    });
  }
};

BatchTriplet::BatchTriplet() : impl_(std::make_unique<Impl>()) {}
BatchTriplet::~BatchTriplet() = default;

double BatchTriplet::run(Scalar s, double margin, int mining, int distance, bool soft_margin,
                         Rows x, Labels labels, Grad gx) {
  return s == Scalar::f32
             ? impl_->run(impl_->f32, margin, mining, distance, soft_margin, x, labels, gx)
             : impl_->run(impl_->f64, margin, mining, distance, soft_margin, x, labels, gx);
}

struct Lifted::Impl {
  std::unique_ptr<ml::LiftedStructureLoss<float>> f32;
  std::unique_ptr<ml::LiftedStructureLoss<double>> f64;

  template <class T>
  double run(std::unique_ptr<ml::LiftedStructureLoss<T>>& slot, double margin, const Rows& x,
             const Labels& labels, Grad gx) {
    auto& loss = functor(slot);
    loss.margin = static_cast<T>(margin);
    return with_grad<T>(gx, [&](auto&& grad_x) {
      return static_cast<double>(loss.forward_backward(ml::simd, map<T>(x), map(labels), grad_x));
    });
  }
};

Lifted::Lifted() : impl_(std::make_unique<Impl>()) {}
Lifted::~Lifted() = default;

double Lifted::run(Scalar s, double margin, Rows x, Labels labels, Grad gx) {
  return s == Scalar::f32 ? impl_->run(impl_->f32, margin, x, labels, gx)
                          : impl_->run(impl_->f64, margin, x, labels, gx);
}

}  // namespace metricloss_python
