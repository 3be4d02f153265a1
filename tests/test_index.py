"""course_lib.tools.index through course_lib.tools.assets.fetch, against local package indexes that record
every request: credentials reach the index's own origin (its pages and its files) and nowhere else, no
message shows a password, pip's trusted-host and client-cert settings are honoured, bad settings and bad
pages get one sentence.

"Another host" follows pip, which keys credentials by host and port: a second server on another port of
127.0.0.1, and the same server reached as ``localhost`` instead of ``127.0.0.1``, are both other hosts.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import ssl
import subprocess
import tarfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from course_lib.tools import assets, index
from course_lib.tools.assets import ASSETS, Asset, AssetError, fetch

USER, PASSWORD = "student", "s3cr/et@42"  # '/' and '@' must be percent-encoded in a URL
QUOTED = urllib.parse.quote(PASSWORD, safe="")
EXPECTED_AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
FILENAME = "private_corpus-1.0.tar.gz"


def _sdist() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        payload = b"private words"
        info = tarfile.TarInfo("private_corpus-1.0/corpus/text.txt")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


SDIST = _sdist()


class Site:
    """One HTTP(S) server on 127.0.0.1 that serves fixed routes and records each request's headers.

    ``guarded`` (a Host header prefix): requests to that host name need Basic ``USER:PASSWORD`` (a private
    index guards its pages and its files); requests naming the server by another host name do not."""

    def __init__(self, guarded: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[dict] = []
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.guarded = guarded
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- http.server's name
                peer = self.connection.getpeercert() if tls is not None else None
                site.seen.append({"host": self.headers.get("Host"), "path": self.path,
                                  "authorization": self.headers.get("Authorization"), "peer": peer})
                if site.guarded and self.headers.get("Host", "").startswith(site.guarded) \
                        and self.headers.get("Authorization") != EXPECTED_AUTH:
                    return self._answer(401, {"WWW-Authenticate": 'Basic realm="index"'}, b"")
                self._answer(*site.routes.get(self.path, (404, {}, b"not here")))

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1", credentials: str = "") -> str:
        return f"{self.scheme}://{credentials}{host}:{self.port}{path}"

    def page(self, href: str, path: str = "/simple/private-corpus/") -> None:
        html = f'<!DOCTYPE html><html><body><a href="{href}">{FILENAME}</a></body></html>'.encode()
        self.routes[path] = (200, {"Content-Type": "text/html"}, html)

    def serve_file(self) -> None:
        self.routes[f"/files/{FILENAME}"] = (200, {"Content-Type": "application/octet-stream"}, SDIST)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _use_index(monkeypatch, url: str, **settings: str) -> None:
    """pip configured with exactly this index (and these PIP_* settings) and nothing else. (``pip config
    list`` is not run: the PIP_* variables alone say the same, 0.2 s sooner; test_assets.py runs it.)"""
    monkeypatch.setattr(index, "_pip_config_list", lambda: "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", url)
    for option in ("EXTRA_INDEX_URL", "FIND_LINKS", "NO_INDEX", "TRUSTED_HOST", "CLIENT_CERT", "PROXY"):
        monkeypatch.setenv(f"PIP_{option}", settings.pop(option, ""))
    monkeypatch.setenv("PIP_TIMEOUT", settings.pop("TIMEOUT", "5"))
    monkeypatch.setenv("PIP_CERT", settings.pop("CERT", ssl.get_default_verify_paths().cafile or ""))
    assert not settings, settings


@pytest.fixture
def private(tmp_path, monkeypatch):
    """A private index on 127.0.0.1 that guards its pages and files, and a second, open server."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    monkeypatch.setitem(ASSETS, "private", Asset(
        package="private-corpus", version="1.0", filename=FILENAME, sha256=hashlib.sha256(SDIST).hexdigest(),
        files_sha256=assets.tree_digest({"text.txt": hashlib.sha256(b"private words").hexdigest()}), kind="sdist",
        members=("private_corpus-1.0/corpus/",), strip="private_corpus-1.0/corpus/", nested=None,
        licence="MIT", what="a test corpus on a private index", size_mb=0.001))
    index_site, other = Site(guarded="127.0.0.1"), Site()
    index_site.serve_file()
    other.serve_file()
    _use_index(monkeypatch, index_site.url("/simple", credentials=f"{USER}:{QUOTED}@"))
    yield index_site, other
    index_site.close()
    other.close()


