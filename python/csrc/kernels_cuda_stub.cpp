// CudaLosses where the binding is built without its CUDA path (the installed torch has no
// CUDA): binding.cpp asks cuda_built() first and rejects CUDA tensors with a clear message,
// so these bodies are never reached.
#include "kernels.hpp"

#include <stdexcept>

namespace metricloss_python {

bool cuda_built() { return false; }

struct CudaLosses::Impl {};

CudaLosses::CudaLosses() = default;
CudaLosses::~CudaLosses() = default;

namespace {
[[noreturn]] void not_built() {
  throw std::logic_error("metricloss: this build of the binding has no CUDA path");
}
}  // namespace

void CudaLosses::contrastive(Scalar, double, int, Rows, Rows, Labels, Grad, Grad, Device, void*) { not_built(); }
void CudaLosses::contrastive(Scalar, double, int, Rows, Rows, Labels, Labels, Grad, Grad, Device, void*) {
  not_built();
}
void CudaLosses::triplet(Scalar, double, int, Rows, Rows, Rows, Grad, Grad, Grad, Device, void*) { not_built(); }
void CudaLosses::batch_triplet(Scalar, double, int, int, bool, bool, Rows, Labels, Grad, Device, void*) {
  not_built();
}
void CudaLosses::lifted(Scalar, double, bool, Rows, Labels, Grad, Device, void*) { not_built(); }
void CudaLosses::batch_triplet(Scalar, double, int, int, bool, bool, Rows, Labels, Reference, Grad, Grad,
                               Device, void*) {
  not_built();
}
void CudaLosses::lifted(Scalar, double, bool, Rows, Labels, Reference, Grad, Grad, Device, void*) {
  not_built();
}
void CudaLosses::batch_contrastive(Scalar, const BatchContrastiveOptions&, Rows, Labels, Grad, Device, void*) {
  not_built();
}
void CudaLosses::multi_similarity(Scalar, const MultiSimilarityOptions&, Rows, Labels, Grad, Device, void*) {
  not_built();
}
void CudaLosses::batch_contrastive(Scalar, const BatchContrastiveOptions&, Rows, Labels, Reference, Grad, Grad,
                                   Device, void*) {
  not_built();
}
void CudaLosses::multi_similarity(Scalar, const MultiSimilarityOptions&, Rows, Labels, Reference, Grad, Grad,
                                  Device, void*) {
  not_built();
}

}  // namespace metricloss_python
