// Bitwise digest of every loss's outputs over a fixed set of calls (scripts/bitwise).
//
// Uses the public API only (<metricloss/metricloss.hpp>, Eigen, std), so that the same source
// compiles against any revision's include/: two builds that differ only in the include path
// must print the same lines, or a change moved an output bit. One line per call:
//
//   <case id> | loss=<hex bits of the returned T> grads=<count> fnv=<FNV-1a-64> g0=<hex>
//   <case id> | threw fnv=<FNV-1a-64 of the message> grads=<count> fnv=<FNV-1a-64>
//
// The case id names the loss and its options, the tag, the scalar type, the regime, the shape
// and strides, the seed, the functor's call number and the call's form (forward or
// forward_backward, top_diff, label type, how the inputs and gradients are passed). fnv hashes
// the exact bits of every gradient buffer of the call, padding between rows included (it is
// a sentinel before the call and must stay one); g0 is the first gradient entry, to debug.
//
// Scratch memory: each functor serves a whole sequence of inputs whose shapes grow and then
// shrink, with the tags alternating on the same object (scalar, simd, scalar, simd), and then
// a copy of the warm functor, a functor copy-assigned from it and a fresh one repeat calls on
// the sequence's largest input and on its last. Every call is digested, so a result that
// depends on what the functor held before (or on what a copy did not take) shows up.
//
// Per input: forward and forward_backward, top_diff 1 and != 1 (-0.5, 0.5, 1e-3, 3e5, 0),
// subsets of the gradients (skip), every label type (int32, int64, float, double, an
// inner-strided map), inputs as RowMatrix, Map<const>, Map and OuterStride maps, gradients
// as RowMatrix, Map and OuterStride maps. Regimes, each with fixed seeds: random normal;
// integer grids with ties, duplicate rows and classes of one (also at an offset of 1e4);
// a large common offset (1e2, 1e4); large scales (uniform in +-30, +-44, +-60, +-200, +-10 at
// D = 512, tight sites at 1e3..1e5) where the float lifted path recomputes weighted
// distances into its list and where it reruns the call in double (both happen: checked at
// 6bcfc73 with a copy of include/ that printed them), explicit triplets whose hinge lies
// within rounding of 0 (recomputed in double), coefficients beyond float (scaled in
// double); degenerate inputs (N = 1, D = 1, one class, coincident rows, no positives, a NaN
// or +inf in x, a NaN label, values near 1e18 or 1e-36); odd sizes (N = 37, D = 17;
// N = 129, D = 3); strided inputs and gradients; and a few malformed calls (the message's
// hash, the gradients untouched). ~5600 calls, ~10 s at -O2.
#include "digest_format.hpp"
#include "fixed_alignment.hpp"  // every operator new on 64 bytes: alignments independent of heap history

#include <metricloss/metricloss.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

namespace ml = metricloss;
using ml::Index;
template <class T>
using RowMatrix = ml::RowMatrix<T>;

// ---------------------------------------------------------------------------------------
// Deterministic data: splitmix64, uniform from 53 bits, normal by Box-Muller (no
// implementation-defined std distributions).

struct Rng {
  std::uint64_t state;
  explicit Rng(std::uint64_t seed) : state(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1p-53; }  // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  double normal() {
    const double u = 1.0 - uniform(), v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }
  Index below(Index n) { return static_cast<Index>(next() % static_cast<std::uint64_t>(n)); }
};

struct Fnv {
  std::uint64_t h = 0xcbf29ce484222325ull;
  void bytes(const void* data, std::size_t size) { h = bitwise::fnv(data, size, h); }
};

using bitwise::hex;

template <class T>
const char* type_name() {
  return std::is_same<T, float>::value ? "float" : "double";
}

template <class T>
constexpr T sentinel() {
  return T(-12345.25);
}

/// Row-major storage of rows x cols with an outer stride, `offset` elements after a 64-byte
/// boundary (fixed_alignment.hpp: the vector's storage starts on one), allocated to its exact
/// extent. Inputs pad with NaN (a kernel reading padding would turn the result NaN); gradients
/// pad with the sentinel, and the whole storage (the offset's elements too) is hashed.
template <class T>
struct Buffer {
  std::vector<T> storage;
  Index rows = 0, cols = 0, stride = 0, offset = 0;
  Buffer() = default;
  Buffer(Index r, Index c, Index s, T fill, Index off) : rows(r), cols(c), stride(s), offset(off) {
    const Index extent = r == 0 || c == 0 ? 0 : (r - 1) * s + c;
    storage.assign(static_cast<std::size_t>(off + extent), fill);
  }
  T* data() { return storage.data() + offset; }
  const T* data() const { return storage.data() + offset; }
  T& at(Index i, Index j) { return storage[static_cast<std::size_t>(offset + i * stride + j)]; }
  T at(Index i, Index j) const { return storage[static_cast<std::size_t>(offset + i * stride + j)]; }
  bool contiguous() const { return stride == cols; }
  ml::ConstRowMap<T> cmap() const { return ml::ConstRowMap<T>(data(), rows, cols, Eigen::OuterStride<>(stride)); }
  ml::RowMap<T> map() { return ml::RowMap<T>(data(), rows, cols, Eigen::OuterStride<>(stride)); }
  RowMatrix<T> dense() const {
    RowMatrix<T> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) m(i, j) = at(i, j);
    return m;
  }
  void reset() { std::fill(storage.begin(), storage.end(), sentinel<T>()); }
};

/// Offsets (in elements) of an input's buffers and of its gradients' from a 64-byte boundary,
/// a fixed function of the input's seed: results may follow the alignment of their memory,
/// so it is part of the case (its id shows it in bytes).
struct Offsets {
  Index input = 0, gradient = 0;
};
inline Offsets offsets_of(std::uint64_t seed) {
  const Index input[] = {0, 1, 2, 3, 5, 8, 13};
  const Index gradient[] = {0, 3, 1, 7, 2};
  return Offsets{input[seed % 7], gradient[(seed / 7) % 5]};
}
template <class T>
std::string offsets_id(std::uint64_t seed) {
  const Offsets o = offsets_of(seed);
  return " xo=" + std::to_string(o.input * static_cast<Index>(sizeof(T)) % 64) +
         " go=" + std::to_string(o.gradient * static_cast<Index>(sizeof(T)) % 64);
}

/// A matrix of doubles (the generated values), cast to T with `pad` NaN columns of padding.
struct Values {
  Index rows = 0, cols = 0;
  std::vector<double> v;
  Values(Index r, Index c) : rows(r), cols(c), v(static_cast<std::size_t>(r * c), 0.0) {}
  double& operator()(Index i, Index j) { return v[static_cast<std::size_t>(i * cols + j)]; }
  double operator()(Index i, Index j) const { return v[static_cast<std::size_t>(i * cols + j)]; }
};

template <class T>
Buffer<T> to_buffer(const Values& values, Index pad, Index offset) {
  Buffer<T> b(values.rows, values.cols, values.cols + pad, std::numeric_limits<T>::quiet_NaN(), offset);
  for (Index i = 0; i < values.rows; ++i)
    for (Index j = 0; j < values.cols; ++j) b.at(i, j) = static_cast<T>(values(i, j));
  return b;
}

