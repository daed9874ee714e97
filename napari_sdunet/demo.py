"""``python -m napari_sdunet.demo``: napari with the Segment and Compare widgets docked and a sample loaded.

The widgets are docked from the plugin's manifest, as *Plugins > SDU-Net segmentation* does, and the
Segment widget preselects the model that suits the sample (see ``napari_sdunet.widgets._preselect``).
``--sample nuclei|polyps|ct`` picks the sample (default nuclei, where the shipped models do well);
``--model`` chooses another model (name or checkpoint folder); ``--segment`` presses Segment once the
window is up and then Compare (prediction against the sample's labels). ``--screenshot PATH --quit``
saves a screenshot of the whole window and exits (headless use; with ``--segment`` it waits for the result).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_SAMPLE = "nuclei"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m napari_sdunet.demo", description=__doc__.splitlines()[0])
    p.add_argument("--sample", choices=["nuclei", "polyps", "ct"], default=DEFAULT_SAMPLE,
                   help=f"sample image to load (default {DEFAULT_SAMPLE})")
    p.add_argument("--model", default=None,
                   help="model name or checkpoint folder (default: the one the Segment widget preselects)")
    p.add_argument("--segment", action="store_true", help="press Segment, then Compare with the sample's labels")
    p.add_argument("--screenshot", metavar="PATH", default=None, help="save a window screenshot (PNG)")
    p.add_argument("--quit", action="store_true", help="exit after loading (and the screenshot)")
    p.add_argument("--size", type=int, nargs=2, default=(1400, 900), metavar=("W", "H"), help="window size")
    return p


def pick_model(widget, wanted: str | None) -> None:
    """Choose ``wanted`` (a name or a checkpoint folder) as if by hand; None keeps the preselection."""
    if not wanted:
        return
    path = Path(wanted).expanduser()
    if path.is_dir():
        widget.models.add_folder(path)
        return
    refs = [ref for _, ref in widget.models.listed()]
    if wanted not in refs:
        raise SystemExit(f"model {wanted!r} not found; available: {', '.join(refs) or 'none'}")
    widget.models.combo.value = wanted  # counts as the user's choice


def dock(viewer, name: str):
    """Dock a napari-sdunet widget the way Plugins > SDU-Net segmentation does; returns the widget."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-sdunet", name)
    return widget


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import napari
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer(title=f"napari-sdunet: {args.sample} sample")
    viewer.window.resize(*args.size)
    viewer.open_sample("napari-sdunet", args.sample)  # File > Open Sample
    segment = dock(viewer, "Segment")
    compare = dock(viewer, "Compare")
    viewer.reset_view()
    pick_model(segment, args.model)
    if segment.image.value is not None and segment.image.value.ndim == 3 and not segment.image.value.rgb:
        viewer.dims.set_point(0, viewer.dims.range[0].start + (viewer.dims.nsteps[0] // 2) * viewer.dims.range[0].step)
    print(f"model: {segment.models.model} ({segment.models.why.value})", flush=True)

    def finish() -> None:
        viewer.reset_view()
        if args.screenshot:
            out = Path(args.screenshot)
            out.parent.mkdir(parents=True, exist_ok=True)
            viewer.screenshot(str(out), canvas_only=False, flash=False)
            print(f"screenshot saved to {out}")
        if args.quit:
            viewer.close()
            from qtpy.QtWidgets import QApplication

            QApplication.instance().quit()

    def after_segment(_result=None) -> None:
        if segment.runner.status.value.startswith("done"):
            compare._default_choice()
            if compare.compare():
                print(f"Compare: {compare.summary.value}", flush=True)
        QTimer.singleShot(300, finish)

    if args.segment:
        if segment.models.model is None:
            print("--segment needs a model: none is shipped; pass --model NAME_OR_FOLDER", file=sys.stderr)
            return 2
        worker = segment.run()
        if worker is None:
            return 1
        worker.finished.connect(lambda: QTimer.singleShot(100, after_segment))
    elif args.screenshot or args.quit:
        QTimer.singleShot(500, finish)
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
