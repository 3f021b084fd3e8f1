"""The review web app: login, queue of deferred cases, case page with its signal plot, labels, fleet view,
the clinician's view of screening trials (the list with what needs review; a trial's signal with its phases,
its answer and reasons in plain words, its features against the training population, its label), and a JSON
API, one router per page (auth, review, fleet, trials, api) over the database and templates on app.state.
Every page and API route needs a logged-in reviewer; every POST checks a CSRF token.

Offline by design: no CDN; the signal plot is inline SVG built here. Must not import paho or torch.
"""

from __future__ import annotations

import html
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.middleware.sessions import SessionMiddleware

from edgekit.errors import DataError
from edgekit.gate import REASON_TEXT
from edgekit.hub import deploy as deploy_mod
from edgekit.hub import observe
from edgekit.hub.auth import csrf_ok, new_csrf_token, verify_password
from edgekit.hub.db import HubDB

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_MAX_AGE_S = 8 * 3600
PAGE_SIZE = 50
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")

# score key -> (threshold key, rule): "max" fails above the threshold, "min" fails below it.
GATE_RULES = {
    "ood": ("ood_max_score", "max"),
    "confidence": ("min_confidence", "min"),
    "disagreement": ("max_disagreement", "max"),
}


# What happened to a trial, in the order a clinician cares; trial_outcome picks one.
OUTCOME_TEXT = {
    "deferred": "Deferred: the station did not answer on its own; a clinician decides.",
    "referred": "Referred for review: the station answered with a label other than the normal one.",
    "not_scored": "Not scored: the station could not compute the answer's features.",
    "answered": "Answered by the station: not referred.",
    "summary": "A gait summary only: no screening answer came with this trial.",
}
# A trial's phases as plot bands: (name, words, start key, end key), times in s from the trial's first sample.
PHASES = (("walk_out", "walk out", "walk_start_s", "turn_start_s"), ("turn", "turn", "turn_start_s", "turn_end_s"),
          ("walk_back", "walk back", "turn_end_s", "walk_end_s"))


class LoginRequired(Exception):
    """Raised by page dependencies; answered with a redirect to the login page."""


class LabelIn(BaseModel):
    label: str = Field(min_length=1, max_length=128)
    note: str = Field("", max_length=2000)


# --- shared state: the app's database and templates (app.state), and who is asking -------------------


def _db(request: Request) -> HubDB:
    return request.app.state.db


def _user(request: Request) -> str | None:
    name = request.session.get("user")
    if not isinstance(name, str) or _db(request).user_password(name) is None:
        return None
    return name


def page_user(request: Request) -> str:
    """Dependency of every page: the logged-in reviewer, else LoginRequired (a redirect to /login)."""
    name = _user(request)
    if name is None:
        raise LoginRequired()
    return name


def api_user(request: Request) -> str:
    """Dependency of every API route: the logged-in reviewer, else 401."""
    name = _user(request)
    if name is None:
        raise HTTPException(401, "login required", headers={"WWW-Authenticate": "Cookie"})
    return name


