// __half and __nv_bfloat16 embeddings and gradients on CUDA (backend/cuda/narrow.cuh), every
// loss and form: the loss and float gradients are bitwise those of the float call on the
// widened inputs, a narrow gradient is bitwise the round-to-nearest-even of that float
// gradient, and the padding of strided maps is untouched; with loss_to, with top_diff as a
// loss scale (overflow to Inf included), on data with a large common offset, with mixed
// narrow and float arguments; NaN propagation, the errors (nothing written), and normalize's
// zero row (the value-returning call throws, loss_to leaves the gradient untouched).
#include "device.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

using namespace mltest;

namespace {

template <class S>
S to_narrow(float v);
template <>
__half to_narrow<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__nv_bfloat16 to_narrow<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
float widen(__half v) { return __half2float(v); }
float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class S>
std::uint16_t bits_of(S v) {
  std::uint16_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}
bool same_bits(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof a) == 0;
}

template <class S>
using NarrowMap = Eigen::Map<ml::RowMatrix<S>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class S>
using ConstNarrowMap = Eigen::Map<const ml::RowMatrix<S>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// A narrow matrix in device memory, outer stride cols + pad with the padding a sentinel, and
/// its widened values.
template <class S>
struct NarrowMatrix {
  Index rows, cols, stride;
  std::vector<S> host;
  DeviceBuffer<S> device;
  Matrix<float> wide;

  static constexpr float sentinel = -7.5f;  // exact in both types

  NarrowMatrix(const Matrix<float>& values, Index pad)
      : rows(values.rows()), cols(values.cols()), stride(values.cols() + pad),
        host(static_cast<std::size_t>(values.rows() * (values.cols() + pad)), to_narrow<S>(sentinel)),
        device(host.size()), wide(values.rows(), values.cols()) {
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) {
        host[static_cast<std::size_t>(i * stride + j)] = to_narrow<S>(values(i, j));
        wide(i, j) = widen(host[static_cast<std::size_t>(i * stride + j)]);
      }
    device.upload(host);
  }
  NarrowMap<S> map() { return NarrowMap<S>(device.data(), rows, cols, Eigen::OuterStride<>(stride)); }
  ConstNarrowMap<S> cmap() const {
    return ConstNarrowMap<S>(device.data(), rows, cols, Eigen::OuterStride<>(stride));
  }
  std::vector<S> download() const { return device.download(); }
};

/// Counts the entries of a narrow gradient that are not the rounding of `expected`, and the
/// padding entries that are not the sentinel (NaN matches NaN).
template <class S>
Index mismatches(const NarrowMatrix<S>& g, const Matrix<float>& expected) {
  const std::vector<S> got = g.download();
  Index bad = 0;
  for (Index i = 0; i < g.rows; ++i)
    for (Index j = 0; j < g.stride; ++j) {
      const S v = got[static_cast<std::size_t>(i * g.stride + j)];
      if (j >= g.cols) {
        bad += bits_of(v) != bits_of(to_narrow<S>(NarrowMatrix<S>::sentinel));
        continue;
      }
      const S want = to_narrow<S>(expected(i, j));
      const bool both_nan = std::isnan(widen(v)) && std::isnan(widen(want));
      bad += !both_nan && bits_of(v) != bits_of(want);
    }
  return bad;
}

/// Bitwise equality of two float matrices (NaN matches NaN).
Index float_mismatches(const Matrix<float>& a, const Matrix<float>& b) {
  Index bad = 0;
  for (Index i = 0; i < a.size(); ++i) bad += !same_bits(a.data()[i], b.data()[i]);
  return bad;
}

