"""The HTTP server on loopback: concurrent requests for several adapters, streaming, bad requests, staying up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from ssmtune import BitFitConfig, InitialStateConfig, LoraConfig, PrefixTuningConfig, StateOffsetConfig, get_peft_model
from ssmtune.cli.args import ServeArgs
from ssmtune.cli.serve import build_app
from ssmtune.models import MambaConfig, causal_lm_for
from ssmtune.tokenizer import ByteTokenizer

pytestmark = pytest.mark.timeout(60)

ADAPTERS = {
    "h": StateOffsetConfig(),
    "y": StateOffsetConfig(variant="y"),
    "h0": InitialStateConfig(conv_state=True),
    "prefix": PrefixTuningConfig(num_virtual_tokens=2),
    "lora": LoraConfig(r=2, target_modules=["out_proj"]),
    "lora_m": LoraConfig(r=3, target_modules=["x_proj.B", "dt_proj"]),
    "bias": BitFitConfig(),
}
MAX_PROMPT = 40
MAX_NEW = 24
MAX_BODY = 4096


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny byte-level model and seven adapters saved to disk, served through `ssmtune serve`'s app builder."""
    tmp = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=264, d_state=8, dt_rank=4, pad_vocab_size_multiple=8)
    base = causal_lm_for(cfg).eval()
    with torch.no_grad():
        for _, mixer in base.mixers():
            mixer.dt_proj.bias.add_(2.0)
    base.save_pretrained(tmp / "model")
    (tmp / "model" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByteTokenizer"}))
    g = torch.Generator().manual_seed(5)
    flags = []
    for name, config in ADAPTERS.items():
        copy = causal_lm_for(cfg, init=False).eval()
        copy.load_state_dict(base.state_dict())
        peft = get_peft_model(copy, config, adapter_name=name)
        with torch.no_grad():
            for p in peft.adapter_state_dict(name).values():
                p.add_(torch.randn(p.shape, generator=g) * (3.0 if name.startswith("lora") else 0.5))
        peft.save_pretrained(tmp / name)
        flags.append(f"{name}={tmp / name}")
    args = ServeArgs(
        model=str(tmp / "model"), adapter=flags, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW,
        batch_wait_ms=30, max_batch=16, device="cpu", max_body_bytes=MAX_BODY,
    )  # fmt: skip
    app, engine = build_app(args)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        assert thread.is_alive(), "the server thread died"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
    assert not thread.is_alive()


def _reference(engine, prompt: str, adapter: str | None, max_new_tokens: int, num_beams: int = 1) -> list[int]:
    """Greedy (or beam search) tokens of one prompt alone, through PeftModel.generate (the engine must be idle)."""
    _wait_idle(engine)
    tok, model = ByteTokenizer(), engine.model
    ids = torch.tensor([tok.encode(prompt)])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, num_beams=num_beams,
                             adapter_names=[adapter])[0, ids.shape[1] :].tolist()  # fmt: skip
    return out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


def _wait_idle(engine, timeout: float = 10.0) -> None:
    """Rows leave the batch right after their last event; wait for the worker to get there."""
    deadline = time.monotonic() + timeout
    while engine.active_rows or engine.pending:
        assert time.monotonic() < deadline, f"{engine.active_rows} rows still decoding, {engine.pending} waiting"
        time.sleep(0.01)


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))


def _sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


