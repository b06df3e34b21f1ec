"""Training prompts in shuffled passes; the position (epoch, offset) is part of the trainer state."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from megatron_minio3.data.minio3_json import Prompt


@dataclass
class SamplerState:
    epoch: int = 0
    offset: int = 0  # prompts of this epoch's order already handed out
    num_prompts: int = 0  # size of the dataset the state refers to


class PromptSampler:
    """Endless passes over `prompts`, each in the order of a permutation seeded by (seed, epoch): the same
    seed and state give the same prompts, so a resumed run continues exactly where the checkpoint was."""

    def __init__(self, prompts: Sequence[Prompt], seed: int):
        if not prompts:
            raise ValueError("the prompt sampler needs at least one prompt")
        self.prompts = list(prompts)
        self.seed = seed
        self.state = SamplerState(num_prompts=len(self.prompts))
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=generator).tolist()

    def next(self, count: int) -> list[Prompt]:
        out = []
        while len(out) < count:
            if self.state.offset == len(self.prompts):
                self.state.epoch += 1
                self.state.offset = 0
                self._order = self._permutation(self.state.epoch)
            take = min(count - len(out), len(self.prompts) - self.state.offset)
            out += [self.prompts[i] for i in self._order[self.state.offset : self.state.offset + take]]
            self.state.offset += take
        return out

    def peek(self, count: int) -> list[Prompt]:
        """The prompts `next(count)` would hand out, without handing them out (a round started early)."""
        state, order = SamplerState(**asdict(self.state)), self._order
        try:
            return self.next(count)
        finally:
            self.state, self._order = state, order

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        restored = SamplerState(**state)
        if restored.num_prompts != len(self.prompts):
            raise ValueError(
                f"the checkpoint's prompt position refers to {restored.num_prompts} training prompts, data.train_files "
                f"now hold {len(self.prompts)}; resume with the same data or set trainer.resume=false"
            )
        self.state = restored
        self._order = self._permutation(restored.epoch)
