#pragma once
// Fashion-MNIST as row-major float images in [0, 1] and int labels.
#include "idx.hpp"

#include <metricloss/types.hpp>

#include <Eigen/Core>

#include <array>
#include <fstream>
#include <stdexcept>
#include <string>

namespace fashion_mnist {

using Matrix = metricloss::RowMatrix<float>;
using Labels = Eigen::VectorXi;

inline constexpr int class_count = 10;
inline const std::array<const char*, class_count> class_names = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

struct Dataset {
  Matrix images;  // one image per row, 784 pixels in [0, 1]
  Labels labels;
  Eigen::Index size() const { return images.rows(); }
};

inline Dataset load_split(const std::string& directory, const std::string& prefix) {
  const std::string images_path = directory + "/" + prefix + "-images-idx3-ubyte.gz";
  const std::string labels_path = directory + "/" + prefix + "-labels-idx1-ubyte.gz";
  const IdxArray images = read_idx_gz(images_path);
  const IdxArray labels = read_idx_gz(labels_path);
  if (images.shape.size() != 3 || labels.shape.size() != 1 || images.shape[0] != labels.shape[0])
    throw std::runtime_error(images_path + ": shape does not match " + labels_path);
  const Eigen::Index n = images.shape[0], pixels = Eigen::Index(images.shape[1]) * images.shape[2];
  Dataset split{Matrix(n, pixels), Labels(n)};
  for (Eigen::Index i = 0; i < n * pixels; ++i)
    split.images.data()[i] = float(images.bytes[std::size_t(i)]) / 255.0f;
  for (Eigen::Index i = 0; i < n; ++i) {
    split.labels[i] = labels.bytes[std::size_t(i)];
    if (split.labels[i] >= class_count)
      throw std::runtime_error(labels_path + ": label out of range");
  }
  return split;
}

/// The first `count` rows (all when count <= 0 or beyond the size).
inline Dataset head(const Dataset& split, Eigen::Index count) {
  if (count <= 0 || count >= split.size()) return split;
  return {split.images.topRows(count), split.labels.head(count)};
}

/// True when the four files of the data set are readable in `directory`.
inline bool files_present(const std::string& directory) {
  for (const char* name : {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"})
    if (!std::ifstream(directory + "/" + name)) return false;
  return true;
}

}  // namespace fashion_mnist
