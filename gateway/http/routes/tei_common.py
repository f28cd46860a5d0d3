"""What every TEI route shares: its OpenAPI entry, TEI's error answers, and its ``opt`` marks.

The TEI routes are split over :mod:`~gateway.http.routes.tei` (embeddings, ``/info`` and the router)
and :mod:`~gateway.http.routes.tei_tokens` (``/tokenize``, ``/decode``); both declare their POST
routes with :func:`tei_post`, so the documented errors and the marks the middleware reads (admit
after the body, TEI's error shape, count requests per key) are written once.
"""

from __future__ import annotations

from litestar import post
from litestar.openapi import ResponseSpec

from gateway.http.auth import KEY_REQUESTS
from gateway.http.errors import TEI_ERRORS, TeiError
from gateway.http.middleware import ADMIT_AFTER_BODY
from gateway.http.routes.embeddings import EMBEDDING_OPT, documented_body

__all__ = ["TEI_BODY_OPT", "TEI_EMBEDDING_OPT", "TEI_ERROR_ANSWERS", "tei_post"]


TEI_ERROR_ANSWERS = {
    status: ResponseSpec(TeiError, description=description, generate_examples=False)
    for status, description in {
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "An input or the request is too large",
        422: "Invalid input",
        424: "The encoder could not compute an input",
        429: "Overloaded or over the key's limits; honour Retry-After",
    }.items()
}


TEI_EMBEDDING_OPT = {**EMBEDDING_OPT, TEI_ERRORS: True}
TEI_BODY_OPT = {ADMIT_AFTER_BODY: True, TEI_ERRORS: True, KEY_REQUESTS: True}


def tei_post(path: str | list[str], summary: str, schema: str, opt: dict[str, bool]) -> post:
    """The decorator every TEI POST route shares: its body documented, TEI's errors, its opt."""
    return post(
        path,
        status_code=200,
        summary=summary,
        tags=["tei"],
        opt=opt,
        responses=TEI_ERROR_ANSWERS,
        operation_class=documented_body(schema),
    )