def test_concurrent_adapters_match_each_alone(served):
    url, engine = served
    cases = [
        ("the cat", "h"), ("a dog ran", "y"), ("x", None), ("the cat", "h0"), ("hello there", "prefix"),
        ("the cat", "y"), ("zz top", "h"), ("the cat", None), ("lorem", "lora"), ("ipsum", "lora"),
        ("the cat", "lora_m"), ("lorem", "bias"),
    ]  # fmt: skip
    want = [_reference(engine, p, a, 16) for p, a in cases]
    # the same prompt answers differently per adapter, so routing mistakes show
    assert len({tuple(want[i]) for i in (0, 3, 5, 7, 10)}) == 5
    before = engine.stats.steps
    bodies = [{"prompt": p, "adapter": a, "max_new_tokens": 16, "stream": i % 2 == 0} for i, (p, a) in enumerate(cases)]
    responses = asyncio.run(_post_all(url, bodies))
    for (prompt, adapter), body, r, ref in zip(cases, bodies, responses, want):
        assert r.status_code == 200, r.text
        final = _sse(r)[-1] if body["stream"] else r.json()
        assert final["done"] and final["adapter"] == adapter
        assert final["tokens"] == ref, (prompt, adapter)
        assert final["finish_reason"] == ("eos" if len(ref) < 16 else "length")
    # rows of several adapters were decoded in the same steps
    assert engine.stats.steps > before
    assert engine.stats.max_adapters >= 3 and engine.stats.max_rows >= 4
    _wait_idle(engine)


def test_streaming_events_add_up(served):
    url, engine = served
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/generate", json={"prompt": "stream me", "adapter": "prefix", "max_new_tokens": 12})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r)
    tokens = [e["token"] for e in events[:-1] if "token" in e]
    assert tokens == events[-1]["tokens"] == _reference(engine, "stream me", "prefix", 12)
    assert all("token" in e for e in events[:-2])  # only the last one before "done" may be a text flush
    assert "".join(e["text"] for e in events[:-1]) == events[-1]["text"] == ByteTokenizer().decode(tokens)


def test_beam_requests_match_generate_and_normal_ones_go_on(served):
    url, engine = served
    cases = [("the cat", "h", 1), ("a dog ran", "prefix", 3), ("lorem", "lora", 1), ("the cat", "lora_m", 4),
             ("zz top", None, 2), ("ipsum", "h0", 1), ("the cat", "bias", 3)]  # fmt: skip
    want = [_reference(engine, p, a, 16, k) for p, a, k in cases]
    # beam search finds other continuations than greedy here, so a beam request run greedily would show
    assert any(want[i] != _reference(engine, cases[i][0], cases[i][1], 16) for i in (1, 3, 4, 6))
    before = engine.stats.beam_requests
    bodies = [{"prompt": p, "adapter": a, "num_beams": k, "max_new_tokens": 16, "stream": i % 2 == 1}
              for i, (p, a, k) in enumerate(cases)]  # fmt: skip
    responses = asyncio.run(_post_all(url, bodies))
    for (prompt, adapter, k), body, r, ref in zip(cases, bodies, responses, want):
        assert r.status_code == 200, r.text
        events = _sse(r) if body["stream"] else [r.json()]
        final = events[-1]
        assert final["tokens"] == ref, (prompt, adapter, k)
        assert final["finish_reason"] == ("eos" if len(ref) < 16 else "length")
        if body["stream"]:
            assert [e["token"] for e in events if "token" in e] == ref
    assert engine.stats.beam_requests == before + 4
    _wait_idle(engine)


def test_sampling_is_seeded(served):
    url, _ = served
    body = {"prompt": "abc", "adapter": "y", "do_sample": True, "temperature": 1.5, "top_k": 50, "top_p": 0.95,
            "seed": 7, "max_new_tokens": 10, "stream": False}  # fmt: skip
    a, b, c = asyncio.run(_post_all(url, [body, body, {**body, "seed": 8}]))
    assert a.status_code == b.status_code == c.status_code == 200
    assert a.json()["tokens"] == b.json()["tokens"] != c.json()["tokens"]


