"""Packaging and project hygiene: metadata, version, license, sdist contents, CI, docs."""
from __future__ import annotations

import importlib.metadata
import pathlib
import re

import pytest

import mfac_linalg

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "mfac_linalg"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def test_version_has_one_source():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "mfac_linalg.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+)?", mfac_linalg.__version__)
    # the installed metadata was read from it
    assert importlib.metadata.version("mfac-linalg") == mfac_linalg.__version__


def test_license_is_an_spdx_expression_with_its_file():
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]
    req = PYPROJECT["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77 for r in req)


def test_dependency_floors_are_plain_and_match_what_ci_installs():
    # .ci/run parses these floors and installs exactly them for the minimum-versions job
    floors = {}
    for dep in PROJECT["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", dep.replace(" ", ""))
        assert m, f"dependency without a plain >= floor: {dep!r}"
        floors[m.group(1)] = tuple(int(p) for p in m.group(2).split("."))
    assert set(floors) == {"numpy", "scipy"}
    assert floors["scipy"] >= (1, 12)          # cg(..., rtol=) is used in the docs and the demo
    assert "minimum versions" in (ROOT / ".ci" / "run").read_text()


def test_extras():
    extras = PROJECT["optional-dependencies"]
    assert extras["torch"] == ["torch>=2.1"]
    assert any(r.startswith("matplotlib") for r in extras["plot"])
    assert any(r.startswith("tqdm") for r in extras["progress"])
    assert any(r.startswith("mkdocs") for r in extras["docs"])
    assert any(r.startswith("mkdocstrings[python]") for r in extras["docs"])
    assert any(r.startswith("scikit-learn") for r in extras["examples"])
    assert any(r.startswith("curvlinops-for-pytorch") for r in extras["test-torch"])
    assert {"pytest>=7", "hypothesis>=6.80", "mpmath>=1.2"} <= set(extras["test"])
    assert any(r.startswith("mpmath") for r in extras["testing"])


def test_every_subpackage_is_found_automatically_and_typed():
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["mfac_linalg", "mfac_linalg.*"]
    assert list(PYPROJECT["tool"]["setuptools"]["packages"]) == ["find"]  # no hand-kept list
    from setuptools import find_packages
    found = set(find_packages(where=str(ROOT), include=find["include"]))
    # every folder of Python files is a package (has __init__.py) and is found
    folders = {p.parent for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}
    for folder in folders:
        assert (folder / "__init__.py").is_file(), f"{folder} has no __init__.py"
        assert ".".join(folder.relative_to(ROOT).parts) in found, folder
    assert (PKG / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["mfac_linalg"]


def test_sdist_manifest_carries_what_the_tests_need():
    manifest = (ROOT / "MANIFEST.in").read_text().split("\n")
    grafted = {line.split()[1] for line in manifest if line.startswith("graft ")}
    assert {"tests", "docs", "examples", "benchmarks", "mfac_linalg"} <= grafted
    included = " ".join(line for line in manifest if line.startswith("include "))
    for name in ("LICENSE", "README.md", "CHANGELOG.md", "mkdocs.yml", ".ci/run"):
        assert name in included and (ROOT / name).is_file()
    # every folder the tests read from is grafted
    used = set()
    for test in (ROOT / "tests").glob("test_*.py"):
        used |= set(re.findall(r'ROOT / "([a-z_]+)"', test.read_text()))
    assert used <= grafted | {"mfac_linalg"}, used - grafted


def test_changelog_follows_keep_a_changelog():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "keepachangelog.com" in text
    heads = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, re.M)
    assert heads[0] == ("Unreleased", "")
    versions = [v for v, _ in heads[1:]]
    assert mfac_linalg.__version__ in versions
    assert all(date for _, date in heads[1:])


def test_ci_installs_torch_first_and_treats_exit_5_as_failure():
    ci = (ROOT / ".ci" / "run").read_text()
    torch_at = ci.index('pip install -q "torch==2.13.0"')
    assert torch_at < ci.index("test-torch")           # before anything that depends on torch
    assert "PIP_CONSTRAINT" in ci                       # and nothing upgrades it afterwards
    assert 'pip install -q ".[test]" && run_pytest main' in ci   # the README's test command
    assert '"$rc" -eq 5' in ci
    assert "mkdocs build --strict" in ci and "build --sdist" in ci
    readme = (ROOT / "README.md").read_text()
    assert 'pip install ".[test]" && python -m pytest' in readme
    assert "pip install . && mfac-linalg demo" in readme


def test_docs_site_lists_every_page_and_the_api():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f": {page.name}" in nav, f"docs/{page.name} is not in the mkdocs nav"
    assert "mkdocstrings" in nav and "strict: true" in nav
    api = (ROOT / "docs" / "api.md").read_text()
    for name in ("StaticInverseFisher", "SlidingWindowInverseFisher", "BlockInverseFisher",
                 "kfac", "kpsvd", "obs", "testing"):
        assert f"::: mfac_linalg.{name}" in api


def test_docs_import_nothing_private_and_cite_their_own_maths_page():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        private = re.search(r"(from|import)\s+mfac_linalg(\.[a-z_]+)*\._[a-z]"
                            r"|from\s+mfac_linalg(\.[a-z_]+)*\s+import\s+\(?\s*_[a-z]", text)
        assert not private, (page.name, private.group(0))
        assert "MATH.md" not in text, page.name
    for src in PKG.rglob("*.py"):
        assert "MATH.md" not in src.read_text(), src


def test_math_page_sections_and_the_citations_that_point_at_them():
    text = (ROOT / "docs" / "math.md").read_text()
    numbers = [int(n) for n in re.findall(r"^## (\d+)\. ", text, re.M)]
    assert numbers == list(range(1, 11))
    cited = set()
    for src in [*PKG.rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]:
        body = src.read_text()
        cited |= {int(n) for n in re.findall(r"docs/math\.md (?:§|section )(\d+)", body)}
    assert cited and cited <= set(numbers), sorted(cited - set(numbers))


def test_public_signatures_of_the_cli_and_progress_are_annotated():
    import inspect

    from mfac_linalg import _progress, cli
    for fn in (cli.main, cli.run_demo, cli.build_parser, cli.demo_max_dim, _progress.progress):
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, fn.__name__
        for p in sig.parameters.values():
            assert p.annotation is not inspect.Parameter.empty, (fn.__name__, p.name)
