"""Make the proof oracle (proof_oracle.py beside this file) importable from every plugin test directory."""

from __future__ import annotations

import pathlib
import sys

PLUGINS_TESTS_DIR = str(pathlib.Path(__file__).resolve().parent)
if PLUGINS_TESTS_DIR not in sys.path:
    sys.path.insert(0, PLUGINS_TESTS_DIR)
