#pragma once
// A hint to start loading one cache line for reading (a no-op where the compiler has none).

namespace metricloss {
namespace detail {

inline void prefetch_line(const char* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(address, 0, 3);
#else
  (void)address;
#endif
}

}  // namespace detail
}  // namespace metricloss
