"""Domains: what chattune knows about one task (its reply format, its scorer, its data generator)."""
