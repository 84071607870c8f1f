#pragma once
// Options shared by the triplet losses (and open to any loss that needs them).

namespace metricloss {

/// The distance d(x, y) between two embeddings that a triplet loss compares.
enum class Distance {
  euclidean,          ///< d = ||x - y||_2
  squared_euclidean,  ///< d = ||x - y||_2^2 (FaceNet)
};

/// How BatchTripletLoss forms triplets from the labels of one batch.
enum class Mining {
  all,       ///< every valid triplet; the mean over those with a positive hinge
  hard,      ///< batch-hard: per anchor its farthest positive and nearest negative
  semihard,  ///< FaceNet: per (anchor, positive) the nearest negative farther than the positive
};

/// How BatchContrastiveLoss averages each side's terms.
enum class Reduction {
  nonzero_mean,  ///< over the terms that are > 0 (pytorch-metric-learning's AvgNonZeroReducer)
  mean,          ///< over every positive (every negative) pair
};

}  // namespace metricloss
