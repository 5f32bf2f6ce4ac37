"""A request's token state: its prompt ids, then the ids it generated, in ONE list.

The scheduler (how many tokens exist), the runner's chunks (which ids to compute), the sampler (min_tokens
counts), the detokeniser (its window) and the events (usage counts) all read this one object; only
``OutputState.append`` writes to it, once per sampled token. Nothing keeps a second copy that could drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class TokenState:
    ids: list[int] = field(default_factory=list)  # prompt + generated
    num_prompt: int = -1  # -1: every id given at construction is prompt

    def __post_init__(self) -> None:
        if self.num_prompt < 0:
            self.num_prompt = len(self.ids)
        if self.num_prompt > len(self.ids):
            raise ValueError(f"num_prompt={self.num_prompt} exceeds the {len(self.ids)} ids given")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def generated(self) -> list[int]:
        return self.ids[self.num_prompt:]

    @property
    def num_generated(self) -> int:
        return len(self.ids) - self.num_prompt

    def append(self, token: int) -> None:
        self.ids.append(token)
