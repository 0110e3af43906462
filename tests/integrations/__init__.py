"""Tests of gradwatch.integrations: torch, transformers, Lightning, distributed runs."""
