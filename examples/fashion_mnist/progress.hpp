#pragma once
// A one-line progress bar, drawn only when stdout is a terminal (logs stay clean).
#include <unistd.h>

#include <cstdio>
#include <string>

namespace fashion_mnist {

class ProgressBar {
 public:
  ProgressBar(std::string label, long total)
      : label_(std::move(label)), total_(total), enabled_(isatty(STDOUT_FILENO) != 0) {}

  /// Redraws when the bar has moved by at least one cell.
  void update(long done, double loss) {
    if (!enabled_ || total_ <= 0) return;
    const int filled = int(width * done / total_);
    if (filled == last_filled_ && done != total_) return;
    last_filled_ = filled;
    std::printf("\r%s [%s%s] %3d%%  loss %.4f", label_.c_str(), std::string(filled, '#').c_str(),
                std::string(width - filled, '.').c_str(), int(100 * done / total_), loss);
    std::fflush(stdout);
  }

  /// Clears the bar so that the next line starts clean.
  void finish() {
    if (!enabled_) return;
    std::printf("\r\033[K");
    std::fflush(stdout);
  }

 private:
  static constexpr int width = 30;
  std::string label_;
  long total_;
  bool enabled_;
  int last_filled_ = -1;
};

}  // namespace fashion_mnist
