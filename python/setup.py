"""Builds metricloss's PyTorch binding from source against the installed torch.

    python -m pip install --no-build-isolation ./python      (from the repository root)

--no-build-isolation makes pip build against the torch already installed (no download; an
isolated build would fetch a different torch from the network and break the ABI match).
The C++ headers come from ../include (this repository), Eigen 3.4 and xsimd from the system.

Environment:
  METRICLOSS_MARCH    -march value (default "native": the binding is compiled on the machine
                      that runs it; set "x86-64-v2" or "" for a portable build)
  EIGEN3_INCLUDE_DIR  Eigen's include folder (default: /usr/include/eigen3 or /usr/local/...)
  MAX_JOBS            parallel compile jobs (torch's cpp_extension)
  METRICLOSS_CUDA     "0": leave the CUDA path out even where torch has CUDA

CUDA: where the installed torch was built with CUDA (torch.version.cuda) and a CUDA toolkit is
found (CUDA_HOME, e.g. /usr/local/cuda), csrc/kernels_cuda.cu is compiled by nvcc and CUDA
tensors run on metricloss::cuda; otherwise the build says so and CUDA tensors are rejected with
a ValueError (csrc/kernels_cuda_stub.cpp).
"""
import os
import sys

from setuptools import setup
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

here = os.path.dirname(os.path.abspath(__file__))
include = os.path.normpath(os.path.join(here, "..", "include"))
if not os.path.isfile(os.path.join(include, "metricloss", "metricloss.hpp")):
    sys.exit(f"metricloss: C++ headers not found in {include}; build from the repository checkout")


def eigen_include():
    candidates = [os.environ.get("EIGEN3_INCLUDE_DIR", ""), "/usr/include/eigen3",
                  "/usr/local/include/eigen3", os.path.join(sys.prefix, "include", "eigen3")]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "Eigen", "Core")):
            return path
    sys.exit("metricloss: Eigen 3.4 not found (Debian: apt-get install libeigen3-dev, "
             "or set EIGEN3_INCLUDE_DIR)")


march = os.environ.get("METRICLOSS_MARCH", "native")
# torch 1.13's cpp_extension passes -std=c++14; the later -std=c++17 wins.
flags = ["-std=c++17", "-O3", "-DNDEBUG", "-g0", "-fvisibility=hidden"] + ([f"-march={march}"] if march else [])

sources = ["csrc/binding.cpp", "csrc/kernels_pairs.cpp", "csrc/kernels_batch.cpp",
           "csrc/kernels_all_pairs.cpp"]
common = dict(name="metricloss._C", include_dirs=[include, eigen_include()],
              extra_link_args=["-s"])  # stripped: the installed module carries no symbols

if os.environ.get("METRICLOSS_CUDA", "1") == "0":
    why_not_cuda = "METRICLOSS_CUDA=0"
elif torch.version.cuda is None:
    why_not_cuda = f"the installed torch {torch.__version__} has no CUDA"
elif CUDA_HOME is None:
    why_not_cuda = "no CUDA toolkit found (set CUDA_HOME)"
else:
    why_not_cuda = None

if why_not_cuda is None:
    print(f"metricloss: building the CPU and CUDA paths (torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}, nvcc from {CUDA_HOME})")
    # No -march for nvcc's host pass: kernels_cuda.cu runs no host SIMD, and the CUDA tests
    # build the same TU without it.
    nvcc = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
            "-Xcudafe=--diag_suppress=20012"]
    extension = CUDAExtension(sources=sources + ["csrc/kernels_cuda.cu"],
                              extra_compile_args={"cxx": flags, "nvcc": nvcc}, **common)
else:
    print(f"metricloss: building the CPU path only: {why_not_cuda}; CUDA tensors will be "
          "rejected with a ValueError")
    extension = CppExtension(sources=sources + ["csrc/kernels_cuda_stub.cpp"],
                             extra_compile_args=flags, **common)

setup(
    name="metricloss",
    version="0.1.0",
    description="Fused metric-learning losses (metricloss C++) as torch.nn.Module losses",
    packages=["metricloss"],
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
