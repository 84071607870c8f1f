// A downstream program: a known contrastive loss through the packaged library.
#include <metricloss/metricloss.hpp>

#include <cmath>
#include <cstdio>

int main() {
  metricloss::RowMatrix<double> a(2, 2), b = metricloss::RowMatrix<double>::Zero(2, 2);
  a << 3, 4, 0.3, 0.4;  // distances 5 and 0.5
  Eigen::VectorXi sim(2);
  sim << 1, 0;
  // (5^2 + (1 - 0.5)^2) / (2 * 2) = 6.3125
  const double value = metricloss::ContrastiveLoss<double>(1.0).forward(metricloss::simd, a, b, sim);
  std::printf("metricloss %d: loss = %.4f\n", METRICLOSS_VERSION, value);
  return std::abs(value - 6.3125) < 1e-12 ? 0 : 1;
}
