"""Fetch and parse Prometheus text exposition, tolerating anything a server may send.

A dashboard must keep going when a server sends a line we do not understand,
so the parser works line by line: a malformed line is counted and skipped,
never fatal, and the fetch layer turns every failure into a message.

We parse ourselves rather than with prometheus_client's parser because that
one stops at the first bad line (losing everything after it) and would make
prometheus_client a runtime dependency for ~100 lines of code.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: hashable, order-free

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}

DEFAULT_URL = "http://127.0.0.1:8000"
MAX_BODY_BYTES = 64 * 1024 * 1024  # a vLLM /metrics page is ~100 kB; anything huge is not one


@dataclass
class Scrape:
    """One parsed exposition: series values by metric name, then by label set."""

    t: float = 0.0  # monotonic time the scrape finished, seconds
    series: dict[str, dict[Labels, float]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)  # from `# TYPE` lines
    bad_lines: int = 0

    def names(self) -> set[str]:
        return set(self.series)

    def only(self, prefixes: tuple[str, ...]) -> "Scrape":
        """The same scrape restricted to metric names with these prefixes (to keep history small)."""
        keep = {n: s for n, s in self.series.items() if n.startswith(prefixes)}
        return Scrape(self.t, keep, {n: ty for n, ty in self.types.items() if n.startswith(prefixes)}, self.bad_lines)


class _Bad(ValueError):
    pass


def _parse_quoted(line: str, i: int) -> tuple[str, int]:
    """Parse a double-quoted string starting at line[i] == '"'; return (value, index after the quote)."""
    if i >= len(line) or line[i] != '"':
        raise _Bad("expected quote")
    out: list[str] = []
    i += 1
    while i < len(line):
        ch = line[i]
        if ch == "\\":
            if i + 1 >= len(line):
                raise _Bad("dangling escape")
            nxt = line[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
        elif ch == '"':
            return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1
    raise _Bad("unterminated string")


def _skip_ws(line: str, i: int) -> int:
    while i < len(line) and line[i] in " \t":
        i += 1
    return i


def _parse_labels(line: str, i: int) -> tuple[str | None, dict[str, str], int]:
    """Parse `{...}` starting at line[i] == '{'. Returns (quoted metric name if any, labels, index after '}').

    Accepts the UTF-8 form `{"metric.name", label="v"}` of newer exposition formats too.
    """
    labels: dict[str, str] = {}
    quoted_name: str | None = None
    i += 1
    while True:
        i = _skip_ws(line, i)
        if i >= len(line):
            raise _Bad("unterminated label set")
        if line[i] == "}":
            return quoted_name, labels, i + 1
        if line[i] == '"':
            text, i = _parse_quoted(line, i)
            j = _skip_ws(line, i)
            if j < len(line) and line[j] == "=":  # quoted label name
                key = text
                i = _skip_ws(line, j + 1)
                labels[key], i = _parse_quoted(line, i)
            else:
                if quoted_name is not None or labels:
                    raise _Bad("metric name must come first")
                quoted_name = text
        else:
            m = _LABEL_NAME_RE.match(line, i)
            if not m:
                raise _Bad("bad label name")
            key = m.group(0)
            i = _skip_ws(line, m.end())
            if i >= len(line) or line[i] != "=":
                raise _Bad("expected '='")
            i = _skip_ws(line, i + 1)
            labels[key], i = _parse_quoted(line, i)
        i = _skip_ws(line, i)
        if i < len(line) and line[i] == ",":
            i += 1
        elif i < len(line) and line[i] == "}":
            continue
        else:
            raise _Bad("expected ',' or '}'")


def parse_value(text: str) -> float:
    """A sample value as Prometheus writes it: a Go float, or +Inf / -Inf / NaN in any case."""
    low = text.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    if low == "nan":
        return math.nan
    if "_" in text:  # Python's float() accepts 1_000, the format does not
        raise _Bad("bad value")
    try:
        return float(text)
    except ValueError:
        raise _Bad("bad value") from None


def parse_sample_line(line: str) -> tuple[str, Labels, float]:
    """One sample line → (name, labels, value). Raises ValueError when malformed."""
    i = _skip_ws(line, 0)
    name: str | None = None
    labels: dict[str, str] = {}
    m = _NAME_RE.match(line, i)
    if m:
        name = m.group(0)
        i = m.end()
    j = _skip_ws(line, i)
    if j < len(line) and line[j] == "{":
        quoted, labels, i = _parse_labels(line, j)
        if quoted is not None:
            if name is not None:
                raise _Bad("two metric names")
            name = quoted
    if not name:
        raise _Bad("no metric name")
    rest = line[i:]
    if rest and rest[0] not in " \t":
        raise _Bad("junk after name")
    # OpenMetrics exemplars follow the value after " # "; the part before is "value [timestamp]".
    rest = rest.split("#", 1)[0]
    fields = rest.split()
    if not fields or len(fields) > 2:
        raise _Bad("expected value [timestamp]")
    value = parse_value(fields[0])
    if len(fields) == 2:
        parse_value(fields[1])  # a timestamp we do not use, but it must be a number
    return name, tuple(sorted(labels.items())), value


def parse_exposition(text: str, t: float = 0.0) -> Scrape:
    """Parse a whole exposition. Never raises: malformed lines are skipped and counted."""
    scrape = Scrape(t=t)
    if not isinstance(text, str):
        return scrape
    for raw in text.split("\n"):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        stripped = line.lstrip()
        if stripped.startswith("#"):
            parts = stripped[1:].split(None, 3)
            if len(parts) >= 3 and parts[0] == "TYPE":
                scrape.types[parts[1]] = parts[2].lower()
            continue
        try:
            name, labels, value = parse_sample_line(line)
        except (ValueError, IndexError):
            scrape.bad_lines += 1
            continue
        scrape.series.setdefault(name, {})[labels] = value
    return scrape


# ---------------------------------------------------------------- URLs and HTTP


class BadURL(ValueError):
    pass


def metrics_url(url: str | None) -> str:
    """Normalise what the user typed into the URL of the metrics page.

    `host:port`, `http://host:port`, `http://host:port/` and the OpenAI base
    `http://host:port/v1` all mean that server's `/metrics`; any other path is
    taken as given (a proxy may publish the page elsewhere).
    """
    text = (url or DEFAULT_URL).strip()
    if not text:
        text = DEFAULT_URL
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise BadURL(f"unsupported scheme {parts.scheme!r} in {url!r}: use http:// or https://")
    if not parts.hostname:
        raise BadURL(f"no host in {url!r}: expected something like http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 - raises on a non-numeric port
    except ValueError:
        raise BadURL(f"bad port in {url!r}: expected a number, e.g. http://127.0.0.1:8000") from None
    path = parts.path.rstrip("/")
    if path in ("", "/v1"):
        path = "/metrics"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def server_root(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def is_local_url(url: str) -> bool:
    """True when the URL's host is this machine (loopback, or one of our own addresses)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("localhost", "ip6-localhost", "0.0.0.0", "::"):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        try:
            addr = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError, UnicodeError):
            return False
    if addr.is_loopback or addr.is_unspecified:
        return True
    try:
        import psutil

        own = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    except Exception:
        return False
    return str(addr) in own


