"""The live server as the dashboard sees it: health, served models and a Prometheus scrape, and the
playground's side-by-side chat — all through the server's public HTTP API, as any client would.

The page polls `snapshot()` and turns counter deltas into rates itself, so the dashboard keeps
no time series and a restarted dashboard loses nothing the server does not keep. Mounted in
`lorakit serve --ui`, the client talks to the serving app in-process (httpx's ASGI transport):
same routes, same keys, no second socket.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "lorakit_"
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_ratio", "kv_cache_blocks_used",
          "kv_cache_blocks_total", "adapters_resident", "generation_tokens_per_second")
COUNTERS = ("generation_tokens", "prompt_tokens", "adapter_cache_hits", "adapter_cache_misses",
            "adapter_cache_evictions", "adapter_cache_loads")
HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "queue_time_seconds")


def parse_metrics(text: str) -> dict:
    """The numbers the server page draws, from the server's /metrics text: gauges, counters, requests
    by status, and each latency histogram summed over adapters as (sum, count, cumulative buckets)."""
    out: dict = {"gauges": {}, "counters": {}, "requests": {}, "histograms": {}}
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix(PREFIX)
        for sample in family.samples:
            short = sample.name.removeprefix(PREFIX)
            if name in GAUGES:
                out["gauges"][name] = sample.value
            elif name in COUNTERS and short.endswith("_total"):
                out["counters"][name] = sample.value
            elif name == "requests" and short == "requests_total":
                status = sample.labels.get("status", "")
                out["requests"][status] = out["requests"].get(status, 0.0) + sample.value
            elif name in HISTOGRAMS:
                histogram = out["histograms"].setdefault(name, {"sum": 0.0, "count": 0.0, "buckets": {}})
                if short.endswith("_sum"):
                    histogram["sum"] += sample.value
                elif short.endswith("_count"):
                    histogram["count"] += sample.value
                elif short.endswith("_bucket"):
                    edge = sample.labels["le"]
                    histogram["buckets"][edge] = histogram["buckets"].get(edge, 0.0) + sample.value
    return out


def _models(reply: httpx.Response) -> list[dict]:
    listed = reply.json().get("data", []) if reply.status_code == 200 else []
    return [{"id": m["id"], "parent": m.get("parent"), "root": m.get("root")} for m in listed]


class ServerView:
    def __init__(self, url: str | None, api_key: str | None = None, transport: httpx.AsyncBaseTransport | None = None):
        self.url = url.rstrip("/") if url else None
        self.api_key = api_key
        self.transport = transport

    @property
    def configured(self) -> bool:
        return self.url is not None

    def _client(self, timeout: float) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout, transport=self.transport)

    async def snapshot(self) -> dict:
        """{"time", "health", "models", "metrics"}; an unreachable server is reported, not raised."""
        async with self._client(timeout=5.0) as client:
            try:
                health, models, metrics = await asyncio.gather(
                    client.get("/health"), client.get("/v1/models"), client.get("/metrics"))
            except httpx.HTTPError as error:
                return {"time": time.time(), "health": f"unreachable: {error}", "models": [], "metrics": None}
        return {"time": time.time(), "health": health.json().get("status", str(health.status_code)),
                "models": _models(models), "metrics": parse_metrics(metrics.text) if metrics.status_code == 200 else None}

    async def base_model(self) -> str | None:
        """The served model without a parent (the playground's right-hand side), from /v1/models alone."""
        async with self._client(timeout=5.0) as client:
            try:
                listed = _models(await client.get("/v1/models"))
            except httpx.HTTPError:
                return None
        return next((m["id"] for m in listed if m["parent"] is None), None)

    async def chat_side_by_side(self, adapter: str, base: str, prompt: str, max_tokens: int) -> dict:
        """The same chat message to `adapter` and to the base model at once, greedy: {"adapter", "base"},
        each {"model", "text", "seconds"} or {"model", "error"}."""
        async def ask(client: httpx.AsyncClient, model: str) -> dict:
            started = time.perf_counter()
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                    "max_tokens": max_tokens}
            try:
                reply = await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as error:
                return {"model": model, "error": f"unreachable: {error}"}
            payload = reply.json()
            if reply.status_code != 200:
                return {"model": model, "error": payload.get("error", {}).get("message", reply.text)}
            return {"model": model, "text": payload["choices"][0]["message"]["content"],
                    "seconds": round(time.perf_counter() - started, 3)}

        async with self._client(timeout=120.0) as client:
            with_adapter, plain = await asyncio.gather(ask(client, adapter), ask(client, base))
        return {"adapter": with_adapter, "base": plain}
