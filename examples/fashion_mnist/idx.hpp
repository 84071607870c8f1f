#pragma once
// Reader for the gzip-compressed IDX files of (Fashion-)MNIST:
// big-endian header {0, 0, type = 0x08 (ubyte), rank}, then `rank` big-endian uint32
// dimensions, then the bytes.
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fashion_mnist {

struct IdxArray {
  std::vector<std::uint32_t> shape;
  std::vector<std::uint8_t> bytes;
};

namespace detail {

struct GzCloser {
  void operator()(gzFile_s* file) const { gzclose(file); }
};

inline void read_exactly(gzFile file, void* out, std::size_t size, const std::string& path) {
  auto* cursor = static_cast<unsigned char*>(out);
  while (size > 0) {
    // gzread takes an unsigned count: read in chunks well below its limit.
    const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(size, 1u << 30));
    const int got = gzread(file, cursor, chunk);
    if (got <= 0) throw std::runtime_error(path + ": truncated or corrupt gzip IDX file");
    cursor += got;
    size -= static_cast<std::size_t>(got);
  }
}

inline std::uint32_t big_endian_u32(const unsigned char* p) {
  return (std::uint32_t(p[0]) << 24) | (std::uint32_t(p[1]) << 16) | (std::uint32_t(p[2]) << 8) |
         std::uint32_t(p[3]);
}

}  // namespace detail

/// Reads a whole .idx*-ubyte.gz file; throws std::runtime_error naming the path on failure.
inline IdxArray read_idx_gz(const std::string& path) {
  std::unique_ptr<gzFile_s, detail::GzCloser> file(gzopen(path.c_str(), "rb"));
  if (!file) throw std::runtime_error(path + ": cannot open");
  unsigned char magic[4];
  detail::read_exactly(file.get(), magic, 4, path);
  if (magic[0] != 0 || magic[1] != 0 || magic[2] != 0x08 || magic[3] == 0)
    throw std::runtime_error(path + ": not an unsigned-byte IDX file");
  IdxArray array;
  std::size_t count = 1;
  for (int axis = 0; axis < magic[3]; ++axis) {
    unsigned char dimension[4];
    detail::read_exactly(file.get(), dimension, 4, path);
    array.shape.push_back(detail::big_endian_u32(dimension));
    count *= array.shape.back();
  }
  array.bytes.resize(count);
  detail::read_exactly(file.get(), array.bytes.data(), count, path);
  return array;
}

}  // namespace fashion_mnist
