// CudaLosses behind kernels.hpp: the batch form of every loss on metricloss::cuda (and the
// reference-set form of the batch losses), for CUDA
// tensors (compiled by nvcc; no torch headers here: binding.cpp passes device pointers, the
// device's index and torch's current stream). The loss goes to device memory (loss_to), so a
// call never synchronises, as a torch operator; with normalize = true a zero row gives a NaN
// loss there and leaves the gradient untouched (the value-returning call's check would need
// a synchronisation).
#include "kernels_common.hpp"

#include <metricloss/cuda.cuh>

#include <cuda_runtime.h>

namespace metricloss_python {

bool cuda_built() { return true; }

namespace {

/// `index` is the current device for the call; the caller's is restored afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int index) {
    ml::detail::cuda::throw_on_error(cudaGetDevice(&previous_), "metricloss: cudaGetDevice");
    if (previous_ != index)
      ml::detail::cuda::throw_on_error(cudaSetDevice(index), "metricloss: cudaSetDevice");
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  ~DeviceGuard() { (void)cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

/// One loss's functors, float and double, created on first use.
template <template <class> class Loss>
struct Functors {
  std::unique_ptr<Loss<float>> f32;
  std::unique_ptr<Loss<double>> f64;
};

/// Runs call(functor, tag) on the functor of scalar s, configured by configure(functor), on
/// the device and stream of `device` with the loss at `loss_out`.
template <template <class> class Loss, class Configure, class Call>
void run(Functors<Loss>& functors, Scalar s, Device device, void* loss_out, Configure&& configure_loss,
         Call&& call) {
  DeviceGuard guard(device.index);
  auto go = [&](auto& loss) {
    using T = typename std::decay_t<decltype(loss)>::scalar_type;
    configure_loss(loss);
    call(loss, ml::cuda.on(static_cast<cudaStream_t>(device.stream)).loss_to(static_cast<T*>(loss_out)));
  };
  if (s == Scalar::f32)
    go(functor(functors.f32));
  else
    go(functor(functors.f64));
}

template <class Loss>
using scalar_of = typename std::decay_t<Loss>::scalar_type;

}  // namespace

struct CudaLosses::Impl {
  Functors<ml::ContrastiveLoss> contrastive;
  Functors<ml::TripletLoss> triplet;
  Functors<ml::BatchTripletLoss> batch_triplet;
  Functors<ml::LiftedStructureLoss> lifted;
  Functors<ml::BatchContrastiveLoss> batch_contrastive;
  Functors<ml::MultiSimilarityLoss> multi_similarity;
};

CudaLosses::CudaLosses() : impl_(std::make_unique<Impl>()) {}
CudaLosses::~CudaLosses() = default;

namespace {

/// ContrastiveLoss: forward_backward(tag, a, b, labels..., grad_a, grad_b), the labels being the
/// similarity flags or the two label vectors.
template <class... L>
auto contrastive_call(const Rows& a, const Rows& b, const Grad& ga, const Grad& gb, const L&... labels) {
  return [&](auto& f, auto tag) {
    using T = scalar_of<decltype(f)>;
    with_grad<T>(ga, [&](auto&& grad_a) {
      return with_grad<T>(gb, [&](auto&& grad_b) {
        return f.forward_backward(tag, map<T>(a), map<T>(b), map(labels)..., grad_a, grad_b);
      });
    });
  };
}

}  // namespace

void CudaLosses::contrastive(Scalar s, double margin, int form, Rows a, Rows b, Labels sim, Grad ga,
                             Grad gb, Device device, void* loss) {
  run(impl_->contrastive, s, device, loss, [&](auto& f) { configure(f, margin, form); },
      contrastive_call(a, b, ga, gb, sim));
}

void CudaLosses::contrastive(Scalar s, double margin, int form, Rows a, Rows b, Labels labels_a,
                             Labels labels_b, Grad ga, Grad gb, Device device, void* loss) {
  run(impl_->contrastive, s, device, loss, [&](auto& f) { configure(f, margin, form); },
      contrastive_call(a, b, ga, gb, labels_a, labels_b));
}

void CudaLosses::triplet(Scalar s, double margin, int distance, Rows anchor, Rows positive, Rows negative,
                         Grad ga, Grad gp, Grad gn, Device device, void* loss) {
  run(impl_->triplet, s, device, loss, [&](auto& f) { configure(f, margin, distance); },
      [&](auto& f, auto tag) {
        using T = scalar_of<decltype(f)>;
        with_grad<T>(ga, [&](auto&& grad_a) {
          return with_grad<T>(gp, [&](auto&& grad_p) {
            return with_grad<T>(gn, [&](auto&& grad_n) {
              return f.forward_backward(tag, map<T>(anchor), map<T>(positive), map<T>(negative), grad_a,
                                        grad_p, grad_n);
            });
          });
        });
      });
}

namespace {

/// The batch losses: forward_backward(tag, x, labels, grad_x or skip).
auto batch_call(const Rows& x, const Labels& labels, const Grad& gx) {
  return [&](auto& f, auto tag) {
    using T = scalar_of<decltype(f)>;
    with_grad<T>(gx, [&](auto&& grad_x) { return f.forward_backward(tag, map<T>(x), map(labels), grad_x); });
  };
}

}  // namespace

void CudaLosses::batch_triplet(Scalar s, double margin, int mining, int distance, bool soft_margin,
                               bool normalize, Rows x, Labels labels, Grad gx, Device device, void* loss) {
  run(impl_->batch_triplet, s, device, loss,
      [&](auto& f) { configure(f, margin, mining, distance, soft_margin, normalize); },
      batch_call(x, labels, gx));
}

void CudaLosses::lifted(Scalar s, double margin, bool normalize, Rows x, Labels labels, Grad gx,
                        Device device, void* loss) {
  run(impl_->lifted, s, device, loss, [&](auto& f) { configure(f, margin, normalize); },
      batch_call(x, labels, gx));
}

namespace {

/// The reference-set form: forward_backward(tag, q, labels_q, reference set, grad_q or skip,
/// grad_r or skip).
auto reference_call(const Rows& q, const Labels& labels_q, const Reference& ref, const Grad& gq,
                    const Grad& gr) {
  return [&](auto& f, auto tag) {
    using T = scalar_of<decltype(f)>;
    with_reference<T>(ref, [&](const auto& set) {
      return with_grad<T>(gq, [&](auto&& grad_q) {
        return with_grad<T>(gr, [&](auto&& grad_r) {
          return f.forward_backward(tag, map<T>(q), map(labels_q), set, grad_q, grad_r);
        });
      });
    });
  };
}

}  // namespace

void CudaLosses::batch_triplet(Scalar s, double margin, int mining, int distance, bool soft_margin,
                               bool normalize, Rows q, Labels labels_q, Reference ref, Grad gq,
                               Grad gr, Device device, void* loss) {
  run(impl_->batch_triplet, s, device, loss,
      [&](auto& f) { configure(f, margin, mining, distance, soft_margin, normalize); },
      reference_call(q, labels_q, ref, gq, gr));
}

void CudaLosses::lifted(Scalar s, double margin, bool normalize, Rows q, Labels labels_q,
                        Reference ref, Grad gq, Grad gr, Device device, void* loss) {
  run(impl_->lifted, s, device, loss, [&](auto& f) { configure(f, margin, normalize); },
      reference_call(q, labels_q, ref, gq, gr));
}

void CudaLosses::batch_contrastive(Scalar s, const BatchContrastiveOptions& o, Rows x, Labels labels,
                                   Grad gx, Device device, void* loss) {
  run(impl_->batch_contrastive, s, device, loss, [&](auto& f) { configure(f, o); },
      batch_call(x, labels, gx));
}

void CudaLosses::multi_similarity(Scalar s, const MultiSimilarityOptions& o, Rows x, Labels labels,
                                  Grad gx, Device device, void* loss) {
  run(impl_->multi_similarity, s, device, loss, [&](auto& f) { configure(f, o); },
      batch_call(x, labels, gx));
}

void CudaLosses::batch_contrastive(Scalar s, const BatchContrastiveOptions& o, Rows q, Labels labels_q,
                                   Reference ref, Grad gq, Grad gr, Device device, void* loss) {
  run(impl_->batch_contrastive, s, device, loss, [&](auto& f) { configure(f, o); },
      reference_call(q, labels_q, ref, gq, gr));
}

void CudaLosses::multi_similarity(Scalar s, const MultiSimilarityOptions& o, Rows q, Labels labels_q,
                                  Reference ref, Grad gq, Grad gr, Device device, void* loss) {
  run(impl_->multi_similarity, s, device, loss, [&](auto& f) { configure(f, o); },
      reference_call(q, labels_q, ref, gq, gr));
}

}  // namespace metricloss_python
