"""The test suite, laid out like the source: a folder per subpackage of gradwatch/.

tests/engine, watch, store and views test those subpackages of gradwatch/ (with check.py,
callback.py, report.py and cli.py, their public faces), tests/integrations the torch,
transformers and Lightning integrations, tests/zoo the planted-bug zoo; the files directly
here test the package as a whole (packaging, docs, README, layout).

Every folder is a package (give a new one an ``__init__.py``): modules are named
``tests.<folder>.<file>``, so two folders may hold files of the same name. What several
files share is a helper module, imported by that name: `tests.reports` (hand-built
results, the CLI in-process), `tests.integrations.planted` (the planted x**2 bug, a batch,
its J), `tests.integrations.bert` (the tiny BERT Trainer) and
`tests.integrations.distributed.launch` (2-rank jobs and their agreement).
"""
