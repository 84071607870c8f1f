#pragma once
// Step 1 of a sharded call (detail/sharded.hpp): every rank's checks and statuses exchanged,
// and the same invalid_argument thrown on every rank when any rank failed or they disagree.
#include <metricloss/detail/buffer.hpp>
#include <metricloss/detail/sharded_exchange.hpp>
#include <metricloss/detail/sharded_options.hpp>
#include <metricloss/detail/validate.hpp>
#include <metricloss/errors.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace metricloss {
namespace detail {

/// Runs a rank's own checks; returns their failure's message without the function's prefix
/// ("" when they pass), for the agreement.
template <class Checks>
std::string local_error(Validator& check, Checks&& checks) {
  try {
    checks();
  } catch (const invalid_argument& failure) {
    const std::string prefix = check.function() + ": ";
    std::string error = failure.what();
    if (error.compare(0, prefix.size(), prefix) == 0) error.erase(0, prefix.size());
    return error.empty() ? "invalid argument" : error;
  }
  return std::string();
}

/// Every rank's text in rank order, each rank's length(q) known on every rank (a collective;
/// the failing calls' messages only: it allocates).
template <class Group, class Length>
std::vector<std::string> gather_texts(Group& group, GrowOnlyBuffer<std::size_t>& bytes,
                                      const std::string& mine, Length&& length) {
  const int ranks = group.size();
  std::size_t total = 0;
  for (int q = 0; q < ranks; ++q) total += static_cast<std::size_t>(length(q));
  std::string all(total, ' ');
  gather(group, bytes, length, mine.data(), &all[0]);
  std::vector<std::string> texts;
  std::size_t at = 0;
  for (int q = 0; q < ranks; ++q) {
    const auto n = static_cast<std::size_t>(length(q));
    texts.push_back(all.substr(at, n));
    at += n;
  }
  return texts;
}

/// Step 1: exchanges the statuses and throws, on every rank alike, when any rank's
/// arguments failed or the ranks disagree. `error` is this rank's message (empty: passed);
/// `describe_options()` writes this rank's options out (called only when they differ).
template <class Group, class DescribeOptions>
void agree(Group& group, Validator& check, ShardStatus mine, const std::string& error,
           GrowOnlyBuffer<ShardStatus>& statuses, GrowOnlyBuffer<std::size_t>& bytes,
           DescribeOptions&& describe_options) {
  const int ranks = group.size();
  ShardStatus* status = statuses.data(static_cast<std::size_t>(ranks));
  gather(group, bytes, [](int) { return 1; }, &mine, status);
  const std::string of = " of " + std::to_string(ranks);
  int failed = -1, failures = 0;
  for (int q = 0; q < ranks; ++q)
    if (!status[q].ok) {
      if (failed < 0) failed = q;
      ++failures;
    }
  if (failed >= 0) {
    // The messages themselves, so that every rank throws the same one.
    const auto messages =
        gather_texts(group, bytes, error, [&](int q) { return status[q].message_bytes; });
    check.fail("rank " + std::to_string(failed) + of + ": " +
               messages[static_cast<std::size_t>(failed)] +
               (failures > 1 ? " (and " + std::to_string(failures - 1) + " more rank" +
                                   (failures > 2 ? "s" : "") + " failed)"
                             : std::string()));
  }
  std::int64_t total = 0;
  for (int q = 0; q < ranks; ++q) {
    total += status[q].rows;
    if (status[q].scalar_bytes != status[0].scalar_bytes)
      check.fail("rank " + std::to_string(q) + of + " calls with " +
                 std::to_string(status[q].scalar_bytes * 8) + "-bit embeddings, rank 0 with " +
                 std::to_string(status[0].scalar_bytes * 8) + "-bit");
    if (status[q].label_code != status[0].label_code)
      check.fail("rank " + std::to_string(q) + of + " passes " +
                 label_type_name(status[q].label_code) + " labels, rank 0 " +
                 label_type_name(status[0].label_code) + " labels; every rank needs the same type");
    if (status[q].cols != status[0].cols)
      check.fail("argument 'x' on rank " + std::to_string(q) + of + " has shape " +
                 shape_string(status[q].rows, status[q].cols) + ", on rank 0 " +
                 shape_string(status[0].rows, status[0].cols) +
                 "; every rank needs the same D (a rank without rows passes 0 x D)");
  }
  for (int q = 1; q < ranks; ++q) {
    if (status[q].reference_rows != status[0].reference_rows)
      check.fail("argument 'r' on rank " + std::to_string(q) + of + " has " +
                 std::to_string(status[q].reference_rows) + " rows, on rank 0 " +
                 std::to_string(status[0].reference_rows) +
                 "; every rank needs the same reference set");
    if (status[q].reference_hash != status[0].reference_hash)
      check.fail("arguments 'r' and 'labels_r' on rank " + std::to_string(q) + of +
                 " differ from rank 0's (the same shape, other bits); every rank needs the "
                 "same reference set, bitwise");
  }
  int differs = -1;
  for (int q = 1; q < ranks && differs < 0; ++q)
    if (status[q].options != status[0].options) differs = q;
  if (differs > 0) {
    // Every rank learns that rank `differs` differs from rank 0, and exchanges its text.
    const std::string text = describe_options();
    // Two rounds: the lengths, then the texts (a failing call may allocate).
    std::vector<std::uint64_t> length(static_cast<std::size_t>(ranks));
    const std::uint64_t my_length = text.size();
    gather(group, bytes, [](int) { return 1; }, &my_length, length.data());
    const auto texts = gather_texts(group, bytes, text,
                                    [&](int q) { return length[static_cast<std::size_t>(q)]; });
    check.fail("rank " + std::to_string(differs) + of + " calls with " +
               texts[static_cast<std::size_t>(differs)] + ", rank 0 with " + texts[0] +
               "; every rank needs the same loss options and path");
  }
  if (total == 0)
    check.fail("argument 'x' has 0 rows on every rank" + of +
               "; the global batch needs N >= 1 rows");
}

/// A rank whose arguments failed before its loss's own sharded call (the half-precision
/// staging checks the caller's memory first): it joins step 1 with its message, so that every
/// rank throws it and no rank waits in a collective this one skipped.
template <class Group>
[[noreturn]] void fail_agreement(Group& group, Validator& check, const std::string& error) {
  ShardStatus mine{0, 0, 0, 0, 0, static_cast<std::int32_t>(error.size()), 0};
  GrowOnlyBuffer<ShardStatus> statuses;
  GrowOnlyBuffer<std::size_t> bytes;
  agree(group, check, mine, error, statuses, bytes, [] { return std::string(); });
  check.fail(error);  // not reached: agree throws when a rank failed
}

}  // namespace detail
}  // namespace metricloss