/// values: the call's embedding matrices, in order; gradient k has the shape of matrix k.
/// call(tag, inputs, gradients, top_diff) with inputs / gradients vectors of maps.
template <class S, class Call>
void check_against_float(const std::vector<Matrix<float>>& values, float top_diff, Call&& call) {
  const Index pad = 3;
  std::vector<std::unique_ptr<NarrowMatrix<S>>> narrow_in, g_narrow, g_deferred;
  std::vector<std::unique_ptr<DeviceStrided<float>>> wide_in, g_float, g_mixed;
  std::vector<ConstNarrowMap<S>> narrow_maps;
  std::vector<ml::ConstRowMap<float>> wide_maps;
  std::vector<NarrowMap<S>> gn_maps, gd_maps;
  std::vector<ml::RowMap<float>> gf_maps, gm_maps;
  for (const Matrix<float>& v : values) {
    narrow_in.push_back(std::make_unique<NarrowMatrix<S>>(v, pad));
    wide_in.push_back(std::make_unique<DeviceStrided<float>>(narrow_in.back()->wide, pad, -7.5f));
    const Matrix<float> zero = Matrix<float>::Zero(v.rows(), v.cols());
    g_narrow.push_back(std::make_unique<NarrowMatrix<S>>(zero, pad));
    g_deferred.push_back(std::make_unique<NarrowMatrix<S>>(zero, pad));
    g_float.push_back(std::make_unique<DeviceStrided<float>>(zero, pad, -7.5f));
    g_mixed.push_back(std::make_unique<DeviceStrided<float>>(zero, pad, -7.5f));
  }
  for (std::size_t k = 0; k < values.size(); ++k) {
    narrow_maps.push_back(narrow_in[k]->cmap());
    wide_maps.push_back(wide_in[k]->cmap());
    gn_maps.push_back(g_narrow[k]->map());
    gd_maps.push_back(g_deferred[k]->map());
    gf_maps.push_back(g_float[k]->map());
    gm_maps.push_back(g_mixed[k]->map());
  }
  const float expected = call(ml::cuda, wide_maps, gf_maps, top_diff);
  const float narrow = call(ml::cuda, narrow_maps, gn_maps, top_diff);
  const float mixed = call(ml::cuda, narrow_maps, gm_maps, top_diff);
  DeviceBuffer<float> device_loss(1);
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CHECK(std::isnan(call(ml::cuda.on(stream).loss_to(device_loss.data()), narrow_maps, gd_maps, top_diff)));
  check_cuda(cudaStreamSynchronize(stream));
  check_cuda(cudaStreamDestroy(stream));
  const float deferred = device_loss.download()[0];
  CAPTURE(expected, narrow, mixed, deferred, top_diff);
  CHECK(same_bits(narrow, expected));
  CHECK(same_bits(mixed, expected));
  CHECK(same_bits(deferred, expected));
  for (std::size_t k = 0; k < values.size(); ++k) {
    CAPTURE(k);
    const Matrix<float> gf = g_float[k]->dense();
    CHECK(g_float[k]->host().padding_is(-7.5f));
    CHECK(g_mixed[k]->host().padding_is(-7.5f));
    CHECK(float_mismatches(g_mixed[k]->dense(), gf) == 0);
    CHECK(mismatches(*g_narrow[k], gf) == 0);
    CHECK(mismatches(*g_deferred[k], gf) == 0);
  }
}

/// Embeddings around `offset`, spread `spread`, rounded to S on the way in.
Matrix<float> embeddings(Index n, Index d, std::mt19937_64& rng, double offset = 0.0, double spread = 1.0) {
  return uniform_matrix<float>(n, d, rng, offset - spread, offset + spread);
}

template <class S>
const char* narrow_name() {
  return std::is_same<S, __half>::value ? "half" : "bfloat16";
}

}  // namespace

TEMPLATE_TEST_CASE("cuda half / bfloat16: pair and triplet losses equal the float call on the widened inputs",
                   "[cuda][narrow]", __half, __nv_bfloat16) {
  if (skip_without_device()) return;
  using S = TestType;
  for (const std::uint64_t seed : {1u, 2u, 3u}) {
    std::mt19937_64 rng(seed);
    const Index n = seed == 1 ? 1 : 37 * Index(seed), d = seed == 2 ? 1 : 35 + Index(seed);
    const double offset = seed == 3 ? 96.0 : 0.0;
    CAPTURE(narrow_name<S>(), seed, n, d, offset);
    std::vector<float> sim(static_cast<std::size_t>(n));
    for (auto& s : sim) s = static_cast<float>(rng() % 2);
    const DeviceVectorOf<float> dsim(sim);
    const std::vector<std::int64_t> ya = random_labels(n, 3, rng), yb = random_labels(n, 3, rng);
    const DeviceVectorOf<std::int64_t> dya(ya), dyb(yb);
    const std::vector<Matrix<float>> pair{embeddings(n, d, rng, offset), embeddings(n, d, rng, offset)};
    for (const ml::ContrastiveForm form : {ml::ContrastiveForm::hadsell, ml::ContrastiveForm::legacy})
      for (const float top_diff : {1.0f, 1024.0f, 3.0e7f}) {
        CAPTURE(static_cast<int>(form), top_diff);
        ml::ContrastiveLoss<float> loss(std::sqrt(static_cast<float>(d)) * 0.8f, form);
        check_against_float<S>(pair, top_diff, [&](auto tag, const auto& in, auto& g, float td) {
          return loss.forward_backward(tag, in[0], in[1], dsim.map(), g[0], g[1], td);
        });
        check_against_float<S>(pair, top_diff, [&](auto tag, const auto& in, auto& g, float td) {
          return loss.forward_backward(tag, in[0], in[1], dya.map(), dyb.map(), g[0], ml::skip, td);
        });
      }
    const std::vector<Matrix<float>> triplet{embeddings(n, d, rng, offset), embeddings(n, d, rng, offset),
                                             embeddings(n, d, rng, offset)};
    for (const ml::Distance distance : {ml::Distance::squared_euclidean, ml::Distance::euclidean}) {
      ml::TripletLoss<float> loss(0.3f, distance);
      check_against_float<S>(triplet, 2.0f, [&](auto tag, const auto& in, auto& g, float td) {
        return loss.forward_backward(tag, in[0], in[1], in[2], g[0], g[1], g[2], td);
      });
    }
  }
}