def test_credentials_go_to_the_index_for_its_pages_and_its_files(private):
    index_site, _ = private
    index_site.page(f"../../files/{FILENAME}")
    assert (fetch("private") / "text.txt").read_text() == "private words"
    assert [(r["path"], r["authorization"]) for r in index_site.seen] == [
        ("/simple/private-corpus/", EXPECTED_AUTH), (f"/files/{FILENAME}", EXPECTED_AUTH)]


@pytest.mark.parametrize("target", ["another port", "another host name"])
@pytest.mark.parametrize("moved", ["the project page", "the file"])
def test_credentials_never_follow_a_redirect_to_another_host(private, moved, target):
    index_site, other = private
    site, host = (other, "127.0.0.1") if target == "another port" else (index_site, "localhost")
    site.page(site.url(f"/files/{FILENAME}", host=host), path="/mirror/private-corpus/")
    if moved == "the project page":
        mirror = site.url("/mirror/private-corpus/", host)
        index_site.routes["/simple/private-corpus/"] = (302, {"Location": mirror}, b"")
    else:
        index_site.routes[f"/moved/{FILENAME}"] = (302, {"Location": site.url(f"/files/{FILENAME}", host)}, b"")
        index_site.page(f"/moved/{FILENAME}")
    assert (fetch("private") / "text.txt").is_file()
    assert index_site.seen[0]["authorization"] == EXPECTED_AUTH, "the index host gets them"
    arrived = [r for r in site.seen if r["host"].startswith(f"{host}:")]
    assert arrived and all(r["authorization"] is None for r in arrived), f"the password followed: {arrived}"


def test_a_file_listed_on_another_host_is_fetched_without_credentials(private):
    index_site, other = private
    index_site.page(other.url(f"/files/{FILENAME}", host="localhost"))
    assert (fetch("private") / "text.txt").is_file()
    assert [r["authorization"] for r in other.seen] == [None]


def _failure(monkeypatch, private, case: str) -> BaseException:
    index_site, _ = private
    index_site.page(f"../../files/{FILENAME}")
    if case == "unreachable":
        _use_index(monkeypatch, f"http://{USER}:{QUOTED}@127.0.0.1:9/simple")
    elif case == "wrong password":
        _use_index(monkeypatch, index_site.url("/simple", credentials=f"{USER}:{QUOTED}x@"))
    elif case == "token only":
        _use_index(monkeypatch, index_site.url("/simple", credentials=f"{QUOTED}@"))
    elif case == "not listed":
        index_site.routes.pop("/simple/private-corpus/")
    elif case == "wrong hash":
        monkeypatch.setitem(ASSETS, "private", Asset(**{**ASSETS["private"].__dict__, "sha256": "ab" * 32}))
    elif case == "proxy":
        _use_index(monkeypatch, index_site.url("/simple", credentials=f"{USER}:{QUOTED}@"),
                   PROXY=f"http://{USER}:{QUOTED}@127.0.0.1:9")
    with pytest.raises(AssetError) as caught:
        fetch("private")
    return caught.value


@pytest.mark.parametrize("case", ["unreachable", "wrong password", "token only", "not listed", "wrong hash", "proxy"])
def test_no_message_shows_the_password(private, monkeypatch, capsys, case):
    error = _failure(monkeypatch, private, case)
    shown = " ".join([str(error), repr(error), repr(error.__cause__), repr(error.__context__), *capsys.readouterr()])
    for secret in (PASSWORD, QUOTED, "s3cr"):
        assert secret not in shown, f"{case}: the password is shown in: {shown}"
    assert "\n" not in str(error) and str(error).endswith("."), str(error)


