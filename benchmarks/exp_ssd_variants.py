"""Versions of the Mamba-2 SSD kernels timed side by side in one process (an experiment, not a benchmark).

Each ``--variant NAME=PATH[@JSON]`` is a copy of ``ssmtune/ops/ssd/fused.py`` (e.g. an earlier commit's, from
``git show``) imported as its own module, with the launch settings JSON (see ``--sweep``) if given; the library's own
file is always the variant "current". Every version is first checked
against the fp32 reference (``ssd_scan_ref``) on one case with every flag (B 2, L 1031, H 24, P 64, N 128, G 8,
chunk 256, per-row states and offsets; y, final state and every gradient, RMS-relative error), in bf16 and fp32. Then
each is timed at B 8, P 64, N 128, bf16, chunk 256, with D, z, dt_bias and softplus ("bare"), plus h0 ("h0"), plus
h' and y' ("hy"): the no-grad forward and forward+backward, medians of triton.testing.do_bench, two rounds with the
versions interleaved (best kept). ``--profile`` adds each version's device time per kernel at the first shape ("hy").

``--sweep JSON`` (repeatable) checks and times "current" with its launch settings changed: ``warps`` (the dx / dC
kernels' ``BWD_WARPS``), ``stages`` (their ``num_stages``), ``hpp`` (the cap on heads per program), ``fwd_warps`` (the
forward chunk-scan kernel's ``FWD_WARPS``); ``'{}'`` is the default.

    python3 benchmarks/exp_ssd_variants.py --variant base=exp_variants/ssd_fused_base.py --profile \\
        --sweep '{}' --sweep '{"stages": 2}' --out $OUT/ssd_variants.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ssd import device_times, make
from exp_scan_variants import load

from ssmtune.ops.ssd import fused as current
from ssmtune.ops.ssd.naive import ssd_scan_ref

FLAGS = ("bare", "h0", "hy")


def call(mod, t: dict, flags: str, chunk: int = 256, final: bool = False):
    kw = {"D": t["D"], "z": t["z"], "dt_bias": t["dt_bias"], "dt_softplus": True}
    if flags == "h0":
        kw["initial_state"] = t["h0"]
    elif flags in ("hy", "all"):
        kw.update(state_offset=t["h_off"], y_offset=t["y_off"])
        if flags == "all":
            kw["initial_state"] = t["h0"]
    fn = ssd_scan_ref if mod is None else mod.ssd_scan_triton
    return fn(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=chunk, return_final_state=final, **kw)


@functools.cache
def _inputs(dtype: torch.dtype):
    torch.manual_seed(0)
    t = make(2, 1031, 24, 64, 128, 8, dtype, "cuda")
    with torch.no_grad():
        for k in ("h0", "h_off", "y_off"):  # per batch row
            t[k] = t[k].unsqueeze(0).expand(2, *t[k].shape).clone().add_(torch.randn_like(t[k]) * 0.05)
    t = {k: v.detach().requires_grad_() for k, v in t.items()}
    t32 = {k: v.detach().float().requires_grad_() for k, v in t.items()}
    dy = torch.randn_like(t32["x"])
    dh = torch.randn(2, 24, 64, 128, device="cuda")
    return t, dy, dh, _outputs(None, t32, dy, dh)


def _outputs(mod, ins: dict, dy: torch.Tensor, dh: torch.Tensor) -> dict:
    y, h = call(mod, ins, "all", final=True)
    leaves = list(ins.values())
    grads = torch.autograd.grad((y.float() * dy).sum() + (h * dh).sum(), leaves)
    return {"y": y.float(), "h_L": h.float(), **{"d" + k: g.float() for k, g in zip(ins, grads)}}


def check(mod, dtype: torch.dtype) -> dict:
    """RMS-relative errors of y, h_L and every gradient against the fp32 reference (per-row h0, h', y')."""
    t, dy, dh, want = _inputs(dtype)
    got_all = _outputs(mod, t, dy, dh)
    err = {}
    for k, ref in want.items():
        got = got_all[k]
        err[k] = float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30).detach())
    return err


def times(mod, t: dict, dy: torch.Tensor) -> dict:
    leaves = list(t.values())
    res = {}
    for flags in FLAGS:
        with torch.no_grad():
            fwd = do_bench(lambda flags=flags: call(mod, t, flags), return_mode="median")

        def step(flags=flags):
            torch.autograd.grad(call(mod, t, flags), leaves, dy, allow_unused=True)

        res[flags] = {"fwd_ms": fwd, "fwd_bwd_ms": do_bench(step, return_mode="median")}
    return res


def profile(mod, t: dict, dy: torch.Tensor) -> dict:
    """Device time (us) of each kernel per forward+backward with h' and y'."""
    leaves = list(t.values())
    return device_times(lambda: torch.autograd.grad(call(mod, t, "hy"), leaves, dy, allow_unused=True))


def apply(mod, cfg: dict) -> None:
    """Set a version's launch settings (``'{}'``: its defaults)."""
    if not hasattr(mod, "_exp_defaults"):
        mod._exp_defaults = (mod._bwd_stages, mod._heads_per_program)
    stages, hpp = mod._exp_defaults
    mod.BWD_WARPS = cfg.get("warps")
    if hasattr(mod, "FWD_WARPS"):  # versions before session 14 have no such knob
        mod.FWD_WARPS = cfg.get("fwd_warps")
    mod._bwd_stages = (lambda *ts: cfg["stages"]) if "stages" in cfg else stages
    mod._heads_per_program = functools.partial(hpp, cap=cfg["hpp"]) if "hpp" in cfg else hpp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="NAME=PATH of a fused.py copy")
    ap.add_argument("--shapes", nargs="+", default=["8192,64,1", "2048,24,1", "8192,64,8", "2048,24,8"], help="L,H,G")
    ap.add_argument("--sweep", action="append", default=[], help="JSON launch settings of 'current'")
    ap.add_argument("--sweep-shapes", type=int, default=2, help="the sweep runs on the first K shapes")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("ssd_variants.json"))
    args = ap.parse_args()

    mods = {"current": current}
    for spec in args.variant:
        name, path = spec.split("=", 1)
        path, _, cfg = path.partition("@")
        mods[name] = load(f"ssd_variant_{name}", Path(path))
        apply(mods[name], json.loads(cfg or "{}"))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "check": {}, "times": {}, "sweep": {}}
    res["triton"] = __import__("triton").__version__
    checks = [(name, mod, None) for name, mod in mods.items()] + [("current", current, c) for c in args.sweep]
    for name, mod, cfg_s in checks:
        if cfg_s is not None:
            apply(current, json.loads(cfg_s))
        for dtype in (torch.bfloat16, torch.float32):
            err = check(mod, dtype)
            res["check"][f"{name}{cfg_s or ''}/{str(dtype)[6:]}"] = err
            worst = max(err, key=err.get)
            print(f"check {name:<10} {cfg_s or '':<28} {str(dtype)[6:]:<9} worst {worst} {err[worst]:.2e}")
        apply(current, {})
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    for i, (L, H, G) in enumerate(shapes):
        torch.manual_seed(0)
        t = make(8, L, H, 64, 128, G, torch.bfloat16, "cuda")
        dy = torch.randn_like(t["x"])
        key = f"L{L} H{H} G{G}"
        res["times"][key] = {}
        for _ in range(2):
            for name, mod in mods.items():
                got = times(mod, t, dy)
                best = res["times"][key].setdefault(name, got)
                for flags, v in got.items():
                    for k in v:
                        best[flags][k] = min(best[flags][k], v[k])
        if i < args.sweep_shapes:
            for cfg_s in args.sweep:
                apply(current, json.loads(cfg_s))
                try:
                    res["sweep"].setdefault(key, {})[cfg_s] = times(current, t, dy)
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a result
                    res["sweep"].setdefault(key, {})[cfg_s] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                apply(current, {})
        if args.profile and i == 0:
            res["profile"] = {name: profile(mod, t, dy) for name, mod in mods.items()}
        del t, dy
        torch.cuda.empty_cache()
        args.out.write_text(json.dumps(res, indent=1))
    if "profile" in res:
        keys = sorted(
            {k for v in res["profile"].values() for k in v}, key=lambda k: -res["profile"]["current"].get(k, 0)
        )
        print("\nus per fwd+bwd (hy), first shape: " + " | ".join(mods))
        for k in keys:
            print(f"  {k:<60} " + " | ".join(f"{res['profile'][n].get(k, 0.0):8.1f}" for n in mods))
    for key, cfgs in res["sweep"].items():
        print(f"\nsweep {key} (fwd / fwd+bwd ms, bare | hy)")
        for c, v in cfgs.items():
            line = v.get("error") or " | ".join(
                f"{v[f]['fwd_ms']:.3f} / {v[f]['fwd_bwd_ms']:.3f}" for f in ("bare", "hy")
            )
            print(f"  {c:<32} {line}")
    print("\nshape         version     bare fwd / f+b    h0 fwd / f+b      hy fwd / f+b    hy/bare f+b  vs first f+b")
    for key, by in res["times"].items():
        first = next(iter(by.values()))
        for name, v in by.items():
            cells = "  ".join(f"{v[f]['fwd_ms']:6.3f} / {v[f]['fwd_bwd_ms']:6.3f}" for f in FLAGS)
            ratio = v["hy"]["fwd_bwd_ms"] / v["bare"]["fwd_bwd_ms"]
            vs = v["bare"]["fwd_bwd_ms"] / first["bare"]["fwd_bwd_ms"]
            print(f"{key:<13} {name:<10}  {cells}   {ratio:6.3f}x      {vs:6.3f}x")


if __name__ == "__main__":
    main()