// ---------------------------------------------------------------------------------------
// Regimes: how the values of one matrix are drawn.

enum class Regime {
  normal,       // N(0, 1)
  grid,         // integers in [-2, 2], a quarter of the rows copies of earlier rows
  grid_offset,  // grid + 1e4 (exact in float: ties survive the offset)
  offset2,      // 1e2 + 0.05 N(0, 1)
  offset4,      // 1e4 + 0.05 N(0, 1)
  uniform,      // uniform in +-scale
  sites,        // 16 sites uniform in +-scale, each row a site plus uniform noise in +-1
  coincident,   // every row the same random row
  nan,          // normal, one entry NaN
  infinite,     // normal, one entry +inf
  huge,         // normal times 1e18 (float: squares overflow)
  tiny,         // normal times 1e-36 (float: subnormal differences, coefficients beyond T)
};

const char* regime_name(Regime r) {
  switch (r) {
    case Regime::normal: return "normal";
    case Regime::grid: return "grid";
    case Regime::grid_offset: return "grid+1e4";
    case Regime::offset2: return "offset1e2";
    case Regime::offset4: return "offset1e4";
    case Regime::uniform: return "uniform";
    case Regime::sites: return "sites";
    case Regime::coincident: return "coincident";
    case Regime::nan: return "nan";
    case Regime::infinite: return "inf";
    case Regime::huge: return "huge";
    case Regime::tiny: return "tiny";
  }
  return "?";
}

Values draw(Regime regime, Index n, Index d, double scale, Rng& rng) {
  Values x(n, d);
  switch (regime) {
    case Regime::normal:
    case Regime::nan:
    case Regime::infinite:
    case Regime::huge:
    case Regime::tiny:
      for (double& v : x.v)
        v = rng.normal() * (regime == Regime::huge ? 1e18 : regime == Regime::tiny ? 1e-36 : 1.0);
      if (regime == Regime::nan) x.v[static_cast<std::size_t>(rng.below(n * d))] = std::nan("");
      if (regime == Regime::infinite)
        x.v[static_cast<std::size_t>(rng.below(n * d))] = std::numeric_limits<double>::infinity();
      break;
    case Regime::grid:
    case Regime::grid_offset:
      for (Index i = 0; i < n; ++i) {
        if (i > 0 && rng.below(4) == 0) {
          const Index from = rng.below(i);
          for (Index j = 0; j < d; ++j) x(i, j) = x(from, j);
          continue;
        }
        for (Index j = 0; j < d; ++j)
          x(i, j) = static_cast<double>(rng.below(5) - 2) + (regime == Regime::grid_offset ? 1e4 : 0.0);
      }
      break;
    case Regime::offset2:
    case Regime::offset4:
      for (double& v : x.v) v = (regime == Regime::offset2 ? 1e2 : 1e4) + 0.05 * rng.normal();
      break;
    case Regime::uniform:
      for (double& v : x.v) v = rng.uniform(-scale, scale);
      break;
    case Regime::sites: {
      Values site(16, d);
      for (double& v : site.v) v = rng.uniform(-scale, scale);
      for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < d; ++j) x(i, j) = site(i % 16, j) + rng.uniform(-1.0, 1.0);
      break;
    }
    case Regime::coincident: {
      std::vector<double> row(static_cast<std::size_t>(d));
      for (double& v : row) v = rng.normal();
      for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < d; ++j) x(i, j) = row[static_cast<std::size_t>(j)];
      break;
    }
  }
  return x;
}

// ---------------------------------------------------------------------------------------
// Labels.

enum class Labels {
  pk,            // classes of `k` rows, shuffled
  pk_modulo,     // label i % (n / k) (the sites regime pairs class c with sites c, c + 8)
  mixed,         // a few classes plus about a fifth singletons (classes of one)
  one_class,     // every row label 0
  all_distinct,  // no positives
  nan_label,     // pk with one NaN label (floating label types only)
};

const char* labels_name(Labels l) {
  switch (l) {
    case Labels::pk: return "pk";
    case Labels::pk_modulo: return "pkmod";
    case Labels::mixed: return "mixed";
    case Labels::one_class: return "oneclass";
    case Labels::all_distinct: return "distinct";
    case Labels::nan_label: return "nanlabel";
  }
  return "?";
}

std::vector<double> draw_labels(Labels kind, Index n, Index k, Rng& rng) {
  std::vector<double> y(static_cast<std::size_t>(n));
  switch (kind) {
    case Labels::pk:
    case Labels::nan_label: {
      for (Index i = 0; i < n; ++i) y[static_cast<std::size_t>(i)] = static_cast<double>(i / k);
      for (Index i = n - 1; i > 0; --i) std::swap(y[static_cast<std::size_t>(i)], y[static_cast<std::size_t>(rng.below(i + 1))]);
      if (kind == Labels::nan_label) y[static_cast<std::size_t>(rng.below(n))] = std::nan("");
      break;
    }
    case Labels::pk_modulo: {
      const Index classes = std::max<Index>(1, n / k);
      for (Index i = 0; i < n; ++i) y[static_cast<std::size_t>(i)] = static_cast<double>(i % classes);
      break;
    }
    case Labels::mixed:
      for (Index i = 0; i < n; ++i)
        y[static_cast<std::size_t>(i)] =
            rng.below(5) == 0 ? static_cast<double>(1000 + i) : static_cast<double>(rng.below(k));
      break;
    case Labels::one_class:
      break;
    case Labels::all_distinct:
      for (Index i = 0; i < n; ++i) y[static_cast<std::size_t>(i)] = static_cast<double>(3 * i + 1);
      break;
  }
  return y;
}

// Label types: 0 int32, 1 int64, 2 float, 3 double, 4 int32 through an inner-strided map.
const char* label_type_name(int t) {
  static const char* names[] = {"i32", "i64", "f32", "f64", "i32strided"};
  return names[t];
}

/// Calls f with the labels as an Eigen vector of label type `type`.
template <class F>
auto with_labels(const std::vector<double>& y, int type, F&& f) {
  const Index n = static_cast<Index>(y.size());
  const auto as = [&](auto zero) {
    using L = decltype(zero);
    Eigen::Matrix<L, Eigen::Dynamic, 1> v(n);
    for (Index i = 0; i < n; ++i) v(i) = static_cast<L>(y[static_cast<std::size_t>(i)]);
    return v;
  };
  switch (type) {
    case 0: return f(as(std::int32_t{}));
    case 1: {
      const auto v = as(std::int64_t{});
      return f(Eigen::Map<const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>>(v.data(), n));
    }
    case 2: return f(as(float{}));
    case 3: {
      const auto v = as(double{});
      return f(Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, 1>>(v.data(), n));
    }
    default: {
      // Every label twice in a row; the map reads every other one (inner stride 2).
      std::vector<std::int32_t> twice(static_cast<std::size_t>(2 * n));
      for (Index i = 0; i < n; ++i)
        twice[static_cast<std::size_t>(2 * i)] = twice[static_cast<std::size_t>(2 * i + 1)] =
            static_cast<std::int32_t>(y[static_cast<std::size_t>(i)]);
      return f(Eigen::Map<const Eigen::Matrix<std::int32_t, Eigen::Dynamic, 1>, 0, Eigen::InnerStride<>>(
          twice.data(), n, Eigen::InnerStride<>(2)));
    }
  }
}

