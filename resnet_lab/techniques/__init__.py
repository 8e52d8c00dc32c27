"""The built-in techniques, one module each: importing this package registers them (`registry`).

Each module holds a technique's settings (`CONFIG`, typed `Field`s with their defaults), its transform, its
file format, its name in tables and its `registry.register(...)`. The order here is the order of 03's
methods and of the summary's columns.
"""
from . import half, int8, binaryconnect, qat, prune, svd  # noqa: F401  (each registers itself)
