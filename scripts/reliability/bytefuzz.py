"""Fuzzing below the schema: mutated request bodies at the byte and JSON-escape level.

    python -m scripts.reliability.bytefuzz --target tiny --draft tiny --cases 5000 --max-time 900
    python -m scripts.reliability.bytefuzz --url http://127.0.0.1:8000 --api-key KEY --cases 2000

schemathesis (scripts/reliability/fuzz.py) only sends valid Unicode in well-formed JSON. This
takes a few valid completions and chat requests and mutates them where the schema does not look:
lone UTF-16 surrogates and NUL as JSON escapes, invalid UTF-8 bytes, overlong and non-finite
numbers, deep nesting, huge arrays and strings, wrong types, truncated and bit-flipped bodies.
Every body goes over ONE raw HTTP/1.1 keep-alive connection (a socket, so that nothing reconnects
behind our back), and right after each one a normal small completion on the same connection.

A case fails if the fuzzed request gets a 5xx, an error that is not in the OpenAI shape
{"error": {"message", "type", "param", "code"}} or quotes a traceback, a stream that does not end
in [DONE], if the server closes or resets the connection, or if the normal request after it is not
a 200. Seeded (--seed) and bounded (--cases, --max-time); loopback only. Exit status 1 on any
failure; --save-dir keeps the failing bodies. The CI short form is tests/reliability/test_rel_bytefuzz.py.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from scripts.reliability.serverproc import attach_or_start, check_loopback

TRACE_MARKERS = ("Traceback (most recent call last)", 'File "/')
MAX_BODY = 1 << 20  # the server's default max_body_bytes; a few mutations go past it on purpose (413)

# ---------------------------------------------------------------------------- seeds and mutations


def seeds(model: str) -> list[tuple[str, dict]]:
    """Valid requests that exercise every string field, token-id prompts, chat parts and streaming."""
    return [
        ("/v1/completions", {"model": model, "prompt": "def f(x):", "max_tokens": 2, "temperature": 0, "stop": ["\n\n"],
                             "user": "u1", "n": 1, "seed": 1, "top_p": 0.9}),
        ("/v1/completions", {"model": model, "prompt": [1, 2, 3], "max_tokens": 2, "logprobs": 1}),
        ("/v1/completions", {"model": model, "prompt": [[1, 2], [3]], "max_tokens": 1, "echo": False}),
        ("/v1/completions", {"model": model, "prompt": ["a = 1", "b"], "max_tokens": 1, "stop": "x",
                             "adasd": {"method": "vanilla", "k": 2}}),
        ("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2, "stream": True,
                             "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"model": model, "max_tokens": 2, "stop": ["\n"], "user": "bob",
                                  "messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hi", "name": "bob"}]}),
        ("/v1/chat/completions", {"model": model, "max_tokens": 1, "temperature": 0.7, "stream": True,
                                  "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        ("/v1/chat/completions", {"model": model, "max_completion_tokens": 1, "logprobs": True, "top_logprobs": 2,
                                  "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                               {"role": "user", "content": "q2"}], "adasd": {"method": "adasd"}}),
    ]


ESCAPES = ["\\udc80", "\\ud800", "\\udfff", "\\ud83d", "\\ude00", "\\ud800\\ud800", "\\ude00\\ud83d", "\\u0000",
           "\\u0001", "\\u001f", "\\u007f", "\\ufffe", "\\uffff", "\\ufeff", "\\u200b", "\\ud83d\\ude00", "\\\\",
           "\\\"", "\\/", "\\b\\f\\n\\r\\t", "\\x41", "\\u12", "\\uZZZZ", "\\", "\\U0001F600"]
BAD_BYTES = [b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xed\xa0\x80",
             b"\xed\xb2\x80", b"\xed\xa0\xbd\xed\xb8\x80", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82",
             b"\xf0\x9f\x98", b"\x00", b"\x01", b"\x1f", b"\x7f", b"\n", b"\t", b"\xc3\xa9", b"\xf0\x9f\x98\x80",
             b"\xef\xbb\xbf"]
NUMBERS = ["1e400", "-1e400", "1e-400", "NaN", "-NaN", "Infinity", "-Infinity", "-0", "0.0", "2.0", "1.5", "-1",
           "9" * 19, "9" * 20, "-9223372036854775809", "18446744073709551616", "9" * 4300, "9" * 4301, "9" * 60000,
           "1" + "0" * 400 + ".0", "0." + "0" * 5000 + "1", "0x10", "01", "+1", ".5", "1.", "1e", "1e+", "--1",
           "1" * 200 + "e" + "9" * 200, "true", "null", '"1"', "[1]"]
VALUES = ["true", "false", "null", "{}", "[]", "[null]", '{"a":1}', '""', '"\\udc80"', "[[[]]]", '{"":{"":""}}',
          "[1e400]", '[-1]', '[true]', '[1.0]', '["\\ud800"]', "0", "-1", '{"type":"text","text":"\\udc80"}']
JSON_TOKENS = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"null", b" ", b"\x00", b"//", b"/*", b"\xff"]

STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')
NUMBER_RE = re.compile(rb"(?<![\w.\"])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.])")


def _spans(body: bytes, pattern: re.Pattern) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(body)]


def _value_spans(body: bytes) -> list[tuple[int, int]]:
    """Spans of string values and numbers (not keys)."""
    out = [s for s in _spans(body, STRING_RE) if not body[s[1]:s[1] + 1] == b":"]
    return out + _spans(body, NUMBER_RE)


def _replace(body: bytes, span: tuple[int, int], new: bytes) -> bytes:
    return body[:span[0]] + new + body[span[1]:]


def _pick(rng: random.Random, spans: list[tuple[int, int]], body: bytes) -> tuple[int, int]:
    """One of `spans`; with none (a body mutated before), an empty span somewhere."""
    if spans:
        return rng.choice(spans)
    at = rng.randint(0, len(body))
    return at, at


def m_escape(rng: random.Random, body: bytes) -> bytes:
    """A JSON escape (lone surrogates, NUL, control characters, broken escapes) inside a string."""
    start, end = _pick(rng, _spans(body, STRING_RE), body)
    at = rng.randint(start + 1, end - 1) if end > start else start
    return body[:at] + rng.choice(ESCAPES).encode() * rng.choice([1, 1, 1, 3, 1000]) + body[at:]


def m_raw_bytes(rng: random.Random, body: bytes) -> bytes:
    """Bytes that are not valid UTF-8 (or are, at the edges) inside a string, raw."""
    start, end = _pick(rng, _spans(body, STRING_RE), body)
    at = rng.randint(start + 1, end - 1) if end > start else start
    return body[:at] + rng.choice(BAD_BYTES) * rng.choice([1, 1, 2, 100]) + body[at:]


def m_number(rng: random.Random, body: bytes) -> bytes:
    """A number replaced by an overlong, non-finite, malformed or mistyped one."""
    spans = _spans(body, NUMBER_RE)
    return _replace(body, rng.choice(spans), rng.choice(NUMBERS).encode()) if spans else m_value(rng, body)


def m_value(rng: random.Random, body: bytes) -> bytes:
    """A string or number value replaced by a value of another type."""
    return _replace(body, _pick(rng, _value_spans(body), body), rng.choice(VALUES).encode())


def m_nest(rng: random.Random, body: bytes) -> bytes:
    """A value wrapped in deep nesting (lists or objects)."""
    depth = rng.choice([2, 32, 500, 1000, 5000, 100_000])
    start, end = _pick(rng, _value_spans(body), body)
    opener, closer = (b"[", b"]") if rng.random() < 0.6 else (b'{"a":', b"}")
    return body[:start] + opener * depth + body[start:end] + closer * depth + body[end:]


def m_huge_array(rng: random.Random, body: bytes) -> bytes:
    """A value replaced by a huge array (token ids, strings, bad ids, nested lists)."""
    item = rng.choice([b"1", b"0", b"-1", b"1e400", b"2.5", b'"a"', b"[1]", b"[]", b"null", b'"\\udc80"',
                       b'{"role":"user","content":"a"}'])
    count = rng.choice([1000, 20_000, 100_000, 200_000])
    return _replace(body, _pick(rng, _value_spans(body), body), b"[" + b",".join([item] * count) + b"]")


def m_long_string(rng: random.Random, body: bytes) -> bytes:
    """A string value replaced by a long one (near and past the body limit)."""
    size = rng.choice([10_000, 500_000, MAX_BODY - len(body) - 100, MAX_BODY + 10])
    unit = rng.choice([b"a", b" ", b"\\u0000", b"\\udc80", b"\xc3\xa9", b"\\n"])
    return _replace(body, _pick(rng, _spans(body, STRING_RE), body), b'"' + unit * max(1, size // len(unit)) + b'"')


def m_flip(rng: random.Random, body: bytes) -> bytes:
    """A few random bytes replaced by random bytes."""
    data = bytearray(body or b" ")
    for _ in range(rng.choice([1, 1, 2, 8])):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def m_splice(rng: random.Random, body: bytes) -> bytes:
    """A JSON token inserted, a slice deleted or duplicated, or the body cut short."""
    a, b = sorted(rng.randrange(len(body) + 1) for _ in range(2))
    kind = rng.randrange(4)
    if kind == 0:
        return body[:a] + rng.choice(JSON_TOKENS) + body[a:]
    if kind == 1:
        return body[:a] + body[b:]
    if kind == 2:
        return body[:b] + body[a:b] + body[b:]
    return body[:a]


def m_key(rng: random.Random, body: bytes) -> bytes:
    """A duplicate or odd key: a second prompt / messages / role, a key with a lone surrogate, an empty key."""
    extra = rng.choice([b'"prompt":"\\udc80"', b'"prompt":[-1]', b'"messages":[{"role":"wizard","content":"x"}]',
                        b'"role":"\\udc80"', b'"\\udc80":1', b'"":null', b'"max_tokens":1e400', b'"n":1e9',
                        b'"logit_bias":{"\\ud800":1}', b'"stop":["\\u0000"]', b'"model":"\\udc80"'])
    return body[:1] + extra + b"," + body[1:]


def m_body(rng: random.Random, body: bytes) -> bytes:
    """The whole body replaced or re-encoded."""
    text = body.decode("utf-8", "surrogatepass")
    return rng.choice([b"", b"null", b"[]", b"1", b'"x"', b"{}", b"\xef\xbb\xbf" + body, b"\x00" + body,
                       text.encode("utf-16"), text.encode("utf-16-le"), text.encode("utf-32"), body + b"\x00",
                       body + b" " * 1000, body + b"garbage", body * 2, b'{"a":' * 400 + b"1" + b"}" * 400])


MUTATORS = {f.__name__[2:]: f for f in (m_escape, m_raw_bytes, m_number, m_value, m_nest, m_huge_array, m_long_string,
                                        m_flip, m_splice, m_key, m_body)}


def mutate(rng: random.Random, body: bytes) -> tuple[str, bytes]:
    name = rng.choice(list(MUTATORS))
    out = MUTATORS[name](rng, body)
    if rng.random() < 0.15:  # now and then a second mutation on top
        second = rng.choice(["escape", "raw_bytes", "number", "value", "key"])
        out, name = MUTATORS[second](rng, out), f"{name}+{second}"
    return name, out


# ---------------------------------------------------------------------------- a raw HTTP/1.1 connection


class ConnectionLost(Exception):
    pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class RawConnection:
    """One keep-alive HTTP/1.1 connection over a plain socket: it never reconnects by itself."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, timeout: float = 120):
        u = urlparse(check_loopback(base_url))
        self.host, self.port = u.hostname, u.port or 80
        self.headers = headers or {}
        self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        self.local_port = self.sock.getsockname()[1]
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _recv(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (TimeoutError, ConnectionError) as exc:
            raise ConnectionLost(f"{type(exc).__name__}: {exc}") from None
        if not chunk:
            raise ConnectionLost("the server closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._recv()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def request(self, method: str, path: str, body: bytes = b"") -> Response:
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in self.headers.items())]
        try:
            self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        except OSError as exc:
            raise ConnectionLost(f"send: {type(exc).__name__}: {exc}") from None
        status = int(self._line().split(b" ", 2)[1])
        headers = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int(self._line().split(b";")[0], 16):
                parts.append(self._exactly(size))
                self._exactly(2)
            while self._line():  # trailers, then the empty line
                pass
            data = b"".join(parts)
        else:
            data = self._exactly(int(headers.get("content-length", "0")))
        return Response(status, headers, data)