// ---------------------------------------------------------------------------------------
// How inputs and gradients are passed: every input of a call in the same form, so that the
// number of instantiations stays small.

// Input forms of contiguous buffers: 0 RowMatrix<T>, 1 Map<const RowMatrix<T>>,
// 2 Map<RowMatrix<T>> (mutable), 3 ConstRowMap<T> (OuterStride<> = cols). Strided buffers
// are always passed as ConstRowMap<T>.
template <class T, std::size_t K>
std::string input_form(const std::array<const Buffer<T>*, K>& b, int form) {
  for (const Buffer<T>* x : b)
    if (!x->contiguous()) return "cmapS";
  static const char* names[] = {"matrix", "cmap", "map", "cmapO"};
  return names[form % 4];
}

template <class T, std::size_t K, class F, std::size_t... I>
T with_inputs_impl(int form, const std::array<const Buffer<T>*, K>& b, F&& f, std::index_sequence<I...>) {
  bool contiguous = true;
  for (const Buffer<T>* x : b) contiguous = contiguous && x->contiguous();
  if (!contiguous) return f(b[I]->cmap()...);
  switch (form % 4) {
    case 0: {
      const std::array<RowMatrix<T>, K> m{b[I]->dense()...};
      return f(m[I]...);
    }
    case 1: return f(Eigen::Map<const RowMatrix<T>>(b[I]->data(), b[I]->rows, b[I]->cols)...);
    case 2: {
      std::array<RowMatrix<T>, K> m{b[I]->dense()...};
      return f(Eigen::Map<RowMatrix<T>>(m[I].data(), m[I].rows(), m[I].cols())...);
    }
    default: return f(b[I]->cmap()...);
  }
}

/// Calls f with every buffer of `b` as an input of form `form`.
template <class T, std::size_t K, class F>
T with_inputs(int form, const std::array<const Buffer<T>*, K>& b, F&& f) {
  return with_inputs_impl<T, K>(form, b, std::forward<F>(f), std::make_index_sequence<K>());
}

// Gradient forms: 1 RowMap<T> (OuterStride<>, strided when the buffer is) or skip, by the
// mask; 2 RowMatrix<T> (lvalues, copied back) and 3 Map<RowMatrix<T>>, for all gradients
// of contiguous buffers.
template <class T, std::size_t K>
bool same_form_gradients(const std::array<Buffer<T>*, K>& b, int form, unsigned mask) {
  if (form < 2 || (mask & ((1u << K) - 1)) != (1u << K) - 1) return false;
  for (const Buffer<T>* g : b)
    if (!g->contiguous()) return false;
  return true;
}

template <class T, std::size_t K>
std::string gradient_form(const std::array<Buffer<T>*, K>& b, int form, unsigned mask) {
  if (same_form_gradients(b, form, mask)) return form == 2 ? "matrix" : "map";
  return "rowmap" + std::to_string(mask & ((1u << K) - 1));
}

template <std::size_t I, std::size_t K, class T, class F, class... Done>
T masked_gradients(unsigned mask, const std::array<Buffer<T>*, K>& b, F& f, Done&&... done) {
  if constexpr (I == K) {
    return f(std::forward<Done>(done)...);
  } else {
    if (mask & (1u << I)) return masked_gradients<I + 1>(mask, b, f, std::forward<Done>(done)..., b[I]->map());
    return masked_gradients<I + 1>(mask, b, f, std::forward<Done>(done)..., ml::skip);
  }
}

template <class T, std::size_t K, class F, std::size_t... I>
T with_gradients_impl(int form, unsigned mask, const std::array<Buffer<T>*, K>& b, F& f,
                      std::index_sequence<I...>) {
  if (!same_form_gradients(b, form, mask)) return masked_gradients<0>(mask, b, f);
  if (form == 3) return f(Eigen::Map<RowMatrix<T>>(b[I]->data(), b[I]->rows, b[I]->cols)...);
  std::array<RowMatrix<T>, K> m{RowMatrix<T>::Constant(b[I]->rows, b[I]->cols, sentinel<T>())...};
  const T result = f(m[I]...);
  for (std::size_t k = 0; k < K; ++k)
    for (Index i = 0; i < b[k]->rows; ++i)
      for (Index j = 0; j < b[k]->cols; ++j) b[k]->at(i, j) = m[k](i, j);
  return result;
}

/// Calls f with the gradient outputs: the wanted ones (bit k of mask) in form `form`, the
/// others metricloss::skip.
template <class T, std::size_t K, class F>
T with_gradients(int form, unsigned mask, const std::array<Buffer<T>*, K>& b, F&& f) {
  return with_gradients_impl<T, K>(form, mask, b, f, std::make_index_sequence<K>());
}

// ---------------------------------------------------------------------------------------
// Output.

long total_lines = 0;

template <class T>
void emit(const std::string& id, bool threw, const std::string& message, T loss,
          const std::vector<const Buffer<T>*>& gradients) {
  ++total_lines;
  Fnv f;
  std::string first = "-";
  for (const Buffer<T>* g : gradients) {
    f.bytes(g->storage.data(), g->storage.size() * sizeof(T));
    if (first == "-" && !g->storage.empty()) first = hex(g->storage[0]);
  }
  if (threw) {  // the message, and the gradients (which must be left as they were)
    Fnv m;
    m.bytes(message.data(), message.size());
    std::printf("%s | threw fnv=%016llx grads=%zu fnv=%016llx\n", id.c_str(),
                static_cast<unsigned long long>(m.h), gradients.size(), static_cast<unsigned long long>(f.h));
    return;
  }
  std::printf("%s | loss=%s grads=%zu fnv=%016llx g0=%s\n", id.c_str(), hex(loss).c_str(),
              gradients.size(), static_cast<unsigned long long>(f.h), first.c_str());
}

/// Runs call() (returning T), catching metricloss::invalid_argument, and emits the line.
template <class T, class Call>
void digest(const std::string& id, const std::vector<Buffer<T>*>& gradients, Call&& call) {
  for (Buffer<T>* g : gradients) g->reset();
  bool threw = false;
  std::string message;
  T loss = T(0);
  try {
    loss = call();
  } catch (const ml::invalid_argument& error) {
    threw = true;
    message = error.what();
  }
  std::vector<const Buffer<T>*> out(gradients.begin(), gradients.end());
  emit<T>(id, threw, message, loss, out);
}

std::string fmt(const char* format, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, value);
  return buffer;
}

std::string shape_id(Index n, Index d, Index xs, Index gs) {
  return "N=" + std::to_string(n) + " D=" + std::to_string(d) + " xs=" + std::to_string(xs) +
         " gs=" + std::to_string(gs);
}

