// Shared by kernels_*.cpp: Eigen maps over the binding's plain descriptors (and reference
// sets over them), the run-time-to-compile-time dispatch of metricloss::skip, and the one
// forward_backward call of a batch loss on a batch or on a reference set.
#pragma once
#include "kernels.hpp"

#include <metricloss/metricloss.hpp>

#include <memory>

namespace metricloss_python {
namespace ml = metricloss;

static_assert(static_cast<int>(ml::Mining::all) == 0 && static_cast<int>(ml::Mining::hard) == 1 &&
                  static_cast<int>(ml::Mining::semihard) == 2,
              "metricloss/__init__.py maps mining names to these values");
static_assert(static_cast<int>(ml::Distance::euclidean) == 0 &&
                  static_cast<int>(ml::Distance::squared_euclidean) == 1,
              "metricloss/__init__.py maps distance names to these values");
static_assert(static_cast<int>(ml::ContrastiveForm::hadsell) == 0 &&
                  static_cast<int>(ml::ContrastiveForm::legacy) == 1,
              "metricloss/__init__.py maps form names to these values");

static_assert(static_cast<int>(ml::Reduction::nonzero_mean) == 0 &&
                  static_cast<int>(ml::Reduction::mean) == 1,
              "metricloss/__init__.py maps reduction names to these values");

template <class T>
ml::ConstRowMap<T> map(const Rows& r) {
  return ml::ConstRowMap<T>(static_cast<const T*>(r.data), r.rows, r.cols,
                            Eigen::OuterStride<>(r.stride));
}

using LabelMap = Eigen::Map<const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>, Eigen::Unaligned,
                            Eigen::InnerStride<>>;
inline LabelMap map(const Labels& l) {
  return LabelMap(l.data, l.size, Eigen::InnerStride<>(l.stride));
}

/// Calls f with a writable map over g, or with metricloss::skip when g.data is null.
template <class T, class F>
decltype(auto) with_grad(const Grad& g, F&& f) {
  if (g.data == nullptr) return f(ml::skip);
  ml::RowMap<T> m(static_cast<T*>(g.data), g.rows, g.cols, Eigen::OuterStride<>(g.stride));
  return f(m);
}

/// Calls f with the metricloss::ReferenceSet over ref (its maps live for the call).
template <class T, class F>
decltype(auto) with_reference(const Reference& ref, F&& f) {
  const auto r = map<T>(ref.r);
  const auto labels = map(ref.labels);
  if (ref.self.data == nullptr) return f(ml::reference(r, labels));
  const auto self = map(ref.self);
  return f(ml::reference(r, labels, self));
}

// The functors' options from the binding's arguments (the CPU and the CUDA kernels alike).
template <class T>
void configure(ml::ContrastiveLoss<T>& loss, double margin, int form) {
  loss.margin = static_cast<T>(margin);
  loss.form = static_cast<ml::ContrastiveForm>(form);
}
template <class T>
void configure(ml::TripletLoss<T>& loss, double margin, int distance) {
  loss.margin = static_cast<T>(margin);
  loss.distance = static_cast<ml::Distance>(distance);
}
template <class T>
void configure(ml::BatchTripletLoss<T>& loss, double margin, int mining, int distance,
               bool soft_margin, bool normalize) {
  loss.margin = static_cast<T>(margin);
  loss.mining = static_cast<ml::Mining>(mining);
  loss.distance = static_cast<ml::Distance>(distance);
  loss.soft_margin = soft_margin;
  loss.normalize = normalize;
}
template <class T>
void configure(ml::LiftedStructureLoss<T>& loss, double margin, bool normalize) {
  loss.margin = static_cast<T>(margin);
  loss.normalize = normalize;
}
template <class T>
void configure(ml::BatchContrastiveLoss<T>& loss, const BatchContrastiveOptions& o) {
  loss.pos_margin = static_cast<T>(o.pos_margin);
  loss.neg_margin = static_cast<T>(o.neg_margin);
  loss.distance = static_cast<ml::Distance>(o.distance);
  loss.reduction = static_cast<ml::Reduction>(o.reduction);
  loss.normalize = o.normalize;
}
template <class T>
void configure(ml::MultiSimilarityLoss<T>& loss, const MultiSimilarityOptions& o) {
  loss.alpha = static_cast<T>(o.alpha);
  loss.beta = static_cast<T>(o.beta);
  loss.base = static_cast<T>(o.base);
  loss.epsilon = static_cast<T>(o.epsilon);  // +inf stays +inf
  loss.normalize = o.normalize;
}

/// The functor of one scalar type, created on first use.
template <class Loss>
Loss& functor(std::unique_ptr<Loss>& slot) {
  if (!slot) slot = std::make_unique<Loss>();
  return *slot;
}


/// The group concept over a kernels.hpp Group.
class GroupRef {
 public:
  explicit GroupRef(const Group& group) : group_(&group) {}
  int rank() const { return group_->rank; }
  int size() const { return group_->size; }
  void allgatherv(const void* send, std::size_t bytes, void* recv, const std::size_t* counts,
                  const std::size_t* offsets) const {
    group_->allgatherv(send, bytes, recv, counts, offsets);
  }

 private:
  const Group* group_;
};

/// forward_backward of the queries q against the reference set ref (either gradient skipped);
/// with a group, q is this rank's queries and ref the same on every rank.
template <class T, class Loss>
double run_reference(Loss& loss, const Rows& q, const Labels& labels_q, const Reference& ref,
                     const Grad& gq, const Grad& gr, const Group* group = nullptr) {
  return with_reference<T>(ref, [&](const auto& set) {
    return with_grad<T>(gq, [&](auto&& grad_q) {
      return with_grad<T>(gr, [&](auto&& grad_r) {
        if (group) {
          GroupRef ranks(*group);
          return static_cast<double>(loss.forward_backward(ml::simd.sharded(ranks), map<T>(q),
                                                           map(labels_q), set, grad_q, grad_r));
        }
        return static_cast<double>(
            loss.forward_backward(ml::simd, map<T>(q), map(labels_q), set, grad_q, grad_r));
      });
    });
  });
}

/// forward_backward of one batch x, or of this rank's rows x of the global batch of `group`.
template <class T, class Loss>
double run_batch(Loss& loss, const Rows& x, const Labels& labels, const Grad& gx,
                 const Group* group = nullptr) {
  return with_grad<T>(gx, [&](auto&& grad_x) {
    if (group) {
      GroupRef ranks(*group);
      return static_cast<double>(
          loss.forward_backward(ml::simd.sharded(ranks), map<T>(x), map(labels), grad_x));
    }
    return static_cast<double>(loss.forward_backward(ml::simd, map<T>(x), map(labels), grad_x));
  });
}

}  // namespace metricloss_python
