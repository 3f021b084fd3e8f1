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
from edgekit.gate import reason_words
from edgekit.hub import deploy as deploy_mod
from edgekit.hub import observe
from edgekit.hub.auth import csrf_ok, new_csrf_token, verify_password
from edgekit.hub.db import BUDGET_KEY, INCIDENT_GAP_KEY, HubDB

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_MAX_AGE_S = 8 * 3600
PAGE_SIZE = 50
QUEUE_STATUSES = ("unlabelled", "labelled", "learning", "all")  # HubDB.incidents' status filter
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


def _label_incident(db: HubDB, window_id: str, ids: list[str], label: str, user: str, note: str) -> int:
    """Label the windows `ids` of the incident holding `window_id` (each must be one of its windows)."""
    found = db.incident(window_id)
    if found is None:
        raise HTTPException(404, f"no incident holds {window_id}")
    outside = [i for i in ids if i not in set(found["window_ids"])]
    if not ids or outside:
        raise HTTPException(400, f"not windows of this incident: {outside[:3] or 'none given'}")
    try:
        n = db.add_labels(ids, label, user, note)
    except DataError as exc:
        raise HTTPException(400, str(exc)) from None
    log.info("hub.incident_labelled incident=%s windows=%d label=%s reviewer=%s", found["id"], n, label, user)
    return n


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
    """Incidents (edgekit/incidents.py), highest priority first, with the totals waiting."""
    status = status if status in QUEUE_STATUSES else "unlabelled"
    offset = max(offset, 0)
    db = _db(request)
    found = db.incidents(site=site or None, device=device or None, reason=reason or None, status=status)
    shown = found["incidents"][offset:offset + PAGE_SIZE]
    for inc in shown:
        inc["reason_words"] = [{"reason": r, "text": reason_text(r), "windows": n} for r, n in inc["reasons"].items()]
    filters = {"site": site, "device": device, "reason": reason, "status": status}
    return render(request, "queue.html", user, incidents=shown, totals=found["totals"], gap_s=found["gap_s"],
                  matching=len(found["incidents"]), facets=db.facets(), filters=filters, offset=offset,
                  statuses=QUEUE_STATUSES,
                  page_size=PAGE_SIZE, **_pages(filters, offset, len(found["incidents"]) > offset + PAGE_SIZE))


@review.get("/incidents/{window_id}", response_class=HTMLResponse)
def incident_page(request: Request, window_id: str, saved: int = 0, user: str = Depends(page_user)) -> Response:
    """One incident, found by any of its windows' ids; labelled as a whole (every window it shows)."""
    db = _db(request)
    found = db.incident(window_id)
    if found is None:
        return render(request, "missing.html", user, 404, result_id=window_id)
    if found["trial"]:  # a screening trial's answer: its own page shows the trial around it
        return RedirectResponse(f"/trials/{quote(found['id'], safe=':@')}", status_code=303)
    if found["id"] != window_id and not saved:  # one address per incident: its first window's
        return RedirectResponse(f"/incidents/{quote(found['id'], safe=':@')}", status_code=303)
    view = incident_view(found)
    waiting = [i for i in db.incidents(status="unlabelled")["incidents"] if i["id"] != found["id"]]
    span = (view["start_s"], view["end_s"])
    return render(request, "incident.html", user, inc=view, saved=bool(saved),
                  plot=signal_svg(view["signal"], span, svg_id="incident-signal", times=view["signal_times"]),
                  plot_narrow=signal_svg(view["signal"], span, NARROW_W, NARROW_STRIP_H,
                                         svg_id="incident-signal-narrow", times=view["signal_times"]),
                  next_incident=waiting[0]["id"] if waiting else None)


@review.post("/incidents/{window_id}/label")
def incident_label_form(request: Request, window_id: str, label: str = Form(""), other: str = Form(""),
                        note: str = Form(""), windows: str = Form(""), csrf: str = Form(""),
                        user: str = Depends(page_user)) -> Response:
    """The label for every window the page showed (`windows`, the ids it listed: a window that joined the
    incident since is not labelled unseen)."""
    if not csrf_ok(request.session.get("csrf"), csrf):
        raise HTTPException(403, "bad CSRF token")
    chosen = (other.strip() if label == "__other__" else label.strip())[:128]
    if not chosen:
        raise HTTPException(400, "choose a label or type one")
    ids = [i for i in windows.split(",") if i]
    _label_incident(_db(request), window_id, ids, chosen, user, note[:2000])
    return RedirectResponse(f"/incidents/{quote(window_id, safe=':@')}?saved=1", status_code=303)


