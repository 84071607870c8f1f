#pragma once
// The number of global operator new (and, with glibc and no sanitizer, malloc) calls so far in this test binary (the replacement
// lives in allocation_counter.cpp: link it to count).
namespace mltest {
long allocation_count();
}  // namespace mltest
