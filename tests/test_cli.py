import subprocess
import sys

from napari_sdunet import __version__
from napari_sdunet.cli import main


def test_version_and_models(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert __version__ in capsys.readouterr().out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "11,000,635" in out and "1,799,393" in out and "7,243,169" in out


def test_console_script_installed():
    r = subprocess.run([sys.executable, "-m", "napari_sdunet", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and __version__ in r.stdout
