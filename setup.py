from setuptools import setup; setup(cffi_modules=["hv/_build.py:ffibuilder"])
