"""Verifiable tasks: the embedded arithmetic and variable-length addition tasks, GSM8K and MATH-500."""

from reclight.tasks.base import SPLITS, Example, Task
from reclight.tasks.gsm8k import GSM8K
from reclight.tasks.jsonl import DataError, read_jsonl
from reclight.tasks.math500 import Math500
from reclight.tasks.varlen import VarLenAddition

__all__ = ["SPLITS", "Example", "Task", "GSM8K", "Math500", "VarLenAddition", "DataError", "read_jsonl"]
