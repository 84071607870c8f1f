#pragma once
// What digest.cpp and replay.cpp print: an FNV-1a-64 hash over exact bytes, and a value's
// bits in hex.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace bitwise {

/// FNV-1a-64 of `size` bytes, continuing from h.
inline std::uint64_t fnv(const void* data, std::size_t size, std::uint64_t h = 0xcbf29ce484222325ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < size; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

/// The bits of a float (8 hex digits) or a double (16).
template <class T>
std::string hex(T value) {
  char buffer[24];
  if constexpr (sizeof(T) == 4) {
    std::uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    std::snprintf(buffer, sizeof buffer, "%08x", static_cast<unsigned>(bits));
  } else {
    std::uint64_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    std::snprintf(buffer, sizeof buffer, "%016llx", static_cast<unsigned long long>(bits));
  }
  return buffer;
}

}  // namespace bitwise