/// One call of a sequence: tag, function, top_diff and forms.
struct Call {
  bool simd = false;
  bool backward = true;
  double top_diff = 1.0;
  int input_form = 0;
  int gradient_form = 1;  // of each wanted gradient
  int label_type = 0;
  unsigned mask = ~0u;    // which gradients are wanted (bit g)
};

/// The calls made on each input: tags alternate scalar, simd, scalar, simd on the same
/// functor, with forward, forward_backward, top_diff != 1 and the forms rotated by `k`.
std::vector<Call> call_pattern(int k, bool floating_labels_only) {
  const auto label = [&](int i) {
    const int t = (k + i) % 5;
    return floating_labels_only ? 2 + (t % 2) : t;
  };
  std::vector<Call> calls(4);
  calls[0] = Call{false, true, 1.0, k, 1 + (k % 3), label(0), ~0u};
  calls[1] = Call{true, true, 1.0, k + 1, 1 + ((k + 1) % 3), label(1), ~0u};
  // top_diff != 1 on the backward one of calls 2 and 3: negative, small, large (float
  // coefficients that overflow T are scaled in double), 0.
  const double top2[] = {-0.5, -0.5, -1e-3, -0.5, -0.5, -0.5};
  const double top3[] = {0.5, 0.5, 3e5, 0.5, 0.0, 0.5};
  calls[2] = Call{false, (k % 2) == 1, top2[k % 6], k + 2, 1, label(2), ~0u ^ (1u << (k % 3))};
  calls[3] = Call{true, (k % 2) == 0, top3[k % 6], k, 1 + ((k + 2) % 3), label(3), ~0u ^ (1u << ((k + 1) % 3))};
  return calls;
}

std::string call_id(const Call& c) {
  std::string s = c.simd ? "tag=simd" : "tag=scalar";
  s += c.backward ? " fb top=" + fmt("%g", c.top_diff) : " fwd";
  return s;
}

// ---------------------------------------------------------------------------------------
// Batch losses (BatchTripletLoss, LiftedStructureLoss): forward(tag, x, labels) and
// forward_backward(tag, x, labels, grad_x, top_diff).

struct BatchInput {
  Regime regime;
  Index n, d, pad, gpad;
  double scale;
  Labels labels;
  Index k;  // rows per class (pk), classes (mixed)
  std::uint64_t seed;
};

std::string batch_input_id(const BatchInput& in) {
  std::string s = "regime=" + std::string(regime_name(in.regime));
  if (in.regime == Regime::uniform || in.regime == Regime::sites) s += fmt("%g", in.scale);
  s += " labels=" + std::string(labels_name(in.labels)) + std::to_string(in.k) + " " +
       shape_id(in.n, in.d, in.d + in.pad, in.d + in.gpad) + " seed=" + std::to_string(in.seed);
  return s;
}

template <class T>
std::string batch_case_id(const BatchInput& in) {
  return batch_input_id(in) + offsets_id<T>(in.seed);
}

template <class T>
struct BatchData {
  Buffer<T> x, grad;
  std::vector<double> y;
};

template <class T>
BatchData<T> make_batch(const BatchInput& in) {
  Rng rng(in.seed);
  BatchData<T> data;
  const Offsets o = offsets_of(in.seed);
  data.x = to_buffer<T>(draw(in.regime, in.n, in.d, in.scale, rng), in.pad, o.input);
  data.y = draw_labels(in.labels, in.n, in.k, rng);
  data.grad = Buffer<T>(in.n, in.d, in.d + in.gpad, sentinel<T>(), o.gradient);
  return data;
}

template <class Loss>
struct Session {
  std::string name;
  Loss loss;
  int calls = 0;
};

template <class T, class Loss>
void batch_call(Session<Loss>& s, Loss& loss, const std::string& who, const BatchInput& in,
                BatchData<T>& data, Call c) {
  if (in.labels == Labels::nan_label && (c.label_type < 2 || c.label_type == 4)) c.label_type = 3;  // NaN: floating
  const std::array<const Buffer<T>*, 1> inputs{&data.x};
  const std::array<Buffer<T>*, 1> grads{&data.grad};
  const std::string id = s.name + " T=" + type_name<T>() + " " + call_id(c) + " " + batch_case_id<T>(in) +
                         " call=" + std::to_string(s.calls++) + who + " L=" + label_type_name(c.label_type) +
                         " x=" + input_form<T>(inputs, c.input_form) +
                         " g=" + (c.backward ? gradient_form<T>(grads, c.gradient_form, c.mask) : "-");
  std::vector<Buffer<T>*> outputs;
  if (c.backward) outputs.push_back(&data.grad);
  digest<T>(id, outputs, [&]() -> T {
    return with_labels(data.y, c.label_type, [&](const auto& labels) -> T {
      return with_inputs<T>(c.input_form, inputs, [&](const auto& x) -> T {
        if (!c.backward) return c.simd ? loss.forward(ml::simd, x, labels) : loss.forward(ml::scalar, x, labels);
        const T top = static_cast<T>(c.top_diff);
        return with_gradients<T>(c.gradient_form, c.mask, grads, [&](auto&& g) -> T {
          return c.simd ? loss.forward_backward(ml::simd, x, labels, g, top)
                        : loss.forward_backward(ml::scalar, x, labels, g, top);
        });
      });
    });
  });
}

/// A copy of the warm functor, a functor copy-assigned from it and a fresh one, on `in`:
/// each must give the bits of the warm one (a copy starts with empty scratch).
template <class T, class Loss, class Configure>
void batch_copies(Session<Loss>& s, Configure& configure, const BatchInput& in, const BatchInput& other) {
  BatchData<T> data = make_batch<T>(in);
  Loss copy = s.loss;
  batch_call<T>(s, copy, " copy", in, data, Call{true, true, 1.0, 0, 1, 1, ~0u});
  batch_call<T>(s, copy, " copy", in, data, Call{false, true, 1.0, 0, 1, 1, ~0u});
  Loss assigned;
  configure(assigned);
  BatchData<T> other_data = make_batch<T>(other);
  batch_call<T>(s, assigned, " assigned-before", other, other_data, Call{true, true, 1.0, 1, 1, 3, ~0u});
  assigned = s.loss;
  batch_call<T>(s, assigned, " assigned", in, data, Call{true, true, 2.0, 1, 1, 3, ~0u});
  Loss fresh;
  configure(fresh);
  batch_call<T>(s, fresh, " fresh", in, data, Call{true, true, 1.0, 0, 1, 0, ~0u});
  batch_call<T>(s, fresh, " fresh", in, data, Call{false, true, 1.0, 0, 1, 0, ~0u});
}

/// Runs every input through one functor (4 calls each, the tags alternating), then copies
/// of the warm functor on the largest input and on the last.
template <class T, class Loss, class Configure>
void batch_sequence(const std::string& name, Configure&& configure, const std::vector<BatchInput>& inputs) {
  Session<Loss> s;
  s.name = name;
  configure(s.loss);
  int k = 0;
  std::size_t largest = 0;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const BatchInput& in = inputs[i];
    if (in.n * in.d > inputs[largest].n * inputs[largest].d) largest = i;
    BatchData<T> data = make_batch<T>(in);
    const bool floating = in.labels == Labels::nan_label;
    for (const Call& c : call_pattern(k, floating)) batch_call<T>(s, s.loss, "", in, data, c);
    ++k;
  }
  batch_copies<T>(s, configure, inputs[largest], inputs.front());
  batch_copies<T>(s, configure, inputs.back(), inputs[largest]);
}

