"""Data sets and benchmark specs (the first stage: what is fed to the model)."""

from .benchmark import Benchmark, Split
from .digits import load_digits_benchmark
from .transforms import ImageNormalize

__all__ = ["Benchmark", "Split", "load_digits_benchmark", "ImageNormalize"]
