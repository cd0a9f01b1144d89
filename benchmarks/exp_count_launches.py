"""How many Triton kernels one training step launches per layer (an experiment; CPU, under ``TRITON_INTERPRET=1``).

Builds a Mamba-1 and a Mamba-2 language model with State-offset (h) at two depths, runs one forward + backward
through the Triton backend under the interpreter and counts the launches per kernel. The difference between the two
depths is what one more (middle) layer launches: the number behind the host time per layer in docs/benchmarks.md
("Session 15"). The interpreter runs the same launchers as the GPU, so the counts are the GPU's.

    PYTHONPATH=. python3 benchmarks/exp_count_launches.py
"""

from __future__ import annotations

import collections
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch
from triton.runtime.interpreter import InterpretedFunction

from ssmtune import StateOffsetConfig, get_peft_model
from ssmtune.models import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

COUNTS: collections.Counter = collections.Counter()
_run = InterpretedFunction.run


def _counting_run(self, *args, **kwargs):
    COUNTS[self.fn.__name__] += 1
    return _run(self, *args, **kwargs)


def launches(model_kind: str, n_layer: int) -> collections.Counter:
    torch.manual_seed(0)
    if model_kind == "mamba":
        base = MambaForCausalLM(MambaConfig(d_model=64, n_layer=n_layer, vocab_size=97))
    else:
        cfg = Mamba2Config(d_model=64, n_layer=n_layer, vocab_size=97, headdim=32, d_state=32, chunk_size=16)
        base = Mamba2ForCausalLM(cfg)
    base.backend = "triton"
    model = get_peft_model(base, StateOffsetConfig(variant="h"))
    ids = torch.randint(0, 97, (2, 40))
    COUNTS.clear()
    model(ids, labels=ids).loss.backward()
    return collections.Counter(COUNTS)


def main() -> None:
    InterpretedFunction.run = _counting_run
    for kind in ("mamba", "mamba2"):
        two, three = launches(kind, 2), launches(kind, 3)
        per_layer = three - two
        print(f"{kind}: {sum(three.values())} launches at 3 layers, {sum(per_layer.values())} per layer: "
              f"{dict(sorted(per_layer.items()))}")  # fmt: skip


if __name__ == "__main__":
    main()
