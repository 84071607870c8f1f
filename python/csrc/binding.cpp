// metricloss._C: tensors in, metricloss (kernels_*.cpp; kernels_cuda.cu for CUDA tensors)
// called once, loss and gradients out,
// and one torch::autograd::Function per loss around that call (the torch.nn.Module classes
// are metricloss/__init__.py). Every check on a tensor names the argument;
// metricloss::invalid_argument becomes ValueError with the C++ message.
#include <torch/extension.h>

#include "kernels.hpp"

#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace mlpy = metricloss_python;
namespace py = pybind11;

namespace {

[[noreturn]] void value_error(const std::string& loss, const std::string& msg) {
  throw py::value_error("metricloss." + loss + ": " + msg);
}

std::string sizes(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

std::string strides(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.stride(i));
  return s + ")";
}

/// The CUDA device and torch's current stream on it of a call whose first input is `first`,
/// or nullopt for a CPU call. A device this build cannot take is a ValueError naming `name`.
/// Holds the GIL (torch.cuda.current_stream is asked in Python: no CUDA torch header here).
c10::optional<mlpy::Device> cuda_device_of(const std::string& loss, const char* name,
                                           const at::Tensor& first) {
  if (!first.defined()) value_error(loss, std::string("argument '") + name + "' is undefined");
  if (first.device().is_cpu()) return c10::nullopt;
  if (!first.device().is_cuda() || !mlpy::cuda_built())
    value_error(loss, std::string("argument '") + name + "' is on device " + first.device().str() +
                          "; this build of metricloss takes CPU tensors" +
                          (mlpy::cuda_built() ? " and CUDA tensors"
                                              : " only (the installed PyTorch has no CUDA, or "
                                                "the CUDA path is not built)"));
  const int index = first.device().index();
  const py::object stream = py::module_::import("torch.cuda").attr("current_stream")(index);
  return mlpy::Device{index, reinterpret_cast<void*>(stream.attr("cuda_stream").cast<std::intptr_t>())};
}

/// t is defined, dense, and on the device of the call's first input `first`.
void check_strided(const std::string& loss, const char* name, const at::Tensor& t,
                   const at::Tensor& first) {
  if (!t.defined()) value_error(loss, std::string("argument '") + name + "' is undefined");
  if (t.device() != first.device())
    value_error(loss, std::string("argument '") + name + "' is on device " + t.device().str() +
                          " but the first input is on " + first.device().str() +
                          "; every tensor of a call must be on one device");
  if (t.layout() != at::kStrided)
    value_error(loss, std::string("argument '") + name + "' must be a dense (strided) tensor");
}

/// An N x D floating embedding tensor: float32 or float64 (the dtype and device of the
/// call's first input `first`), inner stride 1, rows any stride >= D apart. Never copies.
mlpy::Rows rows_of(const std::string& loss, const char* name, const at::Tensor& t,
                   const at::Tensor& first) {
  check_strided(loss, name, t, first);
  const at::ScalarType scalar = first.scalar_type();
  if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble)
    throw py::type_error("metricloss." + loss + ": argument '" + name +
                         "' must be float32 or float64, got " +
                         std::string(c10::toString(t.scalar_type())));
  if (t.scalar_type() != scalar)
    throw py::type_error("metricloss." + loss + ": argument '" + name + "' has dtype " +
                         std::string(c10::toString(t.scalar_type())) + " but the first input has " +
                         std::string(c10::toString(scalar)) + "; all embeddings must share one dtype");
  if (t.dim() != 2)
    value_error(loss, std::string("argument '") + name + "' must be 2-D (N x D), got shape " +
                          sizes(t));
  const int64_t n = t.size(0), d = t.size(1);
  if (d > 1 && t.stride(1) != 1)
    value_error(loss, std::string("argument '") + name +
                          "' must have a contiguous inner dimension (stride 1), got strides " +
                          strides(t) + "; pass it through .contiguous()");
  const int64_t stride = n <= 1 ? d : t.stride(0);
  if (n > 1 && stride < d)
    value_error(loss, std::string("argument '") + name + "' has overlapping rows (strides " +
                          strides(t) + " for shape " + sizes(t) + "); pass it through .contiguous()");
  return {t.data_ptr(), n, d, stride};
}

/// int64 labels prepared by metricloss/__init__.py (any stride), on the device of `first`.
mlpy::Labels labels_of(const std::string& loss, const char* name, const at::Tensor& t,
                       const at::Tensor& first) {
  check_strided(loss, name, t, first);
  if (t.scalar_type() != at::kLong)
    throw py::type_error("metricloss." + loss + ": argument '" + name + "' must be int64 here");
  if (t.dim() != 1)
    value_error(loss, std::string("argument '") + name + "' must be 1-D, got shape " + sizes(t));
  return {t.data_ptr<int64_t>(), t.size(0), t.size(0) <= 1 ? 1 : t.stride(0)};
}

