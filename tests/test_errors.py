"""The error classes and the light modules load without torch (napari lists the plugin fast)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["errors", "axes", "devices", "metrics", "io", "inference"])
def test_module_imports_without_torch(module):
    code = (f"import sys, napari_sdunet.{module}; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_input_error_has_one_home():
    import napari_sdunet.inference as inference
    from napari_sdunet.errors import InputError

    assert inference.InputError is InputError and InputError.__module__ == "napari_sdunet.errors"