/// The sequence every batch loss sees: shapes grow, then shrink; every regime.
std::vector<BatchInput> batch_inputs(std::uint64_t base) {
  std::vector<BatchInput> v;
  const auto add = [&](Regime r, Index n, Index d, Index pad, Index gpad, double scale, Labels l, Index k) {
    v.push_back(BatchInput{r, n, d, pad, gpad, scale, l, k, base + v.size()});
  };
  add(Regime::normal, 8, 4, 0, 0, 0, Labels::pk, 2);
  add(Regime::normal, 64, 32, 0, 0, 0, Labels::pk, 4);
  add(Regime::grid, 37, 17, 0, 0, 0, Labels::mixed, 4);
  add(Regime::normal, 129, 3, 5, 0, 0, Labels::pk, 8);
  add(Regime::grid, 129, 3, 0, 2, 0, Labels::mixed, 3);
  add(Regime::offset2, 64, 16, 0, 0, 0, Labels::pk, 4);
  add(Regime::offset4, 48, 8, 3, 1, 0, Labels::pk, 4);
  add(Regime::grid_offset, 32, 6, 0, 0, 0, Labels::mixed, 3);
  add(Regime::uniform, 256, 128, 0, 0, 30.0, Labels::pk, 8);
  add(Regime::normal, 200, 64, 3, 7, 0, Labels::pk, 8);
  add(Regime::uniform, 512, 64, 0, 0, 30.0, Labels::pk, 8);
  add(Regime::normal, 96, 24, 0, 0, 0, Labels::mixed, 6);
  add(Regime::offset2, 130, 33, 2, 0, 0, Labels::pk, 5);
  add(Regime::uniform, 48, 8, 0, 0, 60.0, Labels::pk, 4);  // soft margin: large hinges
  add(Regime::sites, 64, 16, 0, 0, 1e3, Labels::pk_modulo, 8);
  add(Regime::normal, 37, 17, 2, 1, 0, Labels::pk, 3);
  add(Regime::normal, 1, 5, 0, 0, 0, Labels::pk, 1);
  add(Regime::normal, 6, 1, 0, 0, 0, Labels::pk, 2);
  add(Regime::grid, 40, 1, 0, 0, 0, Labels::mixed, 3);
  add(Regime::normal, 10, 4, 0, 0, 0, Labels::one_class, 1);
  add(Regime::normal, 12, 3, 1, 1, 0, Labels::all_distinct, 1);
  add(Regime::coincident, 16, 8, 0, 0, 0, Labels::pk, 4);
  add(Regime::nan, 20, 5, 0, 0, 0, Labels::pk, 4);
  add(Regime::infinite, 20, 5, 0, 0, 0, Labels::pk, 4);
  add(Regime::huge, 12, 4, 0, 0, 0, Labels::pk, 3);
  add(Regime::tiny, 24, 6, 0, 0, 0, Labels::pk, 3);
  add(Regime::normal, 10, 3, 0, 0, 0, Labels::nan_label, 2);
  add(Regime::normal, 5, 2, 0, 0, 0, Labels::pk, 2);
  return v;
}

/// Lifted in float at large scales: the list of recomputed weighted negatives and the
/// call in double (both, at these inputs), growing to N = 1024, then small again.
std::vector<BatchInput> lifted_large_inputs() {
  std::vector<BatchInput> v;
  const auto add = [&](Regime r, Index n, Index d, Index pad, Index gpad, double scale, Labels l, Index k) {
    v.push_back(BatchInput{r, n, d, pad, gpad, scale, l, k, 500 + v.size()});
  };
  add(Regime::normal, 16, 8, 0, 0, 0, Labels::pk, 4);
  add(Regime::uniform, 256, 16, 0, 0, 44.0, Labels::pk, 8);   // the list
  add(Regime::uniform, 256, 32, 0, 0, 30.0, Labels::pk, 8);   // the list
  add(Regime::uniform, 256, 128, 0, 0, 30.0, Labels::pk, 8);  // in double
  add(Regime::uniform, 512, 128, 3, 1, 30.0, Labels::pk, 8);
  add(Regime::uniform, 1024, 128, 0, 0, 30.0, Labels::pk, 8);
  add(Regime::uniform, 1024, 512, 0, 0, 10.0, Labels::pk, 8);
  add(Regime::uniform, 256, 16, 0, 0, 200.0, Labels::pk, 8);
  add(Regime::uniform, 512, 8, 0, 0, 200.0, Labels::pk, 8);
  add(Regime::sites, 64, 16, 0, 0, 1e4, Labels::pk_modulo, 8);
  add(Regime::sites, 64, 16, 0, 0, 1e5, Labels::pk_modulo, 8);
  add(Regime::uniform, 256, 16, 1, 2, 44.0, Labels::pk, 8);
  add(Regime::grid, 37, 17, 0, 0, 0, Labels::mixed, 4);
  add(Regime::normal, 8, 4, 0, 0, 0, Labels::pk, 2);
  return v;
}

template <class T>
void batch_triplet_all() {
  const ml::Mining minings[] = {ml::Mining::all, ml::Mining::hard, ml::Mining::semihard};
  const char* mining_names[] = {"all", "hard", "semihard"};
  const ml::Distance distances[] = {ml::Distance::euclidean, ml::Distance::squared_euclidean};
  const char* distance_names[] = {"euclidean", "squared"};
  std::uint64_t base = std::is_same<T, float>::value ? 1000 : 2000;
  for (int m = 0; m < 3; ++m)
    for (int d = 0; d < 2; ++d)
      for (int soft = 0; soft < 2; ++soft) {
        // Margins: the default, and 0 and 1 on grids (hinges exactly 0).
        const double margin = soft ? 0.2 : (m == 0 ? 1.0 : (d == 0 ? 0.2 : 0.0));
        const std::string name = std::string("BatchTriplet mining=") + mining_names[m] +
                                 " distance=" + distance_names[d] + " soft=" + std::to_string(soft) +
                                 " margin=" + fmt("%g", margin);
        batch_sequence<T, ml::BatchTripletLoss<T>>(
            name,
            [&](ml::BatchTripletLoss<T>& loss) {
              loss.margin = static_cast<T>(margin);
              loss.mining = minings[m];
              loss.distance = distances[d];
              loss.soft_margin = soft != 0;
            },
            batch_inputs(base));
        base += 100;
      }
  // The options changed between calls on one functor (as training code may).
  Session<ml::BatchTripletLoss<T>> s;
  s.name = "BatchTriplet options-changing";
  const std::vector<BatchInput> inputs = batch_inputs(base);
  int k = 0;
  for (const BatchInput& in : inputs) {
    s.loss.mining = minings[k % 3];
    s.loss.distance = distances[(k / 3) % 2];
    s.loss.soft_margin = (k % 4) == 3;
    s.loss.margin = static_cast<T>(k % 5 == 0 ? 0.0 : 0.3);
    BatchData<T> data = make_batch<T>(in);
    const std::string who = std::string(" opts=") + mining_names[k % 3] + "/" + distance_names[(k / 3) % 2] +
                            "/" + std::to_string(s.loss.soft_margin) + "/" + fmt("%g", s.loss.margin);
    for (const Call& c : call_pattern(k, in.labels == Labels::nan_label)) batch_call<T>(s, s.loss, who, in, data, c);
    ++k;
  }
}