/// The memory of one loss's CPU gradient tensors, reused once a tensor is gone. torch's CPU
/// allocator hands every free back to the system, and a gradient above glibc's mmap threshold
/// (32 MiB: N = 65536, D = 128, float) came back page by page on every call: 18 ms a tensor
/// on this machine, 80 % of a contrastive call. A block returns here when the last tensor on
/// it dies (x.grad set to None, or the layer below done with it in backward), never before,
/// and is handed out again for the same size. At most `kept` blocks wait; older ones are
/// freed. Tensors hold the pool (shared_ptr), so they may outlive their module.
class GradientPool : public std::enable_shared_from_this<GradientPool> {
 public:
  GradientPool() = default;
  GradientPool(const GradientPool&) = delete;
  GradientPool& operator=(const GradientPool&) = delete;
  ~GradientPool() {
    for (const Block& b : free_) std::free(b.data);
  }

  /// A rows x cols contiguous tensor of like's dtype on the CPU, its entries unspecified.
  at::Tensor tensor(int64_t rows, int64_t cols, const at::Tensor& like) {
    const auto options = like.options().requires_grad(false);
    const std::size_t bytes = static_cast<std::size_t>(rows * cols) * like.element_size();
    if (bytes == 0) return at::empty({rows, cols}, options);
    void* data = take(bytes);
    if (data == nullptr) {
      data = std::aligned_alloc(alignment, (bytes + alignment - 1) / alignment * alignment);
      if (data == nullptr) throw std::bad_alloc();
    }
    auto self = shared_from_this();
    return at::from_blob(data, {rows, cols}, [self, bytes](void* p) { self->give(p, bytes); },
                         options);
  }

  /// Blocks waiting to be reused (tests).
  std::size_t waiting() {
    std::lock_guard<std::mutex> lock(mutex_);
    return free_.size();
  }

 private:
  struct Block {
    void* data;
    std::size_t bytes;
  };
  static constexpr std::size_t alignment = 64, kept = 8;

  void* take(std::size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it)
      if (it->bytes == bytes) {
        void* data = it->data;
        free_.erase(std::next(it).base());
        return data;
      }
    return nullptr;
  }
  void give(void* data, std::size_t bytes) {  // any thread: the tensor's last owner's
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back({data, bytes});
    if (free_.size() > kept) {
      std::free(free_.front().data);
      free_.erase(free_.begin());
    }
  }

  std::mutex mutex_;
  std::vector<Block> free_;  // oldest first
};

/// A contiguous gradient for `like` (a CPU one from `pool`: memory of an earlier call's
/// gradient that nothing holds any more, or new), or undefined when not wanted.
std::pair<at::Tensor, mlpy::Grad> grad_for(GradientPool& pool, const at::Tensor& like,
                                           const mlpy::Rows& r, bool want) {
  if (!want) return {at::Tensor(), mlpy::Grad{nullptr, 0, 0, 0}};
  at::Tensor g = like.device().is_cpu()
                     ? pool.tensor(r.rows, r.cols, like)
                     : at::empty({r.rows, r.cols}, like.options().requires_grad(false));
  return {g, mlpy::Grad{g.data_ptr(), r.rows, r.cols, r.cols}};
}

void nan_unless_written(const at::Tensor& grad, bool normalize);
void reject_cuda_group(const std::string& loss, const c10::optional<mlpy::Device>& device,
                       const mlpy::Group* group);

/// The tensors of a call of queries x against a reference set ref, described for the kernel,
/// with fresh gradients for those wanted. Names are metricloss/__init__.py's arguments.
/// On CUDA tensors (`device` set) everything but self_index is on x's device; self_index is
/// read on the host (metricloss's contract: it is bookkeeping), so a CUDA one is copied here.
struct ReferenceCall {
  c10::optional<mlpy::Device> device;
  mlpy::Rows q;
  mlpy::Labels labels_q;
  mlpy::Reference ref;
  at::Tensor self_host;
  at::Tensor grad_q, grad_r;
  mlpy::Grad gq, gr;
};

ReferenceCall reference_call(const std::string& loss, const at::Tensor& x, const at::Tensor& labels,
                             const at::Tensor& ref, const c10::optional<at::Tensor>& ref_labels,
                             const c10::optional<at::Tensor>& self_index, bool want_x,
                             bool want_ref, const mlpy::Group* group, GradientPool& pool) {
  ReferenceCall c;
  c.device = cuda_device_of(loss, "x", x);
  reject_cuda_group(loss, c.device, group);
  if (!ref_labels.has_value()) value_error(loss, "argument 'ref' needs 'ref_labels'");
  c.q = rows_of(loss, "x", x, x);
  c.labels_q = labels_of(loss, "labels", labels, x);
  c.ref.r = rows_of(loss, "ref", ref, x);
  c.ref.labels = labels_of(loss, "ref_labels", *ref_labels, x);
  c.ref.self = mlpy::Labels{nullptr, 0, 1};
  if (self_index.has_value()) {
    c.self_host = c.device ? self_index->to(at::kCPU) : *self_index;
    c.ref.self = labels_of(loss, "self_index", c.self_host, c.device ? c.self_host : x);
  }
  std::tie(c.grad_q, c.gq) = grad_for(pool, x, c.q, want_x);
  std::tie(c.grad_r, c.gr) = grad_for(pool, ref, c.ref.r, want_ref);
  // On CUDA a self row with another label leaves the gradients untouched (the loss is NaN).
  if (c.device && self_index.has_value()) {
    nan_unless_written(c.grad_q, true);
    nan_unless_written(c.grad_r, true);
  }
  return c;
}

