"""Tests of gradwatch.store and gradwatch.report: the report on disk, its runs and its reader."""
