"""indivaid_field: embed and match animal photos with an exported ONNX model, without torch.

A field laptop or edge box needs only ``requirements-field.txt`` (onnxruntime, numpy, pillow,
pyarrow, rich) and this folder: ``python -m indivaid_field embed|match --onnx model.onnx ...``.
The model comes from ``python -m indivaid export``; the embedding files are the same Parquet files
``python -m indivaid embed`` writes, so a catalogue embedded on either side matches on the other.

Nothing here imports torch, Ray or open_clip (a test walks the package to keep it so). The
pure-numpy pieces (image preprocessing, the embedding file format, the identity search and the
KNOWN/NEW decision) live here and ``indivaid`` imports them, so both paths share one
implementation.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["FieldError", "__version__"]


class FieldError(ValueError):
    """A user-facing problem (a missing file, a bad flag value): printed as one line naming it."""