mlpy::Scalar scalar_of(at::ScalarType s) {
  return s == at::kFloat ? mlpy::Scalar::f32 : mlpy::Scalar::f64;
}

/// Runs f with the GIL released; metricloss::invalid_argument (a std::invalid_argument)
/// becomes ValueError carrying the C++ message.
template <class F>
double call_kernel(std::mutex& m, F&& f) {
  std::string error;
  double value = 0;
  {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(m);  // one functor per module: serialise its scratch
    try {
      value = f();
    } catch (const std::invalid_argument& e) {
      error = e.what();
    }
  }
  if (!error.empty()) throw py::value_error(error);
  return value;
}

at::Tensor loss_tensor(double v, const at::Tensor& like) {
  return at::scalar_tensor(v, like.options().requires_grad(false));
}

/// A call on a CUDA device: enqueue(loss pointer) enqueues the loss on torch's current stream
/// with L written to a fresh 0-dim tensor on like's device, returned with no synchronisation
/// (as a torch operator).
template <class F>
at::Tensor device_loss(std::mutex& m, const at::Tensor& like, F&& enqueue) {
  at::Tensor out = at::empty({}, like.options().requires_grad(false));
  call_kernel(m, [&] {
    enqueue(out.data_ptr());
    return 0.0;
  });
  return out;
}

/// On CUDA a zero row under normalize = true leaves the gradient untouched (the loss is NaN):
/// a fresh gradient starts as NaN there, so that autograd never sees uninitialised memory.
void nan_unless_written(const at::Tensor& grad, bool normalize) {
  if (normalize && grad.defined()) grad.fill_(std::numeric_limits<double>::quiet_NaN());
}

/// Process groups are CPU-only in the binding so far.
void reject_cuda_group(const std::string& loss, const c10::optional<mlpy::Device>& device,
                       const mlpy::Group* group) {
  if (device && group)
    value_error(loss, "process groups ('group') take CPU tensors only so far (CUDA tensors: one "
                      "process)");
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// Whether autograd will want the gradient of t (ctx->needs_input_grad is not available in a
/// C++ forward, and torch.no_grad() must not pay for gradients).
bool wanted(const at::Tensor& t) { return torch::GradMode::is_enabled() && t.requires_grad(); }
bool wanted(const c10::optional<at::Tensor>& t) { return t.has_value() && wanted(*t); }

/// The backward of every loss: the gradients saved by forward times grad_output, one entry per
/// argument of forward. When grad_output is 1 the saved gradient is handed over as it is: no
/// N x D multiply and allocation, and AccumulateGrad adopts it as x.grad (it copies instead
/// while a retained graph still holds it, so a second backward sees it unchanged).
variable_list scale_saved(AutogradContext* ctx, const variable_list& grad_outputs,
                          std::size_t arguments) {
  if (torch::GradMode::is_enabled())
    throw std::runtime_error(
        "metricloss: the losses are once differentiable (backward with create_graph=True is "
        "not supported)");
  const at::Tensor& go = grad_outputs.at(0);
  // (Read on the CPU only: item() of a CUDA tensor would synchronise.)
  const bool one = !go.defined() || (go.device().is_cpu() && go.numel() == 1 && go.item<double>() == 1.0);
  variable_list out;
  for (const at::Tensor& g : ctx->get_saved_variables())
    out.push_back(!g.defined() ? at::Tensor() : one ? g : g * go);
  out.resize(arguments);
  return out;
}

struct Contrastive {
  mlpy::Contrastive kernel;
  mlpy::CudaLosses cuda;  // CUDA tensors: the same loss on metricloss::cuda
  std::mutex mutex;
  std::shared_ptr<GradientPool> pool = std::make_shared<GradientPool>();  // CPU gradients
  int64_t gradient_calls = 0;  // calls that computed a gradient (tests: none under no_grad)

  std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const at::Tensor& a, const at::Tensor& b,
                                                     const c10::optional<at::Tensor>& sim,
                                                     const c10::optional<at::Tensor>& labels_a,
                                                     const c10::optional<at::Tensor>& labels_b,
                                                     double margin,
                                                     int form, bool want_a, bool want_b) {
    const std::string loss = "ContrastiveLoss";
    const auto device = cuda_device_of(loss, "a", a);
    const auto ra = rows_of(loss, "a", a, a);
    const auto rb = rows_of(loss, "b", b, a);
    auto [ta, ga] = grad_for(*pool, a, ra, want_a);
    auto [tb, gb] = grad_for(*pool, b, rb, want_b);
    gradient_calls += want_a || want_b;
    const auto s = scalar_of(a.scalar_type());
    double v;
    if (sim.has_value()) {
      const auto ls = labels_of(loss, "sim", *sim, a);
      if (device)
        return {device_loss(mutex, a, [&](void* out) {
                  cuda.contrastive(s, margin, form, ra, rb, ls, ga, gb, *device, out);
                }),
                ta, tb};
      v = call_kernel(mutex, [&] { return kernel.run(s, margin, form, ra, rb, ls, ga, gb); });
    } else {
      if (!labels_a.has_value() || !labels_b.has_value())
        value_error(loss, "pass either 'sim' or both 'labels_a' and 'labels_b'");
      const auto la = labels_of(loss, "labels_a", *labels_a, a);
      const auto lb = labels_of(loss, "labels_b", *labels_b, a);
      if (device)
        return {device_loss(mutex, a, [&](void* out) {
                  cuda.contrastive(s, margin, form, ra, rb, la, lb, ga, gb, *device, out);
                }),
                ta, tb};
      v = call_kernel(mutex, [&] { return kernel.run(s, margin, form, ra, rb, la, lb, ga, gb); });
    }
    return {loss_tensor(v, a), ta, tb};
  }
};

