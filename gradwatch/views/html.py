"""`gradwatch html`: the whole report as one self-contained page.

No network and no CDN: the charts are SVG and tables (`gradwatch.views.charts`), the
style and the one small script (filtering rows by tensor name) are inline. The page holds
the verdict and next step, the alerts and error checks, the ratio trend (global, the worst
tensors, a band for the rest), a tensor-by-step heatmap, and each check's rule, notes,
tensors and worst components.
"""

from __future__ import annotations

from html import escape

from gradwatch.report import Report
from gradwatch.result import CheckResult, Localization
from gradwatch.store.models import Alert
from gradwatch.views.charts import HEATMAP_COLUMNS, heatmap_section, trend_section
from gradwatch.views.reading import (
    completed,
    format_ratio,
    listed_steps,
    nan_last,
    next_step,
    ranked_tensors,
    screened_only,
    step_of,
    threshold,
    worst_check,
)

__all__ = ["DETAILED_CHECKS", "HEATMAP_COLUMNS", "detailed_steps", "report_html"]

DETAILED_CHECKS = 200
"""Checks listed with their tensors and components: the non-ok ones first, then the
highest ratios (``checks.jsonl`` has every one)."""
TENSORS_PER_CHECK = 12
"""Tensor rows per listed check: every non-ok one up to this, then the highest ratios."""
_CONTROL_CHARACTERS = {
    code: "\N{REPLACEMENT CHARACTER}" for code in [*range(0x20), *range(0x7F, 0xA0)]
} | {ord("\n"): "\n", ord("\t"): "\t"}
"""C0 and C1 control characters (ESC, BEL, CSI, ...) replaced; newlines and tabs kept."""

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
body{padding:0 1em}
h1{font-size:1.35em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
.badge{padding:.15em .6em;border-radius:.3em;color:#fff;font-weight:600}
.fail,.error{background:#b3261e}.ok{background:#2e7d32}.warn{background:#b26a00}
.nondeterministic{background:#666}
table{border-collapse:collapse;margin:.4em 0}
table.wrap{table-layout:fixed;width:100%}table.wrap td{overflow-wrap:anywhere}
.wrap th:first-child{width:4em}.alerts th:nth-child(2){width:6em}
.alerts th:nth-child(3),.alerts th:nth-child(4),.errors th:nth-child(2){width:18%}
.errors td:nth-child(2){white-space:normal}
.heat th.s{font:10px ui-monospace,monospace;font-weight:400;writing-mode:vertical-rl;
transform:rotate(180deg);vertical-align:bottom;padding:0}
td,th{padding:.1em .5em;text-align:left;vertical-align:top}
td:nth-child(2){white-space:nowrap}
tr:nth-child(even){background:#f6f6f6}code,.mono{font-family:ui-monospace,monospace}
.heat td.c{height:12px;padding:0;border:1px solid #fff}
.heat td.n{font:12px ui-monospace,monospace;white-space:nowrap;padding-right:.6em}
#filter{font-size:1em;padding:.3em;width:22em}
.next{background:#fff4e5;padding:.5em;border-left:4px solid #b26a00}
details{margin:.3em 0}summary{cursor:pointer}.note{color:#444}.legend span{margin-right:1em}
.modules tr.suspect{background:#fde7e4;font-weight:600}
"""

_SCRIPT = """
const box = document.getElementById('filter');
const count = document.getElementById('matches');
function applyFilter() {
  const text = box.value.trim().toLowerCase();
  const rows = document.querySelectorAll('[data-tensor]');
  const names = new Set();
  rows.forEach(function (row) {
    const name = row.getAttribute('data-tensor');
    const shown = text === '' || name.toLowerCase().includes(text);
    row.style.display = shown ? '' : 'none';
    if (shown) { names.add(name); }
  });
  count.textContent = text === '' ? '' : names.size + ' tensors match';
}
box.addEventListener('input', applyFilter);
const given = new URLSearchParams(location.hash.slice(1)).get('filter');
if (given !== null) { box.value = given; applyFilter(); }
document.body.setAttribute('data-filter-ready', 'yes');
"""


def report_html(report: Report) -> str:
    """The page for `report`, as one string (UTF-8, no external resource)."""
    title = f"gradwatch report {report.directory}"
    body = [
        f"<h1>{escape(title)}</h1>",
        _verdict(report),
        _alerts(report),
        trend_section(report),
        heatmap_section(report),
        _checks_section(report),
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(body)
        + f"<script>{_SCRIPT}</script></body></html>\n"
    )
    # Names and notes come from a file anyone may have written: `cat report.html` must
    # not pass an escape sequence or a bell to the terminal.
    return page.translate(_CONTROL_CHARACTERS)


def _status_of(report: Report) -> str:
    if report.errors and not report.alerts:
        return "error"
    return "fail" if report.alerts else "ok"


def _verdict(report: Report) -> str:
    status = _status_of(report)
    label = {"fail": "ALERT", "error": "ERROR", "ok": "CLEAN"}[status]
    checks = completed(report)
    state = "closed" if report.closed else "not closed: still running, or killed"
    parts = [
        f"<p><span class='badge {status}'>{label}</span> {len(report.checks)} checks "
        f"(steps {listed_steps(report.steps)}), {escape(state)}; threshold "
        f"{threshold(report):g}; {len(report.alerts)} alerts, {len(report.errors)} errors, "
        f"{len(report.runs)} run(s).</p>"
    ]
    if checks:
        worst = worst_check(report)
        assert worst is not None
        parts.append(
            f"<p>ratio first {format_ratio(checks[0].ratio)} (step {checks[0].step}), "
            f"last {format_ratio(checks[-1].ratio)} (step {checks[-1].step}), "
            f"max {format_ratio(worst.ratio)} (step {worst.step}).</p>"
        )
    advice = next_step(report, str(report.directory))
    if advice:
        parts.append(f"<p class='next'>{escape(advice)}</p>")
    if report.configuration is not None:
        configuration = report.configuration
        setup = (
            f"every {configuration.every}, sample {configuration.sample!r}, "
            f"dtype {configuration.dtype or '-'}, J includes "
            f"{', '.join(configuration.regularization) or 'no penalty'}"
        )
        parts.append(f"<p class='note'>setup: {escape(setup)}</p>")
        parts += [f"<p class='note'>run note: {escape(n)}</p>" for n in configuration.notes]
    return "\n".join(parts)


def _where(alert: Alert) -> str:
    """The module the search named (where the bug is), else the tensor the alert names."""
    return f"bug in {alert.module}" if alert.module else alert.tensor or "-"


def _alerts(report: Report) -> str:
    rows = [
        f"<tr data-tensor='{escape(alert.tensor or '')}'><td>{alert.step}</td>"
        f"<td>{format_ratio(alert.ratio)}</td><td class='mono'>{escape(_where(alert))}"
        f"</td><td class='mono'>{escape(alert.component or '-')}</td>"
        f"<td>{escape(alert.message)}</td></tr>"
        for alert in report.alerts
    ]
    errors = [
        f"<tr><td>{check.step}</td><td>{escape(check.error_source or 'gradwatch')}</td>"
        f"<td class='mono'>{escape(check.error or 'unknown error')}</td></tr>"
        for check in report.errors
    ]
    parts = ["<h2>Alerts</h2>"]
    if rows:
        parts.append(
            # Fixed layout within the page's width: long names and messages wrap.
            "<table class='wrap alerts'><tr><th>step</th><th>ratio</th><th>where</th>"
            "<th>worst component</th><th>alert</th></tr>" + "".join(rows) + "</table>"
        )
    else:
        parts.append("<p>No alerts.</p>")
    if errors:
        parts.append(
            "<h2>Checks that could not run</h2><table class='wrap errors'>"
            "<tr><th>step</th><th>in</th><th>error</th></tr>" + "".join(errors) + "</table>"
        )
    return "\n".join(parts)


def detailed_steps(report: Report) -> list[int]:
    """The steps whose checks the page lists in full (failing and worst first, at most
    ``DETAILED_CHECKS``): the CLI keeps just these whole when it reads a long run."""
    return [step_of(check) for check in _detailed(report.checks)]


def _detailed(checks: list[CheckResult]) -> list[CheckResult]:
    chosen = sorted(checks, key=lambda c: (c.status == "ok", -nan_last(c.ratio)))
    chosen = chosen[:DETAILED_CHECKS]
    chosen.sort(key=step_of)
    return chosen


# -- checks -------------------------------------------------------------------------------


def _checks_section(report: Report) -> str:
    checks = report.checks
    chosen = _detailed(checks)
    parts = [f"<h2>Checks ({len(chosen)} of {len(checks)} listed)</h2>"]
    parts += [_check_details(check) for check in chosen]
    return "\n".join(parts)


def _check_details(check: CheckResult) -> str:
    opened = " open" if check.status in ("fail", "error") else ""
    summary = (
        f"step {check.step}: <span class='badge {check.status}'>{check.status}</span> "
        f"ratio {format_ratio(check.ratio)}, {check.mode}, {check.checked} of {check.size} "
        f"components, {check.loss_evals} loss evaluations, {check.seconds:.3g} s"
    )
    parts = [f"<details{opened}><summary>{summary}</summary>"]
    if check.error:
        parts.append(
            f"<p>error in {escape(check.error_source or 'gradwatch')}: "
            f"<code>{escape(check.error)}</code></p>"
        )
    if check.verdict:
        parts.append(f"<p>rule: {escape(check.verdict)}</p>")
    if check.notes:
        parts.append(
            "<ul>" + "".join(f"<li class='note'>{escape(n)}</li>" for n in check.notes) + "</ul>"
        )
    if check.localization is not None:
        parts.append(_module_tree(check.localization))
    if check.tensors:
        parts.append(_tensor_table(check))
    if check.worst:
        rows = "".join(
            f"<tr data-tensor='{escape(c.tensor)}'><td class='mono'>{escape(c.name)}</td>"
            f"<td>{c.analytic:+.6e}</td><td>{c.numeric:+.6e}</td><td>{c.abs_error:.2e}</td>"
            f"<td>{c.rel_error:.2e}</td><td>{c.diagnosis or ''}</td></tr>"
            for c in check.worst
        )
        parts.append(
            "<table><tr><th>worst component</th><th>analytic</th><th>numeric</th>"
            "<th>abs error</th><th>rel error</th><th>label</th></tr>" + rows + "</table>"
        )
    parts.append("</details>")
    return "".join(parts)


def _module_tree(localization: Localization) -> str:
    """The module-local search: the suspect in words, then every module call it checked,
    indented by depth in the model, with its verdict and each side's local ratio."""
    suspects = "".join(
        f"<p><b>where the bug is</b>: <span class='mono'>{escape(s.describe())}</span></p>"
        for s in localization.suspects
    )
    named = {(s.module, s.call) for s in localization.suspects}
    rows = "".join(
        ("<tr class='suspect'>" if (m.module, m.call) in named else "<tr>")
        + f"<td class='mono' style='padding-left:{0.3 + 1.2 * _depth(m.module):.1f}em'>"
        f"{escape(m.module or '(the model)')}"
        f"{f' (call {m.call + 1} of {m.calls})' if m.calls > 1 else ''}</td>"
        f"<td>{escape(m.class_name)}</td><td>{m.status}</td>"
        f"<td>{format_ratio(m.input_ratio)}</td><td>{format_ratio(m.parameter_ratio)}</td></tr>"
        for m in sorted(localization.modules, key=lambda m: (m.module.split("."), m.call))
    )
    header = (
        "<table class='modules'><tr><th>module (checked by the search)</th><th>class</th>"
        "<th>local verdict</th><th>input side</th><th>parameter side</th></tr>"
    )
    return suspects + header + rows + "</table>"


def _depth(module: str) -> int:
    return module.count(".") + 1 if module else 0


def _tensor_table(check: CheckResult) -> str:
    if screened_only(check):
        return (
            f"<p>{len(check.tensors)} tensors, none checked on its own: the screen over all "
            f"of them gave {format_ratio(check.ratio)}.</p>"
        )
    ranked = ranked_tensors(check)
    shown = ranked[:TENSORS_PER_CHECK]
    rows = "".join(
        f"<tr data-tensor='{escape(name)}'><td class='mono'>{escape(name)}</td>"
        f"<td>{format_ratio(t.ratio)}</td><td>{t.status}</td><td>{t.checked}/{t.size}</td></tr>"
        for name, t in shown
    )
    more = len(ranked) - len(shown)
    folded = f"<p class='note'>... and {more} more tensors, all ok.</p>" if more else ""
    if more and any(t.status != "ok" for _, t in ranked[len(shown) :]):
        folded = f"<p class='note'>... and {more} more tensors (see checks.jsonl).</p>"
    return (
        "<table><tr><th>tensor</th><th>ratio</th><th>status</th><th>checked</th></tr>"
        + rows
        + "</table>"
        + folded
    )
