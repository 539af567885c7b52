"""Builds the optional native extension ``attenuation._C`` from csrc/.

The C++ (CPU) sources are always compiled when present; the CUDA sources only when a CUDA toolkit
is found (``CUDA_HOME`` or nvcc on PATH) and ``ATTENUATION_NO_CUDA`` is not set. With no sources, no
torch at build time, or ``ATTENUATION_NO_EXT=1``, the package installs without the extension and
runs on the reference backend. Build with ``pip install --no-build-isolation -e .`` so that pip uses
the installed torch instead of fetching another copy.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_library_headers():
    """Include dirs of the CUDA libraries that the torch wheel installs as pip packages (nvidia-*):
    a bare toolkit may lack some headers that ATen/cuda/CUDAContext.h includes (cusparse.h)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted({os.path.dirname(h) for loc in spec.submodule_search_locations
                   for h in glob.glob(os.path.join(loc, "*", "include", "cusparse.h"))})


def _native_extensions():
    if os.environ.get("ATTENUATION_NO_EXT") == "1":
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not cpp_sources:
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("attenuation: torch is not importable at build time; skipping the native extension "
              "(use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    use_cuda = (bool(cuda_sources) and os.environ.get("ATTENUATION_NO_CUDA") != "1"
                and cpp_extension.CUDA_HOME is not None)
    # sm_80 code runs on every Ampere and Ada GPU (8.x), sm_90 on Hopper; the PTX of 9.0 is compiled
    # by the driver for anything newer. Two architectures keep the build short.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    extra = {"cxx": ["-O3", "-std=c++20", "-fopenmp-simd"]}
    if use_cuda:
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        extension = cpp_extension.CUDAExtension(
            "attenuation._C", cpp_sources + cuda_sources, extra_compile_args=extra,
            define_macros=[("ATTENUATION_WITH_CUDA", "1")], include_dirs=include_dirs + _cuda_library_headers())
    else:
        extension = cpp_extension.CppExtension(
            "attenuation._C", cpp_sources, extra_compile_args=extra,
            include_dirs=include_dirs)
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extensions()

setup(
    packages=find_packages(include=["attenuation", "attenuation.*"]) + ["attenuation_triton"],
    package_dir={"attenuation_triton": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
