// Replaces the global operator new and delete with counting versions over malloc (and, with
// glibc and no sanitizer, malloc itself), to check that warm functors allocate nothing. In its own translation unit so that no call site
// sees new and free together.
#include "allocation_counter.hpp"

#include <atomic>
#include <cstdlib>
#include <new>

namespace {
std::atomic<long> allocations{0};
}

long mltest::allocation_count() { return allocations.load(); }

// malloc and its kin too (glibc, without a sanitizer, which owns them then): Eigen takes its
// product panels and temporaries from std::malloc, not from operator new.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MLTEST_COUNT_MALLOC 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define MLTEST_COUNT_MALLOC 0
#endif
#endif
#if !defined(MLTEST_COUNT_MALLOC) && defined(__GLIBC__)
#define MLTEST_COUNT_MALLOC 1
#elif !defined(MLTEST_COUNT_MALLOC)
#define MLTEST_COUNT_MALLOC 0
#endif

#if MLTEST_COUNT_MALLOC
extern "C" {
void* __libc_malloc(std::size_t size);
void* __libc_calloc(std::size_t count, std::size_t size);
void* __libc_realloc(void* p, std::size_t size);
void* __libc_memalign(std::size_t alignment, std::size_t size);

void* malloc(std::size_t size) {
  ++allocations;
  return __libc_malloc(size);
}
void* calloc(std::size_t count, std::size_t size) {
  ++allocations;
  return __libc_calloc(count, size);
}
void* realloc(void* p, std::size_t size) {
  ++allocations;
  return __libc_realloc(p, size);
}
void* aligned_alloc(std::size_t alignment, std::size_t size) {
  ++allocations;
  return __libc_memalign(alignment, size);
}
void* memalign(std::size_t alignment, std::size_t size) {
  ++allocations;
  return __libc_memalign(alignment, size);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t size) {
  ++allocations;
  void* p = __libc_memalign(alignment, size);
  if (p == nullptr && size != 0) return 12;  // ENOMEM
  *out = p;
  return 0;
}
}
#endif

namespace {
void* counted(std::size_t size) {
#if MLTEST_COUNT_MALLOC
  return std::malloc(size);  // counted there
#else
  ++allocations;
  return std::malloc(size);
#endif
}
}  // namespace

void* operator new(std::size_t size) {
  if (void* p = counted(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return ::operator new(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
// The nothrow forms too: AddressSanitizer replaces each form, so one left to it would hand
// free() memory from its own operator new (alloc-dealloc-mismatch under scripts/test --sanitize).
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  return counted(size == 0 ? 1 : size);
}
void* operator new[](std::size_t size, const std::nothrow_t& tag) noexcept {
  return ::operator new(size, tag);
}
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
