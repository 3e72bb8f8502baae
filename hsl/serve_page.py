"""The search page of `hsl serve`: one self-contained HTML file (style and script inline).

Every product string reaches the page through textContent / DOM nodes, never innerHTML, so a
title such as `<script>` shows as text. The Content-Security-Policy allows exactly this page's
own script and style (by hash) and same-origin requests, so even a mistake there could not run
injected code. It lives in a .py module so that it ships with the package like any code.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f6f6f6;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:.8rem 1.2rem;z-index:1}
form{display:flex;gap:.5rem}#q{flex:1;font-size:1rem;padding:.45rem .6rem}
button,select{font-size:.9rem;padding:.35rem .5rem}
#filters{display:flex;flex-wrap:wrap;gap:.4rem;margin-top:.5rem}
#status{margin:.6rem 1.2rem;color:#555;font-size:.9rem}#status.error{color:#b00020}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.8rem;padding:0 1.2rem 2rem}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;cursor:pointer}
figure:hover,figure:focus{border-color:#36c;outline:none}
figure img,.missing{width:100%;aspect-ratio:1;object-fit:contain;background:#fff;display:block}
.missing{display:flex;align-items:center;justify-content:center;color:#999;background:#eee;font-size:.8rem}
figcaption{font-size:.78rem;line-height:1.3;display:flex;flex-direction:column;gap:.15rem;margin-top:.3rem}
.score,.attrs{color:#666}
#detail{position:fixed;top:0;right:0;bottom:0;width:min(420px,100%);background:#fff;border-left:1px solid #ccc;
box-shadow:-4px 0 16px #0002;padding:1rem 1.2rem;overflow:auto;z-index:2}
#detail img{width:100%;max-height:50vh;object-fit:contain}#detail th{text-align:left;padding-right:1rem;color:#555}
#close{float:right}
"""

SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
let current = null;  // the product shown in the detail panel

// DOM nodes only: strings become text nodes, so product text is never parsed as HTML.
function el(tag, props, ...children) {
  const node = Object.assign(document.createElement(tag), props || {});
  node.append(...children);
  return node;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function whereParams() {
  return [...$("filters").querySelectorAll("select")].filter((s) => s.value)
    .map((s) => ["where", s.name + "=" + s.value]);
}

async function getJSON(url) {
  const response = await fetch(url, {headers: {Accept: "application/json"}});
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = body.detail;
    throw new Error(typeof detail === "string" ? detail : (detail ? JSON.stringify(detail) : response.statusText));
  }
  return body;
}

function photo(url, alt) {
  const img = el("img", {src: url, alt: alt, loading: "lazy"});
  img.addEventListener("error", () => img.replaceWith(el("div", {className: "missing"}, "photo unavailable")));
  return img;
}

function card(hit) {
  const attrs = Object.values(hit.attributes).filter((v) => v).join(" · ");
  const figure = el("figure", {className: "hit", tabIndex: 0}, photo(hit.image_url, hit.text),
    el("figcaption", {}, el("b", {className: "title"}, hit.text || hit.id),
      el("span", {className: "score"}, "#" + hit.rank + " · score " + hit.score.toFixed(3)),
      el("span", {className: "attrs"}, attrs)));
  figure.dataset.id = hit.id;
  figure.addEventListener("click", () => showProduct(hit.id));
  figure.addEventListener("keydown", (e) => { if (e.key === "Enter") showProduct(hit.id); });
  return figure;
}

function showResults(title, body, started) {
  $("results").replaceChildren(...body.results.map(card));
  const n = body.results.length;
  let text = title + ": " + n + " result" + (n === 1 ? "" : "s") + " in " + Math.round(performance.now() - started)
    + " ms";
  if (body.warnings && body.warnings.length) text += " (" + body.warnings.join("; ") + ")";
  setStatus(text);
}

async function search(event) {
  if (event) event.preventDefault();
  const q = $("q").value.trim();
  if (!q) { setStatus("Type a few words to search, e.g. red summer dress.", true); return; }
  const params = new URLSearchParams([["q", q], ["k", $("k").value], ...whereParams()]);
  history.replaceState(null, "", "?" + params);
  const started = performance.now();
  setStatus("Searching…");
  try {
    showResults("\u201c" + q + "\u201d", await getJSON("/search?" + params), started);
  } catch (error) { setStatus(error.message, true); }
}

async function showProduct(id) {
  try {
    current = await getJSON("/products/" + encodeURIComponent(id));
    $("detail-photo").replaceChildren(photo(current.image_url, current.text));
    $("detail-title").textContent = current.text || current.id;
    $("detail-id").textContent = "id " + current.id;
    $("detail-attrs").replaceChildren(...Object.entries(current.attributes).filter(([, v]) => v)
      .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))));
    $("detail").hidden = false;
  } catch (error) { setStatus(error.message, true); }
}

async function moreLikeThis() {
  if (!current) return;
  const params = new URLSearchParams([["k", $("k").value], ...whereParams()]);
  const started = performance.now();
  try {
    const body = await getJSON(current.similar_url + "?" + params);
    $("detail").hidden = true;
    showResults("More like \u201c" + (current.text || current.id) + "\u201d (image similarity)", body, started);
  } catch (error) { setStatus(error.message, true); }
}

async function loadFilters(initial) {
  const chosen = new Map(initial.getAll("where").map((w) => [w.split("=")[0], w.slice(w.indexOf("=") + 1)]));
  for (const f of await getJSON("/filters")) {
    const select = el("select", {name: f.column, title: f.column}, el("option", {value: ""}, "any " + f.column));
    for (const v of f.values) {
      select.append(el("option", {value: v.value}, f.column + ": " + v.value + " (" + v.count + ")"));
    }
    select.value = chosen.get(f.column) || "";
    select.addEventListener("change", () => { if ($("q").value.trim()) search(); });
    $("filters").append(select);
  }
}

async function start() {
  $("search").addEventListener("submit", search);
  $("more").addEventListener("click", moreLikeThis);
  $("close").addEventListener("click", () => { $("detail").hidden = true; });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") $("detail").hidden = true; });
  const initial = new URLSearchParams(location.search);  // a shared link reopens its search
  if (initial.get("k")) $("k").value = initial.get("k");
  try { await loadFilters(initial); } catch (error) { setStatus(error.message, true); }
  if (initial.get("q")) { $("q").value = initial.get("q"); search(); }
}
start();
"""

_BODY = """<header>
<form id="search" role="search">
<input id="q" type="search" name="q" placeholder="Describe a product, e.g. red floral summer dress" autofocus
 aria-label="search words">
<select id="k" name="k" aria-label="results"><option>10</option><option selected>20</option><option>50</option>
<option>100</option></select>
<button type="submit">Search</button>
</form>
<div id="filters" aria-label="filters"></div>
</header>
<p id="status" role="status">Type what a shopper would, then Enter.</p>
<main id="results" class="grid"></main>
<aside id="detail" hidden>
<button id="close" type="button" aria-label="close">×</button>
<div id="detail-photo"></div>
<h2 id="detail-title"></h2>
<p id="detail-id"></p>
<table id="detail-attrs"></table>
<p><button id="more" type="button">More like this</button></p>
</aside>"""

PAGE = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>hsl product search</title>'
        f'<style>{STYLE}</style></head>\n<body>\n{_BODY}\n<script>{SCRIPT}</script>\n</body></html>\n')


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = (f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
                           "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