@review.get("/cases/{result_id}", response_class=HTMLResponse)
def case_page(request: Request, result_id: str, saved: int = 0, user: str = Depends(page_user)) -> Response:
    db = _db(request)
    if db.is_trial(result_id):  # a trial's answer: its own page shows the trial around it
        return RedirectResponse(f"/trials/{quote(result_id, safe=':@')}", status_code=303)
    case = db.case(result_id)
    if case is None:
        return render(request, "missing.html", user, 404, result_id=result_id)
    nxt = [c for c in db.cases(status="unlabelled", limit=2) if c["id"] != result_id]
    incident = db.incident(result_id) if case["decision"] == "defer" else None
    span = (case["window_start_s"], case["window_end_s"])
    return render(request, "case.html", user, case=case, saved=bool(saved),
                  plot=signal_svg(case["signal"], span),
                  plot_narrow=signal_svg(case["signal"], span, NARROW_W, NARROW_STRIP_H),
                  gate=gate_rows(case["scores"], case["thresholds"]),
                  outputs=model_outputs(case), choices=label_choices(case),
                  current=case["labels"][0]["label"] if case["labels"] else None,
                  next_case=nxt[0]["id"] if nxt else None,
                  reasons=[{"reason": r, "text": reason_text(r)} for r in case["reasons"]],
                  attribution=attribution_rows(case["attribution"]),
                  features=feature_rows(case["features"], case["percentiles"], case["signal"]),
                  incident=None if incident is None else {"id": incident["id"], "windows": incident["windows"]})


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
def fleet_page(request: Request, saved: int = 0, user: str = Depends(page_user)) -> HTMLResponse:
    db = _db(request)
    budget = db.deferral_budget_per_h()
    return render(request, "fleet.html", user, devices=fleet_rows(db.fleet(), db.deferral_rates(), budget),
                  now=time.time(), budget=budget, gap_s=db.incident_gap_s(), saved=bool(saved),
                  rollouts=deploy_mod.summaries(db))


@fleet.post("/fleet/settings")
def fleet_settings(request: Request, budget: str = Form(""), gap_s: str = Form(""), csrf: str = Form(""),
                   user: str = Depends(page_user)) -> Response:
    """The operator's deferral budget (deferred windows per device and hour; empty: none) and incident gap."""
    if not csrf_ok(request.session.get("csrf"), csrf):
        raise HTTPException(403, "bad CSRF token")
    db = _db(request)
    for key, text, empty_ok in ((BUDGET_KEY, budget, True), (INCIDENT_GAP_KEY, gap_s, False)):
        text = text.strip()
        if not text:
            if empty_ok:
                db.set_setting(key, "")
            continue
        try:
            value = float(text)
        except ValueError:
            raise HTTPException(400, f"{key} must be a number (got {text[:40]!r})") from None
        if not (math.isfinite(value) and 0 <= value <= 1e7):
            raise HTTPException(400, f"{key} must be from 0 to 10,000,000 (got {text[:40]!r})")
        db.set_setting(key, repr(value))
    log.info("hub.settings budget=%s gap_s=%s by=%s", budget.strip() or "none", gap_s.strip() or "unchanged", user)
    return RedirectResponse("/fleet?saved=1", status_code=303)


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


@api.get("/incidents")
def api_incidents(request: Request, site: str | None = None, device: str | None = None, reason: str | None = None,
                  status: str = "unlabelled", user: str = Depends(api_user)) -> dict[str, Any]:
    """The queue as data: incidents highest priority first, the totals waiting and the gap used."""
    if status not in QUEUE_STATUSES:
        raise HTTPException(422, f"status must be one of {', '.join(QUEUE_STATUSES)}")
    return _db(request).incidents(site=site, device=device, reason=reason, status=status)


@api.get("/incidents/{window_id}")
def api_incident(request: Request, window_id: str, user: str = Depends(api_user)) -> dict[str, Any]:
    found = _db(request).incident(window_id)
    if found is None:
        raise HTTPException(404, f"no incident holds {window_id}")
    view = incident_view(found)
    return {k: v for k, v in view.items() if k != "members"} | {
        "members": [{k: m.get(k) for k in ("id", "window_start_s", "window_end_s", "reasons", "label", "review_label",
                                            "reviewer", "labelled_at")} for m in found["members"]]}