struct Triplet {
  mlpy::Triplet kernel;
  mlpy::CudaLosses cuda;
  std::mutex mutex;
  std::shared_ptr<GradientPool> pool = std::make_shared<GradientPool>();  // CPU gradients
  int64_t gradient_calls = 0;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run(
      const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
      double margin, int distance, bool want_a, bool want_p, bool want_n) {
    const std::string loss = "TripletLoss";
    const auto device = cuda_device_of(loss, "anchor", anchor);
    const auto ra = rows_of(loss, "anchor", anchor, anchor);
    const auto rp = rows_of(loss, "positive", positive, anchor);
    const auto rn = rows_of(loss, "negative", negative, anchor);
    auto [ta, ga] = grad_for(*pool, anchor, ra, want_a);
    auto [tp, gp] = grad_for(*pool, positive, rp, want_p);
    auto [tn, gn] = grad_for(*pool, negative, rn, want_n);
    gradient_calls += want_a || want_p || want_n;
    const auto s = scalar_of(anchor.scalar_type());
    if (device)
      return {device_loss(mutex, anchor, [&](void* out) {
                cuda.triplet(s, margin, distance, ra, rp, rn, ga, gp, gn, *device, out);
              }),
              ta, tp, tn};
    const double v = call_kernel(
        mutex, [&] { return kernel.run(s, margin, distance, ra, rp, rn, ga, gp, gn); });
    return {loss_tensor(v, anchor), ta, tp, tn};
  }
};

struct BatchTriplet {
  mlpy::BatchTriplet kernel;
  mlpy::CudaLosses cuda;
  std::mutex mutex;
  std::shared_ptr<GradientPool> pool = std::make_shared<GradientPool>();  // CPU gradients
  int64_t gradient_calls = 0;

  std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& x, const at::Tensor& labels,
                                         double margin, int mining, int distance,
                                         bool soft_margin, bool normalize, bool want_x,
                                         const mlpy::Group* group = nullptr) {
    const std::string loss = "BatchTripletLoss";
    const auto device = cuda_device_of(loss, "x", x);
    reject_cuda_group(loss, device, group);
    const auto rx = rows_of(loss, "x", x, x);
    const auto ly = labels_of(loss, "labels", labels, x);
    auto [tx, gx] = grad_for(*pool, x, rx, want_x);
    gradient_calls += want_x;
    const auto s = scalar_of(x.scalar_type());
    if (device)
      return {device_loss(mutex, x, [&](void* out) {
                nan_unless_written(tx, normalize);
                cuda.batch_triplet(s, margin, mining, distance, soft_margin, normalize, rx, ly, gx,
                                   *device, out);
              }),
              tx};
    const double v = call_kernel(
        mutex, [&] {
          return kernel.run(s, margin, mining, distance, soft_margin, normalize, rx, ly, gx, group);
        });
    return {loss_tensor(v, x), tx};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> run_reference(
      const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
      const c10::optional<at::Tensor>& ref_labels, const c10::optional<at::Tensor>& self_index,
      double margin, int mining, int distance, bool soft_margin, bool normalize, bool want_x,
      bool want_ref, const mlpy::Group* group) {
    auto c = reference_call("BatchTripletLoss", x, labels, ref, ref_labels, self_index, want_x,
                            want_ref, group, *pool);
    gradient_calls += want_x || want_ref;
    const auto s = scalar_of(x.scalar_type());
    if (c.device)
      return {device_loss(mutex, x, [&](void* out) {
                nan_unless_written(c.grad_q, normalize);
                nan_unless_written(c.grad_r, normalize);
                cuda.batch_triplet(s, margin, mining, distance, soft_margin, normalize, c.q,
                                   c.labels_q, c.ref, c.gq, c.gr, *c.device, out);
              }),
              c.grad_q, c.grad_r};
    const double v = call_kernel(mutex, [&] {
      return kernel.run(s, margin, mining, distance, soft_margin, normalize, c.q, c.labels_q, c.ref,
                        c.gq, c.gr, group);
    });
    return {loss_tensor(v, x), c.grad_q, c.grad_r};
  }
};

struct Lifted {
  mlpy::Lifted kernel;
  mlpy::CudaLosses cuda;
  std::mutex mutex;
  std::shared_ptr<GradientPool> pool = std::make_shared<GradientPool>();  // CPU gradients
  int64_t gradient_calls = 0;

