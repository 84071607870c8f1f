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
"""
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

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

setup(
    name="metricloss",
    version="0.1.0",
    description="Fused metric-learning losses (metricloss C++) as torch.nn.Module losses",
    packages=["metricloss"],
    ext_modules=[
        CppExtension(
            name="metricloss._C",
            sources=["csrc/binding.cpp", "csrc/kernels_pairs.cpp", "csrc/kernels_batch.cpp",
                     "csrc/kernels_all_pairs.cpp"],
            include_dirs=[include, eigen_include()],
            extra_compile_args=flags,
            extra_link_args=["-s"],  # stripped: the installed module carries no symbols
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
