"""The FastAPI application over loaded runs: plain FastAPI, so tests can drive it without Ray.

Design choices:
- `ServiceState` holds the loaded runs; until they are loaded (or when loading failed) `/health` and
  every data route answer 503 with the reason.
- Errors are JSON `{"detail": ...}`: unknown run, task, checkpoint or feature -> 404; values a route
  cannot use -> 400; malformed parameters or bodies -> FastAPI's 422; a missing or wrong bearer token
  -> 401. Anything else is a bug: logged with its traceback and answered 500.
- Checkpoints are given by revision name or index; runs by MLflow run id or run name.
- The bearer token (off by default) guards the data routes; `/`, `/health` and the schema stay open
  (the page asks for the token when the API answers 401).
"""

import asyncio
import functools
import hmac
import json
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from crossray.errors import ErrorKind
from crossray.results import NotFound, RunIndex, StudyResults, is_study_folder, load_run, load_study
from crossray.tasks import PairError, check_request_rows
from serve import schemas as S

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("static") / "index.html"
MAX_PAGE = 500
CACHE_ENTRIES = 16384
CACHE_BYTES = 64 * 2**20
"""The answer cache's bounds per replica: answers, and their encoded bytes."""
MAX_BODY_BYTES = 1_000_000
"""Default request body limit (413 above it); `build_api(max_body_bytes=...)` changes it."""
ECHO_CHARS = 80
"""A validation error echoes at most this much of what the client sent."""
Run = Annotated[str, PathParam(max_length=200, description="run id or name")]
Feature = Annotated[int, PathParam(ge=0, le=2**31, description="feature (latent) id")]
# the classes of analysis.trajectory_classes
Trajectory = Literal["emerging", "maintained", "discontinued", "transient", "absent"]


class Unavailable(Exception):
    """The runs are not loaded (yet, or loading failed)."""


class Unauthorized(Exception):
    pass


class ServiceState:
    """The loaded runs, by id and by name."""

    def __init__(self, sources: list[str], cache_dir: str | Path):
        self.sources, self.cache_dir = list(sources), Path(cache_dir)
        self.indexes: dict[str, RunIndex] = {}
        self.names: dict[str, str] = {}
        self.origin: dict[str, str] = {}
        """Each run id's source."""
        self.studies: dict[str, StudyResults] = {}
        self.ready = False
        self.error: str | None = None

    def load(self) -> None:
        try:
            for source in self.sources:
                if is_study_folder(source):  # a study: every finished set is a run
                    study, runs = load_study(source)
                    self.studies[study.name] = study
                else:
                    runs = [load_run(source, self.cache_dir)]
                for run in runs:
                    if run.id in self.origin:  # two sources, one id: one would silently replace the other
                        raise ValueError(f"two runs are named {run.id}: {self.origin[run.id]} and {source}; "
                                         f"serve them from folders of different names")
                    self.origin[run.id] = source
                    index = RunIndex(run)
                    self.indexes[index.run.id] = index
                    self.names.setdefault(index.run.name, index.run.id)
                    logger.info("loaded run %s (%s) from %s", index.run.id, index.run.name, source)
            self.ready = True
        except Exception as e:
            logger.exception("loading runs failed")
            self.error = f"loading {self.sources} failed: {e}"

    def index(self, run: str) -> RunIndex:
        if not self.ready:
            raise Unavailable(self.error or "runs are still loading")
        run_id = run if run in self.indexes else self.names.get(run)
        if run_id is None:
            raise NotFound(f"unknown run {run!r}: loaded runs are {sorted(self.indexes)} "
                           f"(names {sorted(self.names)})")
        return self.indexes[run_id]

    def study(self, name: str) -> StudyResults:
        if not self.ready:
            raise Unavailable(self.error or "runs are still loading")
        if name not in self.studies:
            raise NotFound(f"unknown study {name!r}: loaded studies are {sorted(self.studies)}")
        return self.studies[name]


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _short_input(value):
    """What a 422 may echo of the input: a prefix of strings, the start and size of lists."""
    if isinstance(value, bytes):  # (a body FastAPI could not read as JSON)
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        value = value.encode("utf-8", "replace").decode("utf-8")  # (lone surrogates cannot go out as JSON)
        return value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + f"... ({len(value)} characters)"
    if isinstance(value, list | tuple):
        text = json.dumps(list(value[:8]), default=str)[:ECHO_CHARS]
        return value if len(value) <= 8 and len(text) < ECHO_CHARS else f"{text}... ({len(value)} items)"
    if isinstance(value, dict):
        text = json.dumps(value, default=str)
        return value if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + f"... ({len(text)} characters)"
    return value


