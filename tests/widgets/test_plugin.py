"""The plugin as napari sees it: manifest, reader, writer, sample data, docked widgets on screen."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sdunet._sample_data import sample_path


def test_manifest_is_valid():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-sdunet")
    assert {w.display_name for w in pm.contributions.widgets} >= {"Segment", "Compare"}
    assert {s.key for s in pm.contributions.sample_data} == {"nuclei", "polyps", "ct"}


def test_open_nifti_and_save_labels_through_napari(make_napari_viewer, tmp_path):
    import napari
    import nibabel as nib

    viewer = make_napari_viewer()
    layers = viewer.open(str(sample_path("ct_liver_mask.nii.gz")), plugin="napari-sdunet")
    assert layers[0].__class__.__name__ == "Labels" and layers[0].data.shape == (30, 128, 128)
    assert tuple(layers[0].scale) == (3.0, 3.0, 3.0)
    out = tmp_path / "saved.nii.gz"
    written = napari.save_layers(str(out), [layers[0]], plugin="napari-sdunet")
    assert written == [str(out)]
    src = nib.load(str(sample_path("ct_liver_mask.nii.gz")))
    back = nib.load(str(out))
    assert np.allclose(back.affine, src.affine)
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj))


@pytest.mark.parametrize("key,n", [("nuclei", 2), ("polyps", 2), ("ct", 2)])
def test_open_sample(make_napari_viewer, key, n):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-sdunet", key)
    assert len(viewer.layers) == n
    assert viewer.layers[1].__class__.__name__ == "Labels"


def test_docked_widgets_render(make_napari_viewer, qtbot, checkpoints, tmp_path):
    """Both widgets docked in a shown window; the screenshot has the canvas and the docks."""
    from napari_sdunet._sample_data import load_sample
    from napari_sdunet.widgets import CompareWidget, SegmentWidget

    viewer = make_napari_viewer(show=True)
    for data, kwargs, kind in load_sample("polyps"):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    seg, cmp = SegmentWidget(viewer), CompareWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment", area="right")
    viewer.window.add_dock_widget(cmp, name="Compare", area="right")
    seg.models.add_folder(checkpoints["polyps"])
    seg.run()
    qtbot.waitUntil(lambda: not seg.runner.running, timeout=60_000)
    cmp._default_choice()
    assert cmp.compare()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.ndim == 3 and shot.shape[0] > 300 and shot.shape[1] > 600
    assert seg.native.isVisible() and cmp.native.isVisible()
    assert seg.native.width() > 100 and cmp.table.native.isVisible()
    # all-foreground prediction vs the polyp mask: the overlay is white (TP) and red (FP) in the canvas
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    red = (canvas[..., 0] > 150) & (canvas[..., 1] < 80) & (canvas[..., 2] < 80)
    assert red.mean() > 0.05
