#include <catch2/catch.hpp>

double odr_first();
double odr_second();

TEST_CASE("two translation units link and agree", "[odr]") {
  // d = 2 for every pair, margin 3: (3 - 2)^2 / 2.
  CHECK(odr_first() == Approx(0.5));
  CHECK(odr_second() == odr_first());
}
