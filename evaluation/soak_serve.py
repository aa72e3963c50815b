"""Soak test of ``align serve``: thousands of mixed requests from 16 concurrent clients.

Starts ``align serve`` itself on loopback, with an API key, on a tiny random model guided by a
PARM (the serve tests' kind of model; fast on the CPU) or with ``--model smollm2`` the embedded
SmolLM2 guided by an untrained PARM, and sends ``--requests`` requests, a seeded mix of

* good: chat or completion, whole or streamed, a random α, greedy or seeded sampling, a few
  new tokens with EOS ignored: must be a 200 with exactly that many tokens, else it is *lost*;
* malformed: not JSON, not an object, α off the simplex, ``max_tokens`` 0, no messages: 400;
* oversized: a body just past ``--max-body-bytes`` (with Content-Length, or chunked): 413;
* unauthenticated: no key, a wrong one, a prefix of it, another scheme: 401;
* disconnecting: a long stream closed after its first event, or a whole request whose client
  leaves before the answer: the server must free their rows.

It prints requests by kind (sent, answered as expected, what came otherwise), the good requests
lost (target 0), the server's resident memory after a warm-up and at the end (target: growth
≤ 5 %), rows still decoding once the server is idle (target 0), and wall time. Exit status 1
if a good request was lost, memory grew more than 5 % or a row was left decoding. Bounded:
``--requests`` in all, sending stops after ``--max-seconds``.

    python evaluation/soak_serve.py [--requests 3000] [--concurrency 16] [--max-tokens 4]
        [--model tiny|smollm2] [--max-seconds 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import http.client
import json
import os
import random
import secrets
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The server start-up and the port probe are the serving benchmark's.
sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
from serve_load import free_port, launch_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# kind: (share of the requests, the status it must get)
KINDS = {
    "good": (45, 200),
    "good stream": (15, 200),
    "malformed": (12, 400),
    "oversized": (6, 413),
    "unauthenticated": (12, 401),
    "disconnecting": (10, None),  # a stream's 200, or no answer read at all
}
GOOD = ("good", "good stream")
PROMPTS = [
    "Why is the sky blue?",
    "Hi",
    "Tell me about the weather on a long rainy day",
    "Name three colours.",
    "The quick brown fox",
]


@dataclass
class Result:
    kind: str
    status: int | None  # None: no status read (a client that left, or a failure)
    ok: bool
    note: str = ""  # what came instead, when not ok


def plan(count: int, seed: int) -> list[tuple[str, int]]:
    """``count`` requests as ``(kind, seed)``, the kinds drawn by their shares."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    return [(rng.choices(kinds, weights)[0], rng.getrandbits(32)) for _ in range(count)]


