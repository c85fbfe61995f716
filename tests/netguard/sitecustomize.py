"""Python imports this at start-up in every process the tests start (conftest puts this folder on PYTHONPATH): the
network guard of netguard.py in the child too, which names the test from PYTEST_CURRENT_TEST (inherited)."""
import importlib.machinery
import importlib.util
import os
import sys

import netguard

netguard.install()

# This file shadows any other sitecustomize on the path (Debian's, a virtual environment's): run that one too.
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
if _spec is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
