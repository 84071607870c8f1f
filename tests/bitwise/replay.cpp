// Replays libFuzzer inputs (fuzz/corpus/*) through fuzz/fuzz_losses.cpp without libFuzzer and
// prints a bitwise digest of every loss call the fuzz target makes (scripts/bitwise):
//
//   fuzz file=<name> call=<k> T=<type> | loss=<hex bits> grads=<count> fnv=<FNV-1a-64> g0=<hex>
//   fuzz file=<name> call=<k> T=<type> | threw fnv=<FNV-1a-64 of the message>
//
// fnv hashes the exact bits of every gradient the call wrote (rows only: the fuzz target
// itself aborts when padding is written). Every buffer starts on 64 bytes
// (fixed_alignment.hpp), so that where the fuzz target's buffers land does not depend on how
// the library allocated its scratch before. The fuzz target's own checks stay on: a failing
// check aborts the replay. Built with g++ against any revision's include/ (the include path
// picks the library; the fuzz source is the working tree's):
//   g++ -std=c++17 -O2 -march=native -I<rev>/include -Itests -I<dir with fuzzer/FuzzedDataProvider.h>
//       -isystem /usr/include/eigen3 tests/bitwise/replay.cpp
#include "digest_format.hpp"
#include "fixed_alignment.hpp"  // every operator new on 64 bytes: alignments independent of heap history

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace bitwise_replay {

std::string file;  // the input being replayed
long call = 0;     // calls so far in that input
long total = 0;    // calls so far in all inputs

using bitwise::fnv;

using bitwise::hex;

/// Called by fuzz_losses.cpp's run() with each call's Outcome<T>: threw, message, loss (the
/// returned T widened to double, exactly) and the wanted gradients' rows.
template <class Outcome>
void observe(const Outcome& outcome) {
  using T = typename decltype(outcome.gradients)::value_type::value_type;
  ++total;
  const char* type = sizeof(T) == 4 ? "float" : "double";
  if (outcome.threw) {
    std::printf("fuzz file=%s call=%ld T=%s | threw fnv=%016llx\n", file.c_str(), call++, type,
                static_cast<unsigned long long>(fnv(outcome.message.data(), outcome.message.size())));
    return;
  }
  std::uint64_t h = 0xcbf29ce484222325ull;
  std::string first = "-";
  for (const auto& g : outcome.gradients) {
    h = fnv(g.data(), g.size() * sizeof(T), h);
    if (first == "-" && !g.empty()) first = hex(g[0]);
  }
  std::printf("fuzz file=%s call=%ld T=%s | loss=%s grads=%zu fnv=%016llx g0=%s\n", file.c_str(), call++,
              type, hex(static_cast<T>(outcome.loss)).c_str(), outcome.gradients.size(),
              static_cast<unsigned long long>(h), first.c_str());
}

}  // namespace bitwise_replay

#define METRICLOSS_FUZZ_DIGEST(outcome) ::bitwise_replay::observe(outcome)
#include "../../fuzz/fuzz_losses.cpp"

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::ifstream in(argv[i], std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "replay: cannot read %s\n", argv[i]);
      return 2;
    }
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const char* slash = std::strrchr(argv[i], '/');
    bitwise_replay::file = slash ? slash + 1 : argv[i];
    bitwise_replay::call = 0;
    LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    std::fflush(stdout);
  }
  std::fprintf(stderr, "replay: %d inputs, %ld calls\n", argc - 1, bitwise_replay::total);
  return 0;
}