  std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& x, const at::Tensor& labels,
                                         double margin, bool normalize, bool want_x,
                                         const mlpy::Group* group = nullptr) {
    const std::string loss = "LiftedStructureLoss";
    const auto device = cuda_device_of(loss, "x", x);
    reject_cuda_group(loss, device, group);
    const auto rx = rows_of(loss, "x", x, x);
    const auto ly = labels_of(loss, "labels", labels, x);
    auto [tx, gx] = grad_for(*pool, x, rx, want_x);
    gradient_calls += want_x;
    const auto s = scalar_of(x.scalar_type());
    if (device)
      return {device_loss(mutex, x,
                          [&](void* out) {
                            nan_unless_written(tx, normalize);
                            cuda.lifted(s, margin, normalize, rx, ly, gx, *device, out);
                          }),
              tx};
    const double v =
        call_kernel(mutex, [&] { return kernel.run(s, margin, normalize, rx, ly, gx, group); });
    return {loss_tensor(v, x), tx};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> run_reference(
      const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
      const c10::optional<at::Tensor>& ref_labels, const c10::optional<at::Tensor>& self_index,
      double margin, bool normalize, bool want_x, bool want_ref, const mlpy::Group* group) {
    auto c = reference_call("LiftedStructureLoss", x, labels, ref, ref_labels, self_index, want_x,
                            want_ref, group, *pool);
    gradient_calls += want_x || want_ref;
    const auto s = scalar_of(x.scalar_type());
    if (c.device)
      return {device_loss(mutex, x, [&](void* out) {
                nan_unless_written(c.grad_q, normalize);
                nan_unless_written(c.grad_r, normalize);
                cuda.lifted(s, margin, normalize, c.q, c.labels_q, c.ref, c.gq, c.gr, *c.device, out);
              }),
              c.grad_q, c.grad_r};
    const double v = call_kernel(
        mutex, [&] { return kernel.run(s, margin, normalize, c.q, c.labels_q, c.ref, c.gq, c.gr, group); });
    return {loss_tensor(v, x), c.grad_q, c.grad_r};
  }
};

/// The all-pairs batch losses (BatchContrastiveLoss, MultiSimilarityLoss): one kernel class
/// with its options struct (kernels.hpp), on a batch or on a reference set.
template <class Kernel, class Options>
struct AllPairs {
  static const char* const name;
  Kernel kernel;
  mlpy::CudaLosses cuda;
  std::mutex mutex;
  std::shared_ptr<GradientPool> pool = std::make_shared<GradientPool>();  // CPU gradients
  int64_t gradient_calls = 0;

  std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& x, const at::Tensor& labels,
                                         const Options& o, bool want_x,
                                         const mlpy::Group* group = nullptr) {
    const auto device = cuda_device_of(name, "x", x);
    reject_cuda_group(name, device, group);
    const auto rx = rows_of(name, "x", x, x);
    const auto ly = labels_of(name, "labels", labels, x);
    auto [tx, gx] = grad_for(*pool, x, rx, want_x);
    gradient_calls += want_x;
    const auto s = scalar_of(x.scalar_type());
    if (device)
      return {device_loss(mutex, x,
                          [&](void* out) {
                            nan_unless_written(tx, o.normalize);
                            run_cuda(s, o, rx, ly, gx, *device, out);
                          }),
              tx};
    const double v = call_kernel(mutex, [&] { return kernel.run(s, o, rx, ly, gx, group); });
    return {loss_tensor(v, x), tx};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> run_reference(
      const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
      const c10::optional<at::Tensor>& ref_labels, const c10::optional<at::Tensor>& self_index,
      const Options& o, bool want_x, bool want_ref, const mlpy::Group* group) {
    auto c = reference_call(name, x, labels, ref, ref_labels, self_index, want_x, want_ref, group,
                            *pool);
    gradient_calls += want_x || want_ref;
    const auto s = scalar_of(x.scalar_type());
    if (c.device)
      return {device_loss(mutex, x, [&](void* out) {
                nan_unless_written(c.grad_q, o.normalize);
                nan_unless_written(c.grad_r, o.normalize);
                run_cuda(s, o, c.q, c.labels_q, c.ref, c.gq, c.gr, *c.device, out);
              }),
              c.grad_q, c.grad_r};
    const double v = call_kernel(
        mutex, [&] { return kernel.run(s, o, c.q, c.labels_q, c.ref, c.gq, c.gr, group); });
    return {loss_tensor(v, x), c.grad_q, c.grad_r};
  }

  /// The batch form and the reference-set form on metricloss::cuda (CudaLosses has one
  /// entry per loss and form).
  void run_cuda(mlpy::Scalar s, const Options& o, const mlpy::Rows& x, const mlpy::Labels& labels,
                const mlpy::Grad& gx, const mlpy::Device& device, void* out);
  void run_cuda(mlpy::Scalar s, const Options& o, const mlpy::Rows& q, const mlpy::Labels& labels_q,
                const mlpy::Reference& ref, const mlpy::Grad& gq, const mlpy::Grad& gr,
                const mlpy::Device& device, void* out);
};

