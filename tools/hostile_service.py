#!/usr/bin/env python3
"""Runs a corpus of hostile and careless HTTP requests against `hybridiff serve`.

Starts the binary on 127.0.0.1 (a free port; nothing else is contacted) with the embedded
default model, `hybrid` on 2 ranks with fixed switching thresholds (so that step counts
are refused by the strategy), small timeouts and a small image store, then sends each case
over its own raw socket and checks the answer. The kinds (issue 28):

- a keyless service that web pages cannot drive: Host and Origin of other sites, bodies
  an HTML form can send (text/plain, form encodings, no type), repeated Authorization /
  Host / Content-Type headers, `--allowed-host`, links built from the accepted host only,
  the page's Content-Security-Policy, nosniff and no framing;
- requests the job would refuse, answered 400 before they queue, naming the API field
  (no command-line flags in the words), and the limits `/v1/models` reports;
- every request answered and counted: half-closed clients (`shutdown(SHUT_WR)`, as
  `nc -N`), refusals of the HTTP layer (malformed heads, too many or too large headers, a
  long target, a head or body that never ends, a body too large) in the OpenAI error
  shape, a stream that ends in an error event counted under that error, and /metrics
  adding up to exactly the requests sent;
- Ctrl-C during a running job: the job is cancelled, its client answered 503, exit 0.

A case is a FINDING when the answer is missing, has the wrong status, is not the OpenAI
error shape where it must be, or the service dies; the run stops at a deadline (default
50 s). Prints one line per case and a summary; exits 1 on findings.

    python3 tools/hostile_service.py [--bin target/debug/hybridiff] [--deadline 50]

Only the Python standard library is used.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The service's switching thresholds are fixed, so hybrid needs tau_cap + k = 5 steps.
K, TAU_CAP = 2, 3
MIN_STEPS = K + TAU_CAP


class Finding(Exception):
    pass


class Answer:
    """What the server sent on one connection: interim statuses, then the final answer."""

    def __init__(self, raw):
        self.raw = raw
        self.interim = []
        self.status = None
        self.headers = {}
        self.body = b""
        rest = raw
        while True:
            head, sep, after = rest.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.decode("latin-1").split("\r\n")
            m = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
            if not m:
                return
            status = int(m.group(1))
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers.setdefault(k.strip().lower(), []).append(v.strip())
            if 100 <= status < 200:
                self.interim.append(status)
                rest = after
                continue
            self.status, self.headers = status, headers
            n = headers.get("content-length")
            self.body = after[: int(n[0])] if n else after
            return

    def header(self, name):
        v = self.headers.get(name)
        return v[0] if v else None

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def describe(self):
        if self.status is None:
            return f"no answer ({self.raw[:80]!r})"
        return f"{self.status} {self.body[:160].decode('utf-8', 'replace')}"


def exchange(port, data, half_close=False, pause=None, timeout=15):
    """Sends `data` (then `pause` seconds and nothing more, or a half-close) and reads until
    the server closes the connection."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            got += chunk
        return Answer(got)
    finally:
        s.close()


