#pragma once
// The CUDA umbrella (opt-in, compiled by nvcc; link metricloss::cuda): every loss on device
// memory through the execution tag `metricloss::cuda`. The CPU umbrella metricloss.hpp never
// includes this header; include both to have every path.
//
//   namespace ml = metricloss;
//   ml::ContrastiveLoss<float> loss(1.0f);
//   // a, b, sim, ga, gb: Eigen maps over device pointers, as on the CPU path
//   float value = loss.forward_backward(ml::cuda.on(stream), a, b, sim, ga, gb);
//   // never synchronises: the loss lands in device memory (d_loss: one float), NaN returned
//   loss.forward_backward(ml::cuda.on(stream).loss_to(d_loss), a, b, sim, ga, gb);
//   // the batch losses over a group's global batch (threads, MPI, or <metricloss/nccl.cuh>)
//   float L = batch_loss.forward_backward(ml::cuda.on(stream).sharded(group), x_r, y_r, g_r);
//
// Semantics: work is ordered on the tag's stream (legacy default stream for plain
// `ml::cuda`); the only synchronisation is the stream sync that returns a host loss value.
// Device scratch lives in the functor, one workspace per (device, stream), allocated in
// stream order (cudaMallocAsync) only when a call needs more than before: no allocation per
// call once warmed; it is freed with the functor (or by metricloss::release_cuda_workspaces(loss)).
// CUDA failures throw metricloss::cuda_error; bad arguments throw
// metricloss::invalid_argument before anything is enqueued.
//
// Below the functors, namespace metricloss::cuda_core has the CUB-style layer: noexcept
// functions returning cudaError_t that work in caller-owned workspace, with a size query:
//   contrastive_workspace_bytes<T>(N, D)       contrastive_forward_backward (sim or two labels)
//   triplet_workspace_bytes<T>(N, D)           triplet_forward_backward
//   lifted_structure_workspace_bytes<T>(N, D)  lifted_structure_forward_backward
//   batch_triplet_workspace_bytes<T>(N, D[, mining])  batch_triplet_forward_backward
//   batch_contrastive_workspace_bytes<T>(N, D) batch_contrastive_forward_backward
//   multi_similarity_workspace_bytes<T>(N, D)  multi_similarity_forward_backward
//   reference_workspace_bytes(N_q, N_r)        batch_triplet_reference_forward_backward,
//                                              lifted_structure_reference_forward_backward,
//                                              batch_contrastive_reference_forward_backward,
//                                              multi_similarity_reference_forward_backward
//   normalize_workspace_bytes<T>(N, D, grad)   normalize_rows, then a batch core on the unit
//                                              rows, then normalize_chain (normalize = true)
// Each takes DeviceMatrix / DeviceVector views ({data, rows, cols, stride}), the options, the
// gradients (data == nullptr: skipped), top_diff, a device pointer for the loss and a stream.
//
// Memory: contrastive and triplet need 16 KiB of workspace; the batch losses one N x N
// matrix of T (lifted, hard mining) or of T and of double (batch triplet's `all` and
// semihard, batch contrastive, multi-similarity), e.g. 1 GiB / 3 GiB at N = 16384 in float.
//
// normalize = true (the batch losses): the rows are normalised on the device and the verdict
// on zero rows comes back with the loss; a call returning the value throws invalid_argument
// with nothing written, loss_to(d_loss) leaves NaN at d_loss and the gradient untouched
// (backend/cuda/normalize.cuh). Its workspace is two more N x D of T.
//
// __half / __nv_bfloat16 embeddings, reference sets and gradients (backend/cuda/narrow.cuh):
// the float call on the widened values, bitwise; a narrow gradient is the float one rounded to
// nearest even. Their staging is one more workspace: N x D of T per narrow matrix.
//
// Compile with --expt-relaxed-constexpr (the metricloss::cuda target adds it): Eigen and
// the shared host/device maths need it under nvcc.
#if !defined(__CUDACC__)
#error "<metricloss/cuda.cuh> must be compiled by nvcc (or another CUDA compiler)"
#endif

#include <metricloss/version.hpp>
#include <metricloss/config.hpp>
#include <metricloss/types.hpp>
#include <metricloss/errors.hpp>
#include <metricloss/exec.hpp>

#include <metricloss/backend/cuda/runtime.cuh>
#include <metricloss/backend/cuda/reduce.cuh>
#include <metricloss/backend/cuda/exact.cuh>
#include <metricloss/backend/cuda/rows.cuh>
#include <metricloss/backend/cuda/pairwise.cuh>
#include <metricloss/backend/cuda/normalize.cuh>
#include <metricloss/backend/cuda/narrow.cuh>  // __half / __nv_bfloat16 embeddings and gradients

#include <metricloss/contrastive.hpp>
#include <metricloss/backend/cuda/contrastive.cuh>

#include <metricloss/triplet.hpp>
#include <metricloss/backend/cuda/triplet.cuh>

#include <metricloss/lifted_structure.hpp>
#include <metricloss/backend/cuda/lifted_structure.cuh>

#include <metricloss/batch_triplet.hpp>
#include <metricloss/backend/cuda/batch_triplet.cuh>
#include <metricloss/backend/cuda/reference.cuh>  // batch triplet, lifted, batch contrastive, multi-similarity against a reference set
#include <metricloss/backend/cuda/memory.cuh>     // DeviceCrossBatchMemory

#include <metricloss/batch_contrastive.hpp>
#include <metricloss/backend/cuda/batch_contrastive.cuh>

#include <metricloss/multi_similarity.hpp>
#include <metricloss/backend/cuda/multi_similarity.cuh>

#include <metricloss/backend/cuda/sharded.cuh>
