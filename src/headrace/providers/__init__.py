"""Upstream providers: one :class:`~headrace.providers.base.Provider` per deployment."""
