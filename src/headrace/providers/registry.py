"""Provider kinds by name, imported lazily (``"module:Class"``, as uvicorn does for loops).

Adding a provider is one line here and one module beside this one; nothing dispatches on the
kind with ``if``/``elif``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from headrace.errors import InvalidRequestError

if TYPE_CHECKING:
    from headrace.domain import Deployment
    from headrace.providers.base import Provider
    from headrace.providers.http import SessionPool

PROVIDERS: Mapping[str, str] = {
    "openai_compatible": "headrace.providers.openai_compatible:OpenAICompatibleProvider",
    "local": "headrace.providers.local_chat:LlamaCppProvider",
    "local_embeddings": "headrace.providers.local_embeddings:MiniLMProvider",
    "echo": "headrace.providers.echo:EchoProvider",
    "anthropic": "headrace.providers.anthropic:AnthropicProvider",
    "azure_openai": "headrace.providers.azure_openai:AzureOpenAIProvider",
}


@dataclass(frozen=True, slots=True)
class ProviderContext:
    """What providers share across deployments: the pooled HTTP sessions."""

    http: SessionPool


class ProviderFactory(Protocol):
    def __call__(self, deployment: Deployment, context: ProviderContext) -> Provider: ...


def load(kind: str) -> ProviderFactory:
    """Import and return the provider class registered for ``kind``."""
    try:
        target = PROVIDERS[kind]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise InvalidRequestError(f"Unknown provider kind {kind!r}; use one of: {known}.") from None
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return cast("ProviderFactory", getattr(module, attr))


def build(deployment: Deployment, context: ProviderContext) -> Provider:
    return load(deployment.kind)(deployment, context)