class Service:
    """What the routes read, held by the application (`app.state.service`): the loaded runs, the
    bearer token, the live model client and its limits, and the encoded answers of the tables.

    Answers are pure functions of the loaded tables: each is encoded once and its bytes kept (at most
    `CACHE_ENTRIES` answers and `CACHE_BYTES` bytes, least recently used first out), returned as
    they are (the response models still document them). Errors are not cached."""

    def __init__(self, state: ServiceState, token: str | None, live, limits: S.LiveLimits):
        self.state, self.token, self.live, self.limits = state, token, live, limits
        self.cache: OrderedDict[tuple, bytes] = OrderedDict()
        self.cached_bytes = 0

    def encoded(self, *key) -> bytes:
        """The answer's bytes, from the bounded cache or encoded now."""
        if (hit := self.cache.get(key)) is not None:
            self.cache.move_to_end(key)
            return hit
        data = self._encode(*key)
        self.cache[key] = data
        self.cached_bytes += len(data)
        while len(self.cache) > CACHE_ENTRIES or self.cached_bytes > CACHE_BYTES:
            _, old = self.cache.popitem(last=False)
            self.cached_bytes -= len(old)
        return data

    def _encode(self, run_id: str, kind: str, *args) -> bytes:
        index = self.state.indexes[run_id]
        match kind:
            case "card":
                return _json(index.card(*args))
            case "ranking":
                return _json(index.ranking(*args))
            case other:
                raise AssertionError(f"unknown answer kind {other}")

    def answer(self, run: str, kind: str, *args) -> Response:
        run_id = self.state.index(run).run.id
        return Response(self.encoded(run_id, kind, *args), media_type="application/json")

    async def live_info(self) -> dict | None:
        """Where live queries compute ({"device", "gpus"} of the model deployment; both None while it
        does not answer yet), or None when the service runs without it."""
        if self.live is None:
            return None
        info = getattr(self.live, "info", None)
        try:
            return await asyncio.wait_for(info(), 2.0) if info else {"device": None, "gpus": None}
        except Exception:  # noqa: BLE001 (still starting, or restarting: health says so, never a 500)
            return {"device": None, "gpus": None}

    def ready_index(self) -> list[RunIndex]:
        if not self.state.ready:
            raise Unavailable(self.state.error or "runs are still loading")
        return list(self.state.indexes.values())


def _service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(_service)]
_bearer = HTTPBearer(auto_error=False, description="only when the service was started with a token")


async def authorise(svc: Svc, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                    ) -> None:
    """The bearer token, when the service was started with one (constant-time comparison)."""
    if svc.token is None:
        return
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), svc.token.encode()):
        raise Unauthorized("missing or wrong bearer token" if credentials else "a bearer token is required")


DOCUMENTED = {status: {"model": S.Error} for status in (400, 401, 404, 413, 503)}
pages = APIRouter()
tables = APIRouter(prefix="/runs", dependencies=[Depends(authorise)], responses=DOCUMENTED)
live_routes = APIRouter(prefix="/runs", dependencies=[Depends(authorise)], responses=DOCUMENTED)
studies = APIRouter(prefix="/studies", dependencies=[Depends(authorise)], responses=DOCUMENTED)


