import os

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

from mfac_linalg import _backend as B

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=500, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# first runs on a lent GPU: few examples and no shrinking, so a failure costs seconds
settings.register_profile(
    "gpu-quick", max_examples=8, deadline=None, derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _gpu_param():
    return pytest.param("gpu", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not B.gpu_available(), reason="needs CuPy and a CUDA GPU")])


@pytest.fixture(params=["cpu", _gpu_param()])
def backend(request):
    """The backend under test: the CPU always, the GPU where CuPy sees one."""
    return B.backend_for_device(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch generator state, whatever ran before it (tests
    that draw with torch.randn without a generator are then reproducible, one by one)."""
    import sys
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)
    yield
