// API.md: functors hold reusable scratch memory; a loss inside a training loop must not
// allocate per step. After one warm-up call, every call form of every registered loss
// (tests/registry.hpp), every option, both CPU paths, performs no heap allocation at the
// same shapes.
//
// Two counters, since Eigen does not allocate through operator new:
//   - this binary replaces the global operator new / delete (std::vector growth, strings);
//   - Eigen's aligned_malloc (temporaries, GEMM packing buffers above
//     EIGEN_STACK_ALLOCATION_LIMIT) is caught by EIGEN_RUNTIME_NO_MALLOC, whose check goes
//     through eigen_assert, redefined here to record instead of abort.
// This is the only translation unit of the binary that includes Eigen, so the definitions
// below cannot disagree with another one (ODR).
#undef NDEBUG  // keep eigen_assert, and so the malloc check, in every build type
#define EIGEN_RUNTIME_NO_MALLOC
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <type_traits>

namespace mltest {
/// Eigen assertions that failed while counting: each one is a heap allocation by Eigen
/// (or a real assertion, reported the same way with its text).
inline std::atomic<long> eigen_assertions{0};
inline std::string last_eigen_assertion;
inline void eigen_assertion_failed(const char* condition, const char* file, int line) {
  ++eigen_assertions;
  last_eigen_assertion = std::string(condition) + " at " + file + ":" + std::to_string(line);
}
}  // namespace mltest
#define eigen_assert(x) \
  ((x) ? static_cast<void>(0) : ::mltest::eigen_assertion_failed(#x, __FILE__, __LINE__))

#include "registry.hpp"
#include "support.hpp"

namespace {
std::atomic<long> allocations{0};
}

void* operator new(std::size_t size) {
  ++allocations;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return ::operator new(size); }
void* operator new(std::size_t size, std::align_val_t alignment) {
  ++allocations;
  const auto a = static_cast<std::size_t>(alignment);
  if (void* p = std::aligned_alloc(a, (size + a - 1) / a * a)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size, std::align_val_t alignment) {
  return ::operator new(size, alignment);
}
// Not inlined: GCC would otherwise see new's result reach free() (-Wmismatched-new-delete).
// The nothrow forms too: AddressSanitizer replaces each form, so one left to it would hand
// free() memory from its own operator new (alloc-dealloc-mismatch).
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(size);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, const std::nothrow_t& tag) noexcept {
  return ::operator new(size, tag);
}
void* operator new(std::size_t size, std::align_val_t alignment, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(size, alignment);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, std::align_val_t alignment, const std::nothrow_t& tag) noexcept {
  return ::operator new(size, alignment, tag);
}
[[gnu::noinline]] void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

using mltest::Matrix;
using mltest::ml::Index;
namespace ml = metricloss;
namespace registry = mltest::registry;

/// Heap allocations (operator new and Eigen's malloc) made by f.
struct Counted {
  long news = 0;
  long eigen = 0;
  std::string eigen_what;
};

template <class F>
Counted count_allocations(F&& f) {
  const long news_before = allocations.load();
  const long eigen_before = mltest::eigen_assertions.load();
  Eigen::internal::set_is_malloc_allowed(false);
  f();
  Eigen::internal::set_is_malloc_allowed(true);
  Counted c{allocations.load() - news_before, mltest::eigen_assertions.load() - eigen_before, {}};
  if (c.eigen > 0) c.eigen_what = mltest::last_eigen_assertion;
  return c;
}

/// Warm-up call, then the same call counted: it must allocate nothing.
template <class F>
void expect_no_allocation_once_warm(F&& call) {
  call();
  const Counted counted = count_allocations(call);
  CAPTURE(counted.news, counted.eigen, counted.eigen_what);
  CHECK(counted.news == 0);
  CHECK(counted.eigen == 0);
}

struct Shape {
  Index n, d;
};
// Small; D with a tail; past the product tiles' depth (256) and width; a larger batch
// (Eigen's GEMM blocking and packing at full size).
const Shape shapes[] = {{1, 1}, {7, 5}, {40, 37}, {33, 300}, {160, 96}};

/// Every call form of the losses that for_each visits, each configuration passed through
/// adjust first.
template <class T, class Tag, class ForEach, class Adjust>
void check_losses(ForEach&& for_each, Adjust&& adjust) {
  for (const Shape shape : shapes) {
    CAPTURE(shape.n, shape.d);
    const registry::Data<T> data(shape.n, shape.d, static_cast<std::uint64_t>(shape.n * 1000 + shape.d));
    registry::Outputs<T> out(shape.n, shape.d);
    for_each([&](auto entry) {
      using Entry = decltype(entry);
      for (auto& config : Entry::template configs<T>()) {
        adjust(config.loss);
        CAPTURE(Entry::name, config.label);
        Entry::calls(Tag{}, config.loss, data, out, [&](const std::string& call, auto&& run) {
          CAPTURE(call);
          expect_no_allocation_once_warm(run);
        });
      }
    });
  }
}

template <class T, class Tag>
void check_all_losses() {
  check_losses<T, Tag>([](auto&& f) { registry::for_each_loss(f); }, [](auto&) {});
}

/// The batch losses with normalize = true: the unit rows live in the functor's slot.
template <class T, class Tag>
void check_normalized_batch_losses() {
  check_losses<T, Tag>(
      [](auto&& f) {
        registry::for_each_loss([&](auto entry) {
          if constexpr (std::is_base_of<registry::BatchCalls, decltype(entry)>::value) f(entry);
        });
      },
      [](auto& loss) { loss.normalize = true; });
}

}  // namespace

TEST_CASE("the counters see allocations", "[allocation]") {
  const Counted by_new = count_allocations([] { std::vector<int> v(100); (void)v; });
  CHECK(by_new.news >= 1);
  const Counted by_eigen = count_allocations([] {
    Eigen::MatrixXd m = Eigen::MatrixXd::Ones(50, 50);
    (void)m;
  });
  CHECK(by_eigen.eigen >= 1);
}

TEMPLATE_TEST_CASE("warm functors allocate nothing", "[allocation]", ml::scalar_tag, ml::simd_tag) {
  SECTION("float") { check_all_losses<float, TestType>(); }
  SECTION("double") { check_all_losses<double, TestType>(); }
}

TEMPLATE_TEST_CASE("warm functors with normalize = true allocate nothing", "[allocation][normalize]",
                   ml::scalar_tag, ml::simd_tag) {
  SECTION("float") { check_normalized_batch_losses<float, TestType>(); }
  SECTION("double") { check_normalized_batch_losses<double, TestType>(); }
}

TEST_CASE("a functor driven by both CPU tags allocates nothing once each is warm", "[allocation]") {
  // Each backend keeps its scratch in its own entry of the functor's slot: alternating tags
  // must not reallocate. Uniform in +-10 at D = 512 (8 rows a class) sends LiftedStructureLoss
  // <float> through its call in double (backend/simd/widen.hpp), whose double functor lives
  // in the same slot; +-30 at D = 128, through its list of recomputed negatives.
  const std::uint64_t seed = 4242;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (const Shape shape : {Shape{256, 512}, Shape{256, 128}, Shape{37, 17}}) {
    const Index n = shape.n, d = shape.d;
    CAPTURE(n, d);
    const double scale = d == 512 ? 10.0 : d == 128 ? 30.0 : 1.0;
    const Matrix<float> x = mltest::uniform_matrix<float>(n, d, rng, -scale, scale);
    Eigen::VectorXi labels(n);
    for (Index i = 0; i < n; ++i) labels[i] = static_cast<int>(i / 8);
    Matrix<float> g(n, d);
    ml::LiftedStructureLoss<float> lifted;
    ml::BatchTripletLoss<float> batch(0.2f, ml::Mining::all);
    const auto both = [&] {
      lifted.forward_backward(ml::simd, x, labels, g);
      lifted.forward_backward(ml::scalar, x, labels, g);
      batch.forward_backward(ml::simd, x, labels, g);
      batch.forward_backward(ml::scalar, x, labels, g);
    };
    expect_no_allocation_once_warm(both);
    // Every kind of scratch of one functor at once (both tags, batch and reference forms,
    // with and without normalize, lifted's call in double): the slot holds them all.
    const auto ref = ml::reference(x, labels);
    Matrix<float> gr(n, d);
    const auto every = [&] {
      for (bool normalize : {false, true}) {
        lifted.normalize = normalize;
        batch.normalize = normalize;
        both();
        lifted.forward_backward(ml::simd, x, labels, ref, g, gr);
        lifted.forward_backward(ml::scalar, x, labels, ref, g, gr);
        batch.forward_backward(ml::simd, x, labels, ref, g, gr);
        batch.forward_backward(ml::scalar, x, labels, ref, g, gr);
      }
    };
    expect_no_allocation_once_warm(every);
  }
}
