"""The backend boundary (issue 10 item 5, DESIGN.md): only ``_backend.py``, ``kernels/``
and the CUDA ring buffer ``sliding/cuda_buffer.py`` touch CuPy or the device.

The scan parses every module of the package (``ast``, no import) and reports:

* imports of ``cupy`` / ``cupyx`` (any submodule) and of the package's ``kernels``;
* calls of ``.get()`` (no arguments: a device-to-host copy) and of ``memset_async``;
* comparisons with the string ``"gpu"`` (device switches belong behind ``_backend``).
"""
import ast
import pathlib

import pytest

import mfac_linalg

PKG = pathlib.Path(mfac_linalg.__file__).resolve().parent
ALLOWED = {"_backend.py", "sliding/cuda_buffer.py"}
ALLOWED_DIRS = ("kernels/",)


def _allowed(rel):
    return rel in ALLOWED or rel.startswith(ALLOWED_DIRS)


def _is_device_module(name):
    return name.split(".")[0] in ("cupy", "cupyx")


def _imports_kernels(node, rel):
    if isinstance(node, ast.ImportFrom):
        mod = node.module or ""
        parts = mod.split(".")
        if node.level and (parts[0] == "kernels" or (mod == "" and any(
                a.name == "kernels" for a in node.names))):
            return True
        return mod.startswith("mfac_linalg.kernels") or (
            mod == "mfac_linalg" and any(a.name == "kernels" for a in node.names))
    return any(a.name.startswith("mfac_linalg.kernels") for a in node.names)


def _strings(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def violations(source, rel):
    """``(line, what)`` for each boundary crossing in one module's source."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_device_module(a.name):
                    out.append((node.lineno, f"import {a.name}"))
            if _imports_kernels(node, rel):
                out.append((node.lineno, "imports the kernels"))
        elif isinstance(node, ast.ImportFrom):
            if node.module and not node.level and _is_device_module(node.module):
                out.append((node.lineno, f"from {node.module} import ..."))
            if _imports_kernels(node, rel):
                out.append((node.lineno, "imports the kernels"))
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if isinstance(f, ast.Attribute) and name == "get" and not node.args \
                    and not node.keywords:
                out.append((node.lineno, ".get() (a device-to-host copy)"))
            if name == "memset_async":
                out.append((node.lineno, "memset_async"))
        elif isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                if "gpu" in _strings(side):
                    out.append((node.lineno, 'a comparison with "gpu"'))
    return out


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_scanner_finds_every_kind_of_crossing():
    src = '''
import cupy as cp
import cupyx.scipy.linalg
from cupyx.scipy.sparse.linalg import LinearOperator
from .kernels import sliding
from . import kernels
from ..kernels.sliding import trsv
import mfac_linalg.kernels
x = a.get()
y = d.get("key")                 # a dict lookup: fine
cp.cuda.runtime.memset_async(p, 0, n, s)
if backend.name == "gpu": pass
if kind in ("gpu", "cuda"): pass
if backend.name == "cpu": pass   # not a device switch by this rule
'''
    found = violations(src, "x.py")
    assert [line for line, _ in found] == [2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_backend_boundary(path):
    rel = path.relative_to(PKG).as_posix()
    if _allowed(rel):
        pytest.skip("inside the boundary")
    found = violations(path.read_text(encoding="utf-8"), rel)
    assert not found, f"{rel} crosses the backend boundary: " + "; ".join(
        f"line {line}: {what}" for line, what in found)