def _csrf(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = new_csrf_token()
    return token


def _safe_next(target: str | None) -> str:
    """Only same-site paths: no open redirect through ?next=."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/queue"


def render(request: Request, template: str, user: str | None, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    return request.app.state.templates.TemplateResponse(
        request, template, {"user": user, "csrf": _csrf(request), **context}, status_code=status_code)


def _label(db: HubDB, result_id: str, label: str, user: str, note: str) -> int:
    """Store a reviewer's label (the case page's form and the API); HTTP 404/400 when the database refuses."""
    try:
        label_id = db.add_label(result_id, label, user, note)
    except DataError as exc:
        raise HTTPException(404 if "no such" in exc.message else 400, str(exc)) from None
    log.info("hub.labelled result_id=%s label=%s reviewer=%s", result_id, label, user)
    return label_id


class Pages(TypedDict):
    """The pager's links as render's keywords (typed: a plain dict could, for mypy, bind status_code)."""

    newer: str | None
    older: str | None


def _pages(filters: dict[str, Any], offset: int, more: bool) -> Pages:
    """Query strings of the newer and older page of a list (None where there is none)."""
    return {"newer": urlencode({**filters, "offset": max(offset - PAGE_SIZE, 0)}) if offset else None,
            "older": urlencode({**filters, "offset": offset + PAGE_SIZE}) if more else None}


# --- login: /login, /logout (/healthz and /metrics, without a login: edgekit/hub/observe.py) ------------

auth = APIRouter()


@auth.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    return render(request, "login.html", None, next=_safe_next(next), error=None)


@auth.post("/login", response_class=HTMLResponse)
def login(request: Request, name: str = Form(""), password: str = Form(""), csrf: str = Form(""),
          next: str = Form("/queue")) -> Response:
    if not csrf_ok(request.session.get("csrf"), csrf):
        return render(request, "login.html", None, 403, next=_safe_next(next),
                      error="The form expired; please try again.")
    if not verify_password(password, _db(request).user_password(name)):
        log.warning("hub.login_failed name=%s", name[:64])
        return render(request, "login.html", None, 401, next=_safe_next(next), error="Wrong name or password.")
    request.session.clear()
    request.session["user"] = name
    request.session["csrf"] = new_csrf_token()  # a new token per login session
    log.info("hub.login name=%s", name)
    return RedirectResponse(_safe_next(next), status_code=303)


@auth.post("/logout")
def logout(request: Request, csrf: str = Form("")) -> Response:
    if not csrf_ok(request.session.get("csrf"), csrf):
        raise HTTPException(403, "bad CSRF token")
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# --- review: /, /queue, /cases/{id} and its label form ----------------------------------------------

review = APIRouter()


@review.get("/")
def home(user: str = Depends(page_user)) -> Response:
    return RedirectResponse("/queue", status_code=303)


@review.get("/queue", response_class=HTMLResponse)
def queue_page(request: Request, site: str = "", device: str = "", reason: str = "", status: str = "unlabelled",
               offset: int = 0, user: str = Depends(page_user)) -> HTMLResponse:
    status = status if status in ("unlabelled", "labelled", "all") else "unlabelled"
    offset = max(offset, 0)
    db = _db(request)
    cases = db.cases(site=site or None, device=device or None, reason=reason or None, status=status,
                     limit=PAGE_SIZE + 1, offset=offset)
    filters = {"site": site, "device": device, "reason": reason, "status": status}
    return render(request, "queue.html", user, cases=cases[:PAGE_SIZE], facets=db.facets(), filters=filters,
                  offset=offset, page_size=PAGE_SIZE, **_pages(filters, offset, len(cases) > PAGE_SIZE))


@review.get("/cases/{result_id}", response_class=HTMLResponse)
def case_page(request: Request, result_id: str, saved: int = 0, user: str = Depends(page_user)) -> Response:
    db = _db(request)
    if db.is_trial(result_id):  # a trial's answer: its own page shows the trial around it
        return RedirectResponse(f"/trials/{quote(result_id, safe=':@')}", status_code=303)
    case = db.case(result_id)
    if case is None:
        return render(request, "missing.html", user, 404, result_id=result_id)
    nxt = [c for c in db.cases(status="unlabelled", limit=2) if c["id"] != result_id]
    return render(request, "case.html", user, case=case, saved=bool(saved),
                  plot=signal_svg(case["signal"], (case["window_start_s"], case["window_end_s"])),
                  gate=gate_rows(case["scores"], case["thresholds"]),
                  outputs=model_outputs(case), choices=label_choices(case),
                  current=case["labels"][0]["label"] if case["labels"] else None,
                  next_case=nxt[0]["id"] if nxt else None)


@review.post("/cases/{result_id}/label")
def label_form(request: Request, result_id: str, label: str = Form(""), other: str = Form(""),
               note: str = Form(""), csrf: str = Form(""), user: str = Depends(page_user)) -> Response:
    if not csrf_ok(request.session.get("csrf"), csrf):
        raise HTTPException(403, "bad CSRF token")
    chosen = (other.strip() if label == "__other__" else label.strip())[:128]
    if not chosen:
        raise HTTPException(400, "choose a label or type one")
    _label(_db(request), result_id, chosen, user, note[:2000])
    return RedirectResponse(f"/cases/{quote(result_id, safe=':@')}?saved=1", status_code=303)


# --- fleet: /fleet ----------------------------------------------------------------------------------

fleet = APIRouter()


@fleet.get("/fleet", response_class=HTMLResponse)
def fleet_page(request: Request, user: str = Depends(page_user)) -> HTMLResponse:
    db = _db(request)
    return render(request, "fleet.html", user, devices=db.fleet(), now=time.time(), rollouts=deploy_mod.summaries(db))


# --- trials: /trials, /trials/{id} and its label form -------------------------------------------------

trials = APIRouter()


@trials.get("/trials", response_class=HTMLResponse)
def trials_page(request: Request, site: str = "", device: str = "", review: str = "", offset: int = 0,
                user: str = Depends(page_user)) -> HTMLResponse:
    review = "needed" if review == "needed" else ""
    offset = max(offset, 0)
    rows = _db(request).trials(site=site or None, device=device or None, review=review or "all",
                               limit=PAGE_SIZE + 1, offset=offset)
    for r in rows:
        r["outcome"] = trial_outcome(r["summary"])
    filters = {"site": site, "device": device, "review": review}
    return render(request, "trials.html", user, trials=rows[:PAGE_SIZE], filters=filters,
                  **_pages(filters, offset, len(rows) > PAGE_SIZE))


@trials.get("/trials/{trial_id}", response_class=HTMLResponse)
def trial_page(request: Request, trial_id: str, saved: int = 0, user: str = Depends(page_user)) -> HTMLResponse:
    found = _db(request).trial(trial_id)
    if found is None:
        return render(request, "missing.html", user, 404, result_id=trial_id)
    view = trial_view(found)
    return render(request, "trial.html", user, t=view, saved=bool(saved), plot=trial_svg(view))


@trials.post("/trials/{trial_id}/label")
def trial_label_form(request: Request, trial_id: str, label: str = Form(""), note: str = Form(""),
                     csrf: str = Form(""), user: str = Depends(page_user)) -> Response:
    """The clinician's call on a scored trial: one of its bundle's labels (the answer's probs keys, which
    training knows), and the outcome when known as the label's note."""
    if not csrf_ok(request.session.get("csrf"), csrf):
        raise HTTPException(403, "bad CSRF token")
    db = _db(request)
    case = db.case(trial_id) if db.is_trial(trial_id) else None
    if case is None:
        raise HTTPException(404, f"no scored trial {trial_id}")
    if label not in (case["probs"] or {}):
        raise HTTPException(400, f"choose one of {sorted(case['probs'] or {})}")
    _label(db, trial_id, label, user, note[:2000])
    return RedirectResponse(f"/trials/{quote(trial_id, safe=':@')}?saved=1", status_code=303)