@dataclass
class FetchResult:
    ok: bool
    text: str = ""
    error: str = ""  # one line, for the user: what went wrong and what to do
    status: int | None = None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Following a redirect would forward the API key to wherever it points.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(newurl, code, f"redirected to {newurl}", headers, fp)


def _explain(exc: BaseException, url: str, timeout: float) -> str:
    host = urllib.parse.urlsplit(url).netloc
    reason = getattr(exc, "reason", exc)
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code in (401, 403):
            return f"HTTP {exc.code} from {url}: the server wants an API key (pass --api-key or set VLLM_API_KEY)"
        if exc.code == 404:
            return f"HTTP 404 from {url}: no metrics page there; give the server's root URL, e.g. http://127.0.0.1:8000"
        if 300 <= exc.code < 400:
            return f"{url} {exc.msg}; not followed: pass that URL instead"
        return f"HTTP {exc.code} {exc.msg} from {url}"
    if isinstance(reason, ConnectionRefusedError):
        return f"connection refused by {host}: nothing is listening there (server not started yet, or wrong port)"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no answer from {host} within {timeout:g} s"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve host {urllib.parse.urlsplit(url).hostname!r}"
    if isinstance(reason, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return f"connection to {host} was reset"
    if isinstance(exc, (urllib.error.URLError, OSError)):
        return f"cannot reach {host}: {reason}"
    return f"bad answer from {host}: {type(exc).__name__}: {exc}"


def fetch(url: str, api_key: str | None = None, timeout: float = 2.0, max_bytes: int = MAX_BODY_BYTES,
          local: bool | None = None) -> FetchResult:
    """GET the metrics page. Never raises: every failure comes back as FetchResult(ok=False, error=...).

    `local` (is the host this machine?) may be passed in to spare a DNS lookup per scrape.
    """
    try:
        req = urllib.request.Request(url, headers={"Accept": "text/plain;version=0.0.4", "User-Agent": "lvllm-monitor"})
        if api_key:
            req.add_header("Authorization", f"Bearer {api_key}")
        handlers: list = [_NoRedirect()]
        if is_local_url(url) if local is None else local:
            handlers.append(urllib.request.ProxyHandler({}))  # a proxy cannot reach our loopback
        opener = urllib.request.build_opener(*handlers)
        with opener.open(req, timeout=timeout) as resp:
            body = resp.read(max_bytes + 1)
            status = resp.status
            charset = resp.headers.get_content_charset() or "utf-8"
        if len(body) > max_bytes:
            return FetchResult(False, error=f"{url} sent more than {max_bytes // 2**20} MiB: not a metrics page", status=status)
        try:
            text = body.decode(charset, errors="replace")
        except LookupError:
            text = body.decode("utf-8", errors="replace")
        return FetchResult(True, text=text, status=status)
    except Exception as exc:  # the one place that must swallow everything: the dashboard keeps polling
        return FetchResult(False, error=_explain(exc, url, timeout), status=getattr(exc, "code", None))
