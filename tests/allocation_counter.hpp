#pragma once
// The number of global operator new calls so far in this test binary (the replacement
// lives in allocation_counter.cpp: link it to count).
namespace mltest {
long allocation_count();
}  // namespace mltest
