"""The web layer of `hsl serve`: the page at `/` and a JSON API with an OpenAPI schema (/docs).

Searches are plain `def` endpoints, which FastAPI runs in its thread pool: the event loop stays
free for other requests while torch works. Library errors become JSON with a `detail` message:
an unknown product 404, other bad input 400 (FastAPI's own validation: 422), and nothing ever
answers with a traceback. A 400 also says what was wrong as data: `parameter` (in the API's own
names: `k`, `q`, `where`), `value` and, when short, `allowed`. `serve_catalog` runs the app on a
socket that hsl/serve.py binds.
"""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from . import __version__
from .errors import HSLError, HSLUsageError
from .search import SearchResult, parse_where
from .serve import MAX_TOP_K, Catalog, UnknownProductError, bind, url_of
from .serve_page import CONTENT_SECURITY_POLICY, PAGE

log = logging.getLogger("hsl.serve")

SIMILAR_SCORE = ("inner product of the two products' stored HSL index vectors: the sum over levels of the cosine "
                 "of their image vectors plus the inner product of their mean object vectors; no text involved")


class HitOut(BaseModel):
    rank: int
    id: str
    score: float = Field(description="search: the HSL text-to-image score; similar: see the endpoint")
    text: str
    attributes: dict[str, str]
    image_url: str


class ResultsOut(BaseModel):
    query: str
    results: list[HitOut]
    warnings: list[str] = []


class ProductOut(BaseModel):
    id: str
    text: str
    attributes: dict[str, str]
    image_url: str
    similar_url: str


class FilterValue(BaseModel):
    value: str
    count: int


class FilterOut(BaseModel):
    column: str
    values: list[FilterValue]


class HealthOut(BaseModel):
    status: str
    products: int
    model: str
    backend: str
    exact_inner_product: bool


class ErrorOut(BaseModel):
    detail: str
    parameter: str | None = Field(None, description="the query parameter at fault (a 400 only)")
    value: Any = None
    allowed: list[Any] | None = None


# The library names the parameter at fault (hsl/errors.py); the API words it with its own query parameters.
API_NAMES = {"top_k": "k", "query": "q", "where": "where"}


def _error(exc: HSLError, status_code: int) -> JSONResponse:
    """{"detail": the message in the API's words, plus parameter, value and allowed when the error names one}."""
    body: dict[str, Any] = {"detail": exc.worded(API_NAMES)}
    if exc.parameter is not None and status_code == 400:
        value = exc.value if isinstance(exc.value, str | int | float | bool | None) else str(exc.value)
        body.update(parameter=API_NAMES.get(exc.parameter, exc.parameter), value=value, allowed=exc.allowed)
    return JSONResponse(body, status_code=status_code)


def _image_url(product_id: str) -> str:
    return f"/images/{quote(product_id, safe='')}"  # ids may hold '/', '?', '#': always one path segment


def _results(result: SearchResult) -> ResultsOut:
    hits = [HitOut(rank=h.rank, id=h.id, score=h.score, text=h.text, attributes=h.attributes,
                   image_url=_image_url(h.id)) for h in result.hits]
    return ResultsOut(query=result.query, results=hits, warnings=result.warnings)


def _validation_message(exc: RequestValidationError) -> str:
    """"k: Input should be less than or equal to 100; ..." from FastAPI's list of validation errors."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"  # loc[0] is query / path / body
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "malformed request"


TopK = Annotated[int, Query(ge=1, le=MAX_TOP_K, description="How many results.")]
Where = Annotated[list[str] | None, Query(description="Filter COLUMN=VALUE; repeat for several (all must hold).")]
ProductId = Annotated[str, Path(description="The product's id (URL-encoded).")]
ERRORS = {400: {"model": ErrorOut}, 404: {"model": ErrorOut}, 422: {"model": ErrorOut}}


def create_app(catalog: Catalog) -> FastAPI:
    """The ASGI app over a loaded catalog (uvicorn serves it; tests drive it with TestClient)."""
    app = FastAPI(title="hsl", version=__version__,
                  description="Find product photos from a shopper's words (Hierarchical Similarity Learning).")

    @app.exception_handler(UnknownProductError)
    async def not_found(request: Request, exc: UnknownProductError) -> JSONResponse:
        return _error(exc, 404)

    @app.exception_handler(HSLUsageError)
    async def bad_request(request: Request, exc: HSLUsageError) -> JSONResponse:
        return _error(exc, 400)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer is a list of error objects; the API promises {"detail": "one message"}.
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(HSLError)
    async def failed(request: Request, exc: HSLError) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return _error(exc, 500)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:  # logged with its traceback by uvicorn
        return JSONResponse({"detail": "internal error; the server's log has the details"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    @app.get("/health", response_model=HealthOut)
    async def health() -> HealthOut:
        searcher = catalog.searcher
        return HealthOut(status="ok", products=len(catalog), model=searcher.model_dir.name,
                         backend=searcher.index.backend, exact_inner_product=searcher.config.exact_by_inner_product)

    @app.get("/filters", response_model=list[FilterOut])
    async def filters() -> list[FilterOut]:
        """Attribute columns with a manageable number of distinct values, each value with its product count."""
        return [FilterOut(column=c, values=[FilterValue(value=v, count=n) for v, n in values])
                for c, values in catalog.filters.items()]

    @app.get("/search", response_model=ResultsOut, responses=ERRORS)
    def search(q: Annotated[str, Query(max_length=10_000, description="What the shopper types (empty: 400).")],
               k: TopK = 10, where: Where = None) -> ResultsOut:
        """Rank the catalog's products for the words `q` with the HSL model (score: the HSL similarity)."""
        return _results(catalog.search(q, top_k=k, where=parse_where(where or [])))

    # Registered before /products/{id}: a `path` id would otherwise swallow the "/similar".
    @app.get("/products/{product_id:path}/similar", response_model=ResultsOut, responses=ERRORS,
             description=f"More like this product: image-to-image search. Score: {SIMILAR_SCORE}.")
    def similar(product_id: ProductId, k: TopK = 10, where: Where = None) -> ResultsOut:
        return _results(catalog.similar(product_id, top_k=k, where=parse_where(where or [])))

    @app.get("/products/{product_id:path}", response_model=ProductOut, responses=ERRORS)
    async def product(product_id: ProductId) -> ProductOut:
        """One product: title, attributes and the URL of its photo."""
        item = catalog.product(product_id)
        return ProductOut(id=item.id, text=item.text, attributes=item.attributes, image_url=_image_url(item.id),
                          similar_url=f"/products/{quote(item.id, safe='')}/similar")

    @app.get("/images/{product_id:path}", response_class=FileResponse, responses=ERRORS)
    async def image(product_id: ProductId) -> FileResponse:
        """The product's photo, from the store's path for this id only (nothing in the URL is a path)."""
        path = catalog.image_path(product_id)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "max-age=3600",
                                                                  "X-Content-Type-Options": "nosniff"})

    return app


def serve_catalog(catalog: Catalog, host: str = "127.0.0.1", port: int = 8000, *, access_log: bool = True,
                  ready: Callable[[str], None] | None = None) -> None:
    """Serve the page and the JSON API until Ctrl-C / SIGTERM; `ready(url)` once the port is bound."""
    import uvicorn  # only a running server needs it

    sock = bind(host, port)
    if ready:
        ready(url_of(sock))
    config = uvicorn.Config(create_app(catalog), log_level="info" if access_log else "warning",
                            access_log=access_log, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C: the normal way to stop
        pass
