"""Execute the ```py code blocks of docs/torch.md in one namespace (needs torch)."""
import pathlib
import re

import pytest

pytest.importorskip("torch")

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "torch.md"
BLOCK = re.compile(r"^```py\n(.*?)^```", re.S | re.M)


def test_torch_page_code_blocks_run(capsys):
    blocks = BLOCK.findall(PAGE.read_text())
    assert len(blocks) >= 6, "docs/torch.md lost its code examples"
    ns = {"__name__": "doc_torch"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"torch.md[block {i}]", "exec"), ns)
    assert "loss before" in capsys.readouterr().out
