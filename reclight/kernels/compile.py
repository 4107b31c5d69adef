"""Whether ``torch.compile`` can build kernels here (the compiled paths' up-front check)."""

from __future__ import annotations


def cpp_compiler_missing() -> str | None:
    """Why torch.compile on CPU would find no C++ compiler (None: one is there)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # pragma: no cover - a torch without inductor's builder: let compile report it
        return None
    try:
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - any failure to find one is the same problem for the user
        return f"{type(e).__name__}: {e}; set CXX or install g++"
    return None