def build_api(state: ServiceState, token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              live=None, limits: S.LiveLimits | None = None, allowed_hosts: list[str] | None = None
              ) -> FastAPI:
    """The application: JSON routes under /runs, `/health`, and the page at `/`. `live` (a
    `serve.model.LiveClient`) answers the live routes; without it they answer 503. `allowed_hosts`:
    the Host headers answered (others get a 400), against DNS rebinding of a workstation's service
    without a token."""
    api = FastAPI(title="crossray", version="1", summary="Crosscoders across checkpoints: features, "
                  "indirect effects (IE), RelIE and accuracy curves of finished pipeline runs.")
    api.state.service = Service(state, token, live, limits or S.LiveLimits())
    api.middleware("http")(functools.partial(bounded_body, max_body_bytes))
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        api.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    for exc, handler in ERROR_HANDLERS.items():
        api.add_exception_handler(exc, handler)
    for router in (pages, tables, live_routes, studies):
        api.include_router(router)
    return api


# -- bodies and errors ------------------------------------------------------------------------------

async def bounded_body(max_body_bytes: int, request: Request, call_next):
    """Refuse a body that is not JSON (415, naming the content type sent: every body here is JSON), and
    one over the limit (413) before reading it whole: by its Content-Length, or while a chunked body
    streams in."""
    if request.method in ("POST", "PUT", "PATCH"):
        sent = request.headers.get("content-type", "")
        kind = sent.split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            return _error(415, f"the request body must be JSON (content-type application/json), not "
                               f"{_short_input(sent) if sent else 'a body without a content type'}")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
        return _error(413, f"request body over the limit of {max_body_bytes} bytes")
    if length is None and request.method in ("POST", "PUT", "PATCH"):
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return _error(413, f"request body over the limit of {max_body_bytes} bytes")
        request._body = body  # read once; FastAPI takes it from here
    return await call_next(request)


def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{**{k: v for k, v in e.items() if k not in ("ctx", "url")},
               "input": _short_input(e.get("input"))} for e in exc.errors()[:20]]
    return JSONResponse({"detail": errors}, status_code=422)


def _not_unicode(request: Request, exc: UnicodeError) -> JSONResponse:
    """Text holding a lone surrogate (JSON allows the escape, Unicode text does not): 422, the details
    in the log."""
    logger.info("refused text on %s: %s", request.url.path, exc)
    msg = "the text holds a lone surrogate (an unpaired \\ud800-\\udfff escape): not Unicode text"
    return JSONResponse({"detail": [{"type": "string_unicode", "loc": ["body"], "msg": msg, "input": None}]},
                        status_code=422)


def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return _error(500, f"internal error ({type(exc).__name__}); see the service log")


ERROR_HANDLERS = {
    RequestValidationError: _invalid,
    NotFound: lambda _, exc: _error(404, str(exc.args[0])),
    Unavailable: lambda _, exc: _error(503, str(exc)),
    Unauthorized: lambda _, exc: _error(401, str(exc), {"WWW-Authenticate": "Bearer"}),
    UnicodeError: _not_unicode,
    ValueError: lambda _, exc: _error(400, str(exc)),
    Exception: _internal,
}


# -- the page, health and the tables ----------------------------------------------------------------

@pages.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text())


@pages.get("/health", response_model=S.Health, responses={503: {"model": S.Error}})
async def health(svc: Svc):
    """200 once every run is loaded; 503 while loading or when loading failed. `runs`: the loaded runs
    (null when the service has a token: /health is open, and run names are data). `live`: where the
    live queries compute (the model deployment's device and GPUs), null without the model deployment."""
    svc.ready_index()
    runs = None if svc.token else sorted(svc.state.indexes)
    return {"status": "ok", "runs": runs, "live": await svc.live_info()}


@tables.get("", response_model=list[S.RunInfo])
async def list_runs(svc: Svc):
    """The loaded crosscoders: family, layer, checkpoints (revision, tokens seen), metrics."""
    return [index.info() for index in svc.ready_index()]


@tables.get("/{run}", response_model=S.RunInfo)
async def get_run(svc: Svc, run: Run):
    return svc.state.index(run).info()


@tables.get("/{run}/features/{feature}", response_model=S.FeatureCard)
async def feature_card(svc: Svc, run: Run, feature: Feature, contexts: bool = True):
    """Decoder norms, relative norms, class and group, cosine similarities, IE and RelIE per task and
    checkpoint, and top-activating contexts (joint and per checkpoint)."""
    return svc.answer(run, "card", feature, contexts)


