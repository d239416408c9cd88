"""Load other people's ``torch.save`` files without running their code.

A ``torch.save`` file is a pickle, and unpickling can call any function the file names
(``os.system`` included). :func:`load_torch_file` only ever calls
``torch.load(weights_only=True)``: tensors, containers and plain numbers load, anything else
is refused in one line naming what the file asks for, and nothing in it runs. The only
globals added to torch's own allowlist are numpy's numeric scalars and arrays (what
``sklearn`` metrics saved beside a checkpoint come back as); those rebuild data, not objects.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from .errors import ArtifactMismatch, StepprobeError

# numpy dtypes whose scalars/arrays hold numbers only.
_NUMPY_NUMERIC_DTYPES = ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
                         "Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128", "Byte", "UByte",
                         "Short", "UShort", "Int", "UInt", "Long", "ULong", "LongLong", "ULongLong")


def _numpy_globals() -> list[Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or np.core
    out: list[Any] = [np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, f"{n}DType") for n in _NUMPY_NUMERIC_DTYPES if hasattr(dtypes, f"{n}DType")]
    return out


def _unsafe_names(path: Path, message: str) -> list[str]:
    """What the file asks the unpickler for beyond the allowlist (without unpickling it)."""
    names: list[str] = []
    try:
        import torch

        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) files: read it from torch's refusal message instead
        pass
    allowed = {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', getattr(g, '__name__', ''))}"
               for g in _numpy_globals()}
    names = [n for n in names if n not in allowed]
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", message)
    return sorted(set(names))


RESAVE_HINT = ("If you trust it, re-save just its tensors: "
               "torch.save({'model_state_dict': ckpt['model_state_dict']}, 'clean.pt')")


def load_torch_file(path: str | os.PathLike, *, what: str = "checkpoint", mmap: bool = False,
                    hint: str = RESAVE_HINT) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line refusals.

    ``mmap`` maps tensor storage instead of reading it (zip-format files; legacy files are
    read whole). Raises :class:`~stepprobe.errors.ArtifactMismatch` for a file that needs
    full unpickling (naming the globals it wants) or is not a ``torch.save`` file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise StepprobeError(f"{what} not found: {path}")
    use_mmap = bool(mmap) and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        names = _unsafe_names(path, str(exc))
        if not names:  # not a call the unpickler refused: a damaged file or no torch.save file at all
            why = re.findall(r"WeightsUnpickler error: *([^\n]*)", str(exc)) or [type(exc).__name__]
            raise ArtifactMismatch(f"{path}: not a readable torch.save file (weights-only unpickler: "
                                   f"{why[0].strip()[:160] or 'refused'}); nothing in it was run") from None
        raise ArtifactMismatch(
            f"{path}: refused: this {what} needs full unpickling, which can run code (it names "
            f"{', '.join(names)}); stepprobe loads torch files with weights_only=True only. {hint}") from None
    except Exception as exc:  # noqa: BLE001 - junk bytes raise anything (IndexError from a stray BUILD opcode, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ArtifactMismatch(f"{path}: not a readable torch.save file ({first})") from None