BAD = [
    ({"prompt": "hi", "adapter": "nope"}, 404, "unknown adapter 'nope'"),
    ({"prompt": "x" * (MAX_PROMPT + 1)}, 400, f"41 tokens, over this server's limit of {MAX_PROMPT}"),
    ({"prompt": "hi", "max_new_tokens": MAX_NEW + 1}, 400, "max_new_tokens=25 is over"),
    ({"prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt": "hi", "temperature": -1}, 422, "temperature"),
    ({"prompt": "hi", "top_p": 2}, 422, "top_p"),
    ({"prompt": "hi", "top_k": 0}, 422, "top_k"),
    ({"prompt": ""}, 422, "prompt"),
    ({"adapter": "h"}, 422, "prompt: Field required"),
    ({"prompt": "hi", "beams": 3}, 422, "beams"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "hi", "num_beams": 0}, 422, "num_beams: Input should be greater than or equal to 1 (got 0)"),
    ({"prompt": "hi", "num_beams": 9}, 422, "num_beams: Input should be less than or equal to 8 (got 9)"),
    ({"prompt": "hi", "num_beams": 2.5}, 422, "num_beams: Input should be a valid integer"),
    ({"prompt": "hi", "num_beams": 2.5}, 422, "(got 2.5)"),
    ({"prompt": "hi", "num_beams": 3, "do_sample": True}, 422, "num_beams=3 is beam search"),
    ({"prompt": "hi", "num_beams": 3, "do_sample": True}, 422, "do_sample must be false (got true)"),
    # ranges that cannot work in generation are refused before the request joins a batch
    ({"prompt": "hi", "do_sample": True, "seed": 2**64}, 422, "seed: Input should be less than or equal to 1844"),
    ({"prompt": "hi", "do_sample": True, "temperature": 1e-300}, 422, "temperature: Input should be greater"),
    # strict types: no coercion of strings to numbers or booleans
    ({"prompt": "hi", "max_new_tokens": "8"}, 422, "max_new_tokens: Input should be a valid integer (got '8')"),
    ({"prompt": "hi", "stream": "yes"}, 422, "stream: Input should be a valid boolean (got 'yes')"),
    ({"prompt": "hi", "do_sample": 1}, 422, "do_sample: Input should be a valid boolean (got 1)"),
    ({"prompt": "hi", "seed": "7"}, 422, "seed: Input should be a valid integer (got '7')"),
]


def test_bad_requests_get_clear_errors_and_the_server_stays_up(served):
    url, engine = served
    with httpx.Client(base_url=url, timeout=30) as client:
        for body, status, message in BAD:
            r = client.post("/v1/generate", json=body)
            assert r.status_code == status, (body, r.text)
            assert message in r.json()["error"], (body, r.json())
        r = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and "error" in r.json()
        assert client.get("/v1/nothing").status_code == 404
        health = client.get("/health").json()
        assert health["status"] == "ok" and sorted(health["adapters"]) == sorted(ADAPTERS)
        listed = {a["name"]: a["mixable"] for a in client.get("/v1/adapters").json()["adapters"]}
        assert listed == {"h": True, "y": True, "h0": True, "prefix": True, "lora": True, "lora_m": True, "bias": False}
        r = client.post("/v1/generate", json={"prompt": "still here", "adapter": "h0", "stream": False,
                                              "max_new_tokens": 6})  # fmt: skip
    assert r.status_code == 200
    assert r.json()["tokens"] == _reference(engine, "still here", "h0", 6)


def test_client_going_away_frees_its_row(served):
    url, engine = served
    with httpx.Client(base_url=url, timeout=30) as client:
        body = {"prompt": "long one", "adapter": "h", "max_new_tokens": MAX_NEW}
        with client.stream("POST", "/v1/generate", json=body) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
    _wait_idle(engine)
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").json()["active_rows"] == 0


def test_serve_args_validation():
    with pytest.raises(ValueError, match="name=folder"):
        ServeArgs(model="m", adapter=["justafolder"])
    with pytest.raises(ValueError, match=r"unique.*\['a'\]"):
        ServeArgs(model="m", adapter=["a=x", "a=y"])
    with pytest.raises(ValueError, match="max_batch"):
        ServeArgs(model="m", max_batch=0)
    assert ServeArgs(model="m", adapter=["a=x", "b=y=z"]).adapters() == {"a": "x", "b": "y=z"}


