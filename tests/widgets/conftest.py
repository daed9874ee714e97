"""Fixtures for the widget tests: small checkpoints and a notification catcher."""

from __future__ import annotations

import pytest

from tests.test_inference import make_checkpoint


@pytest.fixture
def checkpoints(tmp_path):
    """Small U-Net checkpoints per task whose output is foreground everywhere (logit +10)."""
    return {task: make_checkpoint(tmp_path / f"unet-{task}", task=task, bias=10.0)
            for task in ("nuclei", "polyps", "liver")}


@pytest.fixture
def errors(monkeypatch):
    """Messages shown with napari's show_error during the test."""
    import napari.utils.notifications as notifications

    seen: list[str] = []
    monkeypatch.setattr(notifications, "show_error", lambda message: seen.append(str(message)))
    return seen
