"""Instruction prompts: which text goes in front of each input, as sentence-transformers does it.

A model's prompts come from its ``config_sentence_transformers.json`` (``{"query": "query: "}``);
a request picks one by name (``prompt_name``, TEI's and sentence-transformers' word) or by the kind
of text (``input_type``, Cohere's and Voyage's word); else the default applies (the model's
``default_prompt_name``, or ``EMBED_DEFAULT_PROMPT_NAME``). The prompt is prepended to each input
exactly as ``SentenceTransformer.encode(prompt_name=...)`` does (``prompt + text``), so it is
tokenised with the text, counted in its tokens and part of its cache key (the key hashes the text
the encoder sees).
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.core.errors import InvalidInputError

__all__ = ["INPUT_TYPES", "PromptBook"]

# input_type -> the prompt names that serve it, in order of preference. A model without any of them
# gets no prompt for that type (most models prompt queries only: documents go in as they are).
INPUT_TYPES: dict[str, tuple[str, ...]] = {
    "query": ("query", "search_query"),
    "search_query": ("search_query", "query"),
    "document": ("document", "passage", "search_document", "doc"),
    "search_document": ("search_document", "document", "passage", "doc"),
    "passage": ("passage", "document", "search_document", "doc"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}


class PromptBook:
    """One model's prompts and its default (see the module's docstring)."""

    def __init__(self, prompts: Mapping[str, str], default_name: str | None = None) -> None:
        if default_name is not None and default_name not in prompts:
            raise ValueError(f"the default prompt {default_name!r} is not one of the model's prompts {_names(prompts)}")
        self.prompts = dict(prompts)
        self.default_name = default_name

    def name_for(self, prompt_name: str | None, input_type: str | None) -> str | None:
        """The prompt a request asked for: by name, else by input type, else the default; None: none.

        An unknown name or input type is a 400 that lists what is known."""
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise InvalidInputError(
                    f"'prompt_name' {prompt_name!r} is not one of this model's prompts: {_names(self.prompts)}",
                    param="prompt_name",
                )
            return prompt_name
        if input_type is not None:
            names = INPUT_TYPES.get(input_type)
            if names is None:
                raise InvalidInputError(
                    f"'input_type' {input_type!r} is not one of {', '.join(INPUT_TYPES)}", param="input_type"
                )
            return next((name for name in names if name in self.prompts), None)
        return self.default_name

    def prepend(self, texts: list[str], name: str | None) -> list[str]:
        """``texts`` with prompt ``name`` (from :meth:`name_for`) in front of each; the same list for None."""
        prompt = self.prompts[name] if name is not None else ""
        return [prompt + text for text in texts] if prompt else texts


def _names(prompts: Mapping[str, str]) -> str:
    return ", ".join(repr(name) for name in sorted(prompts)) or "none (this model has no prompts)"
