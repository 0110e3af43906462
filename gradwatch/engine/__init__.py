"""The check engine: how `gradwatch.check` measures and judges a gradient.

J evaluated and counted (`objective`), what to perturb (`sampling`), the differences
(`differences`, `directions`, `bisection`), numeric against analytic (`comparison`), the
worst components labelled (`diagnosis`), the verdict (`verdict`), and the signal-safe
regions every move of the user's arrays runs in (`uninterrupted`). Internal: the public
faces are `gradwatch.check` and `gradwatch.result`.
"""
