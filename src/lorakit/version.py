"""lorakit's version (its own module: files written anywhere below the package record it)."""

__version__ = "0.1.0"