# --- JSON API: /api/... -----------------------------------------------------------------------------

api = APIRouter(prefix="/api")


@api.get("/cases")
def api_cases(request: Request, site: str | None = None, device: str | None = None, reason: str | None = None,
              status: str = "all", limit: int = 100, offset: int = 0,
              user: str = Depends(api_user)) -> dict[str, Any]:
    if status not in ("unlabelled", "labelled", "all"):
        raise HTTPException(422, "status must be unlabelled, labelled or all")
    limit = min(max(limit, 1), 1000)
    cases = _db(request).cases(site=site, device=device, reason=reason, status=status, limit=limit,
                               offset=max(offset, 0))
    return {"cases": cases, "limit": limit, "offset": offset}


@api.get("/cases/{result_id}")
def api_case(request: Request, result_id: str, user: str = Depends(api_user)) -> dict[str, Any]:
    case = _db(request).case(result_id)
    if case is None:
        raise HTTPException(404, f"no case {result_id}")
    return case


@api.post("/cases/{result_id}/labels", status_code=201)
def api_label(request: Request, result_id: str, body: LabelIn, user: str = Depends(api_user)) -> JSONResponse:
    if not csrf_ok(request.session.get("csrf"), request.headers.get("x-csrf-token")):
        raise HTTPException(403, "bad or missing X-CSRF-Token header")
    label_id = _label(_db(request), result_id, body.label, user, body.note)
    return JSONResponse({"id": label_id, "result_id": result_id, "label": body.label.strip(), "reviewer": user},
                        status_code=201)


