"""Learnable text descriptions: per-identity prompt tokens, optionally image-conditioned.

The prompt is ``"A photo of a X X X X <species>."``; each training identity owns its own ``n_ctx``
X vectors (CLIP-ReID). IndivAID's Meta-Net maps the frozen projected image feature v(x) to a
vector pi(x) added to every X token, so t_y(x) describes identity y *as seen in image x*. Prompts
for a whole batch are assembled with one gather and one concatenation (the public IndivAID code
builds them in a Python loop per sample).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from indivaid.models.encoders import TextEncoder

PLACEHOLDER = "X"


class MetaNet(nn.Module):
    """v(x) -> pi(x): Linear(d, d/16), ReLU, Linear(d/16, width)."""

    def __init__(self, embed_dim: int, width: int) -> None:
        super().__init__()
        hidden = max(1, embed_dim // 16)
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width))

    def forward(self, v: Tensor) -> Tensor:
        return self.net(v)


def tokenize_template(template: str, species: str, n_ctx: int, context_length: int) -> tuple[Tensor, int]:
    """Token ids of the prompt and the index of its first placeholder token."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=context_length)
    text = template.format(ctx=" ".join([PLACEHOLDER] * n_ctx), species=species)
    ids = tok([text], context_length=context_length)[0]
    if int((ids > 0).sum()) >= context_length:
        raise ValueError(f"prompt {text!r} does not fit the text context length {context_length}")
    x_id = int(tok([PLACEHOLDER], context_length=8)[0][1])
    pos = (ids == x_id).nonzero().flatten()
    if len(pos) != n_ctx or int(pos[-1] - pos[0]) != n_ctx - 1:
        raise ValueError(f"template {template!r} must contain {{ctx}} once and the species must not tokenise to 'x'")
    return ids, int(pos[0])


class PromptLearner(nn.Module):
    def __init__(self, text: TextEncoder, num_ids: int, species: str, *, n_ctx: int = 4,
                 template: str = "A photo of a {ctx} {species}.", meta_net: bool = False, embed_dim: int | None = None,
                 init_std: float = 0.02) -> None:
        super().__init__()
        ids, start = tokenize_template(template, species, n_ctx, text.positional_embedding.shape[0])
        with torch.no_grad():
            emb = text.token_embedding(ids.unsqueeze(0)).detach()
        self.register_buffer("prefix", emb[:, :start].clone())
        self.register_buffer("suffix", emb[:, start + n_ctx :].clone())
        self.register_buffer("eot", ids.argmax().view(1))
        self.ctx = nn.Parameter(torch.randn(num_ids, n_ctx, text.width) * init_std)
        self.meta_net = MetaNet(embed_dim or text.width, text.width) if meta_net else None
        self.n_ctx = n_ctx

    @property
    def num_ids(self) -> int:
        return self.ctx.shape[0]

    def forward(self, labels: Tensor, image_features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Prompt embeddings (B, L, width) and EOT positions (B,) for identities ``labels``.

        With a Meta-Net, ``image_features`` (B, embed_dim) condition each prompt on its image.
        """
        ctx = self.ctx[labels]
        if self.meta_net is not None:
            if image_features is None:
                raise ValueError("this prompt learner has a Meta-Net: pass the image features")
            ctx = ctx + self.meta_net(image_features.to(ctx.dtype)).unsqueeze(1)
        return self._assemble(ctx)

    def forward_plain(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The identity prompt without image conditioning (CLIP-ReID's identity text)."""
        return self._assemble(self.ctx[labels])

    def _assemble(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        b = ctx.shape[0]
        emb = torch.cat([self.prefix.expand(b, -1, -1), ctx, self.suffix.expand(b, -1, -1)], 1)
        return emb, self.eot.expand(b)
