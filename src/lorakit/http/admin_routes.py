"""vLLM's adapter admin API — POST /v1/load_lora_adapter and /v1/unload_lora_adapter — as a separate privilege.

vLLM lets anyone holding the inference key load adapters (or turns the routes on for all with
an env flag). Here the routes exist only when the server has an admin key, and only that key
opens them; the inference key never does. A `lora_path` must resolve (symlinks followed)
inside one of the server's `--adapter-dir` roots, every file in it too, and stay under a size
cap — an admin key is not a licence to read any file on the machine. The texts and statuses
are vLLM's, so tools written for its admin API work unchanged.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from lorakit.errors import AdapterFileNotFoundError, AdapterNameError, LorakitError
from lorakit.http.errors import ApiError, check_key
from lorakit.http.local_adapters import folder_problem
from lorakit.http.state import ServerState


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str | None = None
    lora_path: str | None = None
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str | None = None
    lora_int_id: int | None = None  # vLLM's field; accepted, the name decides


def checked_adapter_path(raw: str, roots: list[Path], max_bytes: int) -> Path:
    """The adapter folder `raw` names, if it and every file in it lie inside `roots` and under `max_bytes`."""
    if not roots:
        raise ApiError(400, "This server loads adapters over the API only from its adapter directories; start it "
                            "with --adapter-dir DIR.", param="lora_path")
    path = Path(raw)
    if ".." in path.parts:
        raise ApiError(400, f"lora_path {raw!r} must not contain '..'.", param="lora_path")
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        if not candidate.exists():
            continue
        problem = folder_problem(candidate, roots, max_bytes, shown=raw)
        if problem is not None:
            raise ApiError(400, f"lora_path: {problem}", param="lora_path")
        return candidate.resolve()
    raise ApiError(404, f"No adapter found at {raw!r} inside {', '.join(map(str, roots))}.", type="not_found_error",
                   param="lora_path")


def refuse_followed(state: ServerState, name: str) -> None:
    """The registry decides what a name it serves means: loading over it here would leave no trace in the
    registry's history, and the next poll would silently put the registry's version back."""
    if state.sync is not None and state.sync.owns(name):
        raise ApiError(400, f"'{name}' follows the adapter registry; change it there (lorakit registry promote / "
                            "rollback), not through the admin API.", type="InvalidUserInput", param="lora_name")


def admin_router(state: ServerState) -> APIRouter:
    def admin_key(request: Request) -> None:
        check_key(request, state.admin_key, "admin")

    router = APIRouter(dependencies=[Depends(admin_key)])

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
        if not body.lora_name or not body.lora_path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", type="InvalidUserInput")
        if body.lora_name in state.base_names:
            raise ApiError(400, f"'{body.lora_name}' is the base model's name; pick another.", type="InvalidUserInput",
                           param="lora_name")
        refuse_followed(state, body.lora_name)
        path = checked_adapter_path(body.lora_path, state.adapter_roots, state.max_adapter_bytes)
        try:
            future = state.engine.adapters.load(body.lora_name, path, replace=body.load_inplace)
            await asyncio.wrap_future(future)
        except AdapterNameError as error:  # already loaded (and not load_inplace)
            raise ApiError(400, str(error), type="InvalidUserInput", param="lora_name") from None
        except AdapterFileNotFoundError as error:
            raise ApiError(404, f"Loading lora adapter '{body.lora_name}' failed: {error}", type="NotFoundError",
                           param="lora_path") from None
        except LorakitError as error:  # corrupt, pickled, another base: the loader's own words
            raise ApiError(400, f"Loading lora adapter '{body.lora_name}' failed: {error}", type="BadRequestError",
                           param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
        if not body.lora_name:
            raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", type="InvalidUserInput")
        refuse_followed(state, body.lora_name)
        try:
            await asyncio.wrap_future(state.engine.adapters.unload(body.lora_name))
        except AdapterNameError:
            raise ApiError(404, f"The lora adapter '{body.lora_name}' cannot be found.", type="NotFoundError",
                           param="lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return router
