"""`ssmtune serve`: load a base model and its adapters, then run the HTTP server (uvicorn) until interrupted."""

from __future__ import annotations

from typing import Any

from .args import ServeArgs


def build_app(args: ServeArgs) -> tuple[Any, Any]:
    """(FastAPI app, BatchEngine) for the arguments: the model, its adapters and the limits."""
    from ssmtune.core.io import load_adapter
    from ssmtune.serve.app import create_app
    from ssmtune.serve.batching import BatchEngine
    from ssmtune.train.loop import DTYPES

    from .commands import _cast, load_base_model, load_tokenizer_for

    tokenizer = load_tokenizer_for(args.tokenizer, args.model)
    model = load_base_model(args.model, backend=args.backend)
    for i, (name, folder) in enumerate(args.adapters().items()):
        if i == 0:
            model = load_adapter(model, folder, name)
        else:
            model.load_adapter(folder, name)
    _cast(model, args.precision, args.device).eval()
    engine = BatchEngine(
        model, eos_token_id=tokenizer.eos_token_id, max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000, max_queue=args.max_queue, cuda_graph=args.cuda_graph,
        state_dtype=None if args.state_dtype == "auto" else DTYPES[args.state_dtype],
    )  # fmt: skip
    app = create_app(engine, tokenizer, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                     max_body_bytes=args.max_body_bytes)  # fmt: skip
    return app, engine


def serve(args: ServeArgs) -> int:
    """Serve a model and many adapters over HTTP (batched, streaming)."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"ssmtune serve needs the serve extra: pip install 'ssmtune[serve]' ({e})") from e
    app, _ = build_app(args)
    # bounded: requests still running when SIGTERM comes are cut off after shutdown_timeout_s
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=args.shutdown_timeout_s
    )
    return 0