# ---------------------------------------------------------------------------- the run


@dataclass
class Report:
    cases: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    by_mutator: Counter = field(default_factory=Counter)
    failures: list[dict] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    @property
    def client_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if 400 <= s < 500)

    def summary(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (f"{self.cases} cases in {self.seconds:.1f} s: {self.client_errors} 4xx, {self.server_errors} 5xx, "
                f"{self.statuses.get(200, 0)} 200, {len(self.failures)} failures ({statuses})")


def check_response(r: Response, streamed: bool) -> str | None:
    """Why `r` is not an acceptable answer to a (possibly bad) request, or None."""
    if r.status >= 500:
        return f"status {r.status}"
    if r.headers.get("connection", "").lower() == "close":
        return f"status {r.status} with Connection: close"
    text = r.body.decode("utf-8", "replace")
    if any(m in text for m in TRACE_MARKERS):
        return f"status {r.status}: a traceback in the body"
    if r.status >= 400:
        try:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
        except Exception:
            return f"status {r.status}: not the OpenAI error shape: {text[:200]!r}"
    elif r.status == 200 and streamed and "text/event-stream" in r.headers.get("content-type", ""):
        if not text.rstrip().endswith("data: [DONE]"):
            return f"a stream that does not end in [DONE]: {text[-200:]!r}"
    return None


def run(base_url: str, headers: dict[str, str], model: str, cases: int, max_time: float, seed: int = 0,
        save_dir: str | Path | None = None, progress: bool = False) -> Report:
    rng = random.Random(seed)
    pool = [(path, json.dumps(body).encode()) for path, body in seeds(model)]
    good = json.dumps({"model": model, "prompt": "x", "max_tokens": 1}).encode()
    report, t0 = Report(), time.monotonic()
    conn = RawConnection(base_url, headers)
    try:
        while report.cases < cases and time.monotonic() - t0 < max_time:
            path, seed_body = rng.choice(pool)
            name, body = mutate(rng, seed_body)
            report.cases += 1
            report.by_mutator[name.split("+")[0]] += 1
            problem, status = None, None
            try:
                r = conn.request("POST", path, body)
                status = r.status
                report.statuses[status] += 1
                problem = check_response(r, streamed=b'"stream"' in body)
                if problem is None:
                    after = conn.request("POST", "/v1/completions", good)
                    if after.status != 200:
                        problem = f"the normal request after it got {after.status}: {after.body[:200]!r}"
            except ConnectionLost as exc:
                problem = f"connection lost: {exc}"
            if problem:
                failure = {"case": report.cases, "mutator": name, "path": path, "status": status, "problem": problem,
                           "body_head": body[:300].decode("utf-8", "backslashreplace")}
                report.failures.append(failure)
                if save_dir:
                    Path(save_dir).mkdir(parents=True, exist_ok=True)
                    (Path(save_dir) / f"case-{report.cases}.body").write_bytes(body)
                if progress:
                    print("FAIL", json.dumps(failure), flush=True)
                conn.close()
                conn = RawConnection(base_url, headers)  # go on with a fresh connection
            if progress and report.cases % 100 == 0 and report.cases < cases:
                report.seconds = time.monotonic() - t0
                print(report.summary(), flush=True)
    finally:
        conn.close()
    report.seconds = time.monotonic() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.reliability.bytefuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running server (loopback only)")
    p.add_argument("--api-key", default="sk-adasd-fuzz")
    p.add_argument("--model", default="tiny", help="the served model name (with --url)")
    p.add_argument("--target", default="tiny")
    p.add_argument("--draft", default="tiny")
    p.add_argument("--cases", type=int, default=2000)
    p.add_argument("--max-time", type=float, default=600, help="seconds for the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--save-dir", default=None, help="write each failing body here")
    args = p.parse_args(argv)

    srv, base, model = attach_or_start(args)
    try:
        report = run(base, {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}, model, args.cases,
                     args.max_time, seed=args.seed, save_dir=args.save_dir, progress=True)
    finally:
        if srv:
            srv.stop()
    print(report.summary())
    print("cases per mutation:", ", ".join(f"{k} {v}" for k, v in sorted(report.by_mutator.items())))
    for f in report.failures[:20]:
        print("FAIL", json.dumps(f))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
