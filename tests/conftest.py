"""Shared pytest setup: put the repository root on sys.path so the project's packages (models,
data, arguments, ...) import when pytest is started from anywhere.
"""

from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
