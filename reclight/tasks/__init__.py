"""Verifiable tasks: the embedded arithmetic task, GSM8K and MATH-500."""

from reclight.tasks.base import SPLITS, Example, Task

__all__ = ["SPLITS", "Example", "Task"]
