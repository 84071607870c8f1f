#pragma once
// Included by tests/bitwise/digest.cpp and replay.cpp (one translation unit each): every
// allocation through operator new (std::vector, the library's grow-only scratch) starts on a
// 64-byte boundary, whatever the heap's history.
//
// Why: some vectorised paths give bits that follow the alignment of the memory they read or
// write (Eigen's reductions peel up to the first aligned element; a lane's partial sums
// change with it). With malloc's 16-byte alignment, where a buffer lands modulo 64 depends on
// every allocation made before it, the library's own included: two revisions that allocate
// their scratch differently would place the same inputs at different alignments and differ
// in the last bits for that reason alone. With this, the alignment of every buffer is a fixed
// function of the program's own choices (digest.cpp varies it on purpose, by offsets).
#include <cstddef>
#include <cstdlib>
#include <new>

void* operator new(std::size_t size) {
  const std::size_t rounded = size == 0 ? 64 : (size + 63) / 64 * 64;
  if (void* p = std::aligned_alloc(64, rounded)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return ::operator new(size); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(size);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return ::operator new(size, std::nothrow);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
