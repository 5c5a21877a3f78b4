"""Response caching: exact (by request hash) and semantic (by prompt embedding)."""