using BatchContrastive = AllPairs<mlpy::BatchContrastive, mlpy::BatchContrastiveOptions>;
using MultiSimilarity = AllPairs<mlpy::MultiSimilarity, mlpy::MultiSimilarityOptions>;
template <>
const char* const BatchContrastive::name = "BatchContrastiveLoss";
template <>
const char* const MultiSimilarity::name = "MultiSimilarityLoss";
template <>
void BatchContrastive::run_cuda(mlpy::Scalar s, const mlpy::BatchContrastiveOptions& o,
                                const mlpy::Rows& x, const mlpy::Labels& labels, const mlpy::Grad& gx,
                                const mlpy::Device& device, void* out) {
  cuda.batch_contrastive(s, o, x, labels, gx, device, out);
}
template <>
void MultiSimilarity::run_cuda(mlpy::Scalar s, const mlpy::MultiSimilarityOptions& o,
                               const mlpy::Rows& x, const mlpy::Labels& labels, const mlpy::Grad& gx,
                               const mlpy::Device& device, void* out) {
  cuda.multi_similarity(s, o, x, labels, gx, device, out);
}
template <>
void BatchContrastive::run_cuda(mlpy::Scalar s, const mlpy::BatchContrastiveOptions& o,
                                const mlpy::Rows& q, const mlpy::Labels& labels_q,
                                const mlpy::Reference& ref, const mlpy::Grad& gq,
                                const mlpy::Grad& gr, const mlpy::Device& device, void* out) {
  cuda.batch_contrastive(s, o, q, labels_q, ref, gq, gr, device, out);
}
template <>
void MultiSimilarity::run_cuda(mlpy::Scalar s, const mlpy::MultiSimilarityOptions& o,
                               const mlpy::Rows& q, const mlpy::Labels& labels_q,
                               const mlpy::Reference& ref, const mlpy::Grad& gq,
                               const mlpy::Grad& gr, const mlpy::Device& device, void* out) {
  cuda.multi_similarity(s, o, q, labels_q, ref, gq, gr, device, out);
}

// One torch::autograd::Function per loss: forward calls the kernel once and saves the
// gradients of the inputs autograd wants; backward only scales them (scale_saved). The batch
// losses take an optional reference set (ref, ref_labels, self_index): ref is their second
// argument, so that the saved {grad_x, grad_ref} line up with the arguments.

struct ContrastiveFunction : torch::autograd::Function<ContrastiveFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                            const c10::optional<at::Tensor>& sim,
                            const c10::optional<at::Tensor>& labels_a,
                            const c10::optional<at::Tensor>& labels_b, Contrastive* self,
                            double margin, int64_t form, bool want_a, bool want_b) {
    auto [loss, ga, gb] = self->run(a, b, sim, labels_a, labels_b, margin, int(form), want_a, want_b);
    ctx->save_for_backward({ga, gb});
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return scale_saved(ctx, grad_outputs, 10);
  }
};

struct TripletFunction : torch::autograd::Function<TripletFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& anchor,
                            const at::Tensor& positive, const at::Tensor& negative, Triplet* self,
                            double margin, int64_t distance, bool want_a, bool want_p,
                            bool want_n) {
    auto [loss, ga, gp, gn] =
        self->run(anchor, positive, negative, margin, int(distance), want_a, want_p, want_n);
    ctx->save_for_backward({ga, gp, gn});
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return scale_saved(ctx, grad_outputs, 9);
  }
};

struct BatchTripletFunction : torch::autograd::Function<BatchTripletFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& ref, const at::Tensor& labels,
                            const c10::optional<at::Tensor>& ref_labels,
                            const c10::optional<at::Tensor>& self_index, BatchTriplet* self,
                            double margin, int64_t mining, int64_t distance, bool soft_margin,
                            bool normalize, bool want_x, bool want_ref, const mlpy::Group* group) {
    if (ref.has_value()) {
      auto [loss, gx, gr] = self->run_reference(x, labels, *ref, ref_labels, self_index, margin,
                                                int(mining), int(distance), soft_margin, normalize,
                                                want_x, want_ref, group);
      ctx->save_for_backward({gx, gr});
      return loss;
    }
    auto [loss, gx] = self->run(x, labels, margin, int(mining), int(distance), soft_margin,
                                normalize, want_x, group);
    ctx->save_for_backward({gx});
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return scale_saved(ctx, grad_outputs, 15);
  }
};

struct LiftedFunction : torch::autograd::Function<LiftedFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& ref, const at::Tensor& labels,
                            const c10::optional<at::Tensor>& ref_labels,
                            const c10::optional<at::Tensor>& self_index, Lifted* self,
                            double margin, bool normalize, bool want_x, bool want_ref,
                            const mlpy::Group* group) {
    if (ref.has_value()) {
      auto [loss, gx, gr] = self->run_reference(x, labels, *ref, ref_labels, self_index, margin,
                                                normalize, want_x, want_ref, group);
      ctx->save_for_backward({gx, gr});
      return loss;
    }
    auto [loss, gx] = self->run(x, labels, margin, normalize, want_x, group);
    ctx->save_for_backward({gx});
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return scale_saved(ctx, grad_outputs, 12);
  }
};

