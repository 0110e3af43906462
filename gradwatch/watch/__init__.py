"""The watch over a training run: what `gradwatch.GradWatch` keeps between due steps.

Its share of training time and what a due check runs (`budget`), the structured log
events (`events`), the results of checks that raised (`failed_checks`), and the record of
every check in the report (`recording`). Internal: the public face is `gradwatch.callback`.
"""
