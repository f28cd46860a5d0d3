"""Every route the app serves (auth is deny-by-default: see :mod:`gateway.http.auth`).

The embedding routes build and compress their own answers (:mod:`gateway.http.answers`); the
others share Litestar's compression middleware, so the app lists them apart.
"""

from gateway.http.routes.cohere import COHERE_ROUTES
from gateway.http.routes.embeddings import create_embeddings, create_multivector, create_sparse
from gateway.http.routes.models import list_models, retrieve_model
from gateway.http.routes.operations import dashboard, health, livez, metrics, readyz, stats, stats_history
from gateway.http.routes.rerank import RERANK_ROUTES
from gateway.http.routes.tei import TEI_ROUTER

__all__ = ["EMBEDDING_ROUTES", "OTHER_ROUTES", "ROUTES", "TEI_ROUTER"]

EMBEDDING_ROUTES = [create_embeddings, create_sparse, create_multivector, *RERANK_ROUTES, *COHERE_ROUTES]
OTHER_ROUTES = [
    list_models,
    retrieve_model,
    health,
    livez,
    readyz,
    stats,
    stats_history,
    metrics,
    dashboard,
]
ROUTES = [*EMBEDDING_ROUTES, *OTHER_ROUTES]
