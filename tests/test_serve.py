"""hsl serve: the JSON API in process, the server on loopback, the page in headless Chromium."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from hsl.config import load_config
from hsl.extract import ExtractOptions, extract
from hsl.factory import create_model, save_model
from hsl.search import Searcher
from hsl.serve import Catalog, bind, url_of
from hsl.serve_api import create_app
from hsl_cli.main import app as cli

from .conftest import synthetic_photo, write_manifest

XSS = "<script>alert(1)</script> red shirt"
ODD_ID = "dir/a b?#%"  # a slash, a space, a query and a fragment mark: must survive as one URL segment
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1600"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 43-product store (one with an HTML title, one with an awkward id, one whose photo is then
    deleted) and a random hsl-tiny model for it."""
    root = tmp_path_factory.mktemp("shop")
    extra = [{"id": "xss", "image": "images/xss.jpg", "text": XSS, "colour": "red", "kind": "shirt"},
             {"id": ODD_ID, "image": "images/odd.jpg", "text": "blue dress odd", "colour": "blue", "kind": "dress"},
             {"id": "gone", "image": "images/gone.jpg", "text": "green shoe gone", "colour": "green", "kind": "shoe"}]
    manifest = write_manifest(root, 40, extra)
    for seed, name in ((99, "xss"), (98, "odd"), (97, "gone")):
        synthetic_photo(seed)[0].save(root / "images" / f"{name}.jpg")
    store = root / "shop.h5"
    extract(manifest, store, ExtractOptions(backbone="tiny", workers=0))
    (root / "images" / "gone.jpg").unlink()
    torch.manual_seed(0)
    model_dir = root / "model"
    save_model(create_model(dataclasses.replace(load_config("hsl-tiny")), 32, 24), model_dir, {"backbone": "tiny"})
    return store, model_dir


@pytest.fixture(scope="module")
def catalog(shop: tuple[Path, Path]) -> Catalog:
    return Catalog(*shop, max_parallel=0)  # no cap: concurrent requests really search at the same time


