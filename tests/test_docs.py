"""Execute the python code blocks of README.md and docs/*.md, each file in one namespace."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_doc_code_blocks_run(path):
    blocks = BLOCK.findall(path.read_text())
    if path.name in ("README.md", "getting-started.md", "static.md"):
        assert blocks, f"{path.name} lost its code examples"
    ns = {"__name__": f"doc_{path.stem}"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{path.name}[block {i}]", "exec"), ns)
