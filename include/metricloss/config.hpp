#pragma once
// Shared maths in detail/ is callable from CUDA kernels when compiled by nvcc.
#if defined(__CUDACC__)
#define METRICLOSS_HOST_DEVICE __host__ __device__
#else
#define METRICLOSS_HOST_DEVICE
#endif

#if __cplusplus < 201703L && !defined(_MSVC_LANG)
#error "metricloss requires C++17"
#endif