@tables.post("/{run}/features", response_model=S.BatchResponse)
async def feature_batch(svc: Svc, run: Run, body: Annotated[S.BatchRequest, Body()]):
    """Many feature cards in one request (contexts only when asked for)."""
    index = svc.state.index(run)
    for i in body.ids:
        index.feature_id(i)
    cards = b",".join(svc.encoded(index.run.id, "card", i, body.contexts) for i in body.ids)
    body_bytes = b'{"run":%s,"features":[%s]}' % (_json(index.run.id), cards)
    return Response(body_bytes, media_type="application/json")


@tables.get("/{run}/tasks/{task}/ranking", response_model=S.Ranking)
async def ranking(svc: Svc, run: Run, task: Annotated[str, PathParam(max_length=200)],
                  checkpoint: Annotated[str, Query(max_length=200, description="revision or index")],
                  by: Literal["relie", "abs_ie"] = "relie",
                  trajectory: Trajectory | None = None,
                  group: Annotated[str | None, Query(max_length=200)] = None,
                  min_relie: float | None = None, min_abs_ie: float | None = None, selected: bool = False,
                  offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
                  limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50):
    """Features for a task ranked by RelIE (or |IE|) at a checkpoint, filtered and paginated (the
    minimums to 4 significant digits; NaN is a 422)."""
    minimums = _minimum("min_relie", min_relie), _minimum("min_abs_ie", min_abs_ie)
    return svc.answer(run, "ranking", task, checkpoint, by, trajectory, group, *minimums, selected, offset,
                      limit)


def _minimum(name: str, value: float | None) -> float | None:
    """A float filter as the answer cache keys it: rounded to 4 significant digits; NaN refused."""
    if value is None:
        return None
    if math.isnan(value):
        raise RequestValidationError([{"type": "finite_number", "loc": ("query", name), "input": None,
                                       "msg": "a number is needed, not NaN"}])
    return float(f"{value:.4g}")


@tables.get("/{run}/accuracy", response_model=S.Accuracy)
async def accuracy(svc: Svc, run: Run, task: Annotated[str | None, Query(max_length=200)] = None):
    """Task accuracy per screened checkpoint; the crosscoded ones are marked."""
    return svc.state.index(run).accuracy(task)


# -- studies: several checkpoint sets of one family ------------------------------------------------

@studies.get("", response_model=list[S.StudyInfo])
async def list_studies(svc: Svc):
    """The loaded studies: their sets (each served as a run) and the revisions they span."""
    svc.ready_index()
    return [study.info() for study in svc.state.studies.values()]


@studies.get("/{study}", response_model=S.StudyDetail)
async def get_study(svc: Svc, study: Annotated[str, PathParam(max_length=200)]):
    """A study's sets and its comparison on one timeline: per task and set the IE mass per
    checkpoint and the top features' groups, the share of a later checkpoint's IE from features new
    to it, and top features matched by decoder cosine where sets share a checkpoint."""
    return svc.state.study(study).detail()


# -- live queries: computed by the model deployment -----------------------------------------------

def over_cap(field: str, got: int, cap: int, unit: str) -> None:
    if got > cap:
        raise RequestValidationError([{"type": "too_long", "loc": ("body", field), "input": None,
                                       "msg": f"at most {cap} {unit} per request (got {got})"}])


def check_pairs(pairs: list[dict], limits: S.LiveLimits) -> None:
    """Every pair's text, before the model deployment sees it (a 422 names the row and field)."""
    try:
        check_request_rows(pairs, limits.pair_chars)
    except PairError as e:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "pairs", e.row, e.field),
                                       "input": None, "msg": str(e)}]) from None


QUERY_ERROR_STATUS: dict[ErrorKind, int] = {"invalid": 422, "not_found": 404, "unavailable": 503,
                                             "failed": 500}
"""The HTTP status of each kind of live-query error (`crossray.errors.ERROR_KINDS`)."""


