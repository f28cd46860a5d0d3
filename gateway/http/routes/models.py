"""GET /v1/models and /v1/models/{id}: the served id and its aliases.

``EMBED_MODEL_ALIASES=*`` accepts any model name (as TEI does): clients that send their framework's
default (``text-embedding-ada-002``, ``text-embedding-3-small``) work unchanged, and every answer's
``model`` names the model that really served it.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from gateway.core.errors import ModelNotFoundError
from gateway.core.schemas import ModelCard, ModelList
from gateway.http.routes.common import ERRORS, runtime_of
from gateway.http.runtime import Runtime

__all__ = ["ANY_MODEL", "check_model", "list_models", "retrieve_model"]

ANY_MODEL = "*"


def check_model(runtime: Runtime, model: str | None) -> None:
    """A request may name the served id, an alias or ``EMBED_MODEL`` itself (or nothing; anything with ``*``)."""
    if model is None:  # the hit path of clients that name no model: no set built per request
        return
    accepted = runtime.settings.accepted_models
    if model not in accepted and ANY_MODEL not in accepted:
        raise ModelNotFoundError(
            f"The model '{model}' does not exist on this server; it serves '{runtime.settings.served_model}'.",
            param="model",
        )


@get("/v1/models", summary="List models", tags=["models"], responses={401: ERRORS[401]})
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    runtime = runtime_of(request)
    created = int(runtime.telemetry.started_at)
    aliases = [alias for alias in runtime.settings.model_aliases if alias != ANY_MODEL]
    names = dict.fromkeys([runtime.settings.served_model, *aliases])
    prompts = runtime.prompts
    return ModelList(
        data=[
            ModelCard(id=name, created=created, prompts=prompts.prompts, default_prompt_name=prompts.default_name)
            for name in names
        ]
    )


@get("/v1/models/{model_id:str}", summary="Retrieve a model", tags=["models"], responses=ERRORS)
async def retrieve_model(model_id: str, request: Request[Any, Any, Any]) -> ModelCard:
    runtime = runtime_of(request)
    check_model(runtime, model_id)
    prompts = runtime.prompts
    return ModelCard(
        id=model_id,
        created=int(runtime.telemetry.started_at),
        prompts=prompts.prompts,
        default_prompt_name=prompts.default_name,
    )