def request(method, path, host, body=None, headers=(), version="1.1"):
    lines = [f"{method} {path} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += list(headers)
    data = b""
    if body is not None:
        data = body.encode() if isinstance(body, str) else body
        lines.append(f"Content-Length: {len(data)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


JSON = "Content-Type: application/json"


def gen(body):
    return json.dumps(body)


def expect_error(a, status, param=None, code=None):
    if a.status != status:
        raise Finding(f"expected {status}, got {a.describe()}")
    v = a.json()
    e = v.get("error") if isinstance(v, dict) else None
    if not (isinstance(e, dict) and e.get("message") and e.get("type") and "param" in e and "code" in e):
        raise Finding(f"not the OpenAI error shape: {a.describe()}")
    if param is not None and e["param"] != param:
        raise Finding(f"param {e['param']!r}, expected {param!r}: {a.describe()}")
    if code is not None and e["code"] != code:
        raise Finding(f"code {e['code']!r}, expected {code!r}: {a.describe()}")
    if a.header("x-content-type-options") != "nosniff":
        raise Finding(f"no nosniff on the refusal: {a.headers}")
    return e


def expect_ok(a):
    if a.status != 200:
        raise Finding(f"expected 200, got {a.describe()}")
    return a.json()


class Server:
    def __init__(self, binary, cache):
        args = [
            binary, "serve", "--port", "0", "--host", "127.0.0.1",
            "--strategy", "hybrid", "--world-size", "2", "--threads-per-rank", "1",
            "--k", str(K), "--tau-cap", str(TAU_CAP),
            "--allowed-host", "images.example",
            "--max-n", "2", "--max-stored-images", "2",
            "--header-timeout", "2", "--body-timeout", "2", "--request-timeout", "4",
            "--max-body-bytes", "4096",
        ]
        env = dict(os.environ, HYBRIDIFF_CACHE=cache)
        env.pop("HYBRIDIFF_API_KEY", None)
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self.stderr = []
        threading.Thread(target=lambda: self.stderr.extend(self.p.stderr), daemon=True).start()
        line = self.p.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.p.kill()
            raise SystemExit(f"hybridiff serve did not start: {line!r}\n{''.join(self.stderr)}")
        self.port = int(m.group(1))
        self.host = f"127.0.0.1:{self.port}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "debug" / "hybridiff"))
    ap.add_argument("--deadline", type=float, default=50.0)
    args = ap.parse_args()
    t0 = time.monotonic()
    cache = tempfile.mkdtemp(prefix="hybridiff-hostile-service-")
    srv = Server(args.bin, cache)
    port, own = srv.port, srv.host
    sent = {"n": 0}  # requests that reached a route or were refused by the HTTP layer
    results = []

    def send(data, **kw):
        sent["n"] += 1
        return exchange(port, data, **kw)

    def post(body, host=None, headers=(JSON,), **kw):
        host = own if host is None else host
        return send(request("POST", "/v1/images/generations", host, body, headers), **kw)

    cases = []

    def case(name):
        def wrap(f):
            cases.append((name, f))
            return f
        return wrap

    small = {"prompt": "a red circle", "num_inference_steps": MIN_STEPS, "seed": 1}

    # ---- a keyless service that web pages cannot drive
    @case("issue example: text/plain from evil.example through a rebound name")
    def _():
        expect_error(post("{\"prompt\": \"x\"}", host="evil.example",
                          headers=("Content-Type: text/plain", "Origin: http://evil.example")), 403)

    for h in ["evil.example", f"evil.example:{port}", f"localhost:{port + 1}", f"localhost.evil.example:{port}"]:
        @case(f"Host {h}")
        def _(h=h):
            expect_error(post(gen(small), host=h), 403, code="host_not_allowed")

    for h in ["", "user@127.0.0.1", "a b"]:
        @case(f"malformed Host {h!r}")
        def _(h=h):
            expect_error(post(gen(small), host=h), 400)

    @case("no Host (HTTP/1.0)")
    def _():
        expect_error(send(request("POST", "/v1/images/generations", None, gen(small), (JSON,), "1.0")), 400,
                     code="missing_host")

    for o in ["http://evil.example", "null", f"http://evil.example:{port}", f"http://localhost:{port + 1}"]:
        @case(f"Origin {o}")
        def _(o=o):
            expect_error(post(gen(small), headers=(JSON, f"Origin: {o}")), 403, code="origin_not_allowed")

    for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
               "application/json; charset=iso-8859-1", None]:
        @case(f"Content-Type {ct}")
        def _(ct=ct):
            hs = () if ct is None else (f"Content-Type: {ct}",)
            expect_error(post(gen(small), headers=hs), 415, code="unsupported_media_type")

    for dup in [("Authorization: Bearer a", "Authorization: Bearer b"), (f"Host: {own}",),
                ("Content-Type: application/json",)]:
        @case(f"repeated {dup[0].split(':')[0]}")
        def _(dup=dup):
            expect_error(post(gen(small), headers=(JSON,) + dup), 400, code="duplicate_header")

    @case("the service's own page and origin")
    def _():
        a = send(request("GET", "/", own))
        if a.status != 200:
            raise Finding(a.describe())
        csp = a.header("content-security-policy") or ""
        if "script-src 'sha256-" not in csp or "unsafe-inline" in csp or a.header("x-frame-options") != "DENY" \
                or a.header("x-content-type-options") != "nosniff":
            raise Finding(f"page headers: {a.headers}")
        v = expect_ok(post(gen(small), host=f"localhost:{port}", headers=(JSON, f"Origin: http://{own}")))
        if not v["data"][0].get("b64_json"):
            raise Finding(f"no image: {v}")

    @case("--allowed-host: links built from the accepted host, all live")
    def _():
        a = post(gen(dict(small, n=2, response_format="url")), host="images.example")
        v = expect_ok(a)
        if a.header("x-content-type-options") != "nosniff":
            raise Finding(f"API answer without nosniff: {a.headers}")
        for d in v["data"]:
            url = d["url"]
            if not url.startswith("http://images.example/v1/images/files/"):
                raise Finding(f"link {url}")
            b = send(request("GET", url[len("http://images.example"):], own))
            if b.status != 200 or not b.body.startswith(b"\x89PNG"):
                raise Finding(f"{url}: {b.describe()}")

    # ---- requests the job would refuse: 400 before queueing, in an API client's words
    for body, param in [
        (dict(small, num_inference_steps=1), "num_inference_steps"),
        (dict(small, num_inference_steps=MIN_STEPS - 1), "num_inference_steps"),
        (dict(small, size="30x32"), "size"),
        (dict(small, size="4096x256"), "size"),
        (dict(small, n=3, response_format="url"), "n"),
        (dict(small, guidance_scale=51), "guidance_scale"),
    ]:
        @case(f"refused before queueing: {json.dumps({k: body[k] for k in body if k != 'prompt'})}")
        def _(body=body, param=param):
            e = expect_error(post(gen(body)), 400, param=param)
            if "--" in e["message"]:
                raise Finding(f"worded as command-line flags: {e['message']}")

    @case("/v1/models says the limits")
    def _():
        v = expect_ok(send(request("GET", "/v1/models", own)))
        lim = v["data"][0]["hybridiff"]["limits"]
        if lim["num_inference_steps"]["min"] != MIN_STEPS or lim["n"]["max"] != 2:
            raise Finding(f"limits {lim}")

    # ---- every request answered and counted
    @case("half-closed client (nc -N) gets its image")
    def _():
        a = post(gen(small), half_close=True)
        v = expect_ok(a)
        if not v["data"][0].get("b64_json") or any(s != 102 for s in a.interim):
            raise Finding(a.describe())

    @case("half-closed client gets its refusal")
    def _():
        expect_error(post(gen(dict(small, n=0)), half_close=True), 400, param="n")

    head_cases = [
        ("malformed request line", b"GARBAGE\r\n\r\n", 400),
        ("invalid header name", f"GET / HTTP/1.1\r\nHost: {own}\r\nBad Header: x\r\n\r\n".encode(), 400),
        ("150 headers", (f"GET / HTTP/1.1\r\nHost: {own}\r\n" + "".join(f"X-{i}: v\r\n" for i in range(150))
                         + "\r\n").encode(), 431),
        ("a 70 KB header", f"GET / HTTP/1.1\r\nHost: {own}\r\nX-Big: {'a' * 70000}\r\n\r\n".encode(), 431),
        ("a 9 KB target", request("GET", "/v1/models?" + "q" * 9000, own), 414),
        ("conflicting Content-Lengths",
         f"POST /v1/images/generations HTTP/1.1\r\nHost: {own}\r\n{JSON}\r\nContent-Length: 5\r\n"
         f"Content-Length: 6\r\n\r\n{{}}".encode(), 400),
        ("a body over --max-body-bytes", request("POST", "/v1/images/generations", own, "x" * 5000, (JSON,)), 413),
    ]
    for name, data, status in head_cases:
        @case(name)
        def _(data=data, status=status):
            expect_error(send(data), status)

    def slow_cases():
        """Cases that wait for a timeout, run side by side."""
        out = {}

        def half_head():
            out["head"] = send(f"GET / HTTP/1.1\r\nHost: {own}\r\n".encode())

        def half_body():
            out["body"] = send(f"POST /v1/images/generations HTTP/1.1\r\nHost: {own}\r\n{JSON}\r\n"
                               f"Content-Length: 100\r\n\r\n{{\"prompt\":".encode())

        def stream():
            # Longer than --request-timeout 4: ends in an error event, counted 504.
            out["stream"] = post(gen({"prompt": "a", "stream": True, "size": "256x256",
                                      "num_inference_steps": 150}))

        ts = [threading.Thread(target=f) for f in (half_head, half_body, stream)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        return out

    slow = {}

    @case("head and body that never end, a stream that times out")
    def _():
        slow.update(slow_cases())
        expect_error(slow["head"], 408, code="header_timeout")
        expect_error(slow["body"], 408, code="body_timeout")
        text = slow["stream"].body.decode("utf-8", "replace")
        if slow["stream"].status != 200 or "event: error" not in text or '"status":504' not in text:
            raise Finding(f"stream: {slow['stream'].describe()}")

    @case("/metrics counts every request once, under its real status")
    def _():
        sent["n"] += 1  # this one
        a = exchange(port, request("GET", "/metrics", own))
        text = a.body.decode()
        total, by_status = 0, {}
        for line in text.splitlines():
            m = re.match(r'hybridiff_http_requests_total\{route="([^"]*)",status="(\d+)"\} (\S+)', line)
            if m:
                n = int(float(m.group(3)))
                total += n
                by_status[m.group(2)] = by_status.get(m.group(2), 0) + n
        # This request is counted when it ends, after its own text was made.
        if total != sent["n"] - 1:
            raise Finding(f"{total} requests counted, {sent['n'] - 1} sent: {by_status}")
        for status in ("403", "415", "400", "431", "414", "413", "408", "504"):
            if by_status.get(status, 0) == 0:
                raise Finding(f"no request counted under {status}: {by_status}")

    # ---- Ctrl-C during a running job
    @case("Ctrl-C cancels the running job, answers it 503 and exits 0")
    def _():
        def health():
            return exchange(port, request("GET", "/health", own)).json() or {}

        # The stream's cancelled job may still be stopping: wait for idle ranks first.
        deadline = time.monotonic() + 15
        while health().get("running") and time.monotonic() < deadline:
            time.sleep(0.05)
        box = {}
        t = threading.Thread(target=lambda: box.update(a=post(gen({"prompt": "a", "size": "256x256",
                                                                   "num_inference_steps": 150}))))
        t.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if health().get("running"):
                break
            time.sleep(0.05)
        else:
            raise Finding("the long job never ran")
        srv.p.send_signal(signal.SIGINT)
        t.join(20)
        if "a" not in box:
            raise Finding("the running request got no answer within 20 s of Ctrl-C")
        expect_error(box["a"], 503, code="shutting_down")
        try:
            code = srv.p.wait(15)
        except subprocess.TimeoutExpired:
            raise Finding("still running 15 s after Ctrl-C")
        if code != 0:
            raise Finding(f"exit {code} after Ctrl-C")

    findings = 0
    for name, f in cases:
        if time.monotonic() - t0 > args.deadline:
            print(f"DEADLINE  {name}: not run ({args.deadline:.0f} s passed)")
            findings += 1
            continue
        if srv.p.poll() is not None and "Ctrl-C" not in name:
            print(f"FINDING   {name}: the service exited ({srv.p.returncode})")
            findings += 1
            continue
        try:
            f()
            print(f"ok        {name}")
        except Finding as e:
            findings += 1
            print(f"FINDING   {name}: {e}")
        except OSError as e:
            findings += 1
            print(f"FINDING   {name}: {e!r}")
    if srv.p.poll() is None:
        srv.p.kill()
        srv.p.wait()
    shutil.rmtree(cache, ignore_errors=True)
    err = "".join(srv.stderr)
    if "panicked" in err:
        findings += 1
        print(f"FINDING   the service panicked:\n{err}")
    print(f"{len(cases)} cases, {findings} finding(s), {time.monotonic() - t0:.1f} s")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