template <class T>
void lifted_all() {
  const std::uint64_t base = std::is_same<T, float>::value ? 3000 : 4000;
  const double margins[] = {1.0, 0.0, 20.0};
  int i = 0;
  for (double margin : margins) {
    batch_sequence<T, ml::LiftedStructureLoss<T>>(
        "Lifted margin=" + fmt("%g", margin),
        [&](ml::LiftedStructureLoss<T>& loss) { loss.margin = static_cast<T>(margin); },
        batch_inputs(base + 100 * static_cast<std::uint64_t>(i++)));
  }
  if (std::is_same<T, float>::value)
    batch_sequence<T, ml::LiftedStructureLoss<T>>(
        "Lifted large margin=1", [&](ml::LiftedStructureLoss<T>& loss) { loss.margin = T(1); },
        lifted_large_inputs());
}

// ---------------------------------------------------------------------------------------
// Pairs (ContrastiveLoss) and triplets (TripletLoss): inputs of the same shape.

struct RowsInput {
  Regime regime;
  Index n, d, pad, gpad;
  double scale;
  std::uint64_t seed;
};

std::string rows_input_id(const RowsInput& in) {
  std::string s = "regime=" + std::string(regime_name(in.regime));
  if (in.regime == Regime::uniform || in.regime == Regime::sites) s += fmt("%g", in.scale);
  return s + " " + shape_id(in.n, in.d, in.d + in.pad, in.d + in.gpad) + " seed=" + std::to_string(in.seed);
}

template <class T>
std::string rows_case_id(const RowsInput& in) {
  return rows_input_id(in) + offsets_id<T>(in.seed);
}

std::vector<RowsInput> rows_inputs(std::uint64_t base) {
  std::vector<RowsInput> v;
  const auto add = [&](Regime r, Index n, Index d, Index pad, Index gpad, double scale) {
    v.push_back(RowsInput{r, n, d, pad, gpad, scale, base + v.size()});
  };
  add(Regime::normal, 8, 4, 0, 0, 0);
  add(Regime::normal, 300, 64, 0, 0, 0);
  add(Regime::grid, 37, 17, 0, 0, 0);
  add(Regime::normal, 129, 3, 2, 5, 0);
  add(Regime::grid, 129, 3, 0, 0, 0);
  add(Regime::offset2, 64, 16, 0, 0, 0);
  add(Regime::offset4, 48, 130, 1, 3, 0);
  add(Regime::grid_offset, 32, 6, 0, 0, 0);
  add(Regime::uniform, 1000, 200, 0, 0, 1e3);
  add(Regime::uniform, 64, 128, 4, 4, 1e4);
  add(Regime::normal, 37, 17, 3, 1, 0);
  add(Regime::normal, 1, 5, 0, 0, 0);
  add(Regime::normal, 6, 1, 0, 0, 0);
  add(Regime::coincident, 16, 8, 0, 0, 0);
  add(Regime::nan, 20, 5, 0, 0, 0);
  add(Regime::infinite, 20, 5, 0, 0, 0);
  add(Regime::huge, 12, 4, 0, 0, 0);
  add(Regime::tiny, 40, 9, 0, 1, 0);
  add(Regime::normal, 3, 2, 0, 0, 0);
  return v;
}

std::size_t largest_input(const std::vector<RowsInput>& inputs) {
  std::size_t largest = 0;
  for (std::size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].n * inputs[i].d > inputs[largest].n * inputs[largest].d) largest = i;
  return largest;
}

// Contrastive similarity kinds: 0 sim float (fractional values too), 1 sim int32,
// 2 labels int64 / int64, 3 labels int32 / double, 4 sim double through an inner-strided map.
const char* similarity_name(int kind) {
  static const char* names[] = {"simf32", "simi32", "lab64/64", "lab32/f64", "simf64strided"};
  return names[kind];
}

template <class T>
struct PairData {
  Buffer<T> a, b, ga, gb;
  std::vector<double> sim, labels_a, labels_b;
};

template <class T>
PairData<T> make_pairs(const RowsInput& in) {
  Rng rng(in.seed);
  PairData<T> p;
  const Values a = draw(in.regime, in.n, in.d, in.scale, rng);
  Values b = draw(in.regime == Regime::nan || in.regime == Regime::infinite ? Regime::normal : in.regime,
                  in.n, in.d, in.scale, rng);
  // Some pairs coincide (d = 0), some sit at distance exactly 1 on grids (a kink at margin 1).
  for (Index i = 0; i < in.n; ++i) {
    const Index what = rng.below(6);
    for (Index j = 0; j < in.d; ++j) {
      if (what == 0) b(i, j) = a(i, j);
      if (what == 1 && (in.regime == Regime::grid || in.regime == Regime::grid_offset))
        b(i, j) = a(i, j) + (j == 0 ? 1.0 : 0.0);
    }
  }
  const Offsets o = offsets_of(in.seed);
  p.a = to_buffer<T>(a, in.pad, o.input);
  p.b = to_buffer<T>(b, in.pad, o.gradient);  // a and b at different alignments
  p.ga = Buffer<T>(in.n, in.d, in.d + in.gpad, sentinel<T>(), o.gradient);
  p.gb = Buffer<T>(in.n, in.d, in.d + in.gpad, sentinel<T>(), o.input);
  const double sims[] = {0.0, 1.0, 0.5, -3.0, 2.0, -0.75, 1.0, 0.0};
  for (Index i = 0; i < in.n; ++i) {
    p.sim.push_back(sims[rng.below(8)]);
    p.labels_a.push_back(static_cast<double>(rng.below(3)));
    p.labels_b.push_back(static_cast<double>(rng.below(3)));
  }
  return p;
}