async def live_answer(svc: Service, run: str, kind: str, body: dict, field: str) -> Response:
    index, limits = svc.state.index(run), svc.limits
    for i in body.get("features") or []:
        index.feature_id(i)
    if svc.live is None:
        raise Unavailable("live queries are off: the service runs without its model deployment")
    # the model replica checks the token budget and stops computing past the deadline
    body["limits"] = {"chars": limits.pair_chars, "tokens": limits.tokens,
                      "deadline": time.time() + limits.deadline_s}
    try:
        result = await asyncio.wait_for(svc.live(kind, index.run.id, body), limits.deadline_s)
    except TimeoutError:
        return _error(503, f"the model work took longer than the {limits.deadline_s:g} s deadline; "
                      "retry later or send fewer pairs", {"Retry-After": "5"})
    except Exception as e:  # the model replica failed (died, restarted): not the client's doing
        logger.exception("live %s query failed", kind)
        return _error(503, f"the model deployment failed ({type(e).__name__}); retry later",
                      {"Retry-After": "5"})
    if "error" in result:
        status = QUERY_ERROR_STATUS[result["error"]]
        if status == 422:
            raise RequestValidationError([{"type": "value_error", "loc": ("body", field), "input": None,
                                           "msg": result["detail"]}])
        retry = {"Retry-After": "5"} if status == 503 else None
        return _error(status, result["detail"], retry)
    # encoded here: the answer is JSON-ready, and validating it against the response model costs
    # more CPU than the rest of the route (the model still documents it)
    return Response(_json({"run": index.run.id, **result}), media_type="application/json")


LIVE_RESPONSES = {422: {"model": S.Error}, 503: {"model": S.Error, "description": "live queries "
                  "unavailable, or over the deadline (Retry-After)"},
                  500: {"model": S.Error, "description": "the model failed on this query alone (a "
                        "defect: retrying does not help; the service log has the traceback)"}}


@live_routes.post("/{run}/effects", response_model=S.EffectsResponse, responses=LIVE_RESPONSES)
async def effects(svc: Svc, run: Run, body: Annotated[S.EffectsRequest, Body()]):
    """IE and RelIE per checkpoint of the features on the pairs sent, computed like the attribute
    stage computes a task's (sending a task's examples reproduces its stored effects): the given
    features, or the `top` by largest |IE| at any checkpoint."""
    limits = svc.limits
    over_cap("pairs", len(body.pairs), limits.pairs, "pairs")
    over_cap("features", len(body.features or []), limits.features, "features")
    over_cap("top", body.top, limits.top, "features (top)")
    over_cap("steps", body.steps or 0, limits.steps, "integrated-gradient steps")
    check_pairs(body.pairs, limits)
    return await live_answer(svc, run, "effects", body.model_dump(), "pairs")


@live_routes.post("/{run}/ablate", response_model=S.AblateResponse, responses=LIVE_RESPONSES)
async def ablate(svc: Svc, run: Run, body: Annotated[S.AblateRequest, Body()]):
    """Logit difference and accuracy on the pairs before and after zero-ablating the features
    (together) at a checkpoint, or at every checkpoint; and each feature's own delta."""
    over_cap("pairs", len(body.pairs), svc.limits.pairs, "pairs")
    over_cap("features", len(body.features), svc.limits.features, "features")
    check_pairs(body.pairs, svc.limits)
    if body.checkpoint is not None:
        svc.state.index(run).checkpoint(body.checkpoint)
    return await live_answer(svc, run, "ablate", body.model_dump(), "pairs")


@live_routes.post("/{run}/activations", response_model=S.ActivationsResponse, responses=LIVE_RESPONSES)
async def activations(svc: Svc, run: Run, body: Annotated[S.ActivationsRequest, Body()]):
    """The text's tokens and, at each, the top features by joint activation and by each checkpoint's
    encoder contribution."""
    over_cap("text", len(body.text), svc.limits.text_chars, "characters of text")
    over_cap("top", body.top, svc.limits.top, "features (top)")
    return await live_answer(svc, run, "activations", body.model_dump(), "text")
