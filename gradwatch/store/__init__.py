"""The report on disk: ``checks.jsonl`` and ``report.json``.

The pydantic models and file names (`models`), which rule an alert fired by (`alerts`),
reading a report safely (`reader`) and writing it atomically (`writer`). Internal: the
public face is `gradwatch.report`.
"""
