"""The method registry: what each method trains and how identity descriptions are formed."""

from __future__ import annotations

from dataclasses import dataclass

from indivaid.models.fusion import FUSIONS
from indivaid.registry import Registry


@dataclass(frozen=True)
class MethodSpec:
    """``train`` False: the frozen CLIP image feature (zero-shot baseline, no stage 1 or 2): code
    that treats the baseline differently asks this trait, never the method's name.
    ``fusion`` names an entry of the fusion registry (``indivaid.models.fusion.FUSIONS``)."""

    meta_net: bool
    fusion: str
    train: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        FUSIONS.get(self.fusion)  # an unknown fusion fails at registration, naming the registered ones


METHODS: Registry[MethodSpec] = Registry("method")
METHODS.register("indivaid", MethodSpec(True, "attention", description="Meta-Net + attention fusion (IndivAID)"))
METHODS.register("clipreid", MethodSpec(False, "none", description="per-identity prompts, no Meta-Net (CLIP-ReID)"))
METHODS.register("zeroshot", MethodSpec(False, "none", train=False, description="frozen CLIP image features"))
METHODS.register("indivaid-mean", MethodSpec(True, "mean", description="ablation: Meta-Net + mean fusion (public code)"))
METHODS.register("indivaid-nofusion", MethodSpec(True, "none", description="ablation: Meta-Net in stage 1, identity text in stage 2"))


def untrained_methods() -> list[str]:
    """The registered methods that train nothing (the frozen-feature baselines every board shows)."""
    return [n for n in METHODS.names() if not METHODS.get(n).train]
