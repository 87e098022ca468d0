"""Build script. The package is pure Python today; the native kernels of csrc/ are
added here as torch.utils.cpp_extension modules when they land."""

from setuptools import setup

setup()
