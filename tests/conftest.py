"""Make the shared helpers (clonesafe_testlib) importable from every test directory."""

from __future__ import annotations

import pathlib
import sys

TESTS_DIR = str(pathlib.Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
