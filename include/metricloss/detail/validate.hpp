#pragma once
// Argument checks shared by every loss. They run before any output is touched, so a
// throwing call leaves every output as it was.
#include <metricloss/detail/views.hpp>
#include <metricloss/errors.hpp>
#include <metricloss/options.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace metricloss {
namespace detail {

template <class T>
constexpr const char* scalar_name() {
  if constexpr (std::is_same<T, float>::value) return "float";
  else if constexpr (std::is_same<T, double>::value) return "double";
  else return "T";
}

inline std::string shape_string(Index rows, Index cols) {
  return std::to_string(rows) + "x" + std::to_string(cols);
}

/// Collects the byte ranges of inputs and outputs of one call and checks them.
class Validator {
 public:
  // Only pointers are kept: a call that succeeds allocates nothing.
  Validator(const char* loss, const char* scalar, const char* method)
      : loss_(loss), scalar_(scalar), method_(method) {}

  /// "metricloss::ContrastiveLoss<float>::forward"
  std::string function() const {
    return std::string("metricloss::") + loss_ + "<" + scalar_ + ">::" + method_;
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw metricloss::invalid_argument(function() + ": " + what);
  }

  /// Embeddings: N >= 1 rows, D >= 1 columns, outer stride >= D.
  template <class T>
  void embeddings(const char* name, const MatrixView<T>& m) {
    if (m.rows < 1 || m.cols < 1)
      fail(std::string("argument '") + name + "' has shape " + shape_string(m.rows, m.cols) +
           "; embeddings need N >= 1 rows and D >= 1 columns");
    if (m.rows > 1 && m.stride < m.cols)
      fail(std::string("argument '") + name + "' has outer stride " + std::to_string(m.stride) +
           " < D = " + std::to_string(m.cols));
    add_input(name, m.data, m.extent_bytes());
  }

  /// `m` must have the shape of `ref` (already checked).
  template <class T, class U>
  void same_shape(const char* name, const MatrixView<T>& m, const char* ref_name,
                  const MatrixView<U>& ref) {
    if (m.rows != ref.rows || m.cols != ref.cols)
      fail(std::string("argument '") + name + "' has shape " + shape_string(m.rows, m.cols) +
           ", expected " + shape_string(ref.rows, ref.cols) + " (the shape of '" + ref_name +
           "')");
  }

  template <class L>
  void labels(const char* name, const VectorView<L>& v, Index n, const char* ref_name) {
    if (v.size != n)
      fail(std::string("argument '") + name + "' has length " + std::to_string(v.size) +
           ", expected " + std::to_string(n) + " (the rows of '" + ref_name + "')");
    add_input(name, v.data, v.extent_bytes());
  }

  /// A value as a person writes it: -1, 0.25, 1e+30, nan, inf.
  static std::string number(double value) {
    char text[32];
    std::snprintf(text, sizeof text, "%.7g", value);
    return text;
  }

  template <class T>
  void margin(T value) {
    if (!(std::isfinite(value) && value >= T(0)))
      fail("option 'margin' is " + number(static_cast<double>(value)) +
           "; it must be finite and >= 0");
  }

  /// A gradient output (empty = skipped): shape of `ref`, and no overlap with any input
  /// or any other output.
  template <class T, class U>
  void gradient(const char* name, const MatrixView<T>& g, const char* ref_name,
                const MatrixView<U>& ref) {
    if (g.empty()) {
      if (g.stride < 0)
        fail(std::string("argument '") + name + "' has shape " + shape_string(g.rows, g.cols) +
             " and no storage (null data); pass metricloss::skip for a gradient not wanted");
      return;
    }
    same_shape(name, g, ref_name, ref);
    if (g.rows > 1 && g.stride < g.cols)
      fail(std::string("argument '") + name + "' has outer stride " + std::to_string(g.stride) +
           " < D = " + std::to_string(g.cols));
    Range r{name, reinterpret_cast<std::uintptr_t>(g.data), g.extent_bytes()};
    for (int i = 0; i < n_inputs_; ++i) check_disjoint(r, inputs_[i]);
    for (int i = 0; i < n_outputs_; ++i) check_disjoint(r, outputs_[i]);
    if (n_outputs_ < kMax) outputs_[n_outputs_++] = r;
  }

 private:
  struct Range {
    const char* name;
    std::uintptr_t begin;
    std::size_t bytes;
  };
  static constexpr int kMax = 8;

  template <class T>
  void add_input(const char* name, const T* data, std::size_t bytes) {
    if (n_inputs_ < kMax) inputs_[n_inputs_++] = {name, reinterpret_cast<std::uintptr_t>(data), bytes};
  }

  void check_disjoint(const Range& out, const Range& other) const {
    if (out.bytes == 0 || other.bytes == 0) return;
    if (out.begin < other.begin + other.bytes && other.begin < out.begin + out.bytes)
      fail(std::string("argument '") + out.name + "' overlaps argument '" + other.name +
           "' in memory; gradients must not alias inputs or other gradients");
  }

  const char* loss_;
  const char* scalar_;
  const char* method_;
  Range inputs_[kMax]{};
  Range outputs_[kMax]{};
  int n_inputs_ = 0;
  int n_outputs_ = 0;
};

/// Rejects an enumerator outside the declared ones (e.g. from a cast).
inline void check_distance(Validator& check, Distance distance) {
  if (distance != Distance::euclidean && distance != Distance::squared_euclidean)
    check.fail("option 'distance' has the undeclared value " +
               std::to_string(static_cast<int>(distance)));
}
inline void check_mining(Validator& check, Mining mining) {
  if (mining != Mining::all && mining != Mining::hard && mining != Mining::semihard)
    check.fail("option 'mining' has the undeclared value " +
               std::to_string(static_cast<int>(mining)));
}

}  // namespace detail
}  // namespace metricloss
