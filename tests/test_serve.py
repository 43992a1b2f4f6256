"""`dsrh serve`: the search page, driven in a real headless browser (Debian's chromium + chromedriver through
Selenium): load, search from the index, upload, the worst-queries view, and bad input answered with a message.
The numbers on the page are checked against brute-force loops written here."""

from __future__ import annotations

import io
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from _metric_refs import ap_at
from _tiny_ckpt import tiny_ckpt  # noqa: F401  (fixture)
from dsrh_lightning import cli

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def served(tiny_ckpt, tmp_path_factory):  # noqa: F811
    """The page over the tiny checkpoint's database split, on a free loopback port."""
    from werkzeug.serving import make_server

    from dsrh_lightning.serve.app import create_app, make_service

    ckpt, _ = tiny_ckpt
    tmp = tmp_path_factory.mktemp("serve")
    index = tmp / "db.npz"
    assert cli.main(["index", "--ckpt", str(ckpt), "--out", str(index), "--no-progress", "split=database"]) == 0
    service = make_service(ckpt, index, k=12)
    server = make_server("127.0.0.1", 0, create_app(service), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", service, tmp
    server.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), \
        "the browser test needs Debian's chromium and chromium-driver (make test installs them)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1300,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _click_and_wait(driver, element) -> None:
    """Click a link or button and wait until the next page has loaded in its place.

    The old page is recognised by a flag set on its window (a new page starts with a fresh window), not
    by holding one of its elements: asking chromedriver about an element of a replaced document can
    fail with "Node with given id does not belong to the document" instead of reporting it stale."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.__dsrhOldPage = true")
    element.click()
    WebDriverWait(driver, 120, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return !window.__dsrhOldPage && document.readyState === 'complete'"))


def _items(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#results .item")


def _image_loaded(driver, img) -> bool:
    return bool(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img))


def test_load_and_search_from_the_index(served, browser):
    from selenium.webdriver.common.by import By

    url, service, _ = served
    browser.get(url + "/")
    assert f"{len(service.ids)} items of {service.index.bits} bits" in browser.find_element(By.ID, "summary").text
    p = 7
    box = browser.find_element(By.ID, "query-id")
    box.clear()
    box.send_keys(service.ids[p])
    _click_and_wait(browser, browser.find_element(By.ID, "pick-go"))
    items = _items(browser)
    assert len(items) == 12
    # brute force: distances to every item, ranked by (distance, position)
    bits, labels = service.bits.astype(int), np.asarray(service.labels)
    dist = [int((bits[p] != bits[j]).sum()) for j in range(len(bits))]
    order = sorted(range(len(bits)), key=lambda j: (dist[j], j))
    for r, el in enumerate(items):
        j = order[r]
        assert el.get_attribute("data-id") == service.ids[j]
        assert int(el.get_attribute("data-distance")) == dist[j]
        relevant = bool(labels[j] == labels[p])
        assert el.get_attribute("data-relevant") == str(relevant)
        assert ("rel" if relevant else "irr") in el.get_attribute("class").split()  # green / red border
        assert ("the query itself" in el.text) == (j == p)
    # every distance shown has its tie group: its size over the whole index and its ranks
    groups = browser.find_elements(By.CSS_SELECTOR, "#tie-groups .tie-group")
    shown = sorted({dist[order[r]] for r in range(12)})
    assert [int(g.get_attribute("data-distance")) for g in groups] == shown
    for g in groups:
        d = int(g.get_attribute("data-distance"))
        ranks = [r + 1 for r, j in enumerate(order) if dist[j] == d]
        assert int(g.get_attribute("data-size")) == len(ranks)
        assert f"ranks {ranks[0]}-{ranks[-1]} ({len(ranks)} items)" in g.text
    # the pictures of in-memory ids are served
    imgs = browser.find_elements(By.CSS_SELECTOR, "#results img")
    assert imgs and all(_image_loaded(browser, im) for im in imgs[:3])


def test_upload_an_image(served, browser):
    from selenium.webdriver.common.by import By

    from dsrh_lightning.serve.ids import write_png

    url, service, tmp = served
    img, _ = service.lookup.image(service.ids[3])
    picture = tmp / "query.png"
    write_png(picture, img)
    browser.get(url + "/")
    browser.find_element(By.ID, "file").send_keys(str(picture))
    _click_and_wait(browser, browser.find_element(By.ID, "upload-go"))
    assert "uploaded query.png" in browser.find_element(By.ID, "query-title").text
    assert _image_loaded(browser, browser.find_element(By.ID, "query-img"))
    items = _items(browser)
    assert len(items) == 12
    code, _ = service.encode_upload(picture.read_bytes(), "query.png")
    dist = (service.bits.astype(int) != code.astype(int)[None]).sum(1)
    order = sorted(range(len(dist)), key=lambda j: (dist[j], j))
    assert [el.get_attribute("data-id") for el in items] == [service.ids[j] for j in order[:12]]
    assert all(el.get_attribute("data-relevant") == "None" for el in items)  # an upload has no label


def test_worst_queries_view(served, browser):
    from selenium.webdriver.common.by import By

    url, service, _ = served
    browser.get(url + "/")
    _click_and_wait(browser, browser.find_element(By.ID, "worst-link"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#worst .worst-row")
    n = len(service.ids)
    assert len(rows) == min(500, n)
    aps = [float(r.get_attribute("data-ap")) for r in rows]
    assert aps == sorted(aps)  # worst first
    bits, labels = service.bits.astype(int), np.asarray(service.labels)
    for row in rows[:3] + rows[-2:]:
        item = row.find_element(By.TAG_NAME, "a").text
        p = service.ids.index(item)
        others = [j for j in range(n) if j != p]
        dist = {j: int((bits[p] != bits[j]).sum()) for j in others}
        ranked = sorted(others, key=lambda j: (dist[j], j))
        ref = ap_at([int(labels[j] == labels[p]) for j in ranked], len(ranked))
        assert float(row.get_attribute("data-ap")) == pytest.approx(ref, abs=1e-6)
    _click_and_wait(browser, rows[0].find_element(By.TAG_NAME, "a"))  # a worst query opens its results
    assert len(_items(browser)) == 12


def test_bad_input_is_answered_with_a_message_not_a_500(served, browser):
    from selenium.webdriver.common.by import By

    url, _, tmp = served
    browser.get(url + "/query?id=cifar10%2399999999")
    assert "unknown id 'cifar10#99999999'" in browser.find_element(By.ID, "message").text
    text_file = tmp / "notes.png"
    text_file.write_text("this is not an image")
    browser.get(url + "/")
    browser.find_element(By.ID, "file").send_keys(str(text_file))
    _click_and_wait(browser, browser.find_element(By.ID, "upload-go"))
    msg = browser.find_element(By.ID, "message").text
    assert "not an image this page can read" in msg and "notes.png" in msg and "/tmp" not in msg
    # the statuses behind those pages
    for path in ("/query?id=nothing", "/image/100000"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + path, timeout=60)
        assert err.value.code == 404
    req = urllib.request.Request(url + "/upload", data=b"--x\r\nContent-Disposition: form-data; name=\"image\"; "
                                 b"filename=\"a.txt\"\r\n\r\nhello\r\n--x--\r\n",
                                 headers={"Content-Type": "multipart/form-data; boundary=x"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 400


def test_only_loopback_addresses():
    from dsrh_lightning.errors import InputError
    from dsrh_lightning.serve.app import check_loopback

    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert check_loopback(host) == host
    for host in ("0.0.0.0", "192.168.1.5", "example.org", "::"):
        with pytest.raises(InputError, match="loopback"):
            check_loopback(host)
    assert cli.main(["serve", "--ckpt", "x.ckpt", "--index", "y.npz", "--host", "0.0.0.0"]) == 2


def test_page_numbers_match_loops_on_random_codes():
    """tie groups, relevance and leave-one-out AP against plain loops (ties everywhere: 4-bit codes)."""
    from dsrh_lightning.serve.ranking import hamming_row, leave_one_out_ap, rank, relevant, tie_groups

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (60, 4), dtype=np.uint8)
    labels = rng.integers(0, 3, 60)
    for p in (0, 17, 59):
        dist = hamming_row(bits[p], bits)
        assert dist.tolist() == [sum(int(a != b) for a, b in zip(bits[p], bits[j])) for j in range(60)]
        order = rank(dist)
        assert order.tolist() == sorted(range(60), key=lambda j: (dist[j], j))
        groups = tie_groups(dist, order, 10)
        for g in groups:
            ranks = [r + 1 for r, j in enumerate(order) if dist[j] == g["distance"]]
            assert (g["first"], g["last"], g["size"]) == (ranks[0], ranks[-1], len(ranks))
        assert [g["distance"] for g in groups] == sorted({int(dist[j]) for j in order[:10]})
    ap = leave_one_out_ap(bits, labels, [3, 40])
    for value, p in zip(ap, (3, 40)):
        others = sorted((j for j in range(60) if j != p), key=lambda j: (int((bits[p] != bits[j]).sum()), j))
        assert value == pytest.approx(ap_at([int(labels[j] == labels[p]) for j in others], 59))
    multi = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1]])
    assert relevant(multi[0], multi).tolist() == [True, False, True]  # a shared label, not equality


def test_an_index_of_image_files_serves_its_files_and_has_no_ap_view(tiny_ckpt, tmp_path):  # noqa: F811
    from dsrh_lightning.data.sources import make_synthetic
    from dsrh_lightning.serve.app import create_app, make_service
    from PIL import Image

    from dsrh_lightning.serve.ids import write_png

    ckpt, _ = tiny_ckpt
    (tmp_path / "pics").mkdir()
    src = make_synthetic(3, 2, 32, seed=5)
    for i in range(3):
        write_png(tmp_path / "pics" / f"p{i}.png", src.images[i])
    index = tmp_path / "pics.npz"
    assert cli.main(["index", "--ckpt", str(ckpt), "--out", str(index), "--no-progress", str(tmp_path / "pics")]) == 0
    service = make_service(ckpt, index, k=3)
    client = create_app(service).test_client()
    r = client.get("/image/1")
    assert r.status_code == 200 and r.data[:4] == b"\x89PNG"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB")),
                                  np.asarray(Image.open(service.ids[1]).convert("RGB")))  # the file itself
    r = client.get("/query", query_string={"id": service.ids[2]})
    assert r.status_code == 200 and r.data.count(b'data-relevant="None"') == 3 and b"the query itself" in r.data
    r = client.get("/worst")
    assert r.status_code == 400 and b"no labels" in r.data


def _bare_service(n: int = 3):
    """What the home page and the id lookup read of a SearchService, without a checkpoint."""
    from types import SimpleNamespace

    from dsrh_lightning.serve.app import SearchService

    service = SimpleNamespace(ids=[f"cifar10#{i}" for i in range(n)], run=SimpleNamespace(path="tiny.ckpt"),
                              index=SimpleNamespace(bits=8, source="db.npz"))
    service.position = {i: p for p, i in enumerate(service.ids)}
    service.find = lambda text: SearchService.find(service, text)
    return service


def test_requests_for_other_host_names_are_refused():
    """DNS rebinding: a Host header other than a loopback name (any port) or the --host given is refused."""
    from dsrh_lightning.serve.app import create_app

    client = create_app(_bare_service()).test_client()
    for name in ("localhost", "localhost:8765", "127.0.0.1:8765", "[::1]:8765", "[::1]", "LOCALHOST:1"):
        r = client.get("/", headers={"Host": name})
        assert r.status_code == 200 and b"Hamming search" in r.data, f"Host {name}: got {r.status_code}"
    for name in ("evil.example:8765", "evil.example", "127.0.0.2:8765", "localhost.evil.example", "[::2]:80"):
        r = client.get("/", headers={"Host": name})
        assert r.status_code == 421, f"Host {name}: expected 421, got {r.status_code}"
        assert b"answers only requests for" in r.data and b"Hamming search" not in r.data
    # a --host given (a loopback address other than the usual names) is served as well
    client = create_app(_bare_service(), host="127.0.0.2").test_client()
    assert client.get("/", headers={"Host": "127.0.0.2:8765"}).status_code == 200
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 421
    client = create_app(_bare_service(), host="::1").test_client()
    assert client.get("/", headers={"Host": "[::1]:9"}).status_code == 200


def test_an_id_of_digits_that_int_cannot_read_is_an_unknown_id_not_a_500():
    from dsrh_lightning.errors import InputError
    from dsrh_lightning.serve.app import create_app

    service = _bare_service(3)
    assert [service.find(t) for t in ("0", "2", " 1 ", "cifar10#2")] == [0, 2, 1, 2]
    for text in ("²", "١", "3", "-1", "1.0", ""):
        with pytest.raises(InputError, match="unknown id"):
            service.find(text)
    client = create_app(service).test_client()
    for text in ("²", "٣", "𝟙"):
        r = client.get("/query", query_string={"id": text})
        assert r.status_code == 404 and b"unknown id" in r.data, f"id={text!r}: got {r.status_code}"


def test_parse_id_reads_every_in_memory_id_the_codes_file_writes():
    """One definition of an in-memory id: parse_id accepts exactly what codes_file.is_memory_id accepts."""
    from dsrh_lightning.search.codes_file import is_memory_id
    from dsrh_lightning.serve.ids import parse_id

    assert parse_id("cifar10#53001") == ("cifar10", 53001)
    assert parse_id(" nus-wide.v2#7 ") == ("nus-wide.v2", 7)  # '.' and '-' in a data set name
    assert parse_id("my_set#0") == ("my_set", 0)
    for text in ("cifar10#53001", "nus-wide.v2#7", "my_set#0", "a#b#3", "cifar10#", "#3", "c/d#3", "x.png",
                 "cifar10#-1", "cifar10#1.5", "img#3.png"):
        assert (parse_id(text) is not None) == is_memory_id(text), text
