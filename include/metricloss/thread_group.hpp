#pragma once
// Ranks as threads of one process: a group for sharded batch losses (API.md, "Global
// batches") in tests, on one-GPU machines and on multi-core CPUs.
//
//   metricloss::thread_group team(3);              // shared by the three threads
//   // in thread r:
//   metricloss::thread_rank me = team.member(r);
//   double L = loss.forward_backward(metricloss::simd.sharded(me), x_r, y_r, g_r);
//
// Every collective is entered by all `size()` ranks in the same order, as with MPI. The
// group allocates nothing after construction (a warm sharded call allocates nothing).
#include <metricloss/errors.hpp>

#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

namespace metricloss {

class thread_rank;

/// The shared state of `size` ranks; one object for all of them, alive while any rank calls.
class thread_group {
 public:
  explicit thread_group(int size) : size_(size) {
    if (size < 1)
      throw invalid_argument("metricloss::thread_group: argument 'size' is " +
                             std::to_string(size) + "; a group needs at least one rank");
    slots_ = std::make_unique<Slot[]>(static_cast<std::size_t>(size));
  }
  thread_group(const thread_group&) = delete;
  thread_group& operator=(const thread_group&) = delete;

  int size() const { return size_; }

  /// The handle rank `rank` calls the losses with.
  thread_rank member(int rank);

 private:
  friend class thread_rank;
  struct Slot {
    const void* send = nullptr;
    std::size_t bytes = 0;
  };

  /// Blocks until every rank has arrived (a generation barrier).
  void arrive() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      all_arrived_.notify_all();
    } else {
      all_arrived_.wait(lock, [&] { return generation_ != generation; });
    }
  }

  void allgatherv(int rank, const void* send, std::size_t bytes, void* recv,
                  const std::size_t* counts, const std::size_t* offsets) {
    slots_[static_cast<std::size_t>(rank)] = {send, bytes};
    arrive();  // every rank has published its buffer
    for (int q = 0; q < size_; ++q) {
      const Slot& slot = slots_[static_cast<std::size_t>(q)];
      const std::size_t n = slot.bytes < counts[q] ? slot.bytes : counts[q];
      if (n > 0) std::memcpy(static_cast<char*>(recv) + offsets[q], slot.send, n);
    }
    arrive();  // every rank has read: the senders may reuse their buffers
  }

  int size_;
  std::unique_ptr<Slot[]> slots_;
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  int arrived_ = 0;
  unsigned long generation_ = 0;
};

/// One rank of a thread_group: what a sharded call is given (the group concept).
class thread_rank {
 public:
  int rank() const { return rank_; }
  int size() const { return group_->size(); }
  /// Rank q's `counts[q]` bytes land at recv + offsets[q], on every rank.
  void allgatherv(const void* send, std::size_t bytes, void* recv, const std::size_t* counts,
                  const std::size_t* offsets) const {
    group_->allgatherv(rank_, send, bytes, recv, counts, offsets);
  }

 private:
  friend class thread_group;
  thread_rank(thread_group* group, int rank) : group_(group), rank_(rank) {}
  thread_group* group_;
  int rank_;
};

inline thread_rank thread_group::member(int rank) {
  if (rank < 0 || rank >= size_)
    throw invalid_argument("metricloss::thread_group::member: argument 'rank' is " +
                           std::to_string(rank) + "; the group has ranks 0.." +
                           std::to_string(size_ - 1));
  return thread_rank(this, rank);
}

}  // namespace metricloss
