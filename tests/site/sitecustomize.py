"""For the signal tests (tests/stopped_import.py): on PYTHONPATH, with STOPPED_IMPORT_IN naming a module, that module's
import first imports tests.stopped_import, which waits for a signal there; with STOPPED_IMPORT_SWALLOWED set, as a
check of whether a package imports (lightning_utilities.module_available), which swallows the ImportError."""

import os
import sys


class _StoppedImport:
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == os.environ.get("STOPPED_IMPORT_IN"):
            sys.meta_path.remove(self)
            try:
                import tests.stopped_import  # noqa: F401
            except ImportError:
                if not os.environ.get("STOPPED_IMPORT_SWALLOWED"):
                    raise


if os.environ.get("STOPPED_IMPORT_IN"):
    sys.meta_path.insert(0, _StoppedImport())