/// BatchContrastiveLoss and MultiSimilarityLoss (Loss: an AllPairs), the options as one struct.
template <class Loss, class Options>
struct AllPairsFunction : torch::autograd::Function<AllPairsFunction<Loss, Options>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& ref, const at::Tensor& labels,
                            const c10::optional<at::Tensor>& ref_labels,
                            const c10::optional<at::Tensor>& self_index, Loss* self,
                            const Options& options, bool want_x, bool want_ref,
                            const mlpy::Group* group) {
    if (ref.has_value()) {
      auto [loss, gx, gr] =
          self->run_reference(x, labels, *ref, ref_labels, self_index, options, want_x, want_ref,
                              group);
      ctx->save_for_backward({gx, gr});
      return loss;
    }
    auto [loss, gx] = self->run(x, labels, options, want_x, group);
    ctx->save_for_backward({gx});
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return scale_saved(ctx, grad_outputs, 10);
  }
};

at::Tensor contrastive_loss(Contrastive& self, const at::Tensor& a, const at::Tensor& b,
                            const c10::optional<at::Tensor>& sim,
                            const c10::optional<at::Tensor>& labels_a,
                            const c10::optional<at::Tensor>& labels_b, double margin, int form) {
  return ContrastiveFunction::apply(a, b, sim, labels_a, labels_b, &self, margin, int64_t(form),
                                    wanted(a), wanted(b));
}

at::Tensor triplet_loss(Triplet& self, const at::Tensor& anchor, const at::Tensor& positive,
                        const at::Tensor& negative, double margin, int distance) {
  return TripletFunction::apply(anchor, positive, negative, &self, margin, int64_t(distance),
                                wanted(anchor), wanted(positive), wanted(negative));
}

at::Tensor batch_triplet_loss(BatchTriplet& self, const at::Tensor& x, const at::Tensor& labels,
                              const c10::optional<at::Tensor>& ref,
                              const c10::optional<at::Tensor>& ref_labels,
                              const c10::optional<at::Tensor>& self_index, double margin,
                              int mining, int distance, bool soft_margin, bool normalize,
                              const mlpy::Group* group) {
  return BatchTripletFunction::apply(x, ref, labels, ref_labels, self_index, &self, margin,
                                     int64_t(mining), int64_t(distance), soft_margin, normalize,
                                     wanted(x), wanted(ref), group);
}

at::Tensor lifted_loss(Lifted& self, const at::Tensor& x, const at::Tensor& labels,
                       const c10::optional<at::Tensor>& ref,
                       const c10::optional<at::Tensor>& ref_labels,
                       const c10::optional<at::Tensor>& self_index, double margin,
                       bool normalize, const mlpy::Group* group) {
  return LiftedFunction::apply(x, ref, labels, ref_labels, self_index, &self, margin, normalize,
                               wanted(x), wanted(ref), group);
}

template <class Loss, class Options>
at::Tensor all_pairs_loss(Loss& self, const at::Tensor& x, const at::Tensor& labels,
                          const c10::optional<at::Tensor>& ref,
                          const c10::optional<at::Tensor>& ref_labels,
                          const c10::optional<at::Tensor>& self_index, const Options& options,
                          const mlpy::Group* group) {
  return AllPairsFunction<Loss, Options>::apply(x, ref, labels, ref_labels, self_index, &self,
                                                options, wanted(x), wanted(ref), group);
}

at::Tensor batch_contrastive_loss(BatchContrastive& self, const at::Tensor& x,
                                  const at::Tensor& labels, const c10::optional<at::Tensor>& ref,
                                  const c10::optional<at::Tensor>& ref_labels,
                                  const c10::optional<at::Tensor>& self_index, double pos_margin,
                                  double neg_margin, int distance, int reduction, bool normalize,
                                  const mlpy::Group* group) {
  const mlpy::BatchContrastiveOptions o{pos_margin, neg_margin, distance, reduction, normalize};
  return all_pairs_loss(self, x, labels, ref, ref_labels, self_index, o, group);
}

at::Tensor multi_similarity_loss(MultiSimilarity& self, const at::Tensor& x,
                                 const at::Tensor& labels, const c10::optional<at::Tensor>& ref,
                                 const c10::optional<at::Tensor>& ref_labels,
                                 const c10::optional<at::Tensor>& self_index, double alpha,
                                 double beta, double base, double epsilon, bool normalize,
                                 const mlpy::Group* group) {
  const mlpy::MultiSimilarityOptions o{alpha, beta, base, epsilon, normalize};
  return all_pairs_loss(self, x, labels, ref, ref_labels, self_index, o, group);
}

