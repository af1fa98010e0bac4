"""The gateway's web console: server-rendered HTML pages over :class:`Operations`.

Pages (every one behind the API's credentials, :mod:`medssl.serving.api`):

* ``/``: overview: the live queue (``static/console.js`` refreshes it from
  ``/api/v1/counters``), studies finished per hour over 24 h, failures of the last 24 h,
  destinations up or down, readiness;
* ``/studies``: the studies table with filters (state, UID or accession, received since/until)
  and ``/studies/<id>``: a job's timeline of stages, its routed series, outputs, deliveries
  and actions, with its action buttons;
* ``/failures``: failed and dead-lettered studies with their reasons and a retry button;
* ``/deliveries``, ``/quarantine`` (with the purge form), ``/refused``, ``/config`` (read-only,
  secrets masked).

No script or style comes from elsewhere (the CSP forbids it); the pages work without
JavaScript, by keyboard (a skip link, real buttons and links, visible focus) and in a narrow
window (tables scroll sideways inside their box). Every value is HTML-escaped.
"""

from __future__ import annotations

import html
import urllib.parse
from typing import Any

import yaml

from medssl.serving.httpquery import int_param, list_param, one_param, time_param
from medssl.serving.jobstore import FINISHED, JobState
from medssl.serving.operations import Operations

__all__ = ["PAGES", "error_page", "render"]

#: Navigation: (path, title).
PAGES = (
    ("/", "Overview"),
    ("/studies", "Studies"),
    ("/failures", "Failures"),
    ("/deliveries", "Deliveries"),
    ("/quarantine", "Quarantine"),
    ("/refused", "Refused"),
    ("/config", "Configuration"),
)
_PAGE = 50


def _e(value: Any) -> str:
    return "" if value is None else html.escape(str(value), quote=True)


def _layout(title: str, active: str, body: str, user: str) -> str:
    nav = "".join(
        f'<li><a href="{p}"{" aria-current=page" if p == active else ""}>{t}</a></li>'
        for p, t in PAGES
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} · medssl gateway</title>"
        '<link rel="stylesheet" href="/static/console.css">'
        f'<script src="/static/console.js" defer></script></head><body>'
        f'<a class="skip" href="#main">Skip to content</a>'
        '<header><span class="brand">medssl gateway</span>'
        f'<nav aria-label="Console"><ul>{nav}</ul></nav>'
        f'<span class="user">signed in as {_e(user)}</span></header>'
        f'<main id="main" tabindex="-1"><h1>{_e(title)}</h1>{body}</main></body></html>'
    )


def _table(caption: str, headers: list[str], rows: list[list[str]], empty: str = "none") -> str:
    """A table; ``rows`` hold HTML already escaped."""
    if not rows:
        return f'<section><h2>{_e(caption)}</h2><p class="empty">{_e(empty)}</p></section>'
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f'<section><h2>{_e(caption)}</h2><div class="scroll" tabindex="0" role="region" '
        f'aria-label="{_e(caption)}"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f"</div></section>"
    )


def _t(iso: str | None) -> str:
    """An ISO 8601 UTC time as ``<time>`` (``2026-12-07 10:15:02``; the column says UTC)."""
    if not iso:
        return ""
    return f'<time datetime="{_e(iso)}">{_e(iso.replace("T", " ").rstrip("Z"))}</time>'


def _short(text: str | None, limit: int = 160) -> str:
    """Long text cut for a table cell; the whole text is on the study page and in the title."""
    if not text or len(text) <= limit:
        return _e(text)
    return f'<span title="{_e(text)}">{_e(text[: limit - 1])}…</span>'


def _state(state: str) -> str:
    return f'<span class="state state-{_e(state)}">{_e(state)}</span>'


def _study_link(job: dict[str, Any]) -> str:
    return f'<a href="/studies/{job["id"]}">{job["id"]}</a>'


def _uid(uid: str) -> str:
    return f'<code class="uid">{_e(uid)}</code>'