TEMPLATE_TEST_CASE("cuda half / bfloat16: batch losses equal the float call on the widened inputs",
                   "[cuda][narrow]", __half, __nv_bfloat16) {
  if (skip_without_device()) return;
  using S = TestType;
  for (const std::uint64_t seed : {4u, 5u, 6u}) {
    std::mt19937_64 rng(seed);
    const Index n = seed == 4 ? 1 : 29 * Index(seed - 3), d = seed == 5 ? 1 : 33;
    const double offset = seed == 6 ? 96.0 : 0.0;
    CAPTURE(narrow_name<S>(), seed, n, d, offset);
    const std::vector<std::int64_t> labels = tied_labels(n, 5, rng);
    const DeviceVectorOf<std::int64_t> dl(labels);
    const std::vector<Matrix<float>> x{embeddings(n, d, rng, offset)};
    for (const bool normalize : {false, true}) {
      if (normalize && offset != 0.0) continue;  // unit rows of offset data are all one row
      CAPTURE(normalize);
      auto batch = [&](auto& loss) {
        loss.normalize = normalize;
        for (const float top_diff : {1.0f, 4096.0f})
          check_against_float<S>(x, top_diff, [&](auto tag, const auto& in, auto& g, float td) {
            return loss.forward_backward(tag, in[0], dl.map(), g[0], td);
          });
      };
      for (const ml::Mining mining : {ml::Mining::hard, ml::Mining::semihard, ml::Mining::all})
        for (const ml::Distance distance : {ml::Distance::euclidean, ml::Distance::squared_euclidean})
          for (const bool soft : {false, true}) {
            if (soft && mining == ml::Mining::semihard) continue;
            CAPTURE(static_cast<int>(mining), static_cast<int>(distance), soft);
            ml::BatchTripletLoss<float> loss(0.2f, mining, distance);
            loss.soft_margin = soft;
            batch(loss);
          }
      ml::LiftedStructureLoss<float> lifted(1.0f);
      batch(lifted);
      ml::BatchContrastiveLoss<float> contrastive(0.1f, 0.9f);
      batch(contrastive);
      ml::MultiSimilarityLoss<float> ms;
      batch(ms);
    }
  }
}

TEMPLATE_TEST_CASE("cuda half / bfloat16: reference sets equal the float call on the widened inputs",
                   "[cuda][narrow][reference]", __half, __nv_bfloat16) {
  if (skip_without_device()) return;
  using S = TestType;
  std::mt19937_64 rng(7);
  const Index nq = 23, nr = 61, d = 19;
  const std::vector<std::int64_t> yq = random_labels(nq, 4, rng);
  std::vector<std::int64_t> yr = random_labels(nr, 4, rng);
  Eigen::VectorXi self = Eigen::VectorXi::Constant(nq, -1);
  for (Index a = 0; a < nq; a += 3) {  // a few queries are rows of R
    self[a] = static_cast<int>(2 * a);
    yr[static_cast<std::size_t>(2 * a)] = yq[static_cast<std::size_t>(a)];
  }
  const DeviceVectorOf<std::int64_t> dq(yq), dr(yr);
  const std::vector<Matrix<float>> qr{embeddings(nq, d, rng), embeddings(nr, d, rng)};
  for (const bool normalize : {false, true}) {
    CAPTURE(narrow_name<S>(), normalize);
    auto check = [&](auto& loss) {
      loss.normalize = normalize;
      check_against_float<S>(qr, 3.0f, [&](auto tag, const auto& in, auto& g, float td) {
        return loss.forward_backward(tag, in[0], dq.map(), ml::reference(in[1], dr.map(), self),
                                     g[0], g[1], td);
      });
    };
    for (const ml::Mining mining : {ml::Mining::hard, ml::Mining::semihard, ml::Mining::all}) {
      CAPTURE(static_cast<int>(mining));
      ml::BatchTripletLoss<float> loss(0.2f, mining);
      check(loss);
    }
    ml::LiftedStructureLoss<float> lifted(1.0f);
    check(lifted);
    ml::BatchContrastiveLoss<float> contrastive(0.1f, 0.9f);
    check(contrastive);
    ml::MultiSimilarityLoss<float> ms;
    check(ms);
  }

  // Narrow queries against a float reference set, grad_r skipped: the float call's bits.
  const NarrowMatrix<S> q(qr[0], 2);
  const DeviceStrided<float> q_wide(q.wide, 0, 0.0f), r_float(qr[1], 1, 0.0f);
  NarrowMatrix<S> gq(Matrix<float>::Zero(nq, d), 2);
  DeviceStrided<float> gq_float(Matrix<float>::Zero(nq, d), 0, 0.0f);
  ml::BatchTripletLoss<float> loss(0.2f, ml::Mining::semihard);
  const float expected = loss.forward_backward(ml::cuda, q_wide.cmap(), dq.map(),
                                               ml::reference(r_float.cmap(), dr.map()), gq_float.map(), ml::skip);
  const float got = loss.forward_backward(ml::cuda, q.cmap(), dq.map(), ml::reference(r_float.cmap(), dr.map()),
                                          gq.map(), ml::skip);
  CHECK(same_bits(got, expected));
  CHECK(mismatches(gq, gq_float.dense()) == 0);
  CHECK(same_bits(loss.forward(ml::cuda, q.cmap(), dq.map(), ml::reference(r_float.cmap(), dr.map())), expected));
}

