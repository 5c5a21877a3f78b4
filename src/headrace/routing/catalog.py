"""The model catalog: public model names and the deployments behind them."""

from __future__ import annotations

from collections.abc import Sequence

from headrace.domain import ModelRoute
from headrace.errors import InvalidRequestError, ModelNotFoundError


class Catalog:
    def __init__(self, routes: Sequence[ModelRoute]) -> None:
        self._routes = {route.name: route for route in routes}

    @property
    def routes(self) -> Sequence[ModelRoute]:
        return list(self._routes.values())

    def route_any(self, model: str) -> ModelRoute:
        """The route for ``model`` whatever it serves; raises if unknown."""
        route = self._routes.get(model)
        if route is None:
            raise ModelNotFoundError(
                f"The model {model!r} does not exist. Available models: "
                f"{', '.join(sorted(self._routes)) or 'none'}.",
                param="model",
            )
        return route

    def route(self, model: str, capability: str) -> ModelRoute:
        """The route for ``model``; raises if unknown or if it lacks ``capability``."""
        route = self._routes.get(model)
        if route is None:
            available = sorted(
                name for name, r in self._routes.items() if capability in r.capabilities
            )
            raise ModelNotFoundError(
                f"The model {model!r} does not exist. Available {capability} models: "
                f"{', '.join(available) or 'none'}.",
                param="model",
            )
        if capability not in route.capabilities:
            raise InvalidRequestError(
                f"The model {model!r} does not serve {capability}; it serves "
                f"{', '.join(sorted(route.capabilities))}.",
                param="model",
                code="model_not_supported",
            )
        return route