@api.get("/fleet")
def api_fleet(request: Request, user: str = Depends(api_user)) -> dict[str, Any]:
    return {"devices": _db(request).fleet(), "now": time.time()}


@api.get("/trials")
def api_trials(request: Request, site: str | None = None, device: str | None = None, review: str = "all",
               limit: int = 100, offset: int = 0, user: str = Depends(api_user)) -> dict[str, Any]:
    if review not in ("needed", "all"):
        raise HTTPException(422, "review must be needed or all")
    limit = min(max(limit, 1), 1000)
    offset = max(offset, 0)
    rows = _db(request).trials(site=site, device=device, review=review, limit=limit, offset=offset)
    for r in rows:
        r["outcome"] = trial_outcome(r["summary"])
    return {"trials": rows, "limit": limit, "offset": offset}


@api.get("/trials/{trial_id}")
def api_trial(request: Request, trial_id: str, user: str = Depends(api_user)) -> dict[str, Any]:
    """What the trial page shows, as data: trial_view (the stored summary, with its signal, included)."""
    found = _db(request).trial(trial_id)
    if found is None:
        raise HTTPException(404, f"no trial {trial_id}")
    return trial_view(found)


@api.get("/me")
def api_me(request: Request, user: str = Depends(api_user)) -> dict[str, str]:
    return {"name": user, "csrf": _csrf(request)}


# --- the app --------------------------------------------------------------------------------------------

# --- bundles: /bundles/{deployment}, for devices (issue 16) ---------------------------------------------

bundles = APIRouter()


@bundles.get("/bundles/{deployment}", include_in_schema=False)
def bundle_download(request: Request, deployment: str) -> Response:
    """A deployment's bundle archive, for a device that brings its token from its bundle command as
    `Authorization: Bearer TOKEN` (edgekit/hub/deploy.py). No login: a device has none. An unknown deployment and
    a wrong token get the same 403."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    found = deploy_mod.archive_for(_db(request), deployment, token) if scheme.lower() == "bearer" and token else None
    client = request.client.host if request.client else "-"
    if found is None:
        log.warning("hub.bundle_refused deployment=%.64r client=%s", deployment, client)
        raise HTTPException(status_code=403, detail="not a device of this deployment")
    blob, device = found
    log.info("hub.bundle_served deployment=%s device=%s client=%s bytes=%d", deployment, device, client, len(blob))
    return Response(blob, media_type="application/x-tar")


ROUTERS = (auth, review, fleet, trials, api, observe.router, bundles)


async def _headers(request: Request, call_next: Any) -> Response:
    response = await call_next(request)
    # No framing (the label form must not be clickjacked), nothing loaded from elsewhere, no caching
    # of case data by shared caches. Inline style attributes draw the bars.
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if not request.url.path.startswith("/static"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


async def _to_login(request: Request, _exc: Exception) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


def create_app(db: HubDB, *, secure_cookies: bool = False, watch: observe.HubWatch | None = None) -> FastAPI:
    """The app for one database. `secure_cookies` when served over HTTPS (behind a proxy). `watch`: the running
    hub's (its intake's connection for /healthz, its counters for /metrics); without one, /healthz asks the
    database alone. The routers find the database, the templates and the watch on app.state."""
    app = FastAPI(title="edgekit hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware, secret_key=db.secret(), session_cookie="edgekit_hub",
                       max_age=SESSION_MAX_AGE_S, same_site="strict", https_only=secure_cookies)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.middleware("http")(_headers)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(when=fmt_time, ago=fmt_ago, num=fmt_num, pathq=lambda s: quote(str(s), safe=":@"),
                                 reason_text=reason_text, short_pseudonym=short_pseudonym, pct=fmt_pct, sig=fmt_sig,
                                 not_scored_text=lambda s: (not_scored_view(s) or {}).get("text", ""))
    app.state.db = db
    app.state.watch = watch or observe.HubWatch(db)
    app.state.templates = templates
    app.add_exception_handler(LoginRequired, _to_login)
    for router in ROUTERS:
        # The routes themselves, not include_router: FastAPI 0.165 keeps an included router as one opaque
        # entry of app.routes, and tests/test_hub_web.py walks app.routes to prove every page needs a login.
        # (So app.dependency_overrides does not reach these routes; nothing here uses it.)
        app.router.routes.extend(router.routes)
    return app


# --- presentation helpers (pure; tested directly) --------------------------------------------------------


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    s = max((time.time() if now is None else now) - ts, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def fmt_num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"


def fmt_sig(value: Any) -> str:
    """A feature's value to 4 significant digits (78, 12.5, 0.1234), whatever its scale."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:.4g}"