TEMPLATE_TEST_CASE("cuda half / bfloat16: NaN inputs, errors with nothing written, normalize's zero row",
                   "[cuda][narrow]", __half, __nv_bfloat16) {
  if (skip_without_device()) return;
  using S = TestType;
  std::mt19937_64 rng(8);
  const Index n = 17, d = 9;
  const std::vector<std::int64_t> labels = random_labels(n, 3, rng);
  const DeviceVectorOf<std::int64_t> dl(labels);
  Matrix<float> values = embeddings(n, d, rng);

  // NaN propagates as in the float call: NaN loss, every gradient entry NaN.
  {
    Matrix<float> with_nan = values;
    with_nan(4, 2) = std::numeric_limits<float>::quiet_NaN();
    const NarrowMatrix<S> x(with_nan, 0);
    NarrowMatrix<S> g(Matrix<float>::Zero(n, d), 0);
    ml::BatchTripletLoss<float> loss;
    CHECK(std::isnan(loss.forward_backward(ml::cuda, x.cmap(), dl.map(), g.map())));
    for (const S v : g.download()) CHECK(std::isnan(widen(v)));
  }

  // A gradient over an input, or of the wrong shape: invalid_argument naming the function
  // and the argument, nothing written.
  {
    NarrowMatrix<S> x(values, 0);
    const std::vector<S> before = x.download();
    ml::BatchTripletLoss<float> loss;
    try {
      loss.forward_backward(ml::cuda, x.cmap(), dl.map(), x.map());
      FAIL("no error for a gradient over its input");
    } catch (const ml::invalid_argument& e) {
      const std::string what = e.what();
      CAPTURE(what);
      CHECK(what.find("metricloss::BatchTripletLoss<float>::forward_backward") != std::string::npos);
      CHECK(what.find("'grad_x' overlaps argument 'x'") != std::string::npos);
    }
    NarrowMatrix<S> wrong(Matrix<float>::Constant(n, d + 1, 0.5f), 0);
    try {
      loss.forward_backward(ml::cuda, x.cmap(), dl.map(), wrong.map());
      FAIL("no error for a gradient of the wrong shape");
    } catch (const ml::invalid_argument& e) {
      const std::string what = e.what();
      CAPTURE(what);
      CHECK(what.find("'grad_x' has shape 17x10, expected 17x9") != std::string::npos);
    }
    check_cuda(cudaDeviceSynchronize());
    const std::vector<S> after = x.download();
    CHECK(std::memcmp(before.data(), after.data(), before.size() * sizeof(S)) == 0);
    CHECK(mismatches(wrong, Matrix<float>::Constant(n, d + 1, 0.5f)) == 0);
  }

  // normalize with a zero row: the value-returning call throws, loss_to leaves NaN at the
  // loss and the narrow gradient as it was.
  {
    values.row(5).setZero();
    const NarrowMatrix<S> x(values, 1);
    const Matrix<float> previous = Matrix<float>::Constant(n, d, 0.375f);
    NarrowMatrix<S> g(previous, 1);
    ml::LiftedStructureLoss<float> loss;
    loss.normalize = true;
    CHECK_THROWS_AS(loss.forward_backward(ml::cuda, x.cmap(), dl.map(), g.map()), ml::invalid_argument);
    DeviceBuffer<float> device_loss(1);
    loss.forward_backward(ml::cuda.loss_to(device_loss.data()), x.cmap(), dl.map(), g.map());
    check_cuda(cudaDeviceSynchronize());
    CHECK(std::isnan(device_loss.download()[0]));
    CHECK(mismatches(g, previous) == 0);
  }
}