def _button(
    action: str,
    job_id: int,
    label: str,
    csrf: str,
    next_page: str,
    extra: str = "",
    reason: bool = True,
) -> str:
    field = (
        (
            '<label class="reason">Reason <input name="reason" maxlength="500" '
            'autocomplete="off"></label>'
        )
        if reason
        else ""
    )
    return (
        f'<form method="post" action="/api/v1/studies/{job_id}/{action}" class="action">'
        f'<input type="hidden" name="csrf_token" value="{_e(csrf)}">'
        f'<input type="hidden" name="next" value="{_e(next_page)}">{extra}{field}'
        f'<button type="submit" data-action="{_e(action)}" '
        f'data-job="{job_id}">{_e(label)}</button></form>'
    )


def _pager(path: str, query: dict[str, list[str]], total: int, offset: int) -> str:
    if total <= _PAGE:
        return ""
    links = []
    for label, start in (("Newer", offset - _PAGE), ("Older", offset + _PAGE)):
        if 0 <= start < total:
            q = {k: v[-1] for k, v in query.items() if k != "offset"}
            q["offset"] = str(start)
            links.append(f'<a href="{path}?{_e(urllib.parse.urlencode(q))}">{label}</a>')
    return (
        f'<p class="pager">{offset + 1}–{min(offset + _PAGE, total)} of {total} · '
        f"{' · '.join(links)}</p>"
    )


def _studies_rows(
    items: list[dict[str, Any]],
    show_pid: bool,
    csrf: str = "",
    next_page: str = "",
    retry: bool = False,
) -> list[list[str]]:
    rows = []
    for j in items:
        row = [_study_link(j), _state(j["state"]), _uid(j["study_uid"]), _e(j["accession_number"])]
        if show_pid:
            row.append(_e(j.get("patient_id")))
        row += [_t(j["received_at"]), _t(j["finished_at"]), _e(j["attempts"]), _short(j["error"])]
        if retry:
            row.append(
                _button("retry", j["id"], "Retry", csrf, next_page, reason=False)
                if j["state"] in ("failed", "dead-letter")
                else ""
            )
        rows.append(row)
    return rows


def _studies_headers(show_pid: bool, retry: bool = False) -> list[str]:
    headers = ["Job", "State", "Study UID", "Accession"] + (["Patient ID"] if show_pid else [])
    return (
        headers
        + ["Received (UTC)", "Finished (UTC)", "Attempts", "Error or note"]
        + (["Action"] if retry else [])
    )


# --- pages -----------------------------------------------------------------------------------


def _overview(ops: Operations, csrf: str) -> str:
    data = ops.overview()
    c = data["counters"]
    cards = "".join(
        f'<div class="card"><span class="label">{label}</span>'
        f'<span class="value" data-counter="{key}">{_e(value if value is not None else "–")}</span>'
        "</div>"
        for label, key, value in (
            ("Waiting", "waiting", c["waiting"]),
            ("In progress", "in_progress", c["in_progress"]),
            ("Oldest waiting (s)", "oldest_waiting_s", c["oldest_waiting_s"]),
            ("Failed", "failed", c["jobs"]["failed"]),
            ("Dead letters", "dead-letter", c["jobs"]["dead-letter"]),
            ("Done", "done", c["jobs"]["done"]),
        )
    )
    ready = data["readiness"]
    ready_html = (
        ""
        if ready is None
        else (
            f'<p class="readiness {"ok" if ready["ready"] else "bad"}">Readiness: '
            f"{'ready' if ready['ready'] else 'not ready'} ({_e(ready['reason'])})</p>"
        )
    )
    top = max([sum(h[s.value] for s in FINISHED) for h in data["throughput_per_hour"]] + [1])
    hours = []
    for h in data["throughput_per_hour"]:
        total = sum(h[s.value] for s in FINISHED)
        hours.append(
            [
                _t(h["hour"]),
                f'<meter min="0" max="{top}" value="{total}">{total}</meter> {total}',
                _e(h["done"]),
                _e(h["failed"]),
                _e(h["dead-letter"]),
            ]
        )
    destinations = [
        [
            _e(d["name"]),
            _e(d["address"]),
            f'<span class="dest dest-{_e(d["status"])}">{_e(d["status"])}</span>',
            _t(d["last_attempt_at"]),
            _e(d["pending"]),
            _e(d["dead_letter"]),
            _short(d["last_error"]),
        ]
        for d in data["destinations"]
    ]
    failures = data["failures_24h"]
    return (
        '<section aria-live="polite"><h2>Queue</h2>'
        f'<div class="cards">{cards}</div>{ready_html}</section>'
        + _table(
            "Destinations",
            [
                "Name",
                "Address",
                "Status",
                "Last attempt (UTC)",
                "Pending",
                "Dead letters",
                "Last error",
            ],
            destinations,
            "no destinations configured",
        )
        + _table(
            f"Failures in the last 24 h ({failures['total']})",
            _studies_headers(ops.cfg.api.show_patient_id, True),
            _studies_rows(failures["items"], ops.cfg.api.show_patient_id, csrf, "/", True),
            "none",
        )
        + _table(
            "Studies finished per hour (UTC, last 24 h)",
            ["Hour", "Finished", "Done", "Failed", "Dead letters"],
            hours[::-1],
        )
    )


