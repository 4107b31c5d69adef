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


def check_cpp_compiler(compiled: list[str]) -> None:
    """Refuse the settings in ``compiled`` (as typed, e.g. ``model.train_forward.compile=true``)
    when no C++ compiler is found: torch.compile needs one on CPU."""
    if compiled and (missing := cpp_compiler_missing()):
        raise ValueError(f"{' and '.join(compiled)} need(s) a C++ compiler for torch.compile on CPU ({missing}); "
                         "accepted without one: train_forward.compile false, engine.fast.compile_decode false")
