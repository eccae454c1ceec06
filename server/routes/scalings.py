"""/scalings: the router's expert mix for recent requests (a bounded log; with replicas, the deployment's)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from server.access import TOKEN_TEXT, require
from server.deps import get_manager
from server.protocol.errors import APIError
from server.protocol.schemas import (
    BucketedScalingsLog,
    Cleared,
    ScalingsDetail,
    ScalingsLogResponse,
    TokenText,
    error_responses,
)
from server.serving.manager import ModelManager

router = APIRouter(tags=["scalings"])

_INCLUDE_TEXT = Query(
    False,
    description="add each token's text (the request's prompt and answer): admin level, since the log holds "
    "every client's requests",
)


@router.get("/scalings", response_model=ScalingsLogResponse | BucketedScalingsLog, responses=error_responses(422))
async def list_scalings(
    bucketed: bool = Query(False, description="group by sequence length, as peft's get_bucketed_scalings_log"),
    manager: ModelManager = Depends(get_manager),
) -> ScalingsLogResponse | BucketedScalingsLog:
    """Recent requests, oldest first: token counts and mean scaling per adapter (overall, prompt, completion)."""
    log = manager.scalings_log
    if bucketed:
        return BucketedScalingsLog(capacity=log.capacity, buckets=await log.bucketed())
    return ScalingsLogResponse(capacity=log.capacity, entries=await log.summaries())


@router.get("/scalings/latest", response_model=ScalingsDetail, responses=error_responses(404, 422))
async def latest_scalings(
    request: Request, include_text: bool = _INCLUDE_TEXT, manager: ModelManager = Depends(get_manager)
) -> ScalingsDetail:
    if include_text:
        require(request, TOKEN_TEXT, "include_text=true (other requests' prompts and answers)")
    entry = await manager.scalings_log.latest()
    if entry is None:
        raise APIError(404, "no request has finished yet (or the log was cleared)", code="not_found")
    return _detail(entry, include_text, manager)


@router.get("/scalings/{request_id}", response_model=ScalingsDetail, responses=error_responses(404, 422))
async def one_request_scalings(
    request_id: str, request: Request, include_text: bool = _INCLUDE_TEXT, manager: ModelManager = Depends(get_manager)
) -> ScalingsDetail:
    """Per-token, per-layer scalings of one request (while it is still in the log)."""
    if include_text:
        require(request, TOKEN_TEXT, "include_text=true (other requests' prompts and answers)")
    entry = await manager.scalings_log.detail(request_id)
    if entry is None:
        raise APIError(404, f"no request {request_id!r} in the scalings log", param="request_id", code="not_found")
    return _detail(entry, include_text, manager)


@router.delete("/scalings", response_model=Cleared)
async def clear_scalings(manager: ModelManager = Depends(get_manager)) -> Cleared:
    return Cleared(cleared=await manager.scalings_log.clear())


def _detail(entry: dict, include_text: bool, manager: ModelManager) -> ScalingsDetail:
    """An entry's detail (ScalingsEntry.detail(), from whichever store holds it); token texts if asked."""
    detail = ScalingsDetail(**entry, layer_names=lora_layer_names(manager.model))
    if include_text:
        detail.tokens = token_texts(manager.tokenizer, entry["token_ids"])
    return detail


def lora_layer_names(model) -> list[str] | None:
    """The module name of each LoRA layer, by its index (the dashboard groups them by decoder layer)."""
    from xlora_core.lora import FusedLoraLinear

    if model is None:
        return None
    layers = {m.layer_index: name for name, m in model.named_modules() if isinstance(m, FusedLoraLinear)}
    names = [layers[i].removeprefix("base.") for i in sorted(layers)]
    return names if len(names) == model.n_lora_layers else None


def token_texts(tokenizer, ids: list[int]) -> list[TokenText]:
    """Each id decoded alone (at read time, so the model worker does no extra work per token)."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, added in tokenizer.added_tokens_decoder.items() if added.special}
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return [TokenText(text=text, special=i in special) for i, text in zip(ids, texts, strict=True)]
