"""An expert for tests and benchmarks of learning: `redness`, a reward a tiny LoRA learns in seconds on a CPU.

Nothing in the package imports this module, so users' registries do not list `redness`; importing it registers
the expert (tests/test_grpo.py, tests/test_grpo_chain.py, benchmarks/grpo_speed.py).
"""

from __future__ import annotations

from .images import Preprocess
from .registry import Expert, ExpertConfig, register_expert


class RednessConfig(ExpertConfig):
    pass


@register_expert
class Redness(Expert):
    """The mean red minus the mean of green and blue, in [-1, 1]: a reward with a known optimum (a red image)
    that the tiny pipelines can learn, so a test of learning fails when the policy gradient is removed."""

    name = "redness"
    Config = RednessConfig

    def __init__(self):
        super().__init__(Preprocess(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "none", False)

    @classmethod
    def from_config(cls, cfg, ctx):
        return cls()

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None):
        p = pixels.float()
        return p[:, 0].mean(dim=(1, 2)) - p[:, 1:].mean(dim=(1, 2, 3))