def _studies(ops: Operations, query: dict[str, list[str]], csrf: str) -> str:
    offset = int_param(query, "offset", 0)
    states = list_param(query, "state")
    data = ops.studies(
        states=states,
        since=time_param(query, "since"),
        until=time_param(query, "until"),
        uid=one_param(query, "uid"),
        limit=_PAGE,
        offset=offset,
    )
    options = "".join(
        f'<option value="{s.value}"{" selected" if s.value in states else ""}>{s.value}</option>'
        for s in JobState
    )
    form = (
        '<form method="get" action="/studies" class="filters" role="search">'
        f'<label>State <select name="state"><option value="">any</option>{options}</select></label>'
        f'<label>UID or accession <input name="uid" value="{_e(one_param(query, "uid"))}"></label>'
        '<label>Received since <input name="since" placeholder="2026-12-07T00:00Z" '
        f'value="{_e(one_param(query, "since"))}"></label>'
        f'<label>until <input name="until" value="{_e(one_param(query, "until"))}"></label>'
        '<button type="submit">Filter</button></form>'
    )
    show = ops.cfg.api.show_patient_id
    return (
        form
        + _table(
            f"Studies ({data['total']})",
            _studies_headers(show),
            _studies_rows(data["items"], show),
            "no studies match",
        )
        + _pager("/studies", query, data["total"], offset)
    )


