"""Tests of gradwatch.views and the CLI: show, trend, worst, plot and html over real reports."""
