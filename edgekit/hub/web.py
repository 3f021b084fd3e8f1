"""The review web app: login, queue of deferred cases, case page with its signal plot, labels, fleet view,
gait trial summaries, and a JSON API, one router per page (auth, review, fleet, trials, api) over the database
and templates on app.state. Every page and API route needs a logged-in reviewer; every POST checks a CSRF token.

Offline by design: no CDN; the signal plot is inline SVG built here. Must not import paho or torch.
"""

from __future__ import annotations

import html
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.middleware.sessions import SessionMiddleware

from edgekit.errors import DataError
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


def _pages(filters: dict[str, Any], offset: int, more: bool) -> dict[str, str | None]:
    """Query strings of the newer and older page of a list (None where there is none)."""
    return {"newer": urlencode({**filters, "offset": max(offset - PAGE_SIZE, 0)}) if offset else None,
            "older": urlencode({**filters, "offset": offset + PAGE_SIZE}) if more else None}


# --- login: /healthz, /login, /logout ---------------------------------------------------------------

auth = APIRouter()


@auth.get("/healthz", include_in_schema=False)
def healthz() -> dict[str, bool]:
    return {"ok": True}


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
def case_page(request: Request, result_id: str, saved: int = 0, user: str = Depends(page_user)) -> HTMLResponse:
    db = _db(request)
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
    return render(request, "fleet.html", user, devices=_db(request).fleet(), now=time.time())


# --- trials: /trials --------------------------------------------------------------------------------

trials = APIRouter()


@trials.get("/trials", response_class=HTMLResponse)
def trials_page(request: Request, site: str = "", device: str = "", offset: int = 0,
                user: str = Depends(page_user)) -> HTMLResponse:
    offset = max(offset, 0)
    rows = _db(request).trials(site=site or None, device=device or None, limit=PAGE_SIZE + 1, offset=offset)
    filters = {"site": site, "device": device}
    return render(request, "trials.html", user, trials=rows[:PAGE_SIZE], filters=filters,
                  **_pages(filters, offset, len(rows) > PAGE_SIZE))


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
def api_trials(request: Request, site: str | None = None, device: str | None = None, limit: int = 100,
               offset: int = 0, user: str = Depends(api_user)) -> dict[str, Any]:
    limit = min(max(limit, 1), 1000)
    offset = max(offset, 0)
    return {"trials": _db(request).trials(site=site, device=device, limit=limit, offset=offset), "limit": limit,
            "offset": offset}


@api.get("/me")
def api_me(request: Request, user: str = Depends(api_user)) -> dict[str, str]:
    return {"name": user, "csrf": _csrf(request)}


# --- the app --------------------------------------------------------------------------------------------

ROUTERS = (auth, review, fleet, trials, api)


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


def create_app(db: HubDB, *, secure_cookies: bool = False) -> FastAPI:
    """The app for one database. `secure_cookies` when served over HTTPS (behind a proxy). The routers find
    the database and the templates on app.state."""
    app = FastAPI(title="edgekit hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware, secret_key=db.secret(), session_cookie="edgekit_hub",
                       max_age=SESSION_MAX_AGE_S, same_site="strict", https_only=secure_cookies)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.middleware("http")(_headers)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(when=fmt_time, ago=fmt_ago, num=fmt_num, pathq=lambda s: quote(str(s), safe=":@"))
    app.state.db = db
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


def signal_svg(signal: dict[str, Any] | None, span_s: tuple[Any, Any] | None = None, width: int = 960,
               strip_h: int = 84) -> str:
    """One strip per channel (own y range; channels differ in units), shared time axis in seconds.

    The time axis runs over `span_s` (the result's window) when given, else from the signal's start_s at
    rate_hz per point (the points may be downsampled from the sensor's rate)."""
    if not signal or not signal.get("points"):
        return '<p class="muted">No signal was sent with this case.</p>'
    points = [list(ch) for ch in signal["points"]]
    names = list(signal.get("channels") or [])
    names += [f"ch{i}" for i in range(len(names), len(points))]
    rate = float(signal.get("rate_hz") or 1.0)
    t0 = float(signal.get("start_s") or 0.0)
    n = max((len(ch) for ch in points), default=0)
    left, right, top, gap, bottom = 110, 16, 8, 10, 34
    plot_w = width - left - right
    height = top + len(points) * (strip_h + gap) + bottom
    duration = max((n - 1) / rate, 1e-9)
    if span_s and all(isinstance(v, (int, float)) for v in span_s) and span_s[1] > span_s[0]:
        t0, duration = float(span_s[0]), float(span_s[1] - span_s[0])
    esc = html.escape
    out = [f'<svg class="signal" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="100%" role="img" aria-label="signal window, {len(points)} channels">']
    for c, (name, values) in enumerate(zip(names, points)):
        y0 = top + c * (strip_h + gap)
        finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        color = PALETTE[c % len(PALETTE)]
        out.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{strip_h}" class="strip"/>')
        out.append(f'<text x="{left - 8}" y="{y0 + strip_h / 2 + 4:.1f}" text-anchor="end" class="chan" '
                   f'fill="{color}">{esc(str(name))}</text>')
        out.append(f'<text x="{left - 8}" y="{y0 + 11}" text-anchor="end" class="tick">{fmt_num(hi)}</text>')
        out.append(f'<text x="{left - 8}" y="{y0 + strip_h - 2}" text-anchor="end" class="tick">'
                   f'{fmt_num(lo)}</text>')
        segments, current = [], []
        for i, v in enumerate(values):
            if isinstance(v, (int, float)) and math.isfinite(v):
                x = left + plot_w * (i / (n - 1) if n > 1 else 0.5)
                y = y0 + strip_h - 4 - (strip_h - 8) * (v - lo) / (hi - lo)
                current.append(f"{x:.1f},{y:.1f}")
            elif current:
                segments.append(current)
                current = []
        if current:
            segments.append(current)
        for seg in segments:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.4" points="{" ".join(seg)}"/>')
    axis_y = top + len(points) * (strip_h + gap)
    for k in range(6):
        x = left + plot_w * k / 5
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{axis_y - gap}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 10}" text-anchor="middle" class="tick">'
                   f'{t0 + duration * k / 5:.2f}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{axis_y + 26}" text-anchor="middle" class="tick">'
               f'time (s) · {len(points)} channels · {n} points</text>')
    out.append("</svg>")
    return "".join(out)
