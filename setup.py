"""Builds stepcoder._sandbox, the C++ runner, with pybind11 (C++17, -O2, warnings on).

Everything else about the package lives in pyproject.toml.
"""
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

sources = sorted(str(path) for path in Path("csrc").glob("*.cpp"))

sandbox = Pybind11Extension(
    "stepcoder._sandbox",
    sources,
    cxx_std=17,
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)

setup(ext_modules=[sandbox])
