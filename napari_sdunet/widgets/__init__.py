"""napari widgets of napari-sdunet. Shared parts (layer/model/device pickers, job runner) are in ``_common``.

Each widget is a magicgui ``Container`` taking the viewer, registered in ``napari.yaml``. To add one,
write a module here that builds on ``_common`` (``ModelPicker``, ``device_combo``, ``JobRunner``) and add
its class to the manifest's ``widgets``.
"""

from .compare import CompareWidget
from .segment import SegmentWidget

__all__ = ["CompareWidget", "SegmentWidget"]