def test_a_large_temperature_range_and_64_bit_seeds_still_work(served):
    url, _ = served
    body = {"prompt": "abc", "do_sample": True, "temperature": 1e-4, "seed": 2**64 - 1, "max_new_tokens": 4,
            "stream": False}  # fmt: skip
    (r,) = asyncio.run(_post_all(url, [body]))
    assert r.status_code == 200 and len(r.json()["tokens"]) <= 4


def _raw(port: int, head: bytes, chunks=(), timeout: float = 5.0) -> bytes:
    """Send a raw HTTP request to 127.0.0.1 (the server may close early: writes after that are dropped)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break
        out = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in out or len(out) < 12:
                data = sock.recv(65536)
                if not data:
                    break
                out += data
            while True:  # the rest of the (short) body
                data = sock.recv(65536)
                if not data:
                    break
                out += data
        return out


def _health_is_prompt(url: str) -> None:
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=5) as client:
        assert client.get("/health").json()["status"] == "ok"
    assert time.monotonic() - start < 1.0


def test_oversized_bodies_get_413_without_being_read(served):
    url, _ = served
    port = int(url.rsplit(":", 1)[1])
    # a Content-Length over the limit: refused from the header, the (never sent) 10 GB body is not waited for
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000000\r\n\r\n")  # fmt: skip
    start = time.monotonic()
    out = _raw(port, head)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert b"limit is 4096 bytes" in out and time.monotonic() - start < 2.0
    _health_is_prompt(url)
    # a chunked body with no length: refused as soon as it crosses the limit; the client's later chunks are not read
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    piece = b'{"prompt": "' + b"x" * 1000
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] + [b"400\r\n" + b"y" * 1024 + b"\r\n"] * 64
    out = _raw(port, head, chunks)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert b"more than 4096 bytes streamed" in out
    _health_is_prompt(url)
    # a body under the limit still works
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/generate", json={"prompt": "ok", "max_new_tokens": 2, "stream": False})
    assert r.status_code == 200


def test_a_non_streamed_client_going_away_frees_its_row(served, monkeypatch):
    url, engine = served
    forward = engine._forward

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", slow)
    before = engine.stats.steps
    body = {"prompt": "long one", "adapter": "h", "max_new_tokens": MAX_NEW, "stream": False}
    with httpx.Client(base_url=url, timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/generate", json=body)
    _wait_idle(engine, timeout=3)
    # freed well before its 24 steps (0.05 s each) were decoded
    assert engine.stats.steps - before < MAX_NEW - 4


def test_tokenizing_a_prompt_does_not_stall_the_event_loop(served):
    """A slow tokenizer (a long prompt) runs off the event loop: /health answers while it works."""
    from ssmtune.serve.app import create_app
    from ssmtune.serve.batching import BatchEngine

    _, shared = served

    class SlowTokenizer(ByteTokenizer):
        def encode(self, text, *args, **kwargs):
            time.sleep(1.5)
            return super().encode(text, *args, **kwargs)

    engine = BatchEngine(shared.model, eos_token_id=ByteTokenizer().eos_token_id)
    app = create_app(engine, SlowTokenizer(), max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        done = {}
        body = {"prompt": "slow", "max_new_tokens": 2, "stream": False}
        post = threading.Thread(target=lambda: done.update(r=httpx.post(f"{url}/v1/generate", json=body, timeout=20)))
        post.start()
        time.sleep(0.3)  # the request is being tokenized now
        start = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 0.5
        post.join(20)
        assert done["r"].status_code == 200
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_serve_state_dtype_flag(tmp_path):
    from ssmtune.cli.args import parse

    assert parse(ServeArgs, ["--model", "m"], prog="serve").state_dtype == "auto"
    assert parse(ServeArgs, ["--model", "m", "--state_dtype", "bf16"], prog="serve").state_dtype == "bf16"
    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=264, d_state=4, dt_rank=2, pad_vocab_size_multiple=8)
    causal_lm_for(cfg).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByteTokenizer"}))
    for flag, want in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        _, engine = build_app(ServeArgs(model=str(tmp_path / "model"), device="cpu", state_dtype=flag))
        assert engine.state_dtype == want
