// Two translation units include every header and use the same functions: a non-inline
// definition in any header fails to link with "multiple definition".
#include <metricloss/metricloss.hpp>
#include <metricloss/testing/gradcheck.hpp>

double odr_second() {
  metricloss::RowMatrix<double> a = metricloss::RowMatrix<double>::Ones(3, 4);
  metricloss::RowMatrix<double> b = metricloss::RowMatrix<double>::Zero(3, 4);
  Eigen::VectorXi sim = Eigen::VectorXi::Zero(3);
  return metricloss::ContrastiveLoss<double>(3.0).forward(metricloss::scalar, a, b, sim);
}
