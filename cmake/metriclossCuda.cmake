# The optional CUDA path: METRICLOSS_CUDA defaults on when a CUDA compiler is found, and then
# defines the INTERFACE target metricloss_cuda (metricloss::cuda) for <metricloss/cuda.cuh>.
include(CheckLanguage)
# nvcc is often not on PATH; the toolkit's default location is the next best guess.
if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
  find_program(METRICLOSS_NVCC nvcc)
  if(NOT METRICLOSS_NVCC AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc CACHE FILEPATH "CUDA compiler")
  endif()
endif()
check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  set(_metricloss_cuda_default ON)
else()
  set(_metricloss_cuda_default OFF)
endif()
option(METRICLOSS_CUDA "Build the CUDA target, tests and benchmarks" ${_metricloss_cuda_default})

if(METRICLOSS_CUDA)
  # Ampere and Hopper by default; CMAKE_CUDA_ARCHITECTURES, or CMake's CUDAARCHS in the
  # environment (scripts/test sets it), overrides.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND "$ENV{CUDAARCHS}" STREQUAL "")
    set(CMAKE_CUDA_ARCHITECTURES 80 90)
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  add_library(metricloss_cuda INTERFACE)
  add_library(metricloss::cuda ALIAS metricloss_cuda)
  set_target_properties(metricloss_cuda PROPERTIES EXPORT_NAME cuda)
  target_link_libraries(metricloss_cuda INTERFACE metricloss CUDA::cudart)
  target_compile_features(metricloss_cuda INTERFACE cuda_std_17)
  # Eigen and the shared host/device maths call constexpr host functions (numeric_limits)
  # from device code, which nvcc allows only with this flag (Eigen's documented requirement).
  target_compile_options(metricloss_cuda INTERFACE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
endif()

# NCCL (shipped with the CUDA toolkit) for <metricloss/nccl.cuh>: metricloss::nccl where found.
if(METRICLOSS_CUDA)
  find_path(METRICLOSS_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS})
  find_library(METRICLOSS_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR})
  if(METRICLOSS_NCCL_INCLUDE_DIR AND METRICLOSS_NCCL_LIBRARY)
    add_library(metricloss_nccl INTERFACE)
    add_library(metricloss::nccl ALIAS metricloss_nccl)
    set_target_properties(metricloss_nccl PROPERTIES EXPORT_NAME nccl)
    target_include_directories(metricloss_nccl INTERFACE "${METRICLOSS_NCCL_INCLUDE_DIR}")
    target_link_libraries(metricloss_nccl INTERFACE metricloss_cuda "${METRICLOSS_NCCL_LIBRARY}")
    message(STATUS "metricloss: NCCL found (${METRICLOSS_NCCL_LIBRARY}): metricloss::nccl")
  else()
    message(STATUS "metricloss: NCCL not found: no metricloss::nccl")
  endif()
endif()