class IncidentLabelIn(LabelIn):
    windows: list[str] = Field(min_length=1, max_length=100_000)


@api.post("/incidents/{window_id}/labels", status_code=201)
def api_incident_label(request: Request, window_id: str, body: IncidentLabelIn,
                       user: str = Depends(api_user)) -> JSONResponse:
    if not csrf_ok(request.session.get("csrf"), request.headers.get("x-csrf-token")):
        raise HTTPException(403, "bad or missing X-CSRF-Token header")
    n = _label_incident(_db(request), window_id, body.windows, body.label.strip(), user, body.note)
    return JSONResponse({"incident": window_id, "labelled": n, "label": body.label.strip(), "reviewer": user},
                        status_code=201)


@api.get("/fleet")
def api_fleet(request: Request, user: str = Depends(api_user)) -> dict[str, Any]:
    db = _db(request)
    budget = db.deferral_budget_per_h()
    return {"devices": fleet_rows(db.fleet(), db.deferral_rates(), budget), "budget_per_h": budget,
            "now": time.time()}


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
                                 sensor=fmt_sensor_time, span=fmt_sensor_span, duration=fmt_duration,
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
    words = reason_words(reason)
    return reason if words == reason else words[:1].upper() + words[1:] + "."


# Sensor times at or past this (1973) are seconds since 1970: a date (a replayed ISO recording, a gateway's
# clock); smaller ones are a device's own clock from its start, shown as seconds.
SENSOR_EPOCH_MIN_S = 1e8
# A phone's plot: drawn again at this viewBox width (the page shows one of the two by its width), so its
# text stays readable at 390 px where the wide one would shrink to a third.
NARROW_W, NARROW_STRIP_H = 400, 64
MAX_INCIDENT_POINTS = 600  # per channel on an incident's plot (a long incident's windows are averaged down)
# A window feature's statistic (edgekit/features.py, `<channel>.<stat>`) in words, and whether it carries the
# channel's unit ("/s": per second).
STAT_TEXT = {"mean": ("mean", ""), "std": ("standard deviation", ""), "min": ("minimum", ""),
             "max": ("maximum", ""), "ptp": ("peak to peak", ""), "rms": ("RMS", ""),
             "kurtosis": ("kurtosis (peakedness)", None), "skewness": ("skewness", None),
             "crest": ("crest factor (peak / RMS)", None), "slope": ("trend", "/s"),
             "band_low": ("share of power, low third of the spectrum", None),
             "band_mid": ("share of power, middle third", None), "band_high": ("share of power, high third", None)}


