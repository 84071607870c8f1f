// The public headers hold options, validation and dispatch only: a face with its scalar
// backend compiles without xsimd (the SIMD backend and its scratch live in backend/simd/),
// and each backend's scratch lives in the functor's slot (detail/backend_slot.hpp).
#include <metricloss/batch_triplet.hpp>
#include <metricloss/contrastive.hpp>
#include <metricloss/lifted_structure.hpp>
#include <metricloss/triplet.hpp>
#include <metricloss/backend/scalar/batch_triplet.hpp>
#include <metricloss/backend/scalar/contrastive.hpp>
#include <metricloss/backend/scalar/lifted_structure.hpp>
#include <metricloss/backend/scalar/triplet.hpp>

#ifdef XSIMD_VERSION_MAJOR
#error "a face or a scalar backend includes xsimd"
#endif

#include <catch2/catch.hpp>

#include <cmath>

namespace ml = metricloss;

TEST_CASE("the faces run their scalar backends without xsimd", "[core]") {
  ml::RowMatrix<double> x(6, 3);
  for (ml::Index i = 0; i < 6; ++i)
    for (ml::Index c = 0; c < 3; ++c) x(i, c) = static_cast<double>((i * 7 + c * 3) % 5) - 2.0;
  Eigen::VectorXi labels(6);
  labels << 0, 0, 1, 1, 2, 2;
  ml::RowMatrix<double> g(6, 3);
  ml::LiftedStructureLoss<double> lifted;
  ml::BatchTripletLoss<double> batch(0.5, ml::Mining::all);
  CHECK(std::isfinite(lifted.forward_backward(ml::scalar, x, labels, g)));
  CHECK(std::isfinite(batch.forward_backward(ml::scalar, x, labels, g)));
}

namespace {
struct First : ml::detail::BackendSlot::Contents {
  int value = 1;
};
struct Second : ml::detail::BackendSlot::Contents {
  int value = 2;
};
template <int K>
struct Other : ml::detail::BackendSlot::Contents {};
}  // namespace

TEST_CASE("the backend slot keeps one entry per backend", "[core]") {
  ml::detail::BackendSlot slot;
  First& first = slot.get<First>();
  first.value = 10;
  Second& second = slot.get<Second>();
  second.value = 20;
  // Alternating backends find their own contents again, not fresh ones.
  CHECK(&slot.get<First>() == &first);
  CHECK(slot.get<First>().value == 10);
  CHECK(&slot.get<Second>() == &second);
  // reset<C> frees C only; a copy starts empty.
  slot.reset<First>();
  CHECK(slot.get<First>().value == 1);
  CHECK(slot.get<Second>().value == 20);
  ml::detail::BackendSlot copy(slot);
  CHECK(copy.get<Second>().value == 2);
  // More backends than entries: the oldest gives way, the rest stay.
  slot.get<Other<0>>();
  slot.get<Other<1>>();
  slot.get<Other<2>>();
  slot.get<Other<3>>();
  Other<4>& last = slot.get<Other<4>>();
  CHECK(&slot.get<Other<4>>() == &last);
  slot.reset();
  CHECK(slot.get<Second>().value == 2);
}
