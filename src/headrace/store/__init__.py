"""Durable state: keys, teams and usage (:mod:`.base`), in SQL (:mod:`.sql`) or memory."""