template <class T, class F>
T with_similarity(const PairData<T>& p, int kind, F&& f) {
  const Index n = static_cast<Index>(p.sim.size());
  switch (kind) {
    case 0: {
      Eigen::VectorXf s(n);
      for (Index i = 0; i < n; ++i) s(i) = static_cast<float>(p.sim[static_cast<std::size_t>(i)]);
      return f(s);
    }
    case 1: {
      Eigen::VectorXi s(n);
      for (Index i = 0; i < n; ++i) s(i) = static_cast<int>(p.sim[static_cast<std::size_t>(i)]);
      return f(s);
    }
    case 2: {
      Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> la(n), lb(n);
      for (Index i = 0; i < n; ++i) {
        la(i) = static_cast<std::int64_t>(p.labels_a[static_cast<std::size_t>(i)]);
        lb(i) = static_cast<std::int64_t>(p.labels_b[static_cast<std::size_t>(i)]);
      }
      return f(la, lb);
    }
    case 3: {
      Eigen::VectorXi la(n);
      Eigen::VectorXd lb(n);
      for (Index i = 0; i < n; ++i) {
        la(i) = static_cast<int>(p.labels_a[static_cast<std::size_t>(i)]);
        lb(i) = p.labels_b[static_cast<std::size_t>(i)];
      }
      return f(Eigen::Map<const Eigen::VectorXi>(la.data(), n), lb);
    }
    default: {
      std::vector<double> twice(static_cast<std::size_t>(2 * n));
      for (Index i = 0; i < n; ++i) twice[static_cast<std::size_t>(2 * i)] = p.sim[static_cast<std::size_t>(i)];
      return f(Eigen::Map<const Eigen::VectorXd, 0, Eigen::InnerStride<2>>(twice.data(), n));
    }
  }
}

template <class T>
void contrastive_call(Session<ml::ContrastiveLoss<T>>& s, ml::ContrastiveLoss<T>& loss, const std::string& who,
                      const RowsInput& in, PairData<T>& p, const Call& c, int kind) {
  const std::array<const Buffer<T>*, 2> inputs{&p.a, &p.b};
  const std::array<Buffer<T>*, 2> grads{&p.ga, &p.gb};
  const std::string id = s.name + " T=" + type_name<T>() + " " + call_id(c) + " " + rows_case_id<T>(in) +
                         " call=" + std::to_string(s.calls++) + who + " sim=" + similarity_name(kind) +
                         " x=" + input_form<T>(inputs, c.input_form) +
                         " g=" + (c.backward ? gradient_form<T>(grads, c.gradient_form, c.mask) : "-");
  std::vector<Buffer<T>*> outputs;
  if (c.backward) outputs = {&p.ga, &p.gb};
  digest<T>(id, outputs, [&]() -> T {
    return with_inputs<T>(c.input_form, inputs, [&](const auto& a, const auto& b) -> T {
      return with_similarity(p, kind, [&](const auto&... similarity) -> T {
        if (!c.backward)
          return c.simd ? loss.forward(ml::simd, a, b, similarity...) : loss.forward(ml::scalar, a, b, similarity...);
        const T top = static_cast<T>(c.top_diff);
        return with_gradients<T>(c.gradient_form, c.mask, grads, [&](auto&& ga, auto&& gb) -> T {
          return c.simd ? loss.forward_backward(ml::simd, a, b, similarity..., ga, gb, top)
                        : loss.forward_backward(ml::scalar, a, b, similarity..., ga, gb, top);
        });
      });
    });
  });
}

template <class T>
void contrastive_all() {
  struct Option {
    double margin;
    ml::ContrastiveForm form;
  };
  const Option options[] = {{1.0, ml::ContrastiveForm::hadsell},
                            {1.0, ml::ContrastiveForm::legacy},
                            {0.0, ml::ContrastiveForm::hadsell},
                            {2.5, ml::ContrastiveForm::legacy},
                            {0.2, ml::ContrastiveForm::hadsell}};
  std::uint64_t base = std::is_same<T, float>::value ? 5000 : 6000;
  for (const Option& o : options) {
    Session<ml::ContrastiveLoss<T>> s;
    s.name = std::string("Contrastive form=") + (o.form == ml::ContrastiveForm::hadsell ? "hadsell" : "legacy") +
             " margin=" + fmt("%g", o.margin);
    s.loss.margin = static_cast<T>(o.margin);
    s.loss.form = o.form;
    const std::vector<RowsInput> inputs = rows_inputs(base);
    base += 100;
    int k = 0;
    for (const RowsInput& in : inputs) {
      PairData<T> p = make_pairs<T>(in);
      int i = 0;
      for (const Call& c : call_pattern(k, false)) contrastive_call<T>(s, s.loss, "", in, p, c, (k + i++) % 5);
      ++k;
    }
    for (const RowsInput* in : {&inputs[largest_input(inputs)], &inputs.back()}) {
      PairData<T> p = make_pairs<T>(*in);
      ml::ContrastiveLoss<T> copy = s.loss;
      contrastive_call<T>(s, copy, " copy", *in, p, Call{true, true, 1.0, 0, 1, 0, ~0u}, 0);
      ml::ContrastiveLoss<T> fresh(static_cast<T>(o.margin), o.form);
      contrastive_call<T>(s, fresh, " fresh", *in, p, Call{false, true, 1.0, 0, 1, 0, ~0u}, 2);
    }
  }
}

template <class T>
struct TripletData {
  Buffer<T> anchor, positive, negative, ga, gp, gn;
};

/// negative_i = anchor_i + a permutation of (positive_i - anchor_i) on some rows: the two
/// distances equal in exact arithmetic, so hinges sit at the margin (at 0 with margin 0),
/// within rounding, where the row is recomputed in double.
template <class T>
TripletData<T> make_triplets(const RowsInput& in) {
  Rng rng(in.seed);
  const Values a = draw(in.regime, in.n, in.d, in.scale, rng);
  const Regime other = in.regime == Regime::nan || in.regime == Regime::infinite ? Regime::normal : in.regime;
  Values p = draw(other, in.n, in.d, in.scale, rng);
  Values n = draw(other, in.n, in.d, in.scale, rng);
  for (Index i = 0; i < in.n; ++i) {
    const Index what = rng.below(5);
    for (Index j = 0; j < in.d; ++j) {
      if (what == 0) n(i, j) = a(i, j) + (p(i, (j + 1) % in.d) - a(i, (j + 1) % in.d));  // |a-n| ~ |a-p|
      if (what == 1) p(i, j) = a(i, j);
      if (what == 2) n(i, j) = p(i, j);
    }
  }
  TripletData<T> t;
  const Offsets o = offsets_of(in.seed);
  t.anchor = to_buffer<T>(a, in.pad, o.input);
  t.positive = to_buffer<T>(p, in.pad, o.gradient);
  t.negative = to_buffer<T>(n, in.pad, 0);
  t.ga = Buffer<T>(in.n, in.d, in.d + in.gpad, sentinel<T>(), o.gradient);
  t.gp = Buffer<T>(in.n, in.d, in.d + in.gpad, sentinel<T>(), 0);
  t.gn = Buffer<T>(in.n, in.d, in.d + in.gpad, sentinel<T>(), o.input);
  return t;
}