def _study(ops: Operations, ref: str, csrf: str) -> str:
    j = ops.study(ref)
    page = f"/studies/{j['id']}"
    stages = [
        ("Received (first instance)", "received_at", None),
        ("Last instance", "last_instance_at", "receive"),
        ("Queued (study complete)", "queued_at", "assemble"),
        ("Started", "started_at", "queue"),
        ("Results written", "inferred_at", "inference"),
        ("Finished", "finished_at", "send"),
    ]
    timeline = "".join(
        f'<li class="{"reached" if j[key] else "pending"}"><span class="stage">{label}</span> '
        + (_t(j[key]) or "not yet")
        + (
            f' <span class="took">({j["durations_s"][span]:.1f} s)</span>'
            if span and j["durations_s"][span] is not None
            else ""
        )
        + "</li>"
        for label, key, span in stages
    )
    facts = [
        ("State", _state(j["state"])),
        ("Study UID", _uid(j["study_uid"])),
        ("Accession", _e(j["accession_number"])),
    ]
    if ops.cfg.api.show_patient_id:
        facts.append(("Patient ID", _e(j.get("patient_id"))))
    facts += [
        ("Attempts", _e(j["attempts"])),
        ("Instances", (f"{_e(j['instances'])} received, {_e(j['instances_processed'])} processed")),
        ("Error or note", _e(j["error"] or "—")),
    ]
    if j["supersedes"]:
        facts.append(
            ("Supersedes", f'<a href="/studies/{j["supersedes"]}">job {j["supersedes"]}</a>')
        )
    if j["later_jobs"]:
        facts.append(
            (
                "Later jobs",
                ", ".join(f'<a href="/studies/{i}">job {i}</a>' for i in j["later_jobs"]),
            )
        )
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    actions = []
    if j["state"] in ("failed", "dead-letter"):
        actions.append(_button("retry", j["id"], "Retry", csrf, page))
    if j["state"] in ("received", "queued"):
        actions.append(_button("cancel", j["id"], "Cancel", csrf, page))
    if j["state"] == "done" and j["outputs"]:
        names = "".join(f"<option>{_e(d.name)}</option>" for d in ops.cfg.destinations)
        if names:
            actions.append(
                _button(
                    "redeliver",
                    j["id"],
                    "Re-deliver",
                    csrf,
                    page,
                    f'<label>Destination <select name="destination">{names}</select></label>',
                )
            )
    series = [
        [
            _uid(s["series_uid"]),
            _e(s["description"]),
            _e(s["model"]),
            _state(s["status"]),
            _e(s["n_findings"]),
            _e(s["reason"]),
        ]
        for s in j["series"]
    ]
    outputs = [
        [_e(o["kind"].upper()), _e(o["model"]), _uid(o["sop_instance_uid"])] for o in j["outputs"]
    ]
    deliveries = [
        [
            _e(d["destination"]),
            _state(d["state"]),
            _e(d["attempts"]),
            _t(d["last_attempt_at"]),
            _t(d["next_attempt_at"]),
            _e(d["last_error"]),
        ]
        for d in j["deliveries"]
    ]
    acted = [
        [
            _t(a["at"]),
            _e(a["actor"]),
            _e(a["action"]),
            _e(a["detail"]),
            _e(a["reason"]),
            _e(a["outcome"]),
        ]
        for a in j["actions"]
    ]
    return (
        f'<dl class="facts">{dl}</dl>'
        + (
            f'<section><h2>Actions</h2><div class="actions">{"".join(actions)}</div></section>'
            if actions
            else ""
        )
        + f'<section><h2>Timeline</h2><ol class="timeline">{timeline}</ol></section>'
        + _table(
            "Routed series",
            ["Series UID", "Description", "Model", "Outcome", "Findings", "Reason"],
            series,
            "no series processed yet",
        )
        + _table("Results", ["Kind", "Model", "SOP Instance UID"], outputs, "no results")
        + _table(
            "Deliveries",
            [
                "Destination",
                "State",
                "Attempts",
                "Last attempt (UTC)",
                "Next attempt (UTC)",
                "Last error",
            ],
            deliveries,
            "no deliveries",
        )
        + _table(
            "Operator actions",
            ["At (UTC)", "Who", "Action", "What", "Why", "Outcome"],
            acted,
            "none",
        )
    )


def _failures(ops: Operations, query: dict[str, list[str]], csrf: str) -> str:
    offset = int_param(query, "offset", 0)
    data = ops.studies(states=("failed", "dead-letter"), limit=_PAGE, offset=offset)
    show = ops.cfg.api.show_patient_id
    return _table(
        f"Failed and dead-lettered studies ({data['total']})",
        _studies_headers(show, True),
        _studies_rows(data["items"], show, csrf, "/failures", True),
        "no failures",
    ) + _pager("/failures", query, data["total"], offset)


def _deliveries(ops: Operations, query: dict[str, list[str]]) -> str:
    offset = int_param(query, "offset", 0)
    states = list_param(query, "state")
    data = ops.deliveries(states=states, limit=_PAGE, offset=offset)
    options = "".join(
        f"<option{' selected' if s in states else ''}>{s}</option>"
        for s in ("pending", "sent", "dead-letter")
    )
    form = (
        '<form method="get" action="/deliveries" class="filters"><label>State <select name="state">'
        f'<option value="">any</option>{options}</select>'
        '</label><button type="submit">Filter</button></form>'
    )
    rows = [
        [
            f'<a href="/studies/{d["job_id"]}">{d["job_id"]}</a>',
            _e(d["destination"]),
            _state(d["state"]),
            _e(d["attempts"]),
            _t(d["last_attempt_at"]),
            _t(d["next_attempt_at"]),
            _short(d["last_error"]),
        ]
        for d in data["items"]
    ]
    return (
        form
        + _table(
            f"Deliveries ({data['total']})",
            [
                "Job",
                "Destination",
                "State",
                "Attempts",
                "Last attempt (UTC)",
                "Next attempt (UTC)",
                "Last error",
            ],
            rows,
            "no deliveries",
        )
        + _pager("/deliveries", query, data["total"], offset)
    )