def test_default_cap_on_parallel_searches(shop: tuple[Path, Path]) -> None:
    assert Catalog(*shop).max_parallel == max(1, os.cpu_count() // torch.get_num_threads())


@pytest.fixture(scope="module")
def client(catalog: Catalog) -> TestClient:
    return TestClient(create_app(catalog), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def live(catalog: Catalog) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (a free port) in a thread of this process."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(catalog), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield url_of(sock)
    server.should_exit = True
    thread.join(10)
    sock.close()


# -- the JSON API ------------------------------------------------------------------------------------
def test_search_ranks_like_the_searcher(client: TestClient, shop: tuple[Path, Path]) -> None:
    response = client.get("/search", params={"q": "red shirt", "k": 5})
    assert response.status_code == 200
    body = response.json()
    want = Searcher(*shop).search("red shirt", top_k=5).hits  # the plain Searcher reads hits from the store
    assert body["query"] == "red shirt" and body["warnings"] == []
    assert [(h["id"], h["text"], h["attributes"]) for h in body["results"]] == [(h.id, h.text, h.attributes)
                                                                                for h in want]
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([h["score"] for h in body["results"]], [h.score for h in want], rtol=1e-6)
    first = body["results"][0]
    assert set(first) == {"rank", "id", "score", "text", "attributes", "image_url"}
    assert first["image_url"] == f"/images/{quote(first['id'], safe='')}"
    assert str(Path(want[0].image).parent) not in response.text  # no file system paths leave the server


def test_where_filters(client: TestClient) -> None:
    green = client.get("/search", params={"q": "red shirt", "k": 50, "where": "colour=green"}).json()["results"]
    assert green and all(h["attributes"]["colour"] == "green" for h in green)
    both = client.get("/search", params=[("q", "shirt"), ("k", 50), ("where", "colour=red"), ("where", "kind=shirt")])
    assert both.status_code == 200
    assert {(h["attributes"]["colour"], h["attributes"]["kind"]) for h in both.json()["results"]} == {("red", "shirt")}
    upper = client.get("/search", params={"q": "red shirt", "k": 50, "where": "colour=GREEN"}).json()["results"]
    assert [h["id"] for h in upper] == [h["id"] for h in green]  # values match ignoring case
    absent = client.get("/search", params={"q": "shirt", "where": "colour=purple"})
    listed = absent.json()["detail"].split("colour has ")[-1].split(", ")
    assert absent.status_code == 400 and set(listed) == {"red", "green", "blue", "black"}
    unknown = client.get("/search", params={"q": "shirt", "where": "size=L"})
    assert unknown.status_code == 400 and unknown.json()["detail"].startswith("where size=L: no such attribute column")
    assert {k: unknown.json()[k] for k in ("parameter", "value", "allowed")} == {
        "parameter": "where", "value": "size=L", "allowed": ["colour", "kind"]}  # what went wrong, as data
    for bad in ("colour", "=red"):
        response = client.get("/search", params={"q": "shirt", "where": bad})
        assert response.status_code == 400 and "COLUMN=VALUE" in response.json()["detail"]
        assert response.json()["parameter"] == "where" and response.json()["value"] == bad
        assert "--" not in response.json()["detail"] and "`" not in response.json()["detail"]


def test_bad_requests_get_a_clear_4xx(client: TestClient) -> None:
    cases = {"/search": 422, "/search?q=": 400, "/search?q=%20%20%00": 400, "/search?q=a&k=0": 422,
             "/search?q=a&k=101": 422, "/search?q=a&k=ten": 422, "/products/nope": 404, "/products/nope/similar": 404,
             "/products/p1/similar?k=0": 422, "/images/nope": 404, "/no/such/route": 404}
    for url, status in cases.items():
        response = client.get(url)
        assert response.status_code == status, url
        assert response.headers["content-type"] == "application/json", url
        assert isinstance(response.json()["detail"], str) and response.json()["detail"], url  # as the README says
    for empty in ("/search?q=", "/search?q=%20%20"):
        assert "q is empty" in client.get(empty).json()["detail"], empty
        assert client.get(empty).json()["parameter"] == "q"
    assert client.get("/search").json()["detail"] == "q: Field required"  # missing: FastAPI's 422, one string
    assert client.get("/search?q=a&k=101").json()["detail"].startswith("k: ")
    long = client.get("/search", params={"q": "red " * 400}).json()
    assert long["warnings"] and "truncated" in long["warnings"][0]


def test_an_unexpected_failure_is_a_json_500_without_traceback(client: TestClient, catalog: Catalog,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(product_id: str) -> None:
        raise RuntimeError("secret internals at /srv/x.py line 3")

    monkeypatch.setattr(catalog, "product", broken)
    response = client.get("/products/p1")
    assert response.status_code == 500 and response.json() == {"detail": "internal error; the server's log has "
                                                                          "the details"}


def test_product_and_its_odd_id(client: TestClient) -> None:
    product = client.get("/products/p3").json()
    assert product == {"id": "p3", "text": "black shirt 3", "attributes": {"colour": "black", "kind": "shirt"},
                       "image_url": "/images/p3", "similar_url": "/products/p3/similar"}
    odd = client.get("/products/" + quote(ODD_ID, safe=""))
    assert odd.status_code == 200 and odd.json()["id"] == ODD_ID
    assert client.get(odd.json()["image_url"]).status_code == 200
    assert client.get(odd.json()["similar_url"]).status_code == 200


def test_similar_is_the_inner_product_of_stored_vectors(client: TestClient, catalog: Catalog) -> None:
    vectors = catalog.searcher.index._vectors[:]  # [N,D]
    ids = catalog.ids
    me = ids.index("p5")
    scores = vectors @ vectors[me]
    order = [i for i in np.lexsort((np.arange(len(ids)), -scores)) if i != me][:6]
    body = client.get("/products/p5/similar", params={"k": 6}).json()
    assert body["query"] == "more like p5"
    assert [h["id"] for h in body["results"]] == [ids[i] for i in order]
    np.testing.assert_allclose([h["score"] for h in body["results"]], scores[order], rtol=1e-5)
    filtered = client.get("/products/p5/similar", params={"k": 50, "where": "kind=dress"}).json()["results"]
    assert filtered and all(h["attributes"]["kind"] == "dress" and h["id"] != "p5" for h in filtered)
    same_kind = client.get("/products/p5/similar", params={"k": 50, "where": "kind=shirt"}).json()["results"]
    assert "p5" not in {h["id"] for h in same_kind}  # a product is never more like itself


def test_images_come_from_the_store_only(client: TestClient, shop: tuple[Path, Path]) -> None:
    photo = client.get("/images/p3")
    assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"
    assert photo.content == (shop[0].parent / "images" / "p3.jpg").read_bytes()
    traversal = ["/images/..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd", "/images/../../etc/passwd",
                 "/images/" + quote(str(shop[0].parent / "images" / "p3.jpg"), safe=""), "/images/images%2Fp3.jpg",
                 "/images/p3%00", "/images/"]
    for url in traversal:
        response = client.get(url)
        assert response.status_code == 404, url
        assert "root:" not in response.text and response.headers["content-type"] == "application/json"
    gone = client.get("/images/gone")
    assert gone.status_code == 404 and "no longer on disk" in gone.json()["detail"]


def test_health_filters_openapi_and_page(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health == {"status": "ok", "products": 43, "model": "model", "backend": "exact",
                      "exact_inner_product": True}
    filters = {f["column"]: f["values"] for f in client.get("/filters").json()}
    assert set(filters) == {"colour", "kind"}
    assert {"value": "blue", "count": 11} in filters["colour"] and sum(v["count"] for v in filters["kind"]) == 43
    schema = client.get("/openapi.json").json()
    assert {"/search", "/products/{product_id}", "/products/{product_id}/similar", "/images/{product_id}",
            "/health", "/filters"} <= set(schema["paths"])
    params = {p["name"]: p for p in schema["paths"]["/search"]["get"]["parameters"]}
    assert params["q"]["required"] and params["where"]["schema"]["anyOf"][0]["type"] == "array"
    assert "cosine" in schema["paths"]["/products/{product_id}/similar"]["get"]["description"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text and "innerHTML" not in page.text
    script = re.search(r"<script>(.*)</script>", page.text, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in page.headers["content-security-policy"]


# -- the server on loopback --------------------------------------------------------------------------
def test_concurrent_searches_agree_and_do_not_block_the_loop(live: str, catalog: Catalog,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    queries = [f"{c} {k}" for c in ("red", "green", "blue", "black") for k in ("shirt", "dress", "shoe", "watch")]
    want = {q: [h.id for h in catalog.search(q, top_k=10).hits] for q in queries}

    def fetch(q: str) -> list[str]:
        return [h["id"] for h in httpx.get(f"{live}/search", params={"q": q, "k": 10}, timeout=30).json()["results"]]

    results: dict[str, list[str]] = {}
    threads = [threading.Thread(target=lambda q=q: results.__setitem__(q, fetch(q))) for q in queries * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == want
    # A search held up in the thread pool leaves the event loop free to answer others.
    started, release = threading.Event(), threading.Event()
    search = catalog.search

    def held(*args: object, **kwargs: object) -> object:
        started.set()
        release.wait(10)
        return search(*args, **kwargs)

    monkeypatch.setattr(catalog, "search", held)
    slow = threading.Thread(target=lambda: results.__setitem__("slow", fetch("red shirt")))
    slow.start()
    assert started.wait(10)
    assert httpx.get(f"{live}/health", timeout=2).status_code == 200
    assert httpx.get(f"{live}/products/p1", timeout=2).status_code == 200
    release.set()
    slow.join(10)
    assert results["slow"] == want["red shirt"]


def test_raw_traversal_requests_on_the_wire(live: str) -> None:
    """Paths sent as written (an HTTP client would normalise the dots away before sending)."""
    host, port = live.removeprefix("http://").split(":")
    for target in ("/images/../../etc/passwd", "/images/..%2F..%2Fetc%2Fpasswd", "/images/%2e%2e/%2e%2e/etc/passwd",
                   "/images//etc/passwd"):
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 404"), (target, reply[:200])
        assert b"root:" not in reply


def test_cli_serve_listens_and_stops_on_ctrl_c(shop: tuple[Path, Path]) -> None:
    store, model_dir = shop
    command = [sys.executable, "-m", "hsl_cli.main", "serve", "--store", str(store), "--model", str(model_dir),
               "--port", "0", "--quiet"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        deadline, url = time.monotonic() + 60, None
        while url is None and time.monotonic() < deadline:
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", lines.get(timeout=60))
            url = match and match.group(1)
        assert url, "hsl serve did not say where it listens"
        for _ in range(100):  # the port is bound before the message; uvicorn accepts a moment later
            try:
                assert httpx.get(f"{url}/health", timeout=5).json()["products"] == 43
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_serve_busy_port_is_a_clear_error(shop: tuple[Path, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--store", str(shop[0]), "--model", str(shop[1]), "--port",
                                          str(port), "--quiet"])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr


# -- the page in a real browser ---------------------------------------------------------------------
@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no browser: the end-to-end test needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        yield session
    finally:
        session.quit()


RENDERED = """return [...document.querySelectorAll('#results figure.hit')].map((f) => {
  const img = f.querySelector('img');
  return [f.dataset.id, f.querySelector('.title').textContent, !!img && img.complete && img.naturalWidth > 0];
});"""


def test_page_in_chromium(browser: object, live: str, catalog: Catalog) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(live + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#filters select")) == 2)
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("50")
    browser.find_element(By.ID, "q").send_keys("red shirt", Keys.ENTER)
    wait.until(lambda d: len(d.execute_script(RENDERED)) == 43)
    for figure in browser.find_elements(By.CSS_SELECTOR, "#results figure.hit")[::7] + [
            browser.find_element(By.CSS_SELECTOR, f'figure.hit[data-id="{ODD_ID}"]')]:
        browser.execute_script("arguments[0].scrollIntoView()", figure)  # lazy images load when seen
    wait.until(lambda d: sum(ok for _, _, ok in d.execute_script(RENDERED)) >= 8)
    hits = {pid: (title, ok) for pid, title, ok in browser.execute_script(RENDERED)}
    assert hits[ODD_ID][1], "the photo of a product whose id needs URL-encoding did not render"
    assert hits["xss"][0] == XSS  # shown as text, not run as markup
    assert "q=red+shirt" in browser.current_url  # the address reopens this search
    # A click shows the details; "More like this" lists other products, photos rendered.
    card = browser.find_element(By.CSS_SELECTOR, 'figure.hit[data-id="p4"]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)  # clear of the sticky header
    card.click()
    wait.until(lambda d: d.find_element(By.ID, "detail").is_displayed())
    assert browser.find_element(By.ID, "detail-title").text == "red dress 4"
    browser.find_element(By.ID, "more").click()
    wait.until(lambda d: "More like" in d.find_element(By.ID, "status").text)
    similar = browser.execute_script(RENDERED)
    assert len(similar) == 42 and "p4" not in {pid for pid, _, _ in similar}
    wait.until(lambda d: d.execute_script(RENDERED)[0][2])
    # Filters narrow the search; a bad request shows the server's message, not a blank page.
    Select(browser.find_element(By.CSS_SELECTOR, 'select[name="kind"]')).select_by_value("dress")
    browser.find_element(By.ID, "q").send_keys(Keys.ENTER)
    dresses = dict(catalog.filters["kind"])["dress"]
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(f"\u201cred shirt\u201d: {dresses} results"))
    logs = [entry["message"] for entry in browser.get_log("browser")]
    assert not [m for m in logs if "Content Security Policy" in m or "Uncaught" in m], logs
