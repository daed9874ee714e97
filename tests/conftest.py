"""Shared fixtures. Tests needing the real data sets skip when ../shared/data is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

try:  # load triton (when installed) before any viewer: loading it after Mesa's llvmpipe GL crashes
    import triton  # noqa: F401
except ImportError:
    pass

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a reason when it is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the real data set at {path} (only CI and the developers' machines have "
                    "../shared/data; see sample_data/README.md)")
    return path


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _isolated_user_models(tmp_path_factory, monkeypatch):
    """Never touch the real user models folder from a test."""
    monkeypatch.setenv("NAPARI_SDUNET_MODELS", str(tmp_path_factory.mktemp("user_models")))


@pytest.fixture
def one_torch_thread():
    """Tiny models train fastest on one thread (and do not thrash a busy CI machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def precision_calls(monkeypatch):
    """The ``precision`` of every ``inference.iter_predict`` call (the CLI and the widget's path), in order."""
    import napari_sdunet.inference as inference

    seen: list[str | None] = []
    real = inference.iter_predict

    def spy(*args, **kwargs):
        seen.append(kwargs.get("precision"))
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "iter_predict", spy)
    return seen
