"""Files that are written whole or not at all: results (JSON) and caches (torch.save), each via a temporary file in
the same folder and an atomic rename, so a crash or a parallel job never sees half a file."""

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_cache(obj: object, path: Path, what: str) -> None:
    """torch.save `obj` atomically. A cache that cannot be written only costs time, hence a warning, not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            torch.save(obj, f)
        os.replace(f.name, path)
    except OSError as e:
        warnings.warn(
            f"Could not cache {what} in {path.parent} ({e}); it will be made again next time. "
            "Set $AUTOENCODERS_CACHE (or the cache_dir setting) to a writable folder.",
            stacklevel=3,
        )
