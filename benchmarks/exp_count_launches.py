"""What one training step launches per layer (an experiment; CPU, under ``TRITON_INTERPRET=1``).

Builds a Mamba-1 and a Mamba-2 language model with State-offset (h) at two depths (bf16 base, fp32 adapter, bf16
autocast, as in bench_train_step.py), runs one forward + backward through the Triton backend under the interpreter
and counts the Triton launches per kernel. The difference between the two depths is what one more (middle) layer
launches: the numbers behind the host time per layer in docs/benchmarks.md ("Session 15"). The interpreter runs the
same launchers as the GPU, so the counts are the GPU's. ``--aten`` counts the PyTorch (aten) ops per layer instead,
with the Triton launches stubbed out (their outputs are left unwritten, so only the counts mean anything).

    PYTHONPATH=. python3 benchmarks/exp_count_launches.py [--aten]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction

from ssmtune import StateOffsetConfig, get_peft_model
from ssmtune.models import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

COUNTS: collections.Counter = collections.Counter()
_run = InterpretedFunction.run


def _counting_run(self, *args, **kwargs):
    COUNTS[self.fn.__name__] += 1
    return _run(self, *args, **kwargs)


class _AtenCounter(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        COUNTS[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def launches(model_kind: str, n_layer: int, aten: bool = False) -> collections.Counter:
    torch.manual_seed(0)
    if model_kind == "mamba":
        base = MambaForCausalLM(MambaConfig(d_model=64, n_layer=n_layer, vocab_size=97))
    else:
        cfg = Mamba2Config(d_model=64, n_layer=n_layer, vocab_size=97, headdim=32, d_state=32, chunk_size=16)
        base = Mamba2ForCausalLM(cfg)
    base.backend = "triton"
    model = get_peft_model(base.to(torch.bfloat16), StateOffsetConfig(variant="h"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ids = torch.randint(0, 97, (2, 32))
    COUNTS.clear()
    with _AtenCounter() if aten else contextlib.nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
    return collections.Counter(COUNTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aten", action="store_true", help="count aten ops (Triton launches stubbed out)")
    args = ap.parse_args()
    InterpretedFunction.run = (lambda self, *a, **k: None) if args.aten else _counting_run
    what = "aten ops" if args.aten else "Triton launches"
    for kind in ("mamba", "mamba2"):
        two, three = launches(kind, 2, args.aten), launches(kind, 3, args.aten)
        per_layer = three - two
        print(f"{kind}: {sum(three.values())} {what} at 3 layers, {sum(per_layer.values())} per layer: "
              f"{dict(sorted(per_layer.items(), key=lambda kv: -kv[1]))}")  # fmt: skip


if __name__ == "__main__":
    main()
