"""The peer for bench/serve_http.py: a PEFT server that switches adapters between batches.

S-LoRA's PEFT baseline as a server: requests queue up; a worker takes everything waiting,
groups it by adapter and, per group, `set_adapter` + one batched `generate`, then answers.
No streaming (PEFT has no engine to stream from): its TTFT is its whole latency. It speaks
/v1/completions with token-id prompts, the subset the load generator sends.

    python bench/peft_server.py --port 8001 --adapter-dir DIR
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from concurrent.futures import Future
from pathlib import Path

import peft
import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from lorakit.base_models import load_model


class Completion(BaseModel):
    model: str
    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    ignore_eos: bool = True
    stream: bool = False


def build(adapter_dir: Path):
    base, _ = load_model()
    folders = sorted(p for p in adapter_dir.iterdir() if (p / "adapter_config.json").is_file())
    model = peft.PeftModel.from_pretrained(base, folders[0], adapter_name=folders[0].name)
    for folder in folders[1:]:
        model.load_adapter(folder, adapter_name=folder.name)
    return model.eval()


def serve(model, port: int) -> None:
    pending: list[tuple[Completion, Future]] = []
    ready = threading.Condition()

    def worker() -> None:
        while True:
            with ready:
                while not pending:
                    ready.wait()
                batch, pending[:] = list(pending), []
            groups: dict[str, list[tuple[Completion, Future]]] = {}
            for item in batch:
                groups.setdefault(item[0].model, []).append(item)
            for name, items in groups.items():
                model.set_adapter(name)
                width = max(len(r.prompt) for r, _ in items)
                new = max(r.max_tokens for r, _ in items)
                ids = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r, _ in items])
                mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r, _ in items])
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                         do_sample=False, pad_token_id=0)
                for row, (request, future) in enumerate(items):
                    future.set_result(out[row, width:width + request.max_tokens].tolist())

    threading.Thread(target=worker, daemon=True).start()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Completion) -> dict:
        future: Future = Future()
        with ready:
            pending.append((request, future))
            ready.notify()
        tokens = await asyncio.wrap_future(future)
        return {"object": "text_completion", "model": request.model,
                "choices": [{"index": 0, "text": "", "token_ids": tokens, "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(request.prompt), "completion_tokens": len(tokens),
                          "total_tokens": len(request.prompt) + len(tokens)}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--adapter-dir", type=Path, required=True)
    args = parser.parse_args()
    serve(build(args.adapter_dir), args.port)


if __name__ == "__main__":
    main()
