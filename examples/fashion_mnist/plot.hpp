#pragma once
// The learned space as a picture: 2-D PCA of the embeddings, one colour per class, as SVG.
#include "dataset.hpp"

#include <Eigen/Eigenvalues>

#include <fstream>
#include <stdexcept>
#include <string>

namespace fashion_mnist {

/// Coordinates of every row of `points` on its two principal axes.
inline Eigen::MatrixX2d pca_2d(const Matrix& points) {
  const Eigen::MatrixXd x = points.cast<double>();
  const Eigen::MatrixXd centred = x.rowwise() - x.colwise().mean();
  const Eigen::MatrixXd covariance =
      centred.transpose() * centred / double(std::max<Eigen::Index>(1, x.rows() - 1));
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(covariance);
  const Eigen::Index d = x.cols();
  // Eigenvalues come in increasing order: the principal axes are the last two columns.
  Eigen::MatrixXd axes(d, 2);
  axes.col(0) = solver.eigenvectors().col(d - 1);
  axes.col(1) = d > 1 ? Eigen::VectorXd(solver.eigenvectors().col(d - 2)) : Eigen::VectorXd::Zero(d);
  return centred * axes;
}

/// Writes `coordinates` (N x 2) as coloured dots with a legend of the class names.
inline void write_svg(const std::string& path, const Eigen::MatrixX2d& coordinates,
                      const Labels& labels, const std::string& title) {
  // Tableau 10: distinct to most readers, including the common colour-vision deficiencies.
  static const char* const colours[class_count] = {"#4e79a7", "#f28e2b", "#e15759", "#76b7b2",
                                                   "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                                                   "#9c755f", "#bab0ac"};
  constexpr double plot = 640, margin = 20, legend = 150, header = 30;
  std::ofstream out(path);
  if (!out) throw std::runtime_error(path + ": cannot write");
  const Eigen::RowVector2d low = coordinates.colwise().minCoeff();
  const Eigen::RowVector2d span =
      (coordinates.colwise().maxCoeff() - low).cwiseMax(1e-12);
  const double scale = (plot - 2 * margin) / span.maxCoeff();
  out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << plot + legend << "\" height=\""
      << plot + header << "\" font-family=\"sans-serif\" font-size=\"13\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << margin << "\" y=\"20\" font-size=\"15\">" << title << "</text>\n"
      << "<g fill-opacity=\"0.55\">\n";
  out.precision(5);
  for (Eigen::Index i = 0; i < coordinates.rows(); ++i) {
    const double x = margin + (coordinates(i, 0) - low(0)) * scale;
    // SVG's y axis points down; flip it so the picture reads like a plot.
    const double y = header + plot - margin - (coordinates(i, 1) - low(1)) * scale;
    out << "<circle cx=\"" << x << "\" cy=\"" << y << "\" r=\"1.6\" fill=\""
        << colours[labels[i]] << "\"/>\n";
  }
  out << "</g>\n";
  for (int c = 0; c < class_count; ++c) {
    const double y = header + margin + 22.0 * c;
    out << "<circle cx=\"" << plot + 10 << "\" cy=\"" << y << "\" r=\"6\" fill=\"" << colours[c]
        << "\"/><text x=\"" << plot + 22 << "\" y=\"" << y + 4 << "\">" << class_names[std::size_t(c)]
        << "</text>\n";
  }
  out << "</svg>\n";
  if (!out) throw std::runtime_error(path + ": write failed");
}

}  // namespace fashion_mnist
