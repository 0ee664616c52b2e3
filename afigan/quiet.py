"""Third-party notes a user cannot act on, filtered narrowly by their message (standard library
only: every entry point calls :func:`quiet_third_party` before it runs Detectron2's code;
tests/conftest.py filters the same ones in the test suite)."""

import logging
import warnings

__all__ = ["quiet_third_party"]


def _drop_fx_tracing_note(record: logging.LogRecord) -> bool:
    return "is_fx_tracing will return true" not in record.getMessage()


def _drop_no_cuda_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_third_party() -> None:
    """Filter the third-party warnings and log notes that every run of a Detectron2 model prints."""
    # Detectron2's anchor_generator.py calls torch.meshgrid without indexing= (torch asks for it).
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
    # Detectron2 moves inputs with a torch.jit.script_if_tracing function, which scripts it (and torch
    # warns that scripting is deprecated) whenever a model is traced: fvcore's FLOP counts, exports.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    # torch logs this note (once per process) when Detectron2's code asks torch.fx whether it is tracing.
    fx = logging.getLogger("torch.fx._symbolic_trace")
    if _drop_fx_tracing_note not in fx.filters:
        fx.addFilter(_drop_fx_tracing_note)
    # Detectron2's default_setup collects the environment, importing torch.utils.cpp_extension, which
    # logs that a CPU-only machine has no CUDA runtime.
    ext = logging.getLogger("torch.utils.cpp_extension")
    if _drop_no_cuda_note not in ext.filters:
        ext.addFilter(_drop_no_cuda_note)
