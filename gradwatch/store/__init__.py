"""The report on disk: ``checks.jsonl`` and ``report.json``.

The pydantic models and file names (`models`), which rule an alert fired by (`alerts`),
finding and opening its files safely (`files`), reading it back (`reader`) and writing it
atomically (`writer`). Internal: the public face is `gradwatch.report`.
"""
