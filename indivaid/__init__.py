"""IndivAID: individual animal re-identification with CLIP (and CLIP-ReID as the baseline).

``indivaid.train(cfg, workdir=..., report=...)`` runs the two-stage trainer; ``indivaid.load_config``
reads a YAML config. Heavy modules (torch, open_clip) load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["RunResult", "TrainConfig", "load_config", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from indivaid import training

        return getattr(training, name)
    raise AttributeError(f"module 'indivaid' has no attribute {name!r}")