def test_a_guarded_file_without_credentials_is_not_called_offline(private, monkeypatch):
    index_site, _ = private
    index_site.page(f"../../files/{FILENAME}")
    _use_index(monkeypatch, index_site.url("/simple"))
    with pytest.raises(AssetError, match=r"refused asset 'private' \(http://127\.0\.0\.1:\d+/simple/private-corpus/ "
                                         r"answered HTTP 401.*credentials.*USER:TOKEN@HOST") as caught:
        fetch("private")
    assert "connect to the network" not in str(caught.value)


def test_plain_http_on_another_host_is_ignored_as_pip_does(private, monkeypatch):
    _use_index(monkeypatch, "http://192.0.2.1/simple", TIMEOUT="1")  # TEST-NET-1: never contacted
    with pytest.raises(AssetError, match=r"pip ignores http://192\.0\.2\.1/simple: it is plain http on a host that "
                                         r"is not a trusted-host"):
        fetch("private")
    session = index.Session({"index-url": "http://192.0.2.1/simple", "trusted-host": "192.0.2.1"})
    assert session.secure("http://192.0.2.1/simple/x/") and not session.secure("http://192.0.2.2/simple/x/")
    assert index.Session({"index-url": "http://x.example/simple", "trusted-host": "x.example:8080"}).secure(
        "http://x.example:8080/simple/") and not index.Session({"index-url": "x", "trusted-host": "x.example:8080"}
                                                                ).secure("http://x.example/simple/")


def test_a_json_page_without_files_is_one_sentence(private):
    index_site, _ = private
    index_site.routes["/simple/private-corpus/"] = (
        200, {"Content-Type": "application/vnd.pypi.simple.v1+json"}, json.dumps({"name": "private-corpus"}).encode())
    with pytest.raises(AssetError, match=r"is not a simple-API project page \(PEP 691\): it has no 'files' list.*"
                                         r"check index-url"):
        fetch("private")


@pytest.mark.parametrize("setting, value, sentence", [
    ("TIMEOUT", "soon", r"pip's timeout setting is 'soon', not a positive number of seconds"),
    ("CERT", "/no/such/bundle.pem", r"pip's cert setting names /no/such/bundle\.pem, which is not a readable PEM"),
    ("CLIENT_CERT", "/no/such/client.pem", r"pip's client-cert setting names /no/such/client\.pem, which cannot be "
                                           r"loaded"),
    ("TRUSTED_HOST", "host.example:port", r"pip's trusted-host setting holds 'host\.example:port', which is not a "
                                          r"host or host:port"),
])
def test_an_unusable_pip_setting_is_one_sentence(private, monkeypatch, setting, value, sentence):
    index_site, _ = private
    _use_index(monkeypatch, index_site.url("/simple", credentials=f"{USER}:{QUOTED}@"), **{setting: value})
    with pytest.raises(AssetError, match=r"Asset 'private' cannot be fetched: " + sentence):
        fetch("private")


# ---- https: trusted-host and client-cert (certificates made by openssl for the test) -----------------

@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A self-signed server certificate for 127.0.0.1 and a self-signed client certificate (key + cert)."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is needed to make the test certificates; install it (Debian: openssl)")
        pytest.skip("openssl is not installed: the https tests need it to make their certificates")
    folder = tmp_path_factory.mktemp("certs")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=course-student")):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", subject, "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.crt")],
                       check=True, capture_output=True)
    (folder / "client.pem").write_bytes((folder / "client.key").read_bytes() + (folder / "client.crt").read_bytes())
    return folder


def _tls_site(certificates: Path, *, require_client: bool) -> Site:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / "server.crt", certificates / "server.key")
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certificates / "client.crt")
    site = Site(tls=context)
    site.serve_file()
    site.page(f"../../files/{FILENAME}")
    return site


