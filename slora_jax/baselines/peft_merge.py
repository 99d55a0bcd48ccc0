"""S-LoRA's PEFT baseline: one adapter per batch, merged into the base weights for that batch.

Before a batch of adapter X's requests, `W + scale * A @ B` is computed for
every projection X adapts; after the batch the merged weights are dropped and
the base weights serve again. Merging out of place keeps the base weights
exact (merging and unmerging in place in bf16 would drift them a little every
batch); it skips the unmerge arithmetic, so it is, if anything, a little
faster than PEFT's `merge_and_unload`/`unmerge` cycle.
"""

from __future__ import annotations

import jax

from slora_jax.baselines.merge import merge_lora
from slora_jax.baselines.static_batch import StaticBatchServer
from slora_jax.model.llama import Params


class PeftMergeServer(StaticBatchServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_merges = 0

    def _params_for(self, adapter: str | None) -> Params:
        if adapter is None:
            return self.params
        self.num_merges += 1
        return merge_lora(self.params, self.cfg, self.host(adapter))

    def warm(self, input_len: tuple[int, int], output_len: tuple[int, int]) -> int:
        """The base class's shapes, and one merge per distinct rank (the merge's ops compile per shape)."""
        n = super().warm(input_len, output_len)
        seen = set()
        for name in list(self._paths)[:16]:
            adapter = self.host(name)
            key = tuple(sorted((p, m.rank) for (_, p), m in adapter.modules.items()))
            if key not in seen:
                seen.add(key)
                jax.block_until_ready(merge_lora(self.params, self.cfg, adapter))
        return n

    def memory_report(self) -> dict[str, float]:
        return {**super().memory_report(), "num_merges": self.num_merges}