def fmt_pct(p: Any) -> str:
    """A probability (0..1) as whole percent."""
    return f"{100 * p:.0f} %" if isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) else "-"


def gate_rows(scores: dict[str, Any], thresholds: dict[str, Any]) -> list[dict[str, Any]]:
    """Each gate score next to its threshold, with pass/fail and a 0..1 bar position for both."""
    rows = []
    for key, score in (scores or {}).items():
        tkey, rule = GATE_RULES.get(key, (None, None))
        if tkey is None:
            for cand, r in ((f"max_{key}", "max"), (f"{key}_max", "max"), (f"min_{key}", "min"),
                            (f"{key}_min", "min")):
                if cand in (thresholds or {}):
                    tkey, rule = cand, r
                    break
        limit = (thresholds or {}).get(tkey) if tkey else None
        ok = None
        if isinstance(score, (int, float)) and isinstance(limit, (int, float)):
            ok = score <= limit if rule == "max" else score >= limit
        scale = max(abs(score or 0), abs(limit or 0), 1e-9) * 1.25
        rows.append({"name": key, "score": score, "threshold_key": tkey, "threshold": limit, "rule": rule,
                     "ok": ok, "score_pct": 100 * min(abs(score or 0) / scale, 1),
                     "limit_pct": 100 * min(abs(limit or 0) / scale, 1) if limit is not None else None})
    return rows


def model_outputs(case: dict[str, Any]) -> list[dict[str, Any]]:
    """Per label: the model's and the second opinion's probability, most likely first."""
    probs = case.get("probs") or {}
    second = (case.get("second_opinion") or {}).get("probs") or {}
    names = list(dict.fromkeys([*probs, *second]))
    names.sort(key=lambda n: -(probs.get(n) or 0))
    return [{"label": n, "model": probs.get(n), "second": second.get(n)} for n in names]


def label_choices(case: dict[str, Any]) -> list[str]:
    choices = [row["label"] for row in model_outputs(case)]
    for extra in (case.get("label"), (case.get("second_opinion") or {}).get("label")):
        if isinstance(extra, str) and extra not in choices:
            choices.append(extra)
    return choices


def reason_text(reason: str) -> str:
    """A gate reason as a sentence in plain words (gate.REASON_TEXT, which the station screen shows too; keyed
    by the reason up to its first ':', after which a reason may name a channel), or the reason as sent when
    this hub does not know it."""
    words = REASON_TEXT.get(reason.partition(":")[0])
    return reason if words is None else words[:1].upper() + words[1:] + "."