/// A Group whose allgatherv calls gather(send: uint8 tensor, counts: list[int]) in Python
/// (metricloss/distributed.py: torch.distributed.all_gather, padded), which returns one uint8
/// tensor of counts[q] bytes per rank. Called from inside a kernel, with the GIL released.
std::unique_ptr<mlpy::Group> make_group(int rank, int size, py::function gather) {
  if (size < 1 || rank < 0 || rank >= size)
    throw py::value_error("metricloss.distributed: rank " + std::to_string(rank) + " of " +
                          std::to_string(size) + " is not a rank of the group");
  auto group = std::make_unique<mlpy::Group>();
  group->rank = rank;
  group->size = size;
  group->allgatherv = [gather, size](const void* send, std::size_t bytes, void* recv,
                                     const std::size_t* counts, const std::size_t* offsets) {
    py::gil_scoped_acquire acquire;
    std::string error;
    try {
      at::Tensor mine = at::empty({static_cast<int64_t>(bytes)}, at::kByte);
      if (bytes > 0) std::memcpy(mine.data_ptr(), send, bytes);
      py::list count_list;
      for (int q = 0; q < size; ++q) count_list.append(counts[q]);
      const auto parts = gather(mine, count_list).cast<std::vector<at::Tensor>>();
      if (static_cast<int>(parts.size()) != size)
        throw std::runtime_error("the gather returned " + std::to_string(parts.size()) +
                                 " tensors for " + std::to_string(size) + " ranks");
      for (int q = 0; q < size; ++q) {
        const at::Tensor part = parts[static_cast<std::size_t>(q)].contiguous();
        if (part.scalar_type() != at::kByte || static_cast<std::size_t>(part.numel()) != counts[q])
          throw std::runtime_error("the gather returned " + std::to_string(part.numel()) +
                                   " elements of " + std::string(c10::toString(part.scalar_type())) +
                                   " from rank " + std::to_string(q) + ", expected " +
                                   std::to_string(counts[q]) + " bytes");
        if (counts[q] > 0)
          std::memcpy(static_cast<char*>(recv) + offsets[q], part.data_ptr(), counts[q]);
      }
    } catch (const std::exception& e) {  // py::error_already_set included, with the GIL held
      error = e.what();
    }
    if (!error.empty()) throw std::runtime_error("metricloss.distributed: " + error);
  };
  return group;
}

/// Gradient blocks waiting in a loss's pool for reuse (tests).
template <class Loss>
std::size_t pooled(Loss& self) {
  return self.pool->waiting();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metricloss kernels (metricloss::simd) for the torch.nn.Module losses in metricloss";
  // run: the kernel call alone (benchmarks, tests); loss: through the autograd Function.
  m.def("cuda_built", &mlpy::cuda_built,
        "Whether this build takes CUDA tensors (built against a torch with CUDA)");
  py::class_<mlpy::Group>(m, "Group")
      .def(py::init(&make_group), py::arg("rank"), py::arg("size"), py::arg("gather"))
      .def_readonly("rank", &mlpy::Group::rank)
      .def_readonly("size", &mlpy::Group::size);
  py::class_<Contrastive>(m, "Contrastive")
      .def(py::init<>())
      .def("run", &Contrastive::run)
      .def("loss", &contrastive_loss)
      .def_readonly("gradient_calls", &Contrastive::gradient_calls)
      .def_property_readonly("pooled_gradients", &pooled<Contrastive>);
  py::class_<Triplet>(m, "Triplet")
      .def(py::init<>())
      .def("run", &Triplet::run)
      .def("loss", &triplet_loss)
      .def_readonly("gradient_calls", &Triplet::gradient_calls)
      .def_property_readonly("pooled_gradients", &pooled<Triplet>);
  py::class_<BatchTriplet>(m, "BatchTriplet")
      .def(py::init<>())
      .def("run",
           [](BatchTriplet& self, const at::Tensor& x, const at::Tensor& labels, double margin,
              int mining, int distance, bool soft_margin, bool normalize, bool want_x) {
             return self.run(x, labels, margin, mining, distance, soft_margin, normalize, want_x);
           })
      .def("run_reference", &BatchTriplet::run_reference)
      .def("loss", &batch_triplet_loss)
      .def_readonly("gradient_calls", &BatchTriplet::gradient_calls)
      .def_property_readonly("pooled_gradients", &pooled<BatchTriplet>);
  py::class_<Lifted>(m, "Lifted")
      .def(py::init<>())
      .def("run",
           [](Lifted& self, const at::Tensor& x, const at::Tensor& labels, double margin,
              bool normalize, bool want_x) {
             return self.run(x, labels, margin, normalize, want_x);
           })
      .def("run_reference", &Lifted::run_reference)
      .def("loss", &lifted_loss)
      .def_readonly("gradient_calls", &Lifted::gradient_calls)
      .def_property_readonly("pooled_gradients", &pooled<Lifted>);
  py::class_<BatchContrastive>(m, "BatchContrastive")
      .def(py::init<>())
      .def("loss", &batch_contrastive_loss)
      .def_readonly("gradient_calls", &BatchContrastive::gradient_calls)
      .def_property_readonly("pooled_gradients", &pooled<BatchContrastive>);
  py::class_<MultiSimilarity>(m, "MultiSimilarity")
      .def(py::init<>())
      .def("loss", &multi_similarity_loss)
      .def_readonly("gradient_calls", &MultiSimilarity::gradient_calls)
      .def_property_readonly("pooled_gradients", &pooled<MultiSimilarity>);
}
