"""Export a checkpoint's image encoder and feature head to ONNX, for inference without torch.

``python -m indivaid export --checkpoint model.pt --out model.onnx`` writes one graph:
``image`` (float32, N x 3 x H x W, RGB, normalised with the metadata's mean and std; N dynamic,
H x W fixed at the training input size) -> ``feature`` (the raw inference feature, as
``InferenceModel.embed_uint8`` returns it) and ``embedding`` (the same, L2-normalised: what
``embed`` stores and ``match`` compares). The metadata (:data:`indivaid_field.model.METADATA_KEYS`)
carries everything else ``indivaid_field`` needs, so a field laptop runs the model with
ONNX Runtime, numpy and Pillow only. The exporter is torch's dynamo-based one (``torch.export``
then onnxscript): install the ``export`` extra (``pip install indivaid[export]``).

No camera embedding (SIE) is applied, as for any photo whose camera the model never saw: that is
what ``embed`` and ``match`` do with torch too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from indivaid.inference import InferenceModel, load_inference
from indivaid.models.head import inference_feature
from indivaid_field.model import INPUT_NAME, ONNX_FORMAT, OUTPUT_NAMES

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The export cannot run here (a missing package) or its graph disagrees with torch."""


class EmbeddingGraph(nn.Module):
    """The inference path of a checkpoint as one module: normalised image -> (feature, embedding)."""

    def __init__(self, image: nn.Module, head: nn.Module | None = None, *, after_bn: bool = False,
                 part_norm: bool = False) -> None:
        super().__init__()
        self.image, self.head = image, head
        self.after_bn, self.part_norm = after_bn, part_norm

    @classmethod
    def of(cls, model: InferenceModel) -> EmbeddingGraph:
        return cls(model.image, model.head, after_bn=model.after_bn, part_norm=model.part_norm).eval()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        f = inference_feature(self.image(image), self.head, after_bn=self.after_bn, part_norm=self.part_norm)
        return f, F.normalize(f, dim=1)


def onnx_metadata(model: InferenceModel, checkpoint: str | Path) -> dict[str, str]:
    """The exported model's metadata: preprocessing, distance, model version and open-set decision
    (every value JSON, keys as :data:`indivaid_field.model.METADATA_KEYS`)."""
    import indivaid

    cfg, cal = model.cfg, model.calibration
    h, w = model.spec.height, model.spec.width
    values: dict[str, Any] = {
        "format": ONNX_FORMAT, "model_version": model.fingerprint, "indivaid_version": indivaid.__version__,
        "input_height": h, "input_width": w, "resize": model.spec.resize, "pixel_scale": 1 / 255,
        "mean": list(cfg.augment.mean), "std": list(cfg.augment.std),
        "layout": "NCHW RGB float32, (pixel * pixel_scale - mean) / std",
        "embedding_dim": int(model.image.width + model.image.embed_dim), "embedding_normalization": "l2",
        "metric": model.metric, "threshold": cal.threshold if cal else None,
        "threshold_rule": cal.rule if cal else None,
        "probability": list(cal.probability) if cal and cal.probability else None, "method": cfg.method,
        "backbone": cfg.model.backbone, "dataset": cfg.data.dataset, "species": model.species,
        "split_hash": model.split_hash, "checkpoint": Path(checkpoint).name,
    }
    return {k: json.dumps(v) for k, v in values.items()}


def _require_exporter() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the `export` extra ({e.name} is missing): "
                          "pip install 'indivaid[export]'  (onnx, onnxscript)") from None


def export_graph(graph: EmbeddingGraph, size: tuple[int, int], out: str | Path,
                 metadata: dict[str, str] | None = None) -> Path:
    """Trace ``graph`` at input ``size`` (H, W) with a dynamic batch and write it to ``out``, with
    ``metadata`` (string values) in the model's metadata."""
    _require_exporter()
    example = torch.randn(2, 3, *size)  # batch 2: a batch of 1 could be specialised into the graph
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(graph.eval(), (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch},), verbose=False)
    program.model.metadata_props.update(metadata or {})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))
    return out


def export_onnx(checkpoint: str | Path, out: str | Path, *, check: bool = True) -> dict[str, Any]:
    """Write ``checkpoint``'s embedding graph to ``out`` (dynamic batch); with ``check``, run it in
    ONNX Runtime on random images and compare with torch. Returns the metadata (decoded) and, when
    checked, the largest absolute feature difference."""
    _require_exporter()
    model = load_inference(checkpoint, "cpu")
    graph = EmbeddingGraph.of(model)
    meta = onnx_metadata(model, checkpoint)
    export_graph(graph, (model.spec.height, model.spec.width), out, meta)
    info: dict[str, Any] = {k: json.loads(v) for k, v in meta.items()}
    if check:
        info["max_abs_diff"] = check_against_torch(graph, Path(out))
    return info


def check_against_torch(graph: EmbeddingGraph, onnx_file: Path, batch: int = 3, tolerance: float = 1e-4) -> float:
    """Largest absolute difference of the ``feature`` output, ONNX Runtime vs torch, on random
    normalised images of a batch size other than the traced one; raises past ``tolerance``."""
    from indivaid_field.model import OnnxModel

    session = OnnxModel(onnx_file).session
    h, w = session.get_inputs()[0].shape[2:]
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = graph(x)[0].numpy()
    got = session.run([OUTPUT_NAMES[0]], {INPUT_NAME: x.numpy()})[0]
    diff = float(np.abs(got - want).max())
    if not diff <= tolerance:
        raise ExportError(f"{onnx_file}: ONNX Runtime differs from torch by {diff:.2e} (> {tolerance:g})")
    return diff