def short_pseudonym(value: str | None) -> str:
    """p- and the first 6 of its 16 hex digits: enough to tell a day's participants apart at a glance."""
    return "-" if not value else value[:8] + ("…" if len(value) > 8 else "")


def trial_outcome(summary: dict[str, Any]) -> str:
    """One key of OUTCOME_TEXT for a stored trial summary: the answer's `referred` (trial /3; a /2 answer,
    which has none, counts as referred when it came with the trial's signal, which the agent sent only with
    a referral, a deferred answer or a trial not scored). Which trials still need review is the database's
    condition (db._trial_needs_review), the same rule."""
    answer = summary.get("answer")
    if answer:
        if answer.get("decision") == "defer":
            return "deferred"
        return "referred" if answer.get("referred", bool(summary.get("signal"))) else "answered"
    return "not_scored" if summary.get("not_scored") else "summary"


def not_scored_view(text: str | None) -> dict[str, str] | None:
    """The agent's "reason: detail" (NotScored's code and its message, already in words) as {reason, text},
    the text as the station screen shows it."""
    if not text:
        return None
    reason, _, detail = text.partition(": ")
    return {"reason": reason, "text": detail or reason}


def short_doc(text: str, limit: int = 110) -> str:
    """A registry description's first sentence, without a long parenthesis (the full text goes in a title)."""
    first = text
    for stop in (". ", "; "):
        first = first.split(stop, 1)[0]
    if len(first) > limit and " (" in first:
        first = first.split(" (", 1)[0]
    return first.rstrip(".")


def trial_feature_rows(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The answer's features in the order sent, each with its registry unit and description (a name this hub's
    registry does not hold says so) and its percentile in the bundle's training population (None: not sent)."""
    from edgekit.trial_features import REGISTRY  # numpy only; the hub extra has it

    percentiles = answer.get("percentiles") or {}
    rows = []
    for name, value in (answer.get("features") or {}).items():
        entry = REGISTRY.get(name)
        doc = entry.description if entry else "Not a feature of this hub's trial feature registry."
        pct = percentiles.get(name)
        rows.append({"name": name, "value": value, "unit": entry.unit if entry else "", "doc": short_doc(doc),
                     "description": doc, "percentile": pct,
                     "bar_pct": None if pct is None else min(max(float(pct), 0.0), 100.0)})
    return rows


