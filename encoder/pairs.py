"""A query-document pair as one text, so pairs travel the embedding path unchanged.

The service, the micro-batcher and the cache all key their work by one string per input (dedupe in
flight, cache keys, fairness). A reranker's input is a pair; :func:`join_pair` writes it as one
string that no other pair gives (the query's length, a colon, the query, the document), and the
cross-encoder's tokenizer splits it back (:func:`split_pair`). Any text is allowed on either side.
"""

from __future__ import annotations

__all__ = ["join_pair", "split_pair"]


def join_pair(query: str, document: str) -> str:
    return f"{len(query)}:{query}{document}"


def split_pair(text: str) -> tuple[str, str]:
    """The ``(query, document)`` of :func:`join_pair`'s ``text``; ValueError for any other text."""
    head, colon, rest = text.partition(":")
    if not colon or not head.isdigit() or int(head) > len(rest):
        raise ValueError("not a query-document pair")
    length = int(head)
    return rest[:length], rest[length:]
