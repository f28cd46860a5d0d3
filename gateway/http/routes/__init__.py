"""Every route the app serves, in one list (auth is deny-by-default: see :mod:`gateway.http.auth`)."""

from gateway.http.routes.embeddings import create_embeddings, create_multivector, create_sparse
from gateway.http.routes.models import list_models, retrieve_model
from gateway.http.routes.operations import dashboard, health, livez, metrics, readyz, stats, stats_history

__all__ = ["ROUTES"]

ROUTES = [
    create_embeddings,
    create_sparse,
    create_multivector,
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