def trial_phases(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The phases whose start and end the segmentation found (PHASES), in s from the trial's first sample."""
    out = []
    for name, text, start, end in PHASES:
        t0, t1 = summary.get(start), summary.get(end)
        if isinstance(t0, (int, float)) and isinstance(t1, (int, float)) and t1 > t0:
            out.append({"name": name, "text": text, "start_s": float(t0), "end_s": float(t1)})
    return out


def trial_duration_s(summary: dict[str, Any]) -> float | None:
    """What the trial's samples cover: samples / rate (the downsampled signal spans it), else end - start."""
    span = summary.get("trial") or {}
    samples, rate = span.get("samples"), span.get("rate_hz")
    if isinstance(samples, int) and samples > 0 and isinstance(rate, (int, float)) and rate > 0:
        return samples / rate
    start, end = span.get("start_s"), span.get("end_s")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and end > start:
        return float(end - start)
    return None


def trial_view(trial: dict[str, Any]) -> dict[str, Any]:
    """Everything the trial page and /api/trials/{id} show, from HubDB.trial: the outcome in plain words, the
    answer with each reason explained, the phases, the features against the training population, the label
    choices (the bundle's labels: the answer's probs keys) and the label history (newest first)."""
    summary, case = trial["summary"], trial["case"]
    answer = summary.get("answer")
    outcome = trial_outcome(summary)
    history = case["labels"] if case else []
    return {
        "id": trial["id"], "site": trial["site"], "device": trial["device"], "ts": trial["ts"],
        "received_at": trial["received_at"], "participant": trial["participant"],
        "outcome": outcome, "outcome_text": OUTCOME_TEXT[outcome],
        "needs_review": trial["needs_review"],
        "answer": None if not answer else {
            "label": answer.get("label"), "probability": answer.get("confidence"), "probs": answer.get("probs"),
            "decision": answer.get("decision"), "scores": answer.get("scores"),
            "reasons": [{"reason": r, "text": reason_text(r)} for r in answer.get("reasons") or []]},
        "not_scored": not_scored_view(summary.get("not_scored")),
        "duration_s": trial_duration_s(summary), "phases": trial_phases(summary),
        "features": trial_feature_rows(answer or {}),
        "choices": list((case or {}).get("probs") or {}), "label": history[0] if history else None,
        "labels": history, "summary": summary,
    }


def trial_svg(view: dict[str, Any]) -> str:
    """The trial's signal (signal_svg) on the trial's own clock, 0 at its first sample, so the phases and
    steps (times from that sample) fall where they happened."""
    summary = view["summary"]
    duration = view["duration_s"]
    steps = [t for t in summary.get("step_times_s") or [] if isinstance(t, (int, float))]
    return signal_svg(summary.get("signal"), (0.0, duration) if duration else None, width=760, strip_h=70,
                      svg_id="trial-signal", bands=view["phases"], ticks_s=steps)


def signal_svg(signal: dict[str, Any] | None, span_s: tuple[Any, Any] | None = None, width: int = 960,
               strip_h: int = 84, *, svg_id: str | None = None, bands: Sequence[dict[str, Any]] = (),
               ticks_s: Sequence[float] = ()) -> str:
    """One strip per channel (own y range; channels differ in units), shared time axis in seconds.

    The time axis runs over `span_s` (the result's window) when given, else from the signal's start_s at
    rate_hz per point (the points may be downsampled from the sensor's rate). `bands` ({name, text, start_s,
    end_s} on that axis: a trial's phases) are shaded across every strip and named above them; `ticks_s`
    (a trial's steps) are marked under the last strip."""
    if not signal or not signal.get("points"):
        return '<p class="muted">No signal was sent with this case.</p>'
    points = [list(ch) for ch in signal["points"]]
    names = list(signal.get("channels") or [])
    names += [f"ch{i}" for i in range(len(names), len(points))]
    n = max((len(ch) for ch in points), default=0)
    rate = float(signal.get("rate_hz") or 1.0)
    t0, duration = float(signal.get("start_s") or 0.0), max((n - 1) / rate, 1e-9)
    if span_s and all(isinstance(v, (int, float)) for v in span_s) and span_s[1] > span_s[0]:
        t0, duration = float(span_s[0]), float(span_s[1] - span_s[0])
    frame = _Frame(left=110, top=22 if bands else 8, plot_w=width - 126, strip_h=strip_h, strips=len(points),
                   t0=t0, duration=duration)
    height = frame.bottom + 44
    id_attr = f' id="{html.escape(svg_id)}"' if svg_id else ""
    out = [f'<svg{id_attr} class="signal" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="100%" role="img" aria-label="signal, {len(points)} channels">']
    ranges = [_value_range(values) for values in points]
    for c, name in enumerate(names[:len(points)]):
        out += _strip(frame, c, str(name), ranges[c])
    out += _time_axis(frame, len(points), n) + _bands(frame, bands) + _ticks(frame, ticks_s)  # under the lines
    for c, values in enumerate(points):
        out += _polylines(frame, c, values, n, ranges[c])
    out.append("</svg>")
    return "".join(out)


@dataclass(frozen=True)
class _Frame:
    """Where signal_svg draws: strips of strip_h under `top`, GAP apart, from x=left over plot_w pixels for
    `duration` seconds from t0."""

    left: int
    top: int
    plot_w: int
    strip_h: int
    strips: int
    t0: float
    duration: float
    GAP = 10

    def strip_y(self, c: int) -> int:
        return self.top + c * (self.strip_h + self.GAP)

    @property
    def bottom(self) -> int:
        """The y just under the last strip."""
        return self.strip_y(self.strips) - self.GAP

    def x(self, t_s: float) -> float:
        return self.left + self.plot_w * min(max((t_s - self.t0) / self.duration, 0.0), 1.0)


def _value_range(values: list[Any]) -> tuple[float, float]:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo, hi)


