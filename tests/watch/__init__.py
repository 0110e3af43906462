"""Tests of gradwatch.watch and GradWatch: schedule, budget, alerts, training never killed."""
