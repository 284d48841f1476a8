"""The optional C framer (proxy/_xmlframe.c over the system libexpat, DESIGN §8).

Everything else is in pyproject.toml.  `optional=True`: without a compiler, Python headers or
libexpat's headers the build of the extension fails quietly and the install goes on; the
proxy then frames with the pure-Python framer (proxy.xmlstream.FRAMER says which one runs).
"""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("proxy._xmlframe", sources=["proxy/_xmlframe.c"], libraries=["expat"], optional=True),
])
