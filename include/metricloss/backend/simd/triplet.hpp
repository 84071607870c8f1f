#pragma once
// The SIMD path of TripletLoss: triplet_rows_pipelined (backend/simd/triplet_rows.hpp) with
// the batch count and the wanted gradients as template arguments; rows over 8 KiB per input
// take triplet_forward_backward's block pass.
#include <metricloss/backend/simd/rowops.hpp>
#include <metricloss/backend/simd/triplet_rows.hpp>
#include <metricloss/triplet.hpp>

#include <xsimd/xsimd.hpp>

namespace metricloss {
namespace detail {

template <class T>
struct Backend<TripletLoss<T>, simd_tag> {
  static T forward_backward(TripletLoss<T>& loss, simd_tag, const MatrixView<const T>& anchor,
                            const MatrixView<const T>& positive,
                            const MatrixView<const T>& negative, const MatrixView<T>& grad_anchor,
                            const MatrixView<T>& grad_positive,
                            const MatrixView<T>& grad_negative, T top_diff) {
    constexpr Index width = static_cast<Index>(xsimd::batch<T>::size);
    const int wanted = (grad_anchor.empty() ? 0 : 1) | (grad_positive.empty() ? 0 : 2) |
                       (grad_negative.empty() ? 0 : 4);
    const Args args{anchor, positive, negative, static_cast<double>(loss.margin), loss.distance,
                    grad_anchor, grad_positive, grad_negative, static_cast<double>(top_diff)};
    switch (anchor.cols / width) {
      case 0: return static_cast<T>(by_wanted<0>(wanted, args));
      case 1: return static_cast<T>(by_wanted<1>(wanted, args));
      case 2: return static_cast<T>(by_wanted<2>(wanted, args));
      case 3: return static_cast<T>(by_wanted<3>(wanted, args));
      case 4: return static_cast<T>(by_wanted<4>(wanted, args));
      case 5: return static_cast<T>(by_wanted<5>(wanted, args));
      case 6: return static_cast<T>(by_wanted<6>(wanted, args));
      case 7: return static_cast<T>(by_wanted<7>(wanted, args));
      case 8: return static_cast<T>(by_wanted<8>(wanted, args));
      // D = 128 in 8 lanes (float on AVX2, double on AVX-512), unrolled: 1.1-1.2x to
      // 1.0-1.1x the streaming floor at N = 256, D = 128, float, AVX2.
      case 16: return static_cast<T>(by_wanted<16>(wanted, args));
      default:
        // Rows of up to 8 KiB per input: two rows of the three inputs (the one being written
        // and the next) stay in L1. Longer rows take the block pass, which was faster there
        // (double, D = 2048: 457 against 494 us at N = 256).
        if (anchor.cols * static_cast<Index>(sizeof(T)) <= 8192)
          return static_cast<T>(by_wanted<-1>(wanted, args));
        return static_cast<T>(triplet_forward_backward<SimdRowOps>(
            anchor, positive, negative, loss.margin, loss.distance, grad_anchor, grad_positive,
            grad_negative, top_diff));
    }
  }

 private:
  struct Args {
    const MatrixView<const T>& anchor;
    const MatrixView<const T>& positive;
    const MatrixView<const T>& negative;
    double margin;
    Distance distance;
    const MatrixView<T>& grad_anchor;
    const MatrixView<T>& grad_positive;
    const MatrixView<T>& grad_negative;
    double top_diff;
  };

  template <Index Batches, int Wanted>
  static double run(const Args& x) {
    return triplet_rows_pipelined<Batches, Wanted, T>(x.anchor, x.positive, x.negative, x.margin,
                                                      x.distance, x.grad_anchor, x.grad_positive,
                                                      x.grad_negative, x.top_diff);
  }

  template <Index Batches>
  static double by_wanted(int wanted, const Args& x) {
    switch (wanted) {
      case 0: return run<Batches, 0>(x);
      case 1: return run<Batches, 1>(x);
      case 2: return run<Batches, 2>(x);
      case 3: return run<Batches, 3>(x);
      case 4: return run<Batches, 4>(x);
      case 5: return run<Batches, 5>(x);
      case 6: return run<Batches, 6>(x);
      default: return run<Batches, 7>(x);
    }
  }
};

}  // namespace detail
}  // namespace metricloss
