"""Bad inputs never crash or destroy (issue 16): each case gets a clear error or a correct result.

Every CLI case checks: a non-zero exit with one ``error:`` line and no traceback (or the right
result), and no file changed that the user did not name. Untrusted checkpoint configs are loaded
in a child process whose peak memory is bounded. Real microscopy is 12/16-bit, so every pixel type
must segment like the 8-bit original, through the API, the CLI and the fine-tuning engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_sdunet import create_model, io, load_checkpoint, save_checkpoint
from napari_sdunet.checkpoint import clean_stale_temporaries
from napari_sdunet.cli import main
from napari_sdunet.errors import (
    CheckpointError,
    InputError,
    ModelConfigError,
    OutputError,
    SdunetError,
)
from napari_sdunet.inference import load_model, predict, segment, to_labels
from napari_sdunet.metrics import dice
from napari_sdunet.tasks import TASKS
from tests.conftest import REPO, shared_data
from tests.test_inference import make_checkpoint

SAMPLES = REPO / "sample_data"


# ----------------------------------------------------------------------------- helpers

def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (hidden temporaries included)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; it must return (never raise) and print no traceback."""
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    return rc, cap.out, cap.err


def assert_clean_error(rc: int, err: str, *words: str) -> None:
    assert rc == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("napari-sdunet: error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def nuclei() -> tuple[np.ndarray, np.ndarray]:
    """The shipped nuclei sample (uint8 RGB) and its reference mask."""
    return io.read_image(SAMPLES / "nuclei_image.png").data, io.read_mask(SAMPLES / "nuclei_labels.png")


def dtype_copies(img: np.ndarray) -> dict[str, np.ndarray]:
    """Copies of an 8-bit image in the pixel types microscopy files come in."""
    f = img.astype(np.float64)
    return {
        "uint16 (same values)": img.astype(np.uint16),
        "uint16 12-bit": np.round(f * 4095 / 255).astype(np.uint16),
        "uint16 16-bit": img.astype(np.uint16) * 257,
        "int16 12-bit": (img.astype(np.int16) * 16),
        "int32": img.astype(np.int32),
        "float32 0..4095": (f * 4095 / 255).astype(np.float32),
        "float32 0..1": (f / 255).astype(np.float32),
        "float64 (same values)": f,
    }


@pytest.fixture(scope="module")
def nuclei_model():
    return load_model("sdunet-nuclei", "cpu")


# ----------------------------------------------------------------------------- 1. pixel types

def test_every_pixel_type_segments_like_the_8bit_original_api(nuclei, nuclei_model):
    img, ref = nuclei
    mask8, _ = segment(nuclei_model, img, "YXC")
    d8 = dice(mask8, ref)
    assert d8 > 0.85
    for name, arr in dtype_copies(img).items():
        mask, prob = segment(nuclei_model, arr, "YXC")
        assert prob.dtype == np.float32, name
        assert abs(dice(mask, ref) - d8) <= 0.01, name
    # bool (a thresholded image) and a grey 16-bit single channel run and give a mask, no crash
    mask, _ = segment(nuclei_model, img[..., 0] > 40, "YX")
    assert mask.shape == img.shape[:2]
    mask, _ = segment(nuclei_model, img[..., 0].astype(np.uint16) * 16, "YX")
    assert abs(dice(mask, ref) - dice(segment(nuclei_model, img[..., 0], "YX")[0], ref)) <= 0.01


def test_pixel_types_on_real_images_api(nuclei_model):
    root = shared_data("nuclei")
    names = sorted((root / "images").iterdir())[:3]
    for p in names:
        img = io.read_image(p).data[..., :3]
        ref = io.read_mask(root / "masks" / p.name)
        d8 = dice(segment(nuclei_model, img, "YXC")[0], ref)
        for name, arr in dtype_copies(img).items():
            assert abs(dice(segment(nuclei_model, arr, "YXC")[0], ref) - d8) <= 0.01, (p.name, name)


def test_every_pixel_type_through_the_cli(tmp_path, nuclei, capsys):
    img, ref = nuclei
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    io.write_image(images / "u8.png", img)
    for i, arr in enumerate(dtype_copies(img).values()):
        tifffile.imwrite(images / f"t{i}.tif", arr, photometric="rgb")
    from PIL import Image

    Image.fromarray(img[..., 0].astype(np.uint16) * 16).save(images / "grey16.png")  # a 16-bit PNG
    for p in list(images.iterdir()):
        io.write_image(masks / f"{io.stem(p)}.png", ref)
    rc, out, err = run_cli(["predict", "--model", "sdunet-nuclei", "--device", "cpu", "-o", tmp_path / "out", images],
                           capsys)
    assert rc == 0, err
    base = io.read_mask(tmp_path / "out" / "u8.png")
    for i in range(len(dtype_copies(img))):
        assert dice(io.read_mask(tmp_path / "out" / f"t{i}.png"), base) >= 0.99, i
    assert (tmp_path / "out" / "grey16.png").is_file()
    rc, out, err = run_cli(["evaluate", "--model", "sdunet-nuclei", "--device", "cpu", "--images", images,
                            "--masks", masks, "--json"], capsys)
    assert rc == 0, err
    per = {ln.split(":")[0]: float(ln.split()[2]) for ln in out.splitlines() if ": dice " in ln}
    for i in range(len(dtype_copies(img))):
        assert abs(per[f"t{i}.tif"] - per["u8.png"]) <= 0.01


def test_every_pixel_type_through_finetune(tmp_path, nuclei, one_torch_thread):
    from napari_sdunet.finetune import finetune

    img, ref = nuclei
    kw = dict(steps=1, batch_size=1, val_fraction=0.0, augment=False, device="cpu")
    base = finetune("unet-nuclei", [(img, ref)], tmp_path / "u8", **kw)
    for i, (name, arr) in enumerate(dtype_copies(img).items()):
        res = finetune("unet-nuclei", [(arr, ref)], tmp_path / f"ft{i}", **kw)
        assert res.path is not None and (res.path / "model.safetensors").is_file(), name
        assert abs(res.dice_before - base.dice_before) <= 0.01, name
        assert np.isfinite(res.dice_after), name


def test_pixel_types_through_the_finetune_cli(tmp_path, nuclei, capsys, one_torch_thread):
    img, ref = nuclei
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    for i, arr in enumerate(dtype_copies(img).values()):
        tifffile.imwrite(images / f"t{i}.tif", arr, photometric="rgb")
        io.write_image(masks / f"t{i}.png", ref)
    rc, out, err = run_cli(["finetune", "--model", "unet-nuclei", "--images", images, "--masks", masks,
                            "-o", tmp_path / "tuned", "--steps", "1", "--batch-size", "2", "--device", "cpu",
                            "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["n_train"] + res["n_val"] == len(dtype_copies(img)) and np.isfinite(res["dice_after"])
    assert snapshot(images) and (tmp_path / "tuned" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- 2. overwriting

@pytest.fixture
def dataset(tmp_path):
    """DATA/images and DATA/masks with matching names, and a tiny model that predicts everything."""
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "DATA" / "images", tmp_path / "DATA" / "masks"
    for name in ("a", "b", "c"):
        io.write_image(images / f"{name}.png", rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
        m = np.zeros((40, 50), np.uint8)
        m[5:20, 5:30] = 255
        io.write_image(masks / f"{name}.png", m)
    model = make_checkpoint(tmp_path / "model", bias=10.0)
    return images, masks, model


def test_predict_never_overwrites_reference_masks(dataset, capsys):
    images, masks, model = dataset
    data = images.parent
    before = snapshot(data)
    rc, out, err = run_cli(["predict", "--model", model, "--device", "cpu", "-o", masks, images], capsys)
    assert rc == 0
    assert snapshot(data) == before  # nothing changed
    assert "kept 3 existing" in err and "a.png" in err and "--overwrite" in err
    # only the missing one is written
    (masks / "b.png").unlink()
    rc, out, err = run_cli(["predict", "--model", model, "--device", "cpu", "-o", masks, images], capsys)
    assert rc == 0 and "wrote 1 mask" in out
    assert snapshot(masks)["a.png"] == before["masks/a.png"]
    # --overwrite replaces them (the model predicts every pixel)
    rc, out, err = run_cli(["predict", "--model", model, "--device", "cpu", "-o", masks, images, "--overwrite"],
                           capsys)
    assert rc == 0 and io.read_mask(masks / "a.png").all()
    assert snapshot(images) == {k[len("images/"):]: v for k, v in before.items() if k.startswith("images/")}


def test_predict_never_overwrites_its_input_even_with_overwrite(dataset, capsys):
    images, masks, model = dataset
    before = snapshot(images)
    rc, out, err = run_cli(["predict", "--model", model, "--device", "cpu", "-o", images, images, "--overwrite"],
                           capsys)
    assert rc == 1 and "overwrite an input" in err and "3 of 3" in err
    assert snapshot(images) == before


def test_output_naming_a_file_is_a_message(dataset, capsys):
    images, masks, model = dataset
    target = masks / "a.png"
    before = snapshot(masks)
    rc, out, err = run_cli(["predict", "--model", model, "-o", target, images / "b.png"], capsys)
    assert_clean_error(rc, err, "is a file")
    assert snapshot(masks) == before


def test_two_inputs_with_one_stem_do_not_overwrite_each_other(tmp_path, capsys):
    model = make_checkpoint(tmp_path / "model", bias=10.0)
    io.write_image(tmp_path / "in" / "x.png", np.zeros((20, 20), np.uint8))
    tifffile.imwrite(tmp_path / "in" / "x.tif", np.zeros((20, 20), np.uint8))
    rc, out, err = run_cli(["predict", "--model", model, "-o", tmp_path / "out", tmp_path / "in"], capsys)
    assert rc == 1 and "same file stem" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.png"]


# ----------------------------------------------------------------------------- 4. untrusted config.json

@pytest.fixture
def small_ckpt(tmp_path) -> Path:
    m = create_model("sdunet", task="nuclei", base_filters=4, sdn_state=8)
    return save_checkpoint(m, tmp_path / "ckpt", task="nuclei", preprocessing=TASKS["nuclei"].preprocessing.to_dict())


BAD_CONFIGS = {
    "depth 1000": lambda c: c["model"].update(depth=1000),
    "depth -1": lambda c: c["model"].update(depth=-1),
    "depth 2.5": lambda c: c["model"].update(depth=2.5),
    "depth true": lambda c: c["model"].update(depth=True),
    "base_filters 1e9": lambda c: c["model"].update(base_filters=10**9),
    "base_filters -5": lambda c: c["model"].update(base_filters=-5),
    "base_filters 0": lambda c: c["model"].update(base_filters=0),
    "sdn_state 1e9": lambda c: c["model"].update(sdn_state=10**9),
    "sdn_state -5": lambda c: c["model"].update(sdn_state=-5),
    "sdn_state 0": lambda c: c["model"].update(sdn_state=0),
    "in_channels 0": lambda c: c["model"].update(in_channels=0),
    "huge but in bounds": lambda c: c["model"].update(base_filters=512, depth=8),
    "sdn_directions [7]": lambda c: c["model"].update(sdn_directions=[7]),
    "sdn levels text": lambda c: c["model"].update(sdn_encoder_levels="abc"),
    "unknown model key": lambda c: c["model"].update(evil=1),
    "input_size 100000": lambda c: c["preprocessing"].update(input_size=[100000, 100000]),
    "input_size text": lambda c: c["preprocessing"].update(input_size="big"),
    "ct_window reversed": lambda c: c["preprocessing"].update(ct_window=[100, -100]),
    "channels -1": lambda c: c["preprocessing"].update(channels=-1),
    "weights.file traversal": lambda c: c["weights"].update(file="../../../../etc/passwd"),
    "weights.file absolute": lambda c: c["weights"].update(file="/etc/passwd"),
    "weights.file number": lambda c: c["weights"].update(file=5),
    "sha256 not hex": lambda c: c["weights"].update(sha256="zz"),
    "format_version [1]": lambda c: c.update(format_version=[1]),
    "format_version 99": lambda c: c.update(format_version=99),
    "weights 'x'": lambda c: c.update(weights="x"),
    "preprocessing 'abc'": lambda c: c.update(preprocessing="abc"),
    "model list": lambda c: c.update(model=[1, 2]),
    "arch number": lambda c: c.update(arch=3),
    "arch unknown": lambda c: c.update(arch="resnet"),
    "task number": lambda c: c.update(task=5),
    "not an object": lambda c: c.clear() or c.update(format=1),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_a_checkpoint_error(small_ckpt, case, monkeypatch):
    import napari_sdunet.checkpoint as ck

    cfg = json.loads((small_ckpt / "config.json").read_text())
    BAD_CONFIGS[case](cfg)
    (small_ckpt / "config.json").write_text(json.dumps(cfg))
    hashed = []
    real = ck._sha256
    monkeypatch.setattr(ck, "_sha256", lambda p: hashed.append(Path(p)) or real(p))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(small_ckpt)
    assert str(e.value) and "Traceback" not in str(e.value)
    assert all(p.resolve().parent == small_ckpt.resolve() for p in hashed)  # nothing outside was read


def test_weights_symlink_out_of_the_folder_is_refused(small_ckpt, tmp_path):
    outside = tmp_path / "outside.safetensors"
    (small_ckpt / "model.safetensors").rename(outside)
    (small_ckpt / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the model folder"):
        load_checkpoint(small_ckpt)


def test_header_is_checked_before_any_allocation(small_ckpt, monkeypatch):
    """A config that asks for a bigger (in-bounds) net than the file holds fails on the header."""
    import safetensors.torch

    cfg = json.loads((small_ckpt / "config.json").read_text())
    cfg["model"]["base_filters"] = 64
    (small_ckpt / "config.json").write_text(json.dumps(cfg))

    def no_load(*a, **k):
        raise AssertionError("weights were read before the header was checked")

    monkeypatch.setattr(safetensors.torch, "load_file", no_load)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(small_ckpt)


def test_bad_configs_use_bounded_memory(small_ckpt, tmp_path):
    """Every bad config in one child process: its peak memory stays far below what they ask for."""
    folders = []
    for i, case in enumerate(sorted(BAD_CONFIGS)):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((small_ckpt / "model.safetensors").read_bytes())
        cfg = json.loads((small_ckpt / "config.json").read_text())
        BAD_CONFIGS[case](cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
        folders.append(str(folder))
    script = textwrap.dedent("""
        import resource, sys
        from napari_sdunet import load_checkpoint
        from napari_sdunet.errors import CheckpointError
        import napari_sdunet.models, safetensors.torch  # imports are not what is measured
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for f in sys.argv[1:]:
            try:
                load_checkpoint(f)
            except CheckpointError:
                pass
            else:
                raise SystemExit(f"{f} loaded")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script, *folders], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 300  # MB above the baseline (imports included)


def test_bad_model_folder_through_the_cli(small_ckpt, tmp_path, capsys):
    cfg = json.loads((small_ckpt / "config.json").read_text())
    cfg["model"]["depth"] = 1000
    (small_ckpt / "config.json").write_text(json.dumps(cfg))
    io.write_image(tmp_path / "in" / "a.png", np.zeros((20, 20), np.uint8))
    rc, out, err = run_cli(["predict", "--model", small_ckpt, "-o", tmp_path / "out", tmp_path / "in"], capsys)
    assert_clean_error(rc, err, "depth")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 5. messages, not tracebacks

@pytest.mark.parametrize("kwargs", [
    dict(depth=-1), dict(depth=2.5), dict(depth=0), dict(sdn_state=0), dict(base_filters=0),
    dict(in_channels=0), dict(out_channels=0), dict(sdn_directions=[]), dict(sdn_residual="yes"),
    dict(no_such_setting=1), dict(depth=8, base_filters=512),
])
def test_create_model_rejects_bad_arguments(kwargs):
    with pytest.raises(ModelConfigError):
        create_model("sdunet", task="nuclei", **kwargs)


def test_create_model_bad_names():
    for arch, task in (("resnet", None), (None, None), ("unet", "brain")):
        with pytest.raises(ModelConfigError):
            create_model(arch, task=task)


def test_api_argument_errors_are_the_packages_own(tmp_path):
    loaded = load_model(make_checkpoint(tmp_path / "m"), "cpu")
    img = np.zeros((32, 32), np.uint8)
    cases = [
        lambda: predict(loaded, img, None),
        lambda: predict(loaded, img, 5),
        lambda: predict(loaded, img, "QQ"),
        lambda: predict(loaded, img, "ZYX"),
        lambda: predict(loaded, img, "YX", batch_size=0),
        lambda: predict(loaded, img, "YX", batch_size=2.5),
        lambda: predict(loaded, img, "YX", ct_window=(5, 1)),
        lambda: predict(loaded, img, "YX", ct_window="abc"),
        lambda: predict(loaded, img, "YX", modality="xray"),
        lambda: predict(None, img, "YX"),
        lambda: predict(loaded, None, "YX"),
        lambda: predict(loaded, np.zeros((0, 5)), "YX"),
        lambda: predict(loaded, np.array([["a"]]), "YX"),
        lambda: predict(loaded, np.full((8, 8), np.inf, np.float32), "YX"),
        lambda: to_labels(np.zeros(3), threshold=1.5),
        lambda: to_labels(np.zeros(3), threshold="x"),
        lambda: segment(None, img),
        lambda: load_checkpoint(None),
        lambda: load_checkpoint(tmp_path / "nothing"),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(SdunetError) as e:
            case()
        assert str(e.value), i


def test_load_pretrained_none():
    from napari_sdunet import load_pretrained

    for bad in (None, 3, ["x"]):
        with pytest.raises(SdunetError, match="a model is a name"):
            load_pretrained(bad)
    with pytest.raises(SdunetError, match="no model named ''"):
        load_pretrained("")


@pytest.fixture
def cli_data(tmp_path):
    model = make_checkpoint(tmp_path / "model", bias=10.0)
    images, masks = tmp_path / "images", tmp_path / "masks"
    io.write_image(images / "a.png", np.zeros((24, 24, 3), np.uint8))
    io.write_image(masks / "a.png", np.full((24, 24), 255, np.uint8))
    return tmp_path, model, images, masks


def run_cli_or_usage(argv: list[str], capsys) -> tuple[int, str, str]:
    """Like :func:`run_cli`, but an argparse usage error (exit status 2) counts as a result too."""
    try:
        return run_cli(argv, capsys)
    except SystemExit as e:
        cap = capsys.readouterr()
        assert "Traceback" not in cap.err
        return int(e.code), cap.out, cap.err


@pytest.mark.parametrize("args, words", [
    (["--threshold", "2"], ["threshold"]),
    (["--threshold", "abc"], ["number"]),
    (["--batch-size", "0"], ["1 or more"]),
    (["--batch-size", "2.5"], ["whole number"]),
    (["--axes", "QQ"], ["invalid choice"]),
    (["--ct-window", "5", "1"], ["LO < HI"]),
    (["--ct-window", "nan", "1"], ["finite"]),
    (["--device", "tpu"], ["unknown device"]),
    (["--modality", "xray"], ["invalid choice"]),
])
def test_bad_cli_options(cli_data, capsys, args, words):
    root, model, images, masks = cli_data
    before = snapshot(root)
    rc, out, err = run_cli_or_usage(["predict", "--model", model, "-o", root / "out", images, *args], capsys)
    assert rc in (1, 2) and "error:" in err, err  # 2: argparse usage error, before anything runs
    assert any(w in err for w in words), err
    after = snapshot(root)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before
    assert not (root / "out").exists() or not any((root / "out").iterdir())


def test_cli_missing_and_empty_inputs(cli_data, capsys):
    root, model, images, masks = cli_data
    empty = root / "empty"
    empty.mkdir()
    for argv, words in [
        (["predict", "--model", model, "-o", root / "out", root / "nope.png"], ["does not exist"]),
        (["predict", "--model", model, "-o", root / "out", empty], ["no image"]),
        (["predict", "--model", root / "nomodel", "-o", root / "out", images], ["no model"]),
        (["predict", "--model", "", "-o", root / "out", images], ["no model"]),
        (["evaluate", "--model", model, "--images", empty, "--masks", masks], ["no image"]),
        (["evaluate", "--model", model, "--images", root / "nope", "--masks", masks], ["not a folder"]),
        (["finetune", "--model", model, "--images", images, "--masks", masks, "-o", images / "a.png"], ["folder"]),
    ]:
        rc, out, err = run_cli(argv, capsys)
        assert_clean_error(rc, err, *words)


# ----------------------------------------------------------------------------- 6. masks and batches

def test_negative_mask_values_are_foreground(cli_data, capsys):
    root, model, images, masks = cli_data
    (masks / "a.png").unlink()
    tifffile.imwrite(masks / "a.tif", np.full((24, 24), -1, np.int16))  # label -1 everywhere
    rc, out, err = run_cli(["evaluate", "--model", model, "--images", images, "--masks", masks, "--json"], capsys)
    assert rc == 0
    assert json.loads(out.strip().splitlines()[-1])["dice"] == 1.0  # all-foreground model, all -1 mask
    assert io.read_mask(masks / "a.tif").all()


def test_all_empty_masks_warn(cli_data, capsys):
    root, model, images, masks = cli_data
    io.write_image(masks / "a.png", np.zeros((24, 24), np.uint8))
    rc, out, err = run_cli(["evaluate", "--model", model, "--images", images, "--masks", masks], capsys)
    assert rc == 0 and "every reference mask is empty" in err


def test_nan_mask_is_refused():
    with pytest.raises(InputError, match="NaN"):
        io.read_mask(_write_tmp_tif(np.full((4, 4), np.nan, np.float32)))


def _write_tmp_tif(arr: np.ndarray) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "m.tif"
    tifffile.imwrite(path, arr)
    return path


BROKEN_FILES = {
    "empty.png": b"",
    "text.png": b"this is not an image\n",
    "truncated.png": None,  # filled in by the test: the first half of a real PNG
    "empty.tif": b"",
    "garbage.tif": b"II*\x00garbage",
    "empty.nii.gz": b"",
    "garbage.nii.gz": b"\x1f\x8b\x08\x00garbage",
    "five_d.tif": None,
    "nan.tif": None,
}


def test_one_unreadable_file_in_a_batch_is_skipped_and_counted(cli_data, capsys):
    root, model, images, masks = cli_data
    png = (images / "a.png").read_bytes()
    for name, data in BROKEN_FILES.items():
        if name == "truncated.png":
            data = png[: len(png) // 2]
        if data is not None:
            (images / name).write_bytes(data)
    tifffile.imwrite(images / "five_d.tif", np.zeros((2, 2, 2, 8, 8), np.uint8))
    tifffile.imwrite(images / "nan.tif", np.full((8, 8), np.nan, np.float32))
    (images / "folder.png").mkdir()  # a folder that looks like an image: not listed
    before = snapshot(root)
    rc, out, err = run_cli(["predict", "--model", model, "--device", "cpu", "-o", root / "out", images], capsys)
    assert rc == 1
    assert "wrote 1 mask" in out and (root / "out" / "a.png").is_file()
    assert f"{len(BROKEN_FILES)} of {len(BROKEN_FILES) + 1} input(s)" in err
    for name in BROKEN_FILES:
        assert f"skipped {name}:" in err, name
    assert {k: v for k, v in snapshot(root).items() if not k.startswith("out/")} == before
    assert sorted(p.name for p in (root / "out").iterdir()) == ["a.png"]  # no temporaries left
    # evaluate: the same broken images, paired with masks
    for name in BROKEN_FILES:
        io.write_image(masks / f"{io.stem(name)}.png", np.zeros((8, 8), np.uint8))
    rc, out, err = run_cli(["evaluate", "--model", model, "--images", images, "--masks", masks, "--json"], capsys)
    assert rc == 1 and json.loads(out.strip().splitlines()[-1])["n"] == 1
    assert f"{len(BROKEN_FILES)} of {len(BROKEN_FILES) + 1} image/mask pair(s)" in err


@pytest.mark.parametrize("name", sorted(n for n in BROKEN_FILES if BROKEN_FILES[n] is not None))
def test_broken_files_raise_input_errors(tmp_path, name):
    (tmp_path / name).write_bytes(BROKEN_FILES[name])
    with pytest.raises(InputError):
        io.read_image(tmp_path / name)
    from napari_sdunet._reader import layer_data

    with pytest.raises(InputError):  # napari's File > Open shows the message
        layer_data(str(tmp_path / name))


def test_files_too_large_for_memory_are_refused_before_decoding(tmp_path, monkeypatch):
    io.write_image(tmp_path / "a.png", np.zeros((64, 64, 3), np.uint8))
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 64, 64), np.uint16), photometric="minisblack")
    io.write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 64, 64), np.int16))
    monkeypatch.setattr(io, "MAX_BYTES", 1000)
    for name in ("a.png", "a.tif", "a.nii.gz"):
        with pytest.raises(InputError, match="GiB of memory"):
            io.read_image(tmp_path / name)


def test_mask_shape_mismatch_is_skipped_with_a_reason(cli_data, capsys):
    root, model, images, masks = cli_data
    io.write_image(images / "b.png", np.zeros((24, 24, 3), np.uint8))
    io.write_image(masks / "b.png", np.zeros((10, 10), np.uint8))
    rc, out, err = run_cli(["evaluate", "--model", model, "--images", images, "--masks", masks], capsys)
    assert rc == 1 and "skipped b.png" in err and "differs" in err and "n=1" in out


# ----------------------------------------------------------------------------- 7. leftovers and signals

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_save_temporaries_are_cleaned(tmp_path):
    folder = save_checkpoint(create_model("unet", task="nuclei", base_filters=4), tmp_path / "m")
    dead = _dead_pid()
    stale = tmp_path / f".m.{dead}-abc123.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    legacy = tmp_path / ".m.k2j4h5g6.tmp"
    legacy.mkdir()
    old = time.time() - 3600
    os.utime(legacy, (old, old))
    alive = tmp_path / f".m.{os.getpid()}-zzz999.tmp"  # a save in progress in a live process
    alive.mkdir()
    other = tmp_path / f".mm.{dead}-abc123.tmp"  # another model's temporary
    other.mkdir()
    save_checkpoint(create_model("unet", task="nuclei", base_filters=4), folder)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["m", alive.name, other.name])


def test_model_moved_aside_by_a_killed_swap_comes_back(tmp_path):
    folder = save_checkpoint(create_model("unet", task="nuclei", base_filters=4), tmp_path / "m")
    aside = tmp_path / f".m.old-{_dead_pid()}"
    os.replace(folder, aside)  # the kill fell between the two renames
    clean_stale_temporaries(folder)
    assert not aside.exists()
    load_checkpoint(folder)


def test_stale_file_temporaries_are_cleaned(tmp_path):
    stale = tmp_path / f".a.png.{_dead_pid()}-abc.tmp.png"
    stale.write_bytes(b"half a png")
    io.write_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_sigterm_stops_the_cli_like_ctrl_c(cli_data, capsys, monkeypatch):
    root, model, images, masks = cli_data
    import napari_sdunet.inference as inf

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(inf, "predict", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    rc, out, err = run_cli(["predict", "--model", model, "-o", root / "out", images], capsys)
    assert rc == 128 + signal.SIGTERM and "terminated" in err
    assert not any((root / "out").iterdir())
    assert signal.getsignal(signal.SIGTERM) == handler  # the caller's handler is back


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_to_a_real_finetune_process_leaves_no_temporaries(tmp_path, nuclei):
    img, ref = nuclei
    images, masks = tmp_path / "images", tmp_path / "masks"
    for i in range(3):
        io.write_image(images / f"f{i}.png", img)
        io.write_image(masks / f"f{i}.png", ref)
    out = tmp_path / "models" / "tuned"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "napari_sdunet", "finetune", "--model", "unet-nuclei",
                          "--images", str(images), "--masks", str(masks), "-o", str(out), "--steps", "100000",
                          "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and "fine-tuning on" not in seen:
        line = p.stdout.readline()
        if not line:
            break
        seen += line
    time.sleep(1.0)  # inside the training loop
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, seen + err
    assert "Traceback" not in err
    assert not out.exists() and not any((tmp_path / "models").glob(".*"))


# ----------------------------------------------------------------------------- 9. NIfTI orientation

def _swap_xy(vol: io.Volume) -> tuple[np.ndarray, np.ndarray]:
    """The same scan stored with x and y swapped (numpy order data, affine): same world positions."""
    raw = vol.data.T.transpose(1, 0, 2)
    aff = vol.affine.copy()
    aff[:, [0, 1]] = vol.affine[:, [1, 0]]
    return np.ascontiguousarray(raw.T), aff


def _crop_z(vol: io.Volume, z0: int, z1: int) -> io.Volume:
    """Slices z0..z1-1 of a volume, with the affine moved so that every voxel keeps its place."""
    aff = vol.affine.copy()
    aff[:3, 3] += aff[:3, 2] * z0
    return io.Volume(np.ascontiguousarray(vol.data[z0:z1]), vol.axes, affine=aff)


def _swap_xy_flip_x(vol: io.Volume) -> tuple[np.ndarray, np.ndarray]:
    data, aff = _swap_xy(vol)
    return _flip_x(io.Volume(data, vol.axes, affine=aff))


def _flip_x(vol: io.Volume) -> tuple[np.ndarray, np.ndarray]:
    raw = vol.data.T[::-1]
    aff = vol.affine.copy()
    aff[:3, 3] += aff[:3, 0] * (raw.shape[0] - 1)
    aff[:, 0] *= -1
    return np.ascontiguousarray(raw.T), aff


def test_nifti_in_another_orientation_segments_like_the_original(tmp_path, capsys):
    import nibabel as nib

    vol = _crop_z(io.read_image(SAMPLES / "ct_image.nii.gz"), 14, 22)
    data, aff = _swap_xy_flip_x(vol)
    io.write_nifti(tmp_path / "in" / "moved.nii.gz", data, affine=aff)
    io.write_nifti(tmp_path / "in" / "orig.nii.gz", vol.data, affine=vol.affine)
    rc, out, err = run_cli(["predict", "--model", "sdunet-liver", "--device", "cpu", "-o", tmp_path / "out",
                            tmp_path / "in"], capsys)
    assert rc == 0, err
    a = nib.load(str(tmp_path / "out" / "orig.nii.gz"))
    b = nib.load(str(tmp_path / "out" / "moved.nii.gz"))
    np.testing.assert_allclose(b.affine, aff, atol=1e-4)  # written back in the input's own space
    assert np.asarray(a.dataobj).sum() > 0
    np.testing.assert_array_equal(nib.as_closest_canonical(a).get_fdata(), nib.as_closest_canonical(b).get_fdata())
    # evaluate: the moved image against the reference mask stored in the original orientation
    (tmp_path / "masks").mkdir()
    ref = _crop_z(io.read_image(SAMPLES / "ct_liver_mask.nii.gz"), 14, 22)
    for name in ("orig", "moved"):
        io.write_nifti(tmp_path / "masks" / f"{name}.nii.gz", ref.data, affine=ref.affine)
    rc, out, err = run_cli(["evaluate", "--model", "sdunet-liver", "--device", "cpu", "--images", tmp_path / "in",
                            "--masks", tmp_path / "masks"], capsys)
    assert rc == 0, err
    per = {ln.split(":")[0]: float(ln.split()[2]) for ln in out.splitlines() if ": dice " in ln}
    assert per["moved.nii.gz"] == pytest.approx(per["orig.nii.gz"], abs=1e-9)


def test_real_volume_with_swapped_axes_scores_like_the_original(tmp_path, capsys):
    root = shared_data("liver")
    vol = _crop_z(io.read_image(root / "images" / "ircadb1_17.nii.gz"), 50, 70)  # 20 slices through the liver
    ref = _crop_z(io.read_image(root / "masks" / "ircadb1_17.nii.gz"), 50, 70)
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    data, aff = _swap_xy(vol)
    io.write_nifti(tmp_path / "in" / "swapped.nii.gz", data, affine=aff)
    io.write_nifti(tmp_path / "in" / "orig.nii.gz", vol.data, affine=vol.affine)
    mdata, maff = _swap_xy(ref)
    io.write_nifti(tmp_path / "masks" / "swapped.nii.gz", mdata, affine=maff)
    io.write_nifti(tmp_path / "masks" / "orig.nii.gz", ref.data, affine=ref.affine)
    rc, out, err = run_cli(["evaluate", "--model", "sdunet-liver", "--device", "cpu", "--images", tmp_path / "in",
                            "--masks", tmp_path / "masks"], capsys)
    assert rc == 0, err
    per = {ln.split(":")[0]: float(ln.split()[2]) for ln in out.splitlines() if ": dice " in ln}
    assert per["swapped.nii.gz"] == pytest.approx(per["orig.nii.gz"], abs=1e-6)


def test_reorient_round_trip_and_2d_identity():
    vol = io.read_image(SAMPLES / "ct_image.nii.gz")
    for transform in (_swap_xy, _flip_x, _swap_xy_flip_x):
        data, aff = transform(vol)
        out, back = io.reorient(data, aff)
        np.testing.assert_array_equal(out, vol.data)
        np.testing.assert_array_equal(back(out), data)
    img = np.zeros((5, 6))
    out, back = io.reorient(img, None)
    assert out is img and back(img) is img
    assert io.orientation_of(np.zeros((4, 4))) is None  # singular affine: no orientation, no crash


# ----------------------------------------------------------------------------- errors module

def test_errors_module_imports_no_torch():
    code = "import sys, napari_sdunet.errors as e; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_old_import_paths_still_work():
    from napari_sdunet import CheckpointError as C1
    from napari_sdunet.checkpoint import CheckpointError as C2
    from napari_sdunet.preprocess import InputError as I1

    assert C1 is C2 is CheckpointError and I1 is InputError
    assert issubclass(CheckpointError, ValueError) and issubclass(OutputError, SdunetError)


def test_torch_default_dtype_float64_does_not_break_prediction(tmp_path):
    """A user script that sets float64 as torch's default must still get a mask."""
    loaded = load_model(make_checkpoint(tmp_path / "m"), "cpu")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        prob = predict(loaded, np.zeros((20, 20), np.uint16), "YX")
    finally:
        torch.set_default_dtype(old)
    assert prob.shape == (20, 20)


# ----------------------------------------------------------------------------- widgets (read-only use)

def test_segment_widget_handles_every_pixel_type(make_napari_viewer, qtbot, nuclei, monkeypatch):
    """The Segment widget on 16-bit / float copies of the sample: the same mask, the layers untouched."""
    import napari.utils.notifications as notifications

    from napari_sdunet.widgets import SegmentWidget
    from napari_sdunet.zoo import PACKAGE_WEIGHTS

    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_error", lambda message: shown.append(str(message)))
    img, ref = nuclei
    viewer = make_napari_viewer()
    copies = {"uint8": img, **{k: v for k, v in dtype_copies(img).items() if "same values" not in k}}
    layers = {name: viewer.add_image(arr, name=name, rgb=True) for name, arr in copies.items()}
    before = {name: np.array(layer.data, copy=True) for name, layer in layers.items()}
    w = SegmentWidget(viewer)
    w.models.add_folder(PACKAGE_WEIGHTS / "unet-nuclei")
    masks = {}
    for name, layer in layers.items():
        w.image.value = layer
        w.axes.value = "YXC"
        n = len(viewer.layers)
        w.run()
        qtbot.waitUntil(lambda: not w.runner.running, timeout=120_000)
        assert shown == [], (name, shown)
        assert len(viewer.layers) == n + 1, name
        masks[name] = np.asarray(viewer.layers[-1].data) > 0
    d8 = dice(masks["uint8"], ref)
    for name, mask in masks.items():
        assert abs(dice(mask, ref) - d8) <= 0.01, name
    for name, layer in layers.items():
        assert layer.data.dtype == before[name].dtype and np.array_equal(layer.data, before[name]), name