template <class T>
void triplet_call(Session<ml::TripletLoss<T>>& s, ml::TripletLoss<T>& loss, const std::string& who,
                  const RowsInput& in, TripletData<T>& t, const Call& c) {
  const std::array<const Buffer<T>*, 3> inputs{&t.anchor, &t.positive, &t.negative};
  const std::array<Buffer<T>*, 3> grads{&t.ga, &t.gp, &t.gn};
  const std::string id = s.name + " T=" + type_name<T>() + " " + call_id(c) + " " + rows_case_id<T>(in) +
                         " call=" + std::to_string(s.calls++) + who + " x=" + input_form<T>(inputs, c.input_form) +
                         " g=" + (c.backward ? gradient_form<T>(grads, c.gradient_form, c.mask) : "-");
  std::vector<Buffer<T>*> outputs;
  if (c.backward) outputs = {&t.ga, &t.gp, &t.gn};
  digest<T>(id, outputs, [&]() -> T {
    return with_inputs<T>(c.input_form, inputs, [&](const auto& a, const auto& p, const auto& n) -> T {
      if (!c.backward) return c.simd ? loss.forward(ml::simd, a, p, n) : loss.forward(ml::scalar, a, p, n);
      const T top = static_cast<T>(c.top_diff);
      return with_gradients<T>(c.gradient_form, c.mask, grads, [&](auto&& g1, auto&& g2, auto&& g3) -> T {
        return c.simd ? loss.forward_backward(ml::simd, a, p, n, g1, g2, g3, top)
                      : loss.forward_backward(ml::scalar, a, p, n, g1, g2, g3, top);
      });
    });
  });
}

template <class T>
void triplet_all() {
  struct Option {
    double margin;
    ml::Distance distance;
  };
  const Option options[] = {{0.2, ml::Distance::squared_euclidean},
                            {0.2, ml::Distance::euclidean},
                            {0.0, ml::Distance::squared_euclidean},
                            {0.0, ml::Distance::euclidean},
                            {1.0, ml::Distance::euclidean}};
  std::uint64_t base = std::is_same<T, float>::value ? 7000 : 8000;
  for (const Option& o : options) {
    Session<ml::TripletLoss<T>> s;
    s.name = std::string("Triplet distance=") +
             (o.distance == ml::Distance::euclidean ? "euclidean" : "squared") + " margin=" + fmt("%g", o.margin);
    s.loss.margin = static_cast<T>(o.margin);
    s.loss.distance = o.distance;
    const std::vector<RowsInput> inputs = rows_inputs(base);
    base += 100;
    int k = 0;
    for (const RowsInput& in : inputs) {
      TripletData<T> t = make_triplets<T>(in);
      for (const Call& c : call_pattern(k, false)) triplet_call<T>(s, s.loss, "", in, t, c);
      ++k;
    }
    for (const RowsInput* in : {&inputs[largest_input(inputs)], &inputs.back()}) {
      TripletData<T> t = make_triplets<T>(*in);
      ml::TripletLoss<T> copy = s.loss;
      triplet_call<T>(s, copy, " copy", *in, t, Call{true, true, 1.0, 0, 1, 0, ~0u});
      ml::TripletLoss<T> fresh(static_cast<T>(o.margin), o.distance);
      triplet_call<T>(s, fresh, " fresh", *in, t, Call{false, true, 1.0, 0, 1, 0, ~0u});
    }
  }
}

// ---------------------------------------------------------------------------------------
// Bad input: the exception's message and untouched gradients (a few per loss).

template <class T>
void errors_all() {
  Rng rng(9000);
  const Buffer<T> x = to_buffer<T>(draw(Regime::normal, 6, 3, 0, rng), 0, 0);
  const Buffer<T> short_x = to_buffer<T>(draw(Regime::normal, 5, 3, 0, rng), 0, 1);
  Buffer<T> g(6, 3, 3, sentinel<T>(), 0), g_bad(6, 2, 2, sentinel<T>(), 2);
  Eigen::VectorXi labels(6);
  labels << 0, 0, 1, 1, 2, 2;
  const Eigen::VectorXi short_labels = labels.head(5);
  const Eigen::VectorXf short_sim = short_labels.cast<float>();
  const std::string t = std::string(" T=") + type_name<T>();
  for (int simd = 0; simd < 2; ++simd) {
    const std::string tag = simd ? " tag=simd" : " tag=scalar";
    const auto both = [&](auto&& f) -> T { return simd ? f(ml::simd) : f(ml::scalar); };
    ml::BatchTripletLoss<T> bt;
    digest<T>("error BatchTriplet labels-length" + t + tag, {&g}, [&] {
      return both([&](auto tag_) { return bt.forward_backward(tag_, x.cmap(), short_labels, g.map()); });
    });
    bt.margin = T(-1);
    digest<T>("error BatchTriplet negative-margin" + t + tag, {&g}, [&] {
      return both([&](auto tag_) { return bt.forward_backward(tag_, x.cmap(), labels, g.map()); });
    });
    bt.margin = T(0.2);
    digest<T>("error BatchTriplet grad-shape" + t + tag, {&g_bad}, [&] {
      return both([&](auto tag_) { return bt.forward_backward(tag_, x.cmap(), labels, g_bad.map()); });
    });
    ml::LiftedStructureLoss<T> lifted(std::numeric_limits<T>::quiet_NaN());
    digest<T>("error Lifted nan-margin" + t + tag, {&g}, [&] {
      return both([&](auto tag_) { return lifted.forward_backward(tag_, x.cmap(), labels, g.map()); });
    });
    lifted.margin = T(1);
    Buffer<T> alias = x;  // the gradient is its own input
    digest<T>("error Lifted aliasing" + t + tag, {}, [&] {
      return both([&](auto tag_) { return lifted.forward_backward(tag_, alias.cmap(), labels, alias.map()); });
    });
    ml::ContrastiveLoss<T> contrastive;
    digest<T>("error Contrastive shape" + t + tag, {&g}, [&] {
      return both([&](auto tag_) {
        return contrastive.forward_backward(tag_, x.cmap(), short_x.cmap(), short_sim, g.map(), ml::skip);
      });
    });
    ml::TripletLoss<T> triplet(T(0.2), static_cast<ml::Distance>(7));
    digest<T>("error Triplet distance" + t + tag, {&g}, [&] {
      return both([&](auto tag_) {
        return triplet.forward_backward(tag_, x.cmap(), x.cmap(), x.cmap(), g.map(), ml::skip, ml::skip);
      });
    });
  }
}

}  // namespace

int main(int argc, char** argv) {
  // Optional: digest only the sections named on the command line (contrastive, triplet,
  // batch_triplet, lifted, errors); timing per section goes to stderr.
  const auto wanted = [&](const char* section) {
    if (argc < 2) return true;
    for (int i = 1; i < argc; ++i)
      if (std::strcmp(argv[i], section) == 0) return true;
    return false;
  };
  const auto timed = [&](const char* section, auto&& f) {
    if (!wanted(section)) return;
    const auto start = std::chrono::steady_clock::now();
    const long before = total_lines;
    f();
    std::fflush(stdout);
    std::fprintf(stderr, "digest: %-14s %6ld calls %7.2f s\n", section, total_lines - before,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  };
  timed("contrastive", [] { contrastive_all<float>(); contrastive_all<double>(); });
  timed("triplet", [] { triplet_all<float>(); triplet_all<double>(); });
  timed("batch_triplet", [] { batch_triplet_all<float>(); batch_triplet_all<double>(); });
  timed("lifted", [] { lifted_all<float>(); lifted_all<double>(); });
  timed("errors", [] { errors_all<float>(); errors_all<double>(); });
  std::fprintf(stderr, "digest: %ld calls\n", total_lines);
  return 0;
}
