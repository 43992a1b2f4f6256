"""``dsrh serve``: a local search page over a codes file (Flask).

* ``/`` -- what is served, a form to pick a query from the index (its id or its position) and an upload form;
* ``/query?id=ID`` -- the top k of an index item: Hamming distance, label, relevant (green) or not (red),
  the tie group of each distance (``ranks 1-11, d=0``); the query itself is marked;
* ``/upload`` (POST) -- the same for an uploaded image (encoded by the checkpoint; no relevance: no label);
* ``/worst`` -- index items used as queries against the rest, sorted by average precision, worst first;
* ``/image/<position>`` -- the picture of an index item (a thumbnail; in-memory data sets included).

Only items of the index are ever read from disk (by position, never by a path from the request). Bad input
(an unknown id, a file that is not an image) is answered with a message and a 4xx status. A request whose
``Host`` header is not a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``, any port) or the ``--host``
given is refused (421): a web page elsewhere cannot reach the server through a name it re-points at 127.0.0.1
(DNS rebinding).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DsrhError, InputError
from .ids import IdLookup, label_text, png_bytes, parse_id
from .ranking import hamming_row, leave_one_out_ap, rank, relevant, tie_groups

__all__ = ["SearchService", "create_app", "serve", "check_loopback", "allowed_hosts", "host_of", "THUMB"]

THUMB = 128  # longest side of a served picture
MAX_UPLOAD = 20 * 1024 * 1024  # bytes


def check_loopback(host: str) -> str:
    """``host`` when it is a loopback address (127.0.0.0/8, ::1, localhost); else InputError."""
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise InputError(f"--host {host}: the search page binds only to loopback addresses (127.0.0.1, ::1, "
                     "localhost); it has no authentication")


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def allowed_hosts(host: Optional[str] = None) -> frozenset:
    """The ``Host`` header names served: the loopback names, and ``host`` (the ``--host`` given) when set;
    an IPv6 address in brackets, as a ``Host`` header writes it."""
    names = set(LOOPBACK_HOSTS)
    if host:
        host = host.strip().lower()
        names.add(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    return frozenset(names)


def host_of(header: str) -> str:
    """The name of a ``Host`` header without its port, lower case: ``[::1]:8765`` -> ``[::1]``."""
    header = (header or "").strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end > 0 else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class SearchService:
    """The index, the model that encodes uploads, and the data set behind in-memory ids."""

    def __init__(self, run, index, k: int = 20, ap_queries: int = 500) -> None:
        self.run, self.index, self.k = run, index, int(k)
        self.bits = index.unpacked()
        self.ids = [str(i) for i in index.ids]
        self.position = {i: p for p, i in enumerate(self.ids)}
        self.labels = index.labels
        self.lookup = IdLookup(run.cfg)
        self.class_names = None
        self.ap_queries = int(ap_queries)
        self._worst = None
        self._lock = threading.Lock()
        self._model = None

    # ---- pictures and labels of index items
    def label(self, p: int) -> str:
        if self.labels is None:
            return "-"
        names = self.lookup.source.class_names if parse_id(self.ids[p]) else None
        return label_text(self.labels[p], names)

    def picture(self, p: int) -> bytes:
        from ..plots.figures import thumbnail

        img, _ = self.lookup.image(self.ids[p])
        return png_bytes(thumbnail(img, THUMB))

    # ---- queries
    def find(self, text: str) -> int:
        """The position of an index item given by its id or its position; InputError when unknown."""
        text = (text or "").strip()
        if text in self.position:
            return self.position[text]
        if re.fullmatch(r"[0-9]+", text) and int(text) < len(self.ids):  # str.isdigit() accepts '²'; int() does not
            return int(text)
        raise InputError(f"unknown id {text[:200]!r}: not an id of this index, nor a position 0..{len(self.ids) - 1}")

    def results(self, q_bits: np.ndarray, q_label=None, self_pos: Optional[int] = None) -> dict:
        dist = hamming_row(q_bits, self.bits)
        order = rank(dist)
        top = order[: self.k]
        rel = relevant(q_label, self.labels[top]) if q_label is not None and self.labels is not None else None
        rows = [{"rank": r + 1, "position": int(j), "id": self.ids[j], "distance": int(dist[j]),
                 "label": self.label(int(j)), "relevant": None if rel is None else bool(rel[r]),
                 "is_query": self_pos is not None and int(j) == self_pos} for r, j in enumerate(top)]
        return {"rows": rows, "groups": tie_groups(dist, order, self.k)}

    def encode_upload(self, data: bytes, filename: str) -> np.ndarray:
        """The code of an uploaded picture; ImageInputError when it is not an image."""
        from ..search.encode import encode, encoder, image_dataset
        from ..search.images import load_image

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ("upload" + (Path(filename).suffix[:8] if filename else ""))
            path.write_bytes(data)
            try:
                picture = load_image(path)  # refuses a non-image with a message
            except DsrhError as exc:  # name the upload, not the temporary file
                raise InputError(str(exc).replace(str(path), Path(filename or "upload").name[:100])) from None
            with self._lock:
                if self._model is None:
                    self._model = encoder(self.run).eval()
                codes = encode(self._model, image_dataset([path], self.run.cfg), self.run.cfg.eval.threshold,
                               1, progress=False)
        return codes[0], picture

    def worst(self) -> list:
        """Index items as queries (at most ``ap_queries``, evenly spread) sorted by AP, worst first."""
        with self._lock:
            if self._worst is None:
                n = len(self.ids)
                pos = np.unique(np.linspace(0, n - 1, num=min(self.ap_queries, n)).round().astype(np.int64))
                ap = leave_one_out_ap(self.bits, self.labels, pos)
                order = np.argsort(ap, kind="stable")
                self._worst = [(int(pos[i]), float(ap[i])) for i in order]
        return self._worst


_STYLE = """
body{font-family:sans-serif;margin:1.5em;max-width:1200px} .msg{color:#b00;font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:10px} .item{width:150px;font-size:12px;text-align:center}
.item img{width:128px;height:128px;object-fit:contain;border:5px solid #999;background:#eee;image-rendering:pixelated}
.item.rel img{border-color:#1a9850} .item.irr img{border-color:#d73027} .item.self{outline:2px dashed #333}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
"""

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ style }}</style>
</head><body><p><a href="{{ url_for('home') }}">search</a> | <a id="worst-link" href="{{ url_for('worst') }}">
worst queries</a></p>{% if message %}<p class="msg" id="message">{{ message }}</p>{% endif %}{{ body|safe }}
</body></html>"""

_HOME = """<h1>Hamming search</h1>
<p id="summary">{{ n }} items of {{ bits }} bits from {{ index_source }}; checkpoint {{ ckpt }}.</p>
<form id="pick" action="{{ url_for('query') }}" method="get">
 <label>query from the index (id or position): <input id="query-id" name="id" value="{{ example }}" size="40"></label>
 <button id="pick-go" type="submit">search</button></form>
<form id="upload" action="{{ url_for('upload') }}" method="post" enctype="multipart/form-data">
 <label>or upload an image: <input id="file" type="file" name="image"></label>
 <button id="upload-go" type="submit">search</button></form>"""

_RESULTS = """<h2 id="query-title">{{ heading }}</h2>
{% if query_img %}<p><img id="query-img" src="{{ query_img }}" width="128"></p>{% endif %}
<p id="tie-groups">tie groups: {% for g in groups %}<span class="tie-group" data-distance="{{ g.distance }}"
 data-size="{{ g.size }}">d={{ g.distance }}: ranks {{ g.first }}-{{ g.last }} ({{ g.size }} items)</span>{{ "; " if not loop.last }}
{% endfor %}</p>
<div class="grid" id="results">{% for r in rows %}
<div class="item {{ 'rel' if r.relevant else ('irr' if r.relevant is not none else '') }} {{ 'self' if r.is_query }}"
 data-rank="{{ r.rank }}" data-distance="{{ r.distance }}" data-relevant="{{ r.relevant }}" data-id="{{ r.id }}">
<a href="{{ url_for('query', id=r.id) }}"><img src="{{ url_for('image', position=r.position) }}" alt="{{ r.id }}"></a>
<br>rank {{ r.rank }} &middot; d={{ r.distance }}<br>{{ r.label }}{% if r.is_query %}<br><b>(the query itself)</b>{% endif %}
<br><small>{{ r.id[-40:] }}</small></div>{% endfor %}</div>"""

_WORST = """<h2>Queries by average precision, worst first</h2>
<p id="worst-note">{% if rows|length < n %}{{ rows|length }} index items, evenly spread over the {{ n }},
{% else %}All {{ n }} index items {% endif %}as queries: each ranks all the other items; relevant: a shared label.</p>
<table id="worst"><tr><th>#</th><th>AP</th><th>id</th><th>label</th></tr>{% for p, ap, id, label in rows %}
<tr class="worst-row" data-ap="{{ '%.6f'|format(ap) }}"><td>{{ loop.index }}</td><td>{{ '%.4f'|format(ap) }}</td>
<td><a href="{{ url_for('query', id=id) }}">{{ id }}</a></td><td>{{ label }}</td></tr>{% endfor %}</table>"""


def create_app(service: SearchService, host: Optional[str] = None):
    """The Flask application of ``service``; requests are answered only for the ``Host`` names of
    :func:`allowed_hosts` (``host``: the address the server was told to bind, when given)."""
    from flask import Flask, Response, render_template_string, request
    from werkzeug.exceptions import HTTPException

    app = Flask("dsrh_serve")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD

    def page(body: str, title: str = "dsrh search", message: str = "", status: int = 200, **ctx):
        inner = render_template_string(body, **ctx) if body else ""
        return render_template_string(_PAGE, title=title, style=_STYLE, message=message, body=inner), status

    def home_page(message: str = "", status: int = 200):
        idx = service.index
        return page(_HOME, message=message, status=status, n=len(service.ids), bits=idx.bits,
                    index_source=idx.source or "the index", ckpt=Path(str(service.run.path)).name, example=service.ids[0] if service.ids else "")

    hosts = allowed_hosts(host)

    @app.before_request
    def check_host():
        name = host_of(request.headers.get("Host", ""))
        if name not in hosts:
            text = (f"421 Misdirected Request: this search page answers only requests for "
                    f"{', '.join(sorted(hosts))} (any port), not Host {name[:100]!r}")
            return Response(text, status=421, mimetype="text/plain")
        return None

    @app.errorhandler(DsrhError)
    def user_error(exc):
        return home_page(str(exc), 400)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return home_page(f"{exc.code} {exc.name}: {exc.description}", exc.code or 400)

    @app.get("/")
    def home():
        return home_page()

    @app.get("/query")
    def query():
        try:
            p = service.find(request.args.get("id", ""))
        except InputError as exc:
            return home_page(str(exc), 404)
        res = service.results(service.bits[p], None if service.labels is None else service.labels[p], self_pos=p)
        return page(_RESULTS, title=f"query {service.ids[p]}", query_img=f"/image/{p}",
                    heading=f"query: {service.ids[p]} ({service.label(p)})", **res)

    @app.post("/upload")
    def upload():
        f = request.files.get("image")
        if f is None or not f.filename:
            return home_page("choose an image file to upload", 400)
        try:
            code, picture = service.encode_upload(f.read(), f.filename)
        except DsrhError as exc:
            return home_page(f"not an image this page can read: {str(exc)[:300]}", 400)
        from ..plots.figures import thumbnail

        data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(thumbnail(picture, THUMB))).decode()
        res = service.results(code)
        name = Path(f.filename).name[:100]
        return page(_RESULTS, title=f"query {name}", query_img=data_uri, heading=f"query: uploaded {name}", **res)

    @app.get("/worst")
    def worst():
        if service.labels is None:
            return home_page("this index has no labels: average precision needs them (index a split)", 400)
        rows = [(p, ap, service.ids[p], service.label(p)) for p, ap in service.worst()]
        return page(_WORST, rows=rows, n=len(service.ids))

    @app.get("/image/<int:position>")
    def image(position: int):
        if not 0 <= position < len(service.ids):
            return home_page(f"no item {position} in this index (0..{len(service.ids) - 1})", 404)
        try:
            data = service.picture(position)
        except DsrhError as exc:
            return home_page(str(exc), 404)
        return Response(data, mimetype="image/png", headers={"Cache-Control": "max-age=3600"})

    return app


def make_service(ckpt, index_path, k: int = 20):
    from ..runs.checkpoints import load_run
    from ..search.shards import read_index

    if k < 1:
        raise InputError(f"--k must be >= 1 (results per query), got {k}")
    index = read_index(index_path)
    run = load_run(ckpt)
    if int(run.cfg.model.bits) != index.bits:
        raise InputError(f"{index_path} holds {index.bits}-bit codes but {ckpt} makes {run.cfg.model.bits}-bit "
                         "codes; index with this checkpoint")
    return SearchService(run, index, k)


def serve(ckpt, index_path, host: str = "127.0.0.1", port: int = 8765, k: int = 20) -> int:
    """Serve the page until Ctrl-C."""
    from werkzeug.serving import make_server

    check_loopback(host)
    server = make_server(host, port, create_app(make_service(ckpt, index_path, k), host=host),
                         threaded=True)
    print(f"search page: http://{host}:{server.server_port}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
