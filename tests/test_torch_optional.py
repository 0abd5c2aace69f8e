"""Without PyTorch: the library imports, and mfac_linalg.torch says which extra to install."""
import subprocess
import sys

CODE = """
import sys
sys.modules['torch'] = None            # as if PyTorch were not installed
import mfac_linalg
assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]
try:
    import mfac_linalg.torch
except ImportError as exc:
    assert "install the 'torch' extra" in str(exc), str(exc)
    print("ok")
else:
    raise SystemExit("mfac_linalg.torch imported without torch")
"""


def test_library_imports_without_torch_and_the_front_end_names_the_extra():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