def _date(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


def _clock(t: float, span_s: float = 0.0) -> str:
    fmt = "%H:%M:%S" if span_s < 2 * 86400 else "%m-%d %H:%M"
    return datetime.fromtimestamp(t, timezone.utc).strftime(fmt)


def fmt_sensor_time(t: Any) -> str:
    """A sensor time as the sensor wrote it: a date and time (seconds since 1970, no time zone conversion: a
    recording's stamps are shown as recorded), or seconds on the device's own clock."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        return "-"
    if t >= SENSOR_EPOCH_MIN_S:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"{t:.1f} s (device clock)"


def fmt_duration(seconds: Any) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    s = max(float(seconds), 0.0)
    if s < 120:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 7200:
        return f"{s // 60:.0f} min {s % 60:.0f} s"
    return f"{s / 3600:.1f} h"


def fmt_sensor_span(start: Any, end: Any = None) -> str:
    """`2020-03-09 10:14:33 - 10:19:01 (4 min 28 s)` in sensor time (the date once when it does not change)."""
    first = fmt_sensor_time(start)
    if end is None or fmt_sensor_time(end) == "-" or first == "-":
        return first
    last = fmt_sensor_time(end)
    if start >= SENSOR_EPOCH_MIN_S and last[:10] == first[:10]:
        last = last[11:]
    elif start < SENSOR_EPOCH_MIN_S:
        first, last = f"{start:.1f}", f"{end:.1f} s (device clock)"
    return f"{first} – {last} ({fmt_duration(end - start)})"


def feature_rows(features: dict[str, Any] | None, percentiles: dict[str, Any] | None,
                 signal: dict[str, Any] | None, top: int | None = None) -> list[dict[str, Any]]:
    """A window's features, most unusual first (percentile furthest from 50; those without one last), each
    with its channel, its statistic in words, its unit (the channel's, from the signal) and its percentile
    among the training windows (None: the agent sent none). `top`: only that many."""
    placed = percentiles or {}
    units = dict(zip((signal or {}).get("channels") or [], (signal or {}).get("units") or []))
    rows = []
    for name, value in (features or {}).items():
        channel, _, stat = name.rpartition(".")
        words, suffix = STAT_TEXT.get(stat, (stat or name, None))
        unit = units.get(channel, "")
        pct = placed.get(name)
        rows.append({"name": name, "channel": channel or None, "stat": words, "value": value,
                     "unit": "" if suffix is None or not unit else unit + suffix, "percentile": pct,
                     "bar_pct": None if pct is None else min(max(float(pct), 0.0), 100.0),
                     "outside": pct is not None and (pct <= 0.5 or pct >= 99.5)})
    rows.sort(key=lambda r: (r["percentile"] is None, -abs((r["percentile"] or 50.0) - 50.0)))
    return rows[:top] if top else rows


def attribution_rows(attribution: dict[str, Any] | None) -> list[dict[str, Any]]:
    """An ood deferral's make-up: channel or feature and its share of the autoencoder's error, largest first."""
    items = sorted(((k, v) for k, v in (attribution or {}).items() if isinstance(v, (int, float))),
                   key=lambda kv: -kv[1])
    return [{"name": k, "share": float(v), "pct": 100 * min(max(float(v), 0.0), 1.0)} for k, v in items]


def incident_signal(members: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[float]]:
    """The incident's windows' signals on one sensor time axis: each window's points spread over its start..end,
    a time two overlapping windows share kept once (the earlier window's), then averaged down to at most
    MAX_INCIDENT_POINTS per channel. (signal dict with the first window's channels, units and ranges; times)"""
    base = next((m["signal"] for m in members if m.get("signal") and m["signal"].get("points")), None)
    if base is None:
        return None, []
    channels = len(base["points"])
    at: dict[float, list[Any]] = {}
    for m in members:
        sig, a, b = m.get("signal"), m.get("window_start_s"), m.get("window_end_s")
        if not sig or len(sig.get("points") or []) != channels or not isinstance(a, (int, float)) \
                or not isinstance(b, (int, float)):
            continue
        n = len(sig["points"][0])
        for i in range(n):
            t = round(a + (b - a) * (i / (n - 1) if n > 1 else 0.5), 6)
            if t not in at:
                at[t] = [ch[i] if i < len(ch) else None for ch in sig["points"]]
    times = sorted(at)
    step = max(1, math.ceil(len(times) / MAX_INCIDENT_POINTS))
    out_t: list[float] = []
    out_p: list[list[Any]] = [[] for _ in range(channels)]
    for k in range(0, len(times), step):
        chunk = times[k:k + step]
        out_t.append(sum(chunk) / len(chunk))
        for c in range(channels):
            vals = [at[t][c] for t in chunk if isinstance(at[t][c], (int, float)) and math.isfinite(at[t][c])]
            out_p[c].append(sum(vals) / len(vals) if vals else None)
    signal = {"channels": base.get("channels") or [], "units": base.get("units"), "ranges": base.get("ranges"),
              "rate_hz": None, "start_s": out_t[0] if out_t else None, "points": out_p}
    return signal, out_t


def incident_view(found: dict[str, Any]) -> dict[str, Any]:
    """Everything the incident page and /api/incidents/{id} show, from HubDB.incident: the priority and its
    terms, each reason in plain words with its windows, the worst gate scores against their thresholds, the
    signal across the incident, the attribution (mean share over its ood windows), the features of its most
    unusual window (the highest ood score) against the training population, the label choices and the
    windows with their labels."""
    members = found["members"]
    signal, times = incident_signal(members)
    scored = [m for m in members if m.get("features")]
    worst = max(scored, key=lambda m: (m["scores"].get("ood") or 0.0)) if scored else None
    shares: dict[str, float] = {}
    ood = [m for m in members if m.get("attribution")]
    for m in ood:
        for k, v in m["attribution"].items():
            shares[k] = shares.get(k, 0.0) + float(v) / len(ood)
    probs_keys: list[str] = []
    for m in members:
        for k in (m.get("probs") or {}):
            if k not in probs_keys:
                probs_keys.append(k)
    return {
        **{k: v for k, v in found.items() if k != "members"},
        "reason_words": [{"reason": r, "text": reason_text(r), "windows": n} for r, n in found["reasons"].items()],
        "gate": gate_rows(found["worst"], found["thresholds"]),
        "signal": signal, "signal_times": times, "attribution": attribution_rows(shares), "ood_windows": len(ood),
        "features": feature_rows(worst["features"], worst.get("percentiles"), worst.get("signal") or signal)
        if worst else [],
        "features_of": None if worst is None else worst["id"],
        "choices": probs_keys, "members": members,
    }


def fleet_rows(devices: list[dict[str, Any]], rates: list[dict[str, Any]], budget: float | None
               ) -> list[dict[str, Any]]:
    """Each device with its deferral rate (deferred windows for review per hour of sensor time: its newest
    hour, and the mean over the last 24 hours it reported) against the operator's budget; `over` when the
    newest hour or the mean is above it. The budget is a flag for people: the gate never accepts a case to
    meet it."""
    by = {(r["site"], r["device"]): r["hours"] for r in rates}
    out = []
    for d in devices:
        hours = by.get((d["site"], d["device"]), [])
        last = hours[0]["deferred"] if hours else None
        mean = sum(h["deferred"] for h in hours) / len(hours) if hours else None
        windows = sum(h["windows"] for h in hours)
        share = sum(h["deferred"] for h in hours) / windows if windows else None
        over = budget is not None and any(v is not None and v > budget for v in (last, mean))
        out.append({**d, "rate_last_h": last, "rate_mean_h": mean, "rate_hours": len(hours),
                    "deferred_share_24h": share, "over_budget": over})
    return out


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
               ticks_s: Sequence[float] = (), times: Sequence[float] | None = None) -> str:
    """One strip per channel (own y range; channels differ in units), shared time axis.

    Each strip is titled with the channel's full name and unit (the signal's `units`) and shades the range
    the training windows covered (its `ranges`, the bundle's envelope; the strip's y range takes it in, so a
    reading outside it shows as outside). The time axis runs over `span_s` (the result's window or the
    incident's span, sensor time) when given, else from the signal's start_s at rate_hz per point (the
    points may be downsampled from the sensor's rate); `times` (one per point) places points unevenly (an
    incident's windows, with gaps between them: the line breaks where a step is over 5x the median). Sensor
    times past 1973 are dates: the axis shows clock times and the date. `bands` ({name, text, start_s, end_s}
    on that axis: a trial's phases) are shaded across every strip and named above them; `ticks_s` (a trial's
    steps) are marked under the last strip."""
    if not signal or not signal.get("points"):
        return '<p class="muted">No signal was sent with this case.</p>'
    points = [list(ch) for ch in signal["points"]]
    names = list(signal.get("channels") or [])
    names += [f"ch{i}" for i in range(len(names), len(points))]
    units = list(signal.get("units") or [])
    trained = list(signal.get("ranges") or [])
    n = max((len(ch) for ch in points), default=0)
    rate = float(signal.get("rate_hz") or 1.0)
    t0, duration = float(signal.get("start_s") or 0.0), max((n - 1) / rate, 1e-9)
    if span_s and all(isinstance(v, (int, float)) for v in span_s) and span_s[1] > span_s[0]:
        t0, duration = float(span_s[0]), float(span_s[1] - span_s[0])
    frame = _Frame(left=64, top=22 if bands else 8, plot_w=width - 64 - 36, strip_h=strip_h, strips=len(points),
                   t0=t0, duration=duration)
    height = frame.bottom + 44
    id_attr = f' id="{html.escape(svg_id)}"' if svg_id else ""
    out = [f'<svg{id_attr} class="signal" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="100%" role="img" aria-label="signal, {len(points)} channels">']
    ranges = []
    for c, values in enumerate(points):
        band = trained[c] if c < len(trained) and isinstance(trained[c], list) and len(trained[c]) == 2 else None
        ranges.append(_value_range(values, band))
    xs = _xs(frame, n, times)
    for c, name in enumerate(names[:len(points)]):
        unit = units[c] if c < len(units) and units[c] else ""
        band = trained[c] if c < len(trained) and isinstance(trained[c], list) and len(trained[c]) == 2 else None
        out += _strip(frame, c, str(name), unit, ranges[c], band)
    out += _time_axis(frame, len(points), n, bool(trained)) + _bands(frame, bands) + _ticks(frame, ticks_s)
    for c, values in enumerate(points):
        out += _polylines(frame, c, values, xs, ranges[c])
    out.append("</svg>")
    return "".join(out)


def _xs(frame: _Frame, n: int, times: Sequence[float] | None) -> list[tuple[float, bool]]:
    """Each point's (x, whether a gap comes before it): evenly over the plot, or at `times`, where a step
    over 5x the median is a gap."""
    if times is None or len(times) != n:
        return [(frame.left + frame.plot_w * (i / (n - 1) if n > 1 else 0.5), False) for i in range(n)]
    steps = sorted(b - a for a, b in zip(times, times[1:]))
    limit = 5 * steps[len(steps) // 2] if steps else math.inf
    return [(frame.x(t), bool(i) and t - times[i - 1] > limit) for i, t in enumerate(times)]


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


def _value_range(values: list[Any], band: Sequence[Any] | None = None) -> tuple[float, float]:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if band is not None:
        finite += [float(v) for v in band if isinstance(v, (int, float)) and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo, hi)


def _y(frame: _Frame, c: int, v: float, lo_hi: tuple[float, float]) -> float:
    (lo, hi), y0, h = lo_hi, frame.strip_y(c), frame.strip_h
    return y0 + h - 4 - (h - 8) * (v - lo) / (hi - lo)


def _strip(frame: _Frame, c: int, name: str, unit: str, lo_hi: tuple[float, float],
           band: Sequence[Any] | None) -> list[str]:
    """The strip, its training range shaded, its title (full name and unit) and its y extremes."""
    y0, h, left, color = frame.strip_y(c), frame.strip_h, frame.left, PALETTE[c % len(PALETTE)]
    title = f"{name} ({unit})" if unit else name
    out = [f'<rect x="{left}" y="{y0}" width="{frame.plot_w}" height="{h}" class="strip"/>']
    if band is not None:
        top, bottom = _y(frame, c, float(band[1]), lo_hi), _y(frame, c, float(band[0]), lo_hi)
        out.append(f'<rect x="{left}" y="{top:.1f}" width="{frame.plot_w}" height="{max(bottom - top, 1.0):.1f}" '
                   f'class="train-range" data-channel="{html.escape(name)}"><title>{html.escape(name)}: the range '
                   f'the training windows covered, {fmt_num(float(band[0]))} to {fmt_num(float(band[1]))}'
                   f'{" " + html.escape(unit) if unit else ""}</title></rect>')
    out += [f'<text x="{left + 6}" y="{y0 + 14}" class="chan" fill="{color}">{html.escape(title)}</text>',
            f'<text x="{left - 6}" y="{y0 + 11}" text-anchor="end" class="tick">{fmt_num(lo_hi[1])}</text>',
            f'<text x="{left - 6}" y="{y0 + h - 2}" text-anchor="end" class="tick">{fmt_num(lo_hi[0])}</text>']
    return out


def _polylines(frame: _Frame, c: int, values: list[Any], xs: list[tuple[float, bool]],
               lo_hi: tuple[float, float]) -> list[str]:
    """The channel's line, broken where a value is missing or not finite, or at a gap in time."""
    segments: list[list[str]] = [[]]
    for v, (x, gap) in zip(values, xs):
        if gap and segments[-1]:
            segments.append([])
        if isinstance(v, (int, float)) and math.isfinite(v):
            segments[-1].append(f"{x:.1f},{_y(frame, c, v, lo_hi):.1f}")
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


def _time_axis(frame: _Frame, channels: int, n: int, shaded: bool = False) -> list[str]:
    out, axis_y = [], frame.bottom + frame.GAP
    dated = frame.t0 >= SENSOR_EPOCH_MIN_S
    for k in range(6):
        x = frame.left + frame.plot_w * k / 5
        t = frame.t0 + frame.duration * k / 5
        label = _clock(t, frame.duration) if dated else f"{t:.2f}"
        out.append(f'<line x1="{x:.1f}" y1="{frame.top}" x2="{x:.1f}" y2="{frame.bottom}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 10}" text-anchor="middle" class="tick">{label}</text>')
    what = (f"sensor time, {_date(frame.t0)}" if dated else "time (s)")
    out.append(f'<text x="{frame.left + frame.plot_w / 2:.1f}" y="{axis_y + 26}" text-anchor="middle" '
               f'class="tick">{what} · {channels} channels · {n} points'
               f'{" · shaded: the range training covered" if shaded else ""}</text>')
    return out