def _quarantine(ops: Operations, query: dict[str, list[str]], csrf: str) -> str:
    offset = int_param(query, "offset", 0)
    data = ops.quarantine(limit=_PAGE, offset=offset)
    rows = [
        [
            _t(q["at"]),
            _e(q["reason"]),
            _e(q["context"].get("calling_ae")),
            _e(q["context"].get("peer")),
            _uid(q["context"].get("sop_instance_uid", "")),
            _e(q["bytes"]),
            f"<code>{_e(q['name'])}</code>",
        ]
        for q in data["items"]
    ]
    purge = (
        '<form method="post" action="/api/v1/quarantine/purge" class="action">'
        f'<input type="hidden" name="csrf_token" value="{_e(csrf)}">'
        '<input type="hidden" name="next" value="/quarantine">'
        '<label>Older than (days) <input name="older_than_days" '
        'type="number" min="0" step="any" value="30" required></label>'
        '<label class="reason">Reason '
        '<input name="reason" maxlength="500" autocomplete="off"></label>'
        '<button type="submit">Purge</button></form>'
    )
    return (
        f"<section><h2>Purge</h2>{purge}</section>"
        + _table(
            f"Quarantined inputs ({data['total']})",
            ["Received (UTC)", "Reason", "Calling AE", "Peer", "SOP Instance UID", "Bytes", "File"],
            rows,
            "empty",
        )
        + _pager("/quarantine", query, data["total"], offset)
    )


def _refused(ops: Operations, query: dict[str, list[str]]) -> str:
    offset = int_param(query, "offset", 0)
    data = ops.refusals(limit=_PAGE, offset=offset)
    rows = [
        [
            _t(r["at"]),
            f"<code>{_e(r['calling_ae'])}</code>",
            f"<code>{_e(r['called_ae'])}</code>",
            _e(r["peer"]),
            _e(r["reason"]),
        ]
        for r in data["items"]
    ]
    return _table(
        f"Refused associations ({data['total']})",
        ["At (UTC)", "Calling AE", "Called AE", "Peer", "Reason"],
        rows,
        "none",
    ) + _pager("/refused", query, data["total"], offset)


def _config(ops: Operations) -> str:
    text = yaml.safe_dump(ops.config(), sort_keys=False)
    return f'<p>Read-only; secrets are masked.</p><pre class="config">{_e(text)}</pre>'


def render(
    path: str, query: dict[str, list[str]], ops: Operations, *, csrf: str, user: str
) -> str | None:
    """The page at ``path`` as HTML, or None when there is none.

    Raises:
        NotFound: a study page of an unknown job.
        ValueError: a bad filter value (the API answers 400).
    """
    path = path.rstrip("/") or "/"
    if path == "/":
        return _layout("Overview", "/", _overview(ops, csrf), user)
    if path == "/studies":
        return _layout("Studies", "/studies", _studies(ops, query, csrf), user)
    if path.startswith("/studies/") and path.count("/") == 2:
        ref = path.split("/")[2]
        return _layout(f"Study job {ref}", "/studies", _study(ops, ref, csrf), user)
    pages = {
        "/failures": ("Failures", lambda: _failures(ops, query, csrf)),
        "/deliveries": ("Deliveries", lambda: _deliveries(ops, query)),
        "/quarantine": ("Quarantine", lambda: _quarantine(ops, query, csrf)),
        "/refused": ("Refused associations", lambda: _refused(ops, query)),
        "/config": ("Configuration", lambda: _config(ops)),
    }
    if path in pages:
        title, make = pages[path]
        return _layout(title, path, make(), user)
    return None


def error_page(status: int, phrase: str, message: str) -> str:
    """A minimal HTML error page (no navigation: the caller may not be signed in)."""
    return (
        '<!doctype html><html lang="en"><head>'
        f'<meta charset="utf-8"><title>{status} {_e(phrase)}</title>'
        f'<link rel="stylesheet" href="/static/console.css"></head><body><main id="main">'
        f"<h1>{status} {_e(phrase)}</h1><p>{_e(message)}</p>"
        '<p><a href="/">Overview</a></p></main></body></html>'
    )
