#pragma once
// What the ranks of a sharded call must agree on besides the shapes (detail/sharded.hpp):
// the loss's options and the host path, hashed and written out, and the label type.
#include <metricloss/exec.hpp>
#include <metricloss/options.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

namespace metricloss {
namespace detail {

/// The loss's options and the host path (scalar or simd), hashed (FNV-1a over each option's
/// bits) and written out, from the loss's visit_options(visitor): ranks that differ in them
/// would choose different algorithms, and so different sequences of collectives.
inline const char* option_text(Mining m) {
  return m == Mining::all ? "all" : m == Mining::hard ? "hard" : "semihard";
}
inline const char* option_text(Distance d) {
  return d == Distance::euclidean ? "euclidean" : "squared_euclidean";
}
inline const char* option_text(Reduction r) {
  return r == Reduction::mean ? "mean" : "nonzero_mean";
}
inline const char* option_text(bool b) { return b ? "true" : "false"; }
/// The shortest decimal that reads back as v (0.2f prints as 0.2, not 0.200000003).
template <class T, std::enable_if_t<std::is_floating_point<T>::value, int> = 0>
std::string option_text(T v) {
  char text[40];
  for (int digits = std::numeric_limits<T>::digits10;; ++digits) {
    std::snprintf(text, sizeof text, "%.*g", digits, static_cast<double>(v));
    if (digits >= std::numeric_limits<T>::max_digits10 ||
        static_cast<T>(std::strtod(text, nullptr)) == v || v != v)
      return text;
  }
}

struct OptionsHash {
  std::uint64_t value = 14695981039346656037ull;
  template <class V>
  void operator()(const char*, const V& option) {
    unsigned char bytes[sizeof(V)];
    std::memcpy(bytes, &option, sizeof(V));
    for (unsigned char b : bytes) value = (value ^ b) * 1099511628211ull;
  }
};

struct OptionsText {
  std::string text;
  template <class V>
  void operator()(const char* name, const V& option) {
    text += (text.empty() ? "" : ", ") + std::string(name) + " = " + option_text(option);
  }
};

/// The path's name in the options (so that ranks on different paths disagree); the device
/// tags specialise it (backend/cuda/sharded.cuh).
template <class Base>
struct PathName {
  static constexpr const char* value = std::is_same<Base, scalar_tag>::value ? "scalar" : "simd";
};

template <class Base, class Loss>
std::uint64_t options_hash(const Loss& loss) {
  OptionsHash hash;
  loss.visit_options(hash);
  for (const char* c = PathName<Base>::value; *c != '\0'; ++c) hash("path", *c);
  return hash.value;
}

template <class Base, class Loss>
std::string options_text(const Loss& loss) {
  OptionsText out;
  loss.visit_options(out);
  return out.text + " on metricloss::" + PathName<Base>::value;
}

/// Labels travel as raw bytes: every rank must pass the same label type.
template <class L>
constexpr std::int32_t label_code() {
  return static_cast<std::int32_t>(sizeof(L)) * 4 + (std::is_floating_point<L>::value ? 1 : 0) +
         (std::is_signed<L>::value ? 2 : 0);
}
inline std::string label_type_name(std::int32_t code) {
  const std::string kind = (code & 1) ? "floating-point" : (code & 2) ? "signed integer"
                                                                       : "unsigned integer";
  return std::to_string((code / 4) * 8) + "-bit " + kind;
}

}  // namespace detail
}  // namespace metricloss
