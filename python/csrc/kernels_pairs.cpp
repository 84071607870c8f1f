// ContrastiveLoss and TripletLoss behind kernels.hpp (no torch headers here).
#include "kernels_common.hpp"

namespace metricloss_python {

struct Contrastive::Impl {
  std::unique_ptr<ml::ContrastiveLoss<float>> f32;
  std::unique_ptr<ml::ContrastiveLoss<double>> f64;

  template <class T, class Call>
  double run(std::unique_ptr<ml::ContrastiveLoss<T>>& slot, double margin, int form, Grad ga,
             Grad gb, Call&& call) {
    auto& loss = functor(slot);
    configure(loss, margin, form);
    return with_grad<T>(ga, [&](auto&& grad_a) {
      return with_grad<T>(gb, [&](auto&& grad_b) {
        return static_cast<double>(call(loss, grad_a, grad_b));
      });
    });
  }
};

Contrastive::Contrastive() : impl_(std::make_unique<Impl>()) {}
Contrastive::~Contrastive() = default;

double Contrastive::run(Scalar s, double margin, int form, Rows a, Rows b, Labels sim, Grad ga,
                        Grad gb) {
  auto call = [&](auto& loss, auto& grad_a, auto& grad_b) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return loss.forward_backward(ml::simd, map<T>(a), map<T>(b), map(sim), grad_a, grad_b);
  };
  return s == Scalar::f32 ? impl_->run(impl_->f32, margin, form, ga, gb, call)
                          : impl_->run(impl_->f64, margin, form, ga, gb, call);
}

double Contrastive::run(Scalar s, double margin, int form, Rows a, Rows b, Labels labels_a,
                        Labels labels_b, Grad ga, Grad gb) {
  auto call = [&](auto& loss, auto& grad_a, auto& grad_b) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    return loss.forward_backward(ml::simd, map<T>(a), map<T>(b), map(labels_a), map(labels_b),
                                 grad_a, grad_b);
  };
  return s == Scalar::f32 ? impl_->run(impl_->f32, margin, form, ga, gb, call)
                          : impl_->run(impl_->f64, margin, form, ga, gb, call);
}

struct Triplet::Impl {
  std::unique_ptr<ml::TripletLoss<float>> f32;
  std::unique_ptr<ml::TripletLoss<double>> f64;

  template <class T>
  double run(std::unique_ptr<ml::TripletLoss<T>>& slot, double margin, int distance,
             const Rows& a, const Rows& p, const Rows& n, Grad ga, Grad gp, Grad gn) {
    auto& loss = functor(slot);
    configure(loss, margin, distance);
    return with_grad<T>(ga, [&](auto&& grad_a) {
      return with_grad<T>(gp, [&](auto&& grad_p) {
        return with_grad<T>(gn, [&](auto&& grad_n) {
          return static_cast<double>(loss.forward_backward(ml::simd, map<T>(a), map<T>(p),
                                                           map<T>(n), grad_a, grad_p, grad_n));
        });
      });
    });
  }
};

Triplet::Triplet() : impl_(std::make_unique<Impl>()) {}
Triplet::~Triplet() = default;

double Triplet::run(Scalar s, double margin, int distance, Rows anchor, Rows positive,
                    Rows negative, Grad ga, Grad gp, Grad gn) {
  return s == Scalar::f32
             ? impl_->run(impl_->f32, margin, distance, anchor, positive, negative, ga, gp, gn)
             : impl_->run(impl_->f64, margin, distance, anchor, positive, negative, ga, gp, gn);
}

}  // namespace metricloss_python
