"""GET /v1/models and /v1/models/{id}: every served model with its aliases and prompts.

``EMBED_MODEL_ALIASES=*`` (or ``aliases = ["*"]`` in a ``[[models]]`` table) accepts any model name
(as TEI does): clients that send their framework's default (``text-embedding-ada-002``,
``text-embedding-3-small``) work unchanged, and every answer's ``model`` names the model that
really served it.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from gateway.core.models_file import ANY_MODEL
from gateway.core.schemas import ModelCard, ModelList
from gateway.http.routes.common import ERRORS, runtime_of
from gateway.http.runtime import ServedModel

__all__ = ["list_models", "retrieve_model"]


def _card(model_id: str, model: ServedModel, created: int) -> ModelCard:
    prompts = model.prompts
    return ModelCard(
        id=model_id,
        created=created,
        prompts=prompts.prompts,
        default_prompt_name=prompts.default_name,
    )


@get("/v1/models", summary="List models", tags=["models"], responses={401: ERRORS[401]})
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    """Each model's served id, then its aliases, in the models file's order."""
    runtime = runtime_of(request)
    created = int(runtime.telemetry.started_at)
    cards: dict[str, ModelCard] = {}
    for model in runtime.models:
        names = [model.settings.served_model, *model.settings.model_aliases]
        for name in names:
            if name != ANY_MODEL and name not in cards:
                cards[name] = _card(name, model, created)
    return ModelList(data=list(cards.values()))


@get("/v1/models/{model_id:str}", summary="Retrieve a model", tags=["models"], responses=ERRORS)
async def retrieve_model(model_id: str, request: Request[Any, Any, Any]) -> ModelCard:
    runtime = runtime_of(request)
    return _card(model_id, runtime.model_for(model_id), int(runtime.telemetry.started_at))
