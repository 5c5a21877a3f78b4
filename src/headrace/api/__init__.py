"""The HTTP edge: OpenAI-compatible routes, health, metrics. Routes parse, call, render."""

from headrace.api.app import create_app

__all__ = ["create_app"]
