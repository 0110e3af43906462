"""Tests of gradwatch.engine and gradwatch.check: the check itself, against independent oracles."""
