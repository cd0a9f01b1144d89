"""GraphedDecoder: static-buffer decoding (bucket padding, routing buffers, in-place beam reorder) == eager generate.

On the CPU the decoder runs its step eagerly (``cuda_graph=True``); the tests marked ``gpu`` capture it on CUDA.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from ssmtune import LoraConfig, PrefixTuningConfig, StateOffsetConfig, get_peft_model
from ssmtune.models.decode import DECODERS_ATTR, GraphedDecoder, bucket_size, clear_decoders

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
from _peft_cases import CASES, VOCAB, perturb, tiny_model

ARCHES = ("m1", "m2")
# every method, each alone (prefill-time ones too: the decoder must leave them to the prefill)
METHOD_PARAMS = [pytest.param(c, a, id=f"{c.id}-{a}") for c in CASES for a in c.arches]

ADAPTERS = {
    "h": StateOffsetConfig(),
    "y": StateOffsetConfig(variant="y"),
    "h_lowrank": StateOffsetConfig(rank=2, r_ratio=2),
    "prefix": PrefixTuningConfig(num_virtual_tokens=2),
}
ROWS = ["h", "y", None, "prefix", "h_lowrank", "h"]  # 6 rows: a bucket of 8, two pad rows


def _peft(arch: str, adapters: dict, device="cpu", dtype=torch.float32):
    names = list(adapters)
    peft = get_peft_model(tiny_model(arch), adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft.add_adapter(n, adapters[n])
    perturb(peft)
    return peft.to(device=device, dtype=dtype)


def _both(model, ids, graphed=True, **kw):
    eager = model.generate(ids, cuda_graph=False, **kw)
    static = model.generate(ids, cuda_graph=graphed, **kw)
    return eager, static


def _prompts(batch: int, length: int = 5, device="cpu") -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch)).to(device)


@pytest.mark.parametrize("arch", ARCHES)
def test_prefilled_states_are_contiguous(arch) -> None:
    # the decode kernels update the cache's states in place and refuse strided views (a scan's final state can be one)
    from ssmtune.models.cache import InferenceCache

    peft = _peft(arch, ADAPTERS)
    cache = InferenceCache(len(peft.base_model.backbone.layers))
    with torch.no_grad():
        peft(_prompts(len(ROWS)), cache=cache, adapter_names=ROWS)
    for layer in cache.layers:
        assert layer.ssm_state.is_contiguous() and layer.conv_state.is_contiguous()


def test_bucket_sizes() -> None:
    assert [bucket_size(b) for b in (1, 2, 3, 5, 16, 17, 64)] == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="batch must be >= 1"):
        bucket_size(0)


@pytest.mark.parametrize(("case", "arch"), METHOD_PARAMS)
def test_every_method_decodes_as_eager(case, arch) -> None:
    peft = get_peft_model(tiny_model(arch), case.make())
    perturb(peft)
    ids = _prompts(3)
    eager, static = _both(peft, ids, max_new_tokens=6)
    assert torch.equal(eager, static)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_mixed_adapters_per_row(arch, num_beams) -> None:
    peft = _peft(arch, ADAPTERS)
    ids = _prompts(len(ROWS))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row: row-by-row prefill, then decoding together
    kw = {"max_new_tokens": 5, "num_beams": num_beams, "adapter_names": ROWS, "attention_mask": mask}
    eager, static = _both(peft, ids, **kw)
    assert torch.equal(eager, static)
    # a new mix of the same adapters copies into the same buffers: no new step ("capture")
    (dec,) = peft.base_model.__dict__[DECODERS_ATTR].values()
    captures = dec.captures
    _, again = _both(peft, ids, **(kw | {"adapter_names": ROWS[::-1]}))
    assert dec.captures == captures
    assert torch.equal(again, peft.generate(ids, cuda_graph=False, **(kw | {"adapter_names": ROWS[::-1]})))


@pytest.mark.parametrize("arch", ARCHES)
def test_mixed_lora_rows_decode_as_eager(arch) -> None:
    adapters = {"la": LoraConfig(r=2, target_modules=["out_proj"]), "h": StateOffsetConfig()}
    peft = _peft(arch, adapters)
    ids = _prompts(3)
    eager, static = _both(peft, ids, max_new_tokens=5, adapter_names=["la", "h", None])
    assert torch.equal(eager, static)


@pytest.mark.parametrize("arch", ARCHES)
def test_sampling_with_a_seed(arch) -> None:
    peft = _peft(arch, {"h": StateOffsetConfig()})
    ids = _prompts(5)
    kw = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9}
    eager = peft.generate(ids, cuda_graph=False, generator=torch.Generator().manual_seed(7), **kw)
    static = peft.generate(ids, cuda_graph=True, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(eager, static)


@pytest.mark.parametrize("arch", ARCHES)
def test_beams_and_eos(arch) -> None:
    peft = _peft(arch, {"h": StateOffsetConfig()})
    ids = _prompts(3)
    for kw in ({"num_beams": 4, "eos_token_id": [3, 5]}, {"eos_token_id": 3, "min_new_tokens": 2}):
        eager, static = _both(peft, ids, max_new_tokens=7, **kw)
        assert torch.equal(eager, static)


def test_decoder_buffers_are_static() -> None:
    peft = _peft("m1", {"h": StateOffsetConfig()})
    ids = _prompts(3)
    peft.generate(ids, max_new_tokens=4, cuda_graph=True)
    (dec,) = peft.base_model.__dict__[DECODERS_ATTR].values()
    assert isinstance(dec, GraphedDecoder) and dec.bucket == 4 and dec.batch == 3
    ptrs = [layer.ssm_state.data_ptr() for layer in dec.cache.layers]
    h_ptrs = [st.h_off.data_ptr() for st in dec.offsets]
    peft.generate(ids, max_new_tokens=4, num_beams=1, cuda_graph=True)
    peft.generate(_prompts(3, length=7), max_new_tokens=4, cuda_graph=True)
    assert len(peft.base_model.__dict__[DECODERS_ATTR]) == 1
    assert [layer.ssm_state.data_ptr() for layer in dec.cache.layers] == ptrs
    assert [st.h_off.data_ptr() for st in dec.offsets] == h_ptrs
    # reorder is in place, and checks its length
    before = [layer.ssm_state.clone() for layer in dec.cache.layers]
    dec.reorder(torch.tensor([2, 0, 0]))
    for layer, old in zip(dec.cache.layers, before):
        assert torch.equal(layer.ssm_state[:3], old[[2, 0, 0]])
    with pytest.raises(ValueError, match="reorder index has 2 rows"):
        dec.reorder(torch.tensor([0, 1]))
    # copies of the model do not carry the decoders (graphs and static buffers)
    assert DECODERS_ATTR in peft.base_model.__dict__
    assert not copy.deepcopy(peft).base_model.__dict__[DECODERS_ATTR]
    clear_decoders(peft.base_model)
    assert DECODERS_ATTR not in peft.base_model.__dict__


def test_adapter_changes_are_seen() -> None:
    """Edits of adapter weights in place, and added or deleted adapters, reach the next generate."""
    peft = _peft("m2", {"h": StateOffsetConfig(variant="y")})
    ids = _prompts(2)
    first = peft.generate(ids, max_new_tokens=6, cuda_graph=True)
    with torch.no_grad():
        for p in peft.adapter_modules("h").values():
            for t in p.parameters():
                t.mul_(-3)
    second = peft.generate(ids, max_new_tokens=6, cuda_graph=True)
    assert torch.equal(second, peft.generate(ids, max_new_tokens=6, cuda_graph=False))
    assert not torch.equal(first, second)
    peft.add_adapter("h2", StateOffsetConfig())
    perturb(peft)
    for active in (["h", "h2"], "h2"):
        peft.set_adapter(active)
        assert torch.equal(
            peft.generate(ids, max_new_tokens=6, cuda_graph=True),
            peft.generate(ids, max_new_tokens=6, cuda_graph=False),
        )
    peft.delete_adapter("h")
    assert torch.equal(
        peft.generate(ids, max_new_tokens=6, cuda_graph=True), peft.generate(ids, max_new_tokens=6, cuda_graph=False)
    )


# 13 State-offset adapters (h' and y') and base-model rows, over 24 rows (a bucket of 32): rows share adapters
MANY = {f"h{i}": StateOffsetConfig() for i in range(8)} | {f"y{i}": StateOffsetConfig(variant="y") for i in range(5)}
MANY_ROWS = [list(MANY)[(5 * i) % 13] if i % 7 else None for i in range(24)]


def _many_adapters_decode_as_eager(arch: str, device: str = "cpu") -> None:
    peft = _peft(arch, MANY, device=device)
    ids = _prompts(len(MANY_ROWS), device=device)
    kw = {"max_new_tokens": 5, "adapter_names": MANY_ROWS}
    eager, static = _both(peft, ids, **kw)
    assert torch.equal(eager, static)
    (dec,) = peft.base_model.__dict__[DECODERS_ATTR].values()
    # the per-row offsets are a table of the distinct adapters (None: one zero entry), read through offset_index
    index = dec.offset_index.tolist()
    names = list(dict.fromkeys(MANY_ROWS))
    assert index == [names.index(n) for n in MANY_ROWS] + [0] * (dec.bucket - len(MANY_ROWS))
    with peft.route(MANY_ROWS) as routing:
        per_row, _ = dec._collect(len(MANY_ROWS), routing, None)
    rows = dec.offset_index[: len(MANY_ROWS)].long()
    for st, want in zip(dec.offsets, per_row):
        assert st.offset_index is dec.offset_index
        assert torch.equal(st.h_off[rows], want.h_off) and torch.equal(st.y_off[rows], want.y_off)
        assert not st.h_off[len(names) :].any() and not st.y_off[len(names) :].any()
    # another mix of the same adapters (more of them in the batch, other repeats): a copy into the same buffers
    captures = dec.captures
    for names in (MANY_ROWS[::-1], [f"h{i % 8}" if i % 3 else f"y{i % 5}" for i in range(24)]):
        _, again = _both(peft, ids, **(kw | {"adapter_names": names}))
        assert dec.captures == captures
        assert torch.equal(again, peft.generate(ids, cuda_graph=False, **(kw | {"adapter_names": names})))


@pytest.mark.parametrize("arch", ARCHES)
def test_many_adapters_share_offset_entries(arch) -> None:
    _many_adapters_decode_as_eager(arch)


def test_auto_is_eager_on_cpu() -> None:
    peft = _peft("m1", {"h": StateOffsetConfig()})
    peft.generate(_prompts(2), max_new_tokens=3)
    assert DECODERS_ATTR not in peft.base_model.__dict__


# --- CUDA: the captured step ----------------------------------------------------------------------------------------


def _cuda_model(arch: str, dtype):
    return _peft(arch, ADAPTERS, device="cuda", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHES)
def test_cuda_many_adapters_share_offset_entries(arch) -> None:
    # the captured step's Triton kernels read the offsets through offset_index
    _many_adapters_decode_as_eager(arch, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("rows", [ROWS + ["y", None], ROWS], ids=["bucket", "padded"])
def test_cuda_graphed_equals_eager(arch, num_beams, rows) -> None:
    # "bucket": 8 rows, the eager and the captured step run the same kernels; "padded": 6 rows in a bucket of 8
    peft = _cuda_model(arch, torch.float32)
    ids = _prompts(len(rows), device="cuda")
    kw = {"max_new_tokens": 12, "num_beams": num_beams}
    eager, graphed = _both(peft, ids, graphed=True, adapter_names=rows, **kw)
    assert torch.equal(eager, graphed)
    (dec,) = peft.base_model.__dict__[DECODERS_ATTR].values()
    assert dec.graph is not None and dec.replays > 0 and dec.captures == 1
    # another mix of the same adapters: replayed, not captured again
    eager, graphed = _both(peft, ids, graphed=True, adapter_names=rows[::-1], **kw)
    assert torch.equal(eager, graphed) and dec.captures == 1
    eager, graphed = _both(peft, ids[:1], graphed=True, adapter_names=["h"], **kw)
    assert torch.equal(eager, graphed)


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "arch"), METHOD_PARAMS)
def test_cuda_every_method_graphed_equals_eager(case, arch) -> None:
    peft = get_peft_model(tiny_model(arch), case.make())
    perturb(peft)
    peft.cuda()
    eager, graphed = _both(peft, _prompts(4, device="cuda"), graphed=True, max_new_tokens=8)
    assert torch.equal(eager, graphed)
    assert any(d.graph is not None for d in peft.base_model.__dict__[DECODERS_ATTR].values())


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHES)
def test_cuda_graphed_bf16_bucket_batch(arch) -> None:
    # a batch that fills its bucket runs the same kernels eagerly and graphed: the same tokens in bf16 too
    peft = _peft(arch, {"h": StateOffsetConfig()}, device="cuda", dtype=torch.bfloat16)
    ids = _prompts(16, device="cuda")
    eager, graphed = _both(peft, ids, graphed=True, max_new_tokens=16)
    assert torch.equal(eager, graphed)


@pytest.mark.gpu
def test_cuda_mixed_lora_falls_back_with_a_note() -> None:
    peft = _peft("m1", {"la": LoraConfig(r=2, target_modules=["out_proj"]), "h": StateOffsetConfig()}, "cuda")
    ids = _prompts(2, device="cuda")
    # asked for explicitly, an unsupported batch is an error; the default decodes it eagerly without a note
    with pytest.raises(ValueError, match="cuda_graph=True is not supported here"):
        peft.generate(ids, max_new_tokens=4, adapter_names=["la", "h"], cuda_graph=True)
    out = peft.generate(ids, max_new_tokens=4, adapter_names=["la", "h"])
    assert torch.equal(out, peft.generate(ids, max_new_tokens=4, adapter_names=["la", "h"], cuda_graph=False))


def test_a_lora_adapter_without_rows_in_the_batch_does_not_block_capture() -> None:
    from ssmtune.core.routing import RoutedLM
    from ssmtune.models.decode import unsupported_reason

    peft = _peft("m1", {"la": LoraConfig(r=2, target_modules=["out_proj"]), "h": StateOffsetConfig(),
                        "y": StateOffsetConfig(variant="y")})  # fmt: skip
    for names, blocked in ((["h", "y", None], False), (["la", "h"], True), (["la", "la"], False)):
        with peft.route(names) as routing:
            reason = unsupported_reason(RoutedLM(peft.base_model, routing), capture=True)
        assert (reason is not None) is blocked, (names, reason)
        assert unsupported_reason(RoutedLM(peft.base_model, routing), capture=False) is None


def test_steps_are_kept_per_offset_layout() -> None:
    """A step is built once per layout of the offset buffers and kept; another mix of adapters reuses it; a model
    change (an adapter added) drops them all."""
    peft = _peft("m1", ADAPTERS)
    ids = _prompts(4)

    def run(names):
        static = peft.generate(ids, max_new_tokens=3, cuda_graph=True, adapter_names=names)
        assert torch.equal(static, peft.generate(ids, max_new_tokens=3, cuda_graph=False, adapter_names=names))
        (dec,) = peft.base_model.__dict__[DECODERS_ATTR].values()
        return dec.captures

    assert run(["h", "y", "h", None]) == 1
    assert run(["h_lowrank", "y", "y", "h"]) == 1  # h' and y' per row again: same buffers
    assert run(["h", "h", None, "h"]) == 2  # h' only
    assert run(["y", None, "h", "y"]) == 2
    assert run(["h", None, None, "h_lowrank"]) == 2
    peft.add_adapter("extra", StateOffsetConfig())
    assert run(["h", "y", "h", None]) == 3


def test_eval_generation_passes_cuda_graph_on_cuda_only(monkeypatch) -> None:
    from ssmtune.eval.generation import complete

    peft = _peft("m1", {"h": StateOffsetConfig()})
    seen = []
    generate = peft.generate
    monkeypatch.setattr(peft, "generate", lambda *a, **kw: seen.append(kw.get("cuda_graph")) or generate(*a, **kw))

    class Tok:
        eos_token_id, pad_token_id = 0, 0

        def decode(self, ids):
            return " ".join(map(str, ids))

    default = complete(peft, Tok(), [1, 2, 3], max_new_tokens=4)
    assert default == complete(peft, Tok(), [1, 2, 3], max_new_tokens=4, cuda_graph=False)
    assert default == complete(peft, Tok(), [1, 2, 3], max_new_tokens=4, cuda_graph=True)
    # the choice reaches generate only for CUDA tensors (a CPU run decodes eagerly)
    assert seen == [False, False, False]


def test_a_failed_capture_decodes_eagerly() -> None:
    """A capture that raises (here: no CUDA) leaves a decoder that steps eagerly on its buffers, with a warning."""
    from ssmtune.models.decode import decoder_for
    from ssmtune.models.generate import EagerStep, prefill

    peft = _peft("m2", {"h": StateOffsetConfig()})
    lm, ids = peft.base_model, _prompts(4)  # a full bucket: the same shapes as the eager step
    with torch.no_grad():
        cache, _ = prefill(lm, ids)
        ref_cache, _ = prefill(lm, ids)
        dec = decoder_for(lm, cache, capture=True)
        with pytest.warns(UserWarning, match="capture failed"):
            dec.start(cache)
        assert dec.graph is None and not dec.capture
        eager = EagerStep(lm, ref_cache)
        for tok in (ids[:, -1], ids[:, 0]):
            assert torch.equal(dec.step(tok), eager.step(tok))


def test_an_adapter_that_changes_the_state_size() -> None:
    from ssmtune import AdditionalScanConfig

    # a decoder built for N states, then the model gains states: its buffers are built again
    peft = _peft("m1", {"lora": LoraConfig(r=2, target_modules=["out_proj"])})
    ids = _prompts(2)
    peft.generate(ids, max_new_tokens=3, cuda_graph=True)
    peft.add_adapter("scan", AdditionalScanConfig(n_states=3))
    perturb(peft)
    peft.set_adapter(["lora", "scan"])
    eager, static = _both(peft, ids, max_new_tokens=5)
    assert torch.equal(eager, static)


def _count_walks(monkeypatch) -> list:
    from ssmtune.models import decode

    walks = []
    watch = decode._Watch  # a walk of the model, then a snapshot of what it found
    monkeypatch.setattr(decode, "_Watch", lambda lm: walks.append(1) or watch(lm))
    return walks


def test_repeated_generate_calls_do_not_walk_the_model(monkeypatch) -> None:
    """The walk runs on a decoder's first start; later starts (new prompts, another mix of state adapters, beams)
    check the model against a snapshot instead, and reuse the steps."""
    walks = _count_walks(monkeypatch)
    peft = _peft("m1", ADAPTERS)
    ids = _prompts(4)
    for names in (None, ["h", "y", "h", None], ["y", None, "h", "y"], ["h", "y", "h", None], None):
        static = peft.generate(ids, max_new_tokens=3, cuda_graph=True, adapter_names=names)
        assert torch.equal(static, peft.generate(ids, max_new_tokens=3, cuda_graph=False, adapter_names=names))
    assert len(walks) == 1
    peft.generate(_prompts(4, length=7), max_new_tokens=3, cuda_graph=True)
    assert len(walks) == 1
    (dec,) = peft.base_model.__dict__[DECODERS_ATTR].values()
    assert dec.watch.unchanged()


def test_model_changes_still_walk_and_invalidate(monkeypatch) -> None:
    """Every change a captured step depends on is seen by the cheap check: adapters added, switched, deleted, LoRA
    flags set by hand, train / eval, a parameter's storage replaced (as ``.to()`` and back does). Each walks again, and
    the step decodes as the eager one."""
    import gc
    import weakref

    walks = _count_walks(monkeypatch)
    peft = _peft("m1", {"h": StateOffsetConfig()})
    ids = _prompts(2)

    def check() -> int:
        static = peft.generate(ids, max_new_tokens=4, cuda_graph=True)
        assert torch.equal(static, peft.generate(ids, max_new_tokens=4, cuda_graph=False))
        return len(walks)

    def lora_modules():
        return list(peft.adapter_modules("la").values())

    assert check() == 1
    peft.add_adapter("la", LoraConfig(r=2, target_modules=["out_proj"]))
    perturb(peft)
    assert check() == 2
    peft.set_adapter(["h", "la"])
    assert check() == 3 and check() == 3
    lora_modules()[0].active = False  # by hand, behind ssmtune's back
    assert check() == 4
    peft.train()
    assert check() == 5
    peft.eval()
    assert check() == 6
    weight = peft.base_model.backbone.layers[0].mixer.out_proj.base_layer.weight
    weight.data = weight.data.clone()  # same values, another address: a captured graph would read the old one
    assert check() == 7
    gone = weakref.ref(lora_modules()[0])
    peft.delete_adapter("la")
    assert check() == 8
    # the decoder's snapshot does not keep a deleted adapter alive
    gc.collect()
    assert gone() is None


# --- decode states in bf16 (generate(state_dtype=...)) ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_bf16_states_static_decoder_equals_eager(arch, num_beams) -> None:
    # a State-offset adapter, and mixed adapters per row (h, y, none, prefix, low-rank h; 6 rows in a bucket of 8)
    peft = _peft(arch, ADAPTERS)
    ids = _prompts(len(ROWS))
    for names in (None, ROWS):
        kw = {"max_new_tokens": 6, "num_beams": num_beams, "adapter_names": names, "state_dtype": torch.bfloat16}
        eager, static = _both(peft, ids, **kw)
        assert torch.equal(eager, static)
    decoders = list(peft.base_model.__dict__[DECODERS_ATTR].values())
    assert decoders and all(d.state_dtype == torch.bfloat16 for d in decoders)
    for dec in decoders:
        assert {layer.ssm_state.dtype for layer in dec.cache.layers} == {torch.bfloat16}


def test_fp32_and_bf16_states_get_their_own_decoders() -> None:
    peft = _peft("m2", {"h": ADAPTERS["h"]})
    ids = _prompts(3)
    fp32 = peft.generate(ids, max_new_tokens=5, cuda_graph=True)
    bf16 = peft.generate(ids, max_new_tokens=5, cuda_graph=True, state_dtype=torch.bfloat16)
    again = peft.generate(ids, max_new_tokens=5, cuda_graph=True, state_dtype=None)
    assert torch.equal(fp32, again)
    assert torch.equal(bf16, peft.generate(ids, max_new_tokens=5, cuda_graph=False, state_dtype=torch.bfloat16))
    decoders = peft.base_model.__dict__[DECODERS_ATTR]
    assert sorted(str(d.state_dtype) for d in decoders.values()) == ["torch.bfloat16", "torch.float32"]
    for dec in decoders.values():
        assert dec.cache.layers[0].ssm_state.dtype == dec.state_dtype


def test_a_decoder_refuses_a_cache_of_another_state_dtype() -> None:
    from ssmtune.models.generate import prefill

    peft = _peft("m1", {"h": ADAPTERS["h"]})
    cache, _ = prefill(peft.base_model, _prompts(2), state_dtype=torch.bfloat16)
    dec = GraphedDecoder(peft.base_model, 2, torch.device("cpu"), torch.float32, capture=False)
    with pytest.raises(ValueError, match=r"^cache states are torch.bfloat16, the decoder's are torch.float32$"):
        dec.start(cache)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHES)
def test_cuda_graphed_bf16_states_equal_eager(arch) -> None:
    peft = _peft(arch, ADAPTERS, device="cuda", dtype=torch.bfloat16)
    ids = _prompts(len(ROWS), device="cuda")
    kw = {"max_new_tokens": 8, "adapter_names": ROWS, "state_dtype": torch.bfloat16}
    eager, graphed = _both(peft, ids, graphed=None, **kw)
    assert torch.equal(eager, graphed)
