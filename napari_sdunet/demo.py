"""``python -m napari_sdunet.demo``: napari with the Segment and Compare widgets docked and a sample loaded.

``--sample nuclei|polyps|ct`` picks the sample; ``--model`` preselects a model (name or checkpoint
folder); ``--segment`` runs it once the window is up. ``--screenshot PATH --quit`` saves a
screenshot of the whole window and exits (headless use; with ``--segment`` it waits for the result).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SAMPLE_FOR_TASK = {"nuclei": "nuclei", "polyps": "polyps", "liver": "ct"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m napari_sdunet.demo", description=__doc__.splitlines()[0])
    p.add_argument("--sample", choices=["nuclei", "polyps", "ct"], default="polyps",
                   help="sample image to load (default polyps)")
    p.add_argument("--model", default=None, help="model name or checkpoint folder to preselect")
    p.add_argument("--segment", action="store_true", help="press Segment (needs a model) and then Compare")
    p.add_argument("--screenshot", metavar="PATH", default=None, help="save a window screenshot (PNG)")
    p.add_argument("--quit", action="store_true", help="exit after loading (and the screenshot)")
    p.add_argument("--size", type=int, nargs=2, default=(1400, 900), metavar=("W", "H"), help="window size")
    return p


def pick_model(widget, wanted: str | None, sample: str) -> None:
    """Preselect ``wanted``; else the first listed model trained for the sample's task, if any."""
    if wanted:
        path = Path(wanted).expanduser()
        if path.is_dir():
            widget.models.add_folder(path)
        else:
            refs = [ref for _, ref in widget.models.listed()]
            if wanted not in refs:
                raise SystemExit(f"model {wanted!r} not found; available: {', '.join(refs) or 'none'}")
            widget.models.combo.value = wanted
        return
    task = {v: k for k, v in SAMPLE_FOR_TASK.items()}[sample]
    for _, ref in widget.models.listed():
        if ref and Path(str(ref)).name.endswith(task):
            widget.models.combo.value = ref
            return


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import napari
    from qtpy.QtCore import QTimer

    from ._sample_data import load_sample
    from .widgets import CompareWidget, SegmentWidget

    viewer = napari.Viewer(title=f"napari-sdunet: {args.sample} sample")
    viewer.window.resize(*args.size)
    for data, kwargs, kind in load_sample(args.sample):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    segment = SegmentWidget(viewer)
    compare = CompareWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment (napari-sdunet)", area="right")
    viewer.window.add_dock_widget(compare, name="Compare (napari-sdunet)", area="right")
    viewer.reset_view()
    image_layers = [layer for layer in viewer.layers if layer.__class__.__name__ == "Image"]
    if image_layers:
        segment.image.value = image_layers[0]
    pick_model(segment, args.model, args.sample)
    if args.sample == "ct":
        segment.modality.value = "ct"
        viewer.dims.set_point(0, viewer.dims.range[0].start + 15 * viewer.dims.range[0].step)

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
            compare.compare()
        QTimer.singleShot(300, finish)

    if args.segment:
        if segment.models.model is None:
            print("--segment needs a model: pass --model NAME_OR_FOLDER", file=sys.stderr)
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