def test_trusted_host_reads_an_https_index_whose_certificate_does_not_verify(private, monkeypatch, certificates):
    site = _tls_site(certificates, require_client=False)
    try:
        _use_index(monkeypatch, site.url("/simple"))
        with pytest.raises(AssetError, match=r"could not be downloaded securely \(the certificate of https://127\.0\.0"
                                             r"\.1:\d+/simple/private-corpus/ does not verify.*trusted-host"):
            fetch("private")
        assert site.seen == []
        _use_index(monkeypatch, site.url("/simple"), TRUSTED_HOST=f"127.0.0.1:{site.port}")
        assert (fetch("private") / "text.txt").is_file()
        assert [r["path"] for r in site.seen] == ["/simple/private-corpus/", f"/files/{FILENAME}"]
    finally:
        site.close()


def test_client_cert_is_presented_to_an_index_that_asks_for_it(private, monkeypatch, certificates):
    site = _tls_site(certificates, require_client=True)
    try:
        _use_index(monkeypatch, site.url("/simple"), CERT=str(certificates / "server.crt"),
                   CLIENT_CERT=str(certificates / "client.pem"))
        assert (fetch("private") / "text.txt").is_file()
        subjects = [dict(part[0] for part in r["peer"]["subject"])["commonName"] for r in site.seen]
        assert subjects == ["course-student", "course-student"], "each request presented the client certificate"
    finally:
        site.close()


def test_redact_masks_passwords_and_lone_tokens_like_pip():
    text = "at https://u:p%40ss@h.example/simple and https://tok3n@h.example/x and http://127.0.0.1:9/simple"
    assert index.redact(text) == ("at https://u:****@h.example/simple and https://****@h.example/x and "
                                  "http://127.0.0.1:9/simple")
    assert index.redact("reason: p@ss was refused", ("p@ss",)) == "reason: **** was refused"
    assert index.split_credentials("https://u:p%40ss@h.example:8443/s") == ("https://h.example:8443/s", ("u", "p@ss"))


def test_origins_compare_host_case_and_default_ports_like_urls_do():
    assert index.origin("https://Index.Example/simple/") == index.origin("https://index.example:443/files/x")
    assert index.origin("http://index.example/simple/") == ("http", "index.example", 80)
    assert index.origin("https://index.example:8443/") != index.origin("https://index.example/")


def test_a_download_whose_hash_is_not_the_pin_leaves_nothing_behind(private, tmp_path):
    index_site, _ = private
    index_site.page(f"../../files/{FILENAME}")
    into = tmp_path / "into"
    settings = {"index-url": index_site.url("/simple", credentials=f"{USER}:{QUOTED}@")}
    with pytest.raises(index.FetchFailure) as caught:
        index.download_pinned("private-corpus", FILENAME, "ab" * 32, into, desc="x", settings=settings)
    assert caught.value.hash_mismatches and list(into.iterdir()) == [], "the refused bytes are deleted"


def test_a_source_advertising_the_pin_is_tried_before_one_advertising_no_hash(private, monkeypatch):
    """Two indexes list the file: the first without a hash, the second with the pin, which is fetched first."""
    index_site, other = private
    index_site.page(f"../../files/{FILENAME}")
    other.page(f"../../files/{FILENAME}#sha256={hashlib.sha256(SDIST).hexdigest()}")
    _use_index(monkeypatch, index_site.url("/simple", credentials=f"{USER}:{QUOTED}@"),
               EXTRA_INDEX_URL=other.url("/simple"))
    assert (fetch("private") / "text.txt").is_file()
    assert [r["path"] for r in index_site.seen] == ["/simple/private-corpus/"], "the unvouched file is not fetched"
    assert [r["path"] for r in other.seen] == ["/simple/private-corpus/", f"/files/{FILENAME}"]