def _strip(frame: _Frame, c: int, name: str, lo_hi: tuple[float, float]) -> list[str]:
    y0, h, left, color = frame.strip_y(c), frame.strip_h, frame.left, PALETTE[c % len(PALETTE)]
    return [f'<rect x="{left}" y="{y0}" width="{frame.plot_w}" height="{h}" class="strip"/>',
            f'<text x="{left - 8}" y="{y0 + h / 2 + 4:.1f}" text-anchor="end" class="chan" fill="{color}">'
            f'{html.escape(name)}</text>',
            f'<text x="{left - 8}" y="{y0 + 11}" text-anchor="end" class="tick">{fmt_num(lo_hi[1])}</text>',
            f'<text x="{left - 8}" y="{y0 + h - 2}" text-anchor="end" class="tick">{fmt_num(lo_hi[0])}</text>']


def _polylines(frame: _Frame, c: int, values: list[Any], n: int, lo_hi: tuple[float, float]) -> list[str]:
    """The channel's line, broken where a value is missing or not finite."""
    (lo, hi), y0, h = lo_hi, frame.strip_y(c), frame.strip_h
    segments: list[list[str]] = [[]]
    for i, v in enumerate(values):
        if isinstance(v, (int, float)) and math.isfinite(v):
            x = frame.left + frame.plot_w * (i / (n - 1) if n > 1 else 0.5)
            segments[-1].append(f"{x:.1f},{y0 + h - 4 - (h - 8) * (v - lo) / (hi - lo):.1f}")
        elif segments[-1]:
            segments.append([])
    color = PALETTE[c % len(PALETTE)]
    return [f'<polyline fill="none" stroke="{color}" stroke-width="1.4" points="{" ".join(seg)}"/>'
            for seg in segments if seg]


def _bands(frame: _Frame, bands: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    for b in bands:
        x0, x1 = frame.x(b["start_s"]), frame.x(b["end_s"])
        name, text = html.escape(b["name"]), html.escape(b["text"])
        out.append(f'<g class="phase-band phase-{name}" data-phase="{name}"><title>{text}: '
                   f'{b["start_s"]:.2f}-{b["end_s"]:.2f} s</title>'
                   f'<rect x="{x0:.1f}" y="{frame.top}" width="{x1 - x0:.1f}" height="{frame.bottom - frame.top}"/>'
                   f'<text x="{(x0 + x1) / 2:.1f}" y="{frame.top - 6}" text-anchor="middle">{text}</text></g>')
    return out


def _ticks(frame: _Frame, ticks_s: Sequence[float]) -> list[str]:
    y = frame.bottom
    return [f'<line class="step-tick" x1="{frame.x(t):.1f}" y1="{y - 8}" x2="{frame.x(t):.1f}" y2="{y}"/>'
            for t in ticks_s if frame.t0 <= t <= frame.t0 + frame.duration]


def _time_axis(frame: _Frame, channels: int, n: int) -> list[str]:
    out, axis_y = [], frame.bottom + frame.GAP
    for k in range(6):
        x = frame.left + frame.plot_w * k / 5
        out.append(f'<line x1="{x:.1f}" y1="{frame.top}" x2="{x:.1f}" y2="{frame.bottom}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 10}" text-anchor="middle" class="tick">'
                   f'{frame.t0 + frame.duration * k / 5:.2f}</text>')
    out.append(f'<text x="{frame.left + frame.plot_w / 2:.1f}" y="{axis_y + 26}" text-anchor="middle" '
               f'class="tick">time (s) · {channels} channels · {n} points</text>')
    return out