class Client:
    """Raw HTTP on loopback (a client library would refuse the malformed and oversized
    requests), one connection per request."""

    def __init__(self, port: int, api_key: str, max_tokens: int, max_body_bytes: int, model: str):
        self.port, self.key, self.max_tokens = port, api_key, max_tokens
        self.max_body_bytes, self.model = max_body_bytes, model

    def send(self, kind: str, seed: int) -> Result:
        rng = random.Random(seed)
        try:
            return getattr(self, "_" + kind.replace(" ", "_"))(rng)
        except (OSError, http.client.HTTPException, ValueError) as error:
            return Result(kind, None, False, f"{type(error).__name__}: {error}")

    def _connect(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}", **extra}

    def _request(self, rng: random.Random, stream: bool) -> tuple[str, dict, int]:
        alpha = rng.random()
        tokens = rng.randint(1, self.max_tokens)
        body = {
            "model": self.model,
            "max_tokens": tokens,
            "preference": [alpha, 1.0 - alpha],
            "ignore_eos": True,
            "stream": stream,
            **({"temperature": 0} if rng.random() < 0.5 else {"seed": rng.getrandbits(31)}),
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        prompt = rng.choice(PROMPTS)
        if rng.random() < 0.7:
            return (
                "/v1/chat/completions",
                {**body, "messages": [{"role": "user", "content": prompt}]},
                tokens,
            )
        return "/v1/completions", {**body, "prompt": prompt}, tokens

    def _good(self, rng: random.Random) -> Result:
        path, body, tokens = self._request(rng, stream=False)
        connection = self._connect()
        try:
            connection.request("POST", path, json.dumps(body), self._headers())
            response = connection.getresponse()
            answer = json.loads(response.read())
        finally:
            connection.close()
        if response.status != 200:
            return Result("good", response.status, False, _message(answer))
        choice = answer["choices"][0]
        got = answer["usage"]["completion_tokens"]
        if choice["finish_reason"] != "length" or got != tokens:
            return Result(
                "good", 200, False, f"{got} tokens of {tokens}, {choice['finish_reason']}"
            )
        return Result("good", 200, True)

    def _good_stream(self, rng: random.Random) -> Result:
        path, body, tokens = self._request(rng, stream=True)
        connection = self._connect()
        try:
            connection.request("POST", path, json.dumps(body), self._headers())
            response = connection.getresponse()
            raw = response.read().decode()
        finally:
            connection.close()
        if response.status != 200:
            return Result("good stream", response.status, False, raw[:200])
        events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
        if not events or events[-1] != "[DONE]":
            return Result("good stream", 200, False, f"no [DONE] at the end: {events[-1:]}")
        chunks = [json.loads(e) for e in events[:-1]]
        errors = [c["error"]["message"] for c in chunks if "error" in c]
        if errors:
            return Result("good stream", 200, False, f"error event: {errors[0]}")
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        got = chunks[-1].get("usage", {}).get("completion_tokens")
        if reasons[-1:] != ["length"] or got != tokens:
            return Result("good stream", 200, False, f"{got} tokens of {tokens}, {reasons[-1:]}")
        return Result("good stream", 200, True)

    def _malformed(self, rng: random.Random) -> Result:
        path, good, _ = self._request(rng, stream=False)
        changes = [
            lambda b: b"{" + json.dumps(b).encode()[:-3],  # cut short: not JSON
            lambda b: b"[1, 2]",
            lambda b: json.dumps({**b, "preference": [0.5, 0.6]}).encode(),
            lambda b: json.dumps({**b, "max_tokens": 0}).encode(),
            lambda b: json.dumps({**b, "temperature": "hot"}).encode(),
            lambda b: json.dumps(
                {k: v for k, v in b.items() if k not in ("messages", "prompt")}
            ).encode(),
        ]
        raw = rng.choice(changes)(good)
        return self._expect("malformed", 400, path, raw, self._headers())

    def _oversized(self, rng: random.Random) -> Result:
        path, body, _ = self._request(rng, stream=False)
        filler = "x" * (self.max_body_bytes + rng.randint(1, 4096))
        raw = json.dumps(
            {**body, "messages": [{"role": "user", "content": filler}], "prompt": filler}
        )
        if rng.random() < 0.5:
            return self._expect("oversized", 413, path, raw.encode(), self._headers())
        pieces = [raw[i : i + 65536].encode() for i in range(0, len(raw), 65536)]
        return self._expect("oversized", 413, path, iter(pieces), self._headers())  # chunked

    def _unauthenticated(self, rng: random.Random) -> Result:
        path, body, _ = self._request(rng, stream=False)
        headers = self._headers()
        how = rng.randrange(4)
        if how == 0:
            del headers["Authorization"]
        else:
            headers["Authorization"] = [
                None,
                "Bearer wrong-key",
                f"Bearer {self.key[:-1]}",
                f"Basic {self.key}",
            ][how]
        return self._expect("unauthenticated", 401, path, json.dumps(body).encode(), headers)

    def _disconnecting(self, rng: random.Random) -> Result:
        stream = rng.random() < 0.6
        path, body, _ = self._request(rng, stream=stream)
        body["max_tokens"] = 200  # long enough to be mid-decoding when the client leaves
        connection = self._connect()
        try:
            connection.request("POST", path, json.dumps(body), self._headers())
            if not stream:  # leave without reading the answer
                return Result("disconnecting", None, True)
            response = connection.getresponse()
            first = response.readline()
            if response.status != 200 or not first.startswith(b"data: "):
                return Result("disconnecting", response.status, False, first[:200].decode())
            return Result("disconnecting", 200, True)
        finally:
            _hang_up(connection)

    def _expect(self, kind: str, status: int, path: str, raw, headers: dict) -> Result:
        connection = self._connect()
        try:
            connection.request("POST", path, raw, headers)
            response = connection.getresponse()
            answer = json.loads(response.read())
        finally:
            connection.close()
        if response.status != status or "message" not in answer.get("error", {}):
            return Result(kind, response.status, False, _message(answer))
        return Result(kind, response.status, True)


def _hang_up(connection: http.client.HTTPConnection) -> None:
    """Close at once (a shutdown, not only a close: the response may still hold the socket)."""
    try:
        if connection.sock is not None:
            connection.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()


def _message(answer: dict) -> str:
    return str(answer.get("error", {}).get("message", answer))[:200]


def run_soak(client: Client, requests: list[tuple[str, int]], concurrency: int, deadline: float):
    """The results of ``requests`` sent by ``concurrency`` threads (those not yet sent at the
    ``deadline``, a ``time.monotonic()``, are skipped)."""

    def one(item: tuple[str, int]) -> Result | None:
        return None if time.monotonic() > deadline else client.send(*item)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return [r for r in pool.map(one, requests) if r is not None]


def health(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def wait_idle(port: int, timeout: float = 60) -> dict:
    """``/health`` once nothing is in flight or decoding (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        state = health(port)
        if (not state["in_flight"] and not state["decoding"]) or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def summary(results: list[Result]) -> tuple[list[str], int]:
    """The table's lines and the good requests lost."""
    by_kind = collections.defaultdict(list)
    for result in results:
        by_kind[result.kind].append(result)
    lines = [f"{'kind':<16}{'sent':>7}{'expected':>10}{'as expected':>13}  otherwise"]
    for kind, (_, status) in KINDS.items():
        group = by_kind.get(kind, [])
        bad = collections.Counter(
            f"{r.status or 'no answer'}: {r.note[:60]}" for r in group if not r.ok
        )
        other = "; ".join(f"{n}× {what}" for what, n in bad.most_common(3)) or "-"
        expected = {None: "200/none"}.get(status, str(status))
        ok = sum(r.ok for r in group)
        lines.append(f"{kind:<16}{len(group):>7}{expected:>10}{ok:>13}  {other}")
    ok = sum(r.ok for r in results)
    lines.append(f"{'all':<16}{len(results):>7}{'':>10}{ok:>13}")
    lost = sum(not r.ok for r in results if r.kind in GOOD)
    return lines, lost


# --- the server ---------------------------------------------------------------------------


def make_models(folder: Path, model: str) -> tuple[str, Path]:
    """``(base, PARM folder)``: a tiny random base and a PBLoRA PARM on it (their answers are
    noise, their costs those of a real route), or the embedded SmolLM2 and an untrained one."""
    import torch
    from peft import get_peft_model

    from align.adapters import PBLoraConfig

    if model == "tiny":
        from align.testing import tiny_causal_lm

        base, tokenizer = tiny_causal_lm(seed=0)
        base_name = str(folder / "base")
        base.save_pretrained(base_name)
        tokenizer.save_pretrained(base_name)
    else:
        from align.models import load_model

        base, _ = load_model()
        base_name = "smollm2-135m-instruct"
    torch.manual_seed(0)
    config = PBLoraConfig(objectives=["helpful", "harmless"], init_weights=False, lora_dropout=0.0)
    get_peft_model(base, config).save_pretrained(folder / "parm")
    return base_name, folder / "parm"


def start_server(base: str, parm: Path, port: int, api_key: str, options: list[str]):
    command = [
        sys.executable,
        "-m",
        "align.cli",
        "serve",
        "--base",
        base,
        "--route",
        f"{{kind: parm, adapter: '{parm}', beta: 1.0}}",
        "--name",
        "soak",
        "--port",
        str(port),
        *options,
    ]
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "ALIGN_API_KEY": api_key}
    return launch_server(command, port, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=4, help="of a good request, at most")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the server's")
    parser.add_argument("--max-seconds", type=float, default=600, help="stop sending after")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the requests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import psutil  # accelerate's dependency

    requests = plan(args.requests, args.seed)
    warmup = max(1, int(len(requests) * args.warmup))
    api_key = secrets.token_urlsafe(24)
    options = [
        "--max-batch", "16",
        "--max-queue", str(4 * args.concurrency),  # never full: a good request is never a 429
        "--max-body-bytes", str(args.max_body_bytes),
        "--request-timeout", "120",  # every request arms a timer (that must not leak)
        "--threads", "1",  # tiny tensors; the clients need the other core
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        base, parm = make_models(Path(scratch), args.model)
        port = free_port()
        server = start_server(base, parm, port, api_key, options)
        try:
            memory = psutil.Process(server.pid)
            client = Client(port, api_key, args.max_tokens, args.max_body_bytes, "soak")
            started = time.monotonic()
            deadline = started + args.max_seconds
            results = run_soak(client, requests[:warmup], args.concurrency, deadline)
            wait_idle(port)
            rss_start = memory.memory_info().rss
            results += run_soak(client, requests[warmup:], args.concurrency, deadline)
            wall = time.monotonic() - started
            state = wait_idle(port)
            time.sleep(1.0)
            rss_end = memory.memory_info().rss
        finally:
            server.terminate()
            status = server.wait(60)
    lines, lost = summary(results)
    growth = rss_end / rss_start - 1
    print(
        f"align serve soak: {args.model} model + PARM, {len(results)} of {len(requests)} "
        f"requests sent by {args.concurrency} clients, good ones up to {args.max_tokens} new "
        f"tokens; {os.cpu_count()} CPU cores"
    )
    print("\n".join(lines))
    print(f"requests served (a response read): {sum(r.status is not None for r in results)}")
    print(f"lost good requests: {lost}")
    print(
        f"server RSS after warm-up ({warmup} requests): {rss_start / 2**20:.1f} MiB, at the "
        f"end: {rss_end / 2**20:.1f} MiB, growth {100 * growth:+.2f} %"
    )
    print(
        f"once idle: {state['decoding']} rows decoding, {state['in_flight']} in flight; "
        f"cancelled rows {state['cancelled']}, peak rows {state['peak_rows']}"
    )
    print(f"wall {wall:.1f} s ({len(results) / wall:.1f} requests/s); server exit status {status}")
    failed = lost > 0 or growth > 0.05 or state["decoding"] or state["in_flight"]
    if len(results) < len(requests):
        print(
            f"stopped at --max-seconds {args.max_seconds:g}: {len(requests) - len(results)} not sent"
        )
    sys.exit(1 if failed or status != 0 else 0)


if __name__ == "__main__":
    main()
