#pragma once
// Numbers of the SIMD backend fitted to a machine, with the machine, the date and the
// benchmark that refits each. Everything else about precision is in detail/numerics.hpp;
// what is here changes speed only, never a result beyond API.md's bounds.
namespace metricloss {
namespace detail {
namespace tuning {

/// LiftedStructureLoss<float> runs the whole call in double when its list of imprecise
/// weighted negatives is long: entries (entry + d) > N^2 (pair + pair_per_dim d), in ns
/// per list entry and per pair. Fitted 2026-11-24 (a3a98f1) at N = 256 and 1024 on 2 cores
/// of an AMD EPYC (AVX-512, GCC 12): an entry costs ~(44 + 0.077 d) ns, the float path
/// ~N^2 (1.1 + 0.018 d) ns, the double call ~2.2x that after ~0.4x of it is done. Refit by
/// timing BM_lifted (bench_lifted_structure) in float and double at N = 256 and 1024 on
/// uniform data scaled to +-10 and +-30, d = 32, 128 and 512, 8 rows per class (the
/// large-scale inputs of tests/lifted_structure.cpp), where the list is long. At N = 1024:
/// d = 128 at +-30 (24 % of N^2 listed) 15.8 ms by the list, 9.8 in double; d = 512 at +-10
/// (50 %) 41.7 and 33.9; d = 32 at +-30 (3 %) stays with the list (3.6 against 4.3); d = 512
/// at +-30 (24 %) goes to double, 34.0 against 31.5, the one case measured where it errs.
struct lifted_in_double {
  static constexpr double entry = 570.0;
  static constexpr double pair = 22.5;
  static constexpr double pair_per_dim = 0.38;
};

/// BatchContrastiveLoss (simd) applies its weights one by one by differences
/// (DirectWeights) when its active hinges, each a nonzero weight, number at most
/// N^2 / direct_weights_per_pair unordered pairs (8.3 % of them); otherwise densely, through
/// one (N x N)(N x D) product. Both cost about D per pair, so the ratio hardly depends on D.
/// Fitted 2026-12-04 (bench_batch_pair_losses, BM_batch_contrastive_density, N = 1024,
/// D = 128, float, 2 cores of an AMD EPYC with AVX-512, GCC 12, nothing else running): with
/// every weight by differences 3.2 / 3.8 / 4.7 / 5.4 / 5.9 ms at 1 / 3 / 6 / 9 / 12 % of
/// the negative pairs active (plus 0.7 % positive), densely 5.0-5.3 ms throughout.
inline constexpr double direct_weights_per_pair = 24.0;

}  // namespace tuning
}  // namespace detail
}  // namespace metricloss
