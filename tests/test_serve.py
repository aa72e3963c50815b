"""``align serve``: continuous batching (DecodingBatch) and the OpenAI-compatible server.

The server tests run a live uvicorn server on 127.0.0.1 (a free port) in a thread of the test
process and talk to it with the official ``openai`` client (and raw HTTP where a client would
refuse to send the request), on tiny random models; one slow test serves the embedded SmolLM2
with a PARM through the ``align serve`` command.
"""

import concurrent.futures
import contextlib
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from launching import free_port
from peft import get_peft_model

from align.adapters import PBLoraConfig
from align.chat import format_prompt
from align.decoding import (
    DecodingBatch,
    Sampler,
    choose_tokens,
    genarm_guidance,
    guided_decode,
    mod_guidance,
    parm_guidance,
    policy_guidance,
)
from align.testing import tiny_causal_lm

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OBJECTIVES = ("helpful", "harmless")
PROMPTS = [
    "Why is the sky blue?",
    "Hi",
    "Tell me about the weather on a long rainy day",
    "Name three colours.",
]


def tiny(seed):
    """A tiny LM with sharp, distinct next-token preferences (see test_guided_decoding)."""
    model = tiny_causal_lm(seed=seed, tie_word_embeddings=False)[0]
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
    return model


def pblora(model):
    """A PBLoRA adapter whose α visibly changes the model (B scaled up from its random init)."""
    torch.manual_seed(7)
    config = PBLoraConfig(objectives=list(OBJECTIVES), init_weights=False, lora_dropout=0.0)
    arm = get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, p in arm.named_parameters():
            if "pblora_B" in name:
                p.mul_(50)
    return arm


# --- DecodingBatch ------------------------------------------------------------------------


def _guided(mode):
    """``(base, guidance)`` of every way a batch can be guided."""
    if mode == "parm-shared":  # the PARM is the base plus its adapter: one stacked forward
        arm = pblora(tiny(2))
        return arm.get_base_model(), parm_guidance(arm, beta=0.5)
    base = tiny_causal_lm(seed=0)[0]
    if mode == "parm":
        return base, parm_guidance(pblora(tiny(1)), beta=0.5)
    if mode == "genarm":
        return base, genarm_guidance({"helpful": tiny(2), "harmless": tiny(3)}, beta=0.5)
    if mode == "mod":
        return None, mod_guidance({"helpful": tiny(4), "harmless": tiny(5)})
    if mode == "mod-jensen-shannon":  # MOD's f-divergence form: the base as π_ref
        policies = {"helpful": tiny(4), "harmless": tiny(5)}
        return base, mod_guidance(policies, divergence="jensen_shannon")
    return None, policy_guidance(pblora(tiny(6)))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_causal_lm(seed=0)[1]


def _prompt_ids(tokenizer, text):
    return tokenizer(format_prompt(tokenizer, text), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "mode", ["parm-shared", "parm", "genarm", "mod", "mod-jensen-shannon", "policy"]
)
def test_rows_joining_and_leaving_mid_decoding_get_the_tokens_they_get_alone(tokenizer, mode):
    """Rows of different α and prompt lengths join a running batch at different steps (a
    1-token prompt included: nothing to prefill) and leave after different numbers of tokens;
    each row's greedy tokens equal its tokens decoding alone, which equal the one-shot
    guided_decode's; α changes the tokens (so a batch that mixed up rows' α would fail)."""
    base, guidance = _guided(mode)
    prompts = [_prompt_ids(tokenizer, p) for p in PROMPTS[:3]] + [[tokenizer.bos_token_id]]
    alphas = [[1.0, 0.0], [0.3, 0.7], [0.0, 1.0], [0.5, 0.5]]
    lengths = [14, 4, 9, 6]
    joins = {0: [0], 2: [1, 2], 5: [3]}  # step -> rows joining then

    def alone(row, alpha):
        with DecodingBatch(base, guidance, vocab_size=len(tokenizer)) as batch:
            batch.add(["only"], [prompts[row]], [alpha])
            tokens = []
            for _ in range(lengths[row]):
                token = batch.step().argmax(-1)
                batch.feed(token)
                tokens.append(int(token))
            return tokens

    solo = [alone(row, alphas[row]) for row in range(4)]
    # The one-shot decoder (prefill of the whole prompt) picks the same tokens.
    for row in range(3):
        ids = torch.tensor([prompts[row]])
        reference = guided_decode(
            base,
            guidance,
            ids,
            torch.ones_like(ids),
            alphas[row],
            max_new_tokens=lengths[row],
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
            vocab_size=len(tokenizer),
        )
        assert reference[0, ids.shape[1] :].tolist() == solo[row], row
    assert alone(0, alphas[2]) != solo[0]  # α matters for these models

    decoded = {row: [] for row in range(4)}
    widths = []
    with DecodingBatch(base, guidance, vocab_size=len(tokenizer)) as batch:
        step = 0
        while step == 0 or len(batch):
            if step in joins:
                rows = joins[step]
                batch.add(rows, [prompts[r] for r in rows], [alphas[r] for r in rows])
            tokens = batch.step().argmax(-1)
            batch.feed(tokens)
            finished = []
            for row, token in zip(batch.keys, tokens.tolist()):
                decoded[row].append(token)
                if len(decoded[row]) == lengths[row]:
                    finished.append(row)
            batch.remove(finished)
            widths.append(batch.width)
            step += 1
        assert batch.width == 0
    for row in range(4):
        assert decoded[row] == solo[row], row
    # Columns that became padding for every row were cut: the cache narrowed while decoding.
    assert any(later < earlier for earlier, later in zip(widths, widths[1:]) if later)


def test_batch_bookkeeping_errors_are_clear(tokenizer):
    base, guidance = _guided("genarm")
    batch = DecodingBatch(base, guidance, vocab_size=len(tokenizer))
    with pytest.raises(RuntimeError, match="no rows"):
        batch.step()
    batch.add(["a"], [[1, 2, 3]], [0.5, 0.5])
    with pytest.raises(ValueError, match="new and unique"):
        batch.add(["a"], [[4]], [0.5, 0.5])
    with pytest.raises(ValueError, match="non-empty"):
        batch.add(["b"], [[]], [0.5, 0.5])
    with pytest.raises(ValueError, match="sums to"):
        batch.add(["b"], [[4]], [0.5, 0.6])
    scores = batch.step()
    with pytest.raises(RuntimeError, match="feed"):
        batch.step()
    with pytest.raises(ValueError, match="1 rows"):
        batch.feed([1, 2])
    batch.feed(scores.argmax(-1))
    with pytest.raises(KeyError, match="'z'"):
        batch.remove(["z"])
    batch.close()
    with pytest.raises(RuntimeError, match="closed"):
        batch.add(["c"], [[1]], [0.5, 0.5])


def test_seeded_sampling_rows_draw_from_their_own_generator(tokenizer):
    """A sampled row's tokens depend on its seed, not on which rows sample beside it."""
    base, guidance = _guided("genarm")
    with DecodingBatch(base, guidance, vocab_size=len(tokenizer)) as batch:
        batch.add([0, 1], [[5, 6, 7], [8, 9]], [[0.5, 0.5], [1.0, 0.0]])
        scores = batch.step()
    first = choose_tokens(scores, [Sampler(), Sampler(1.0, 0.9, generator=_gen(3))])
    again = choose_tokens(scores[1:], [Sampler(1.0, 0.9, generator=_gen(3))])
    assert first[1] == again[0] and first[0] == scores[0].argmax()
    draws = {int(choose_tokens(scores[1:], [Sampler(1.5, generator=_gen(s))])) for s in range(20)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="top_p"):
        Sampler(1.0, top_p=0.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- the server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """A tiny base and a PARM for it (its answers vary with the prompt and with α)."""
    root = tmp_path_factory.mktemp("serve_models")
    tokenizer = tiny_causal_lm(seed=0)[1]
    tiny(2).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    pblora(tiny(2)).save_pretrained(root / "parm")
    return root


class LiveServer:
    """uvicorn serving an app on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.socket.close()

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def post(self, path, body: bytes):
        """``(status, JSON body)`` of a raw POST (for bodies a client would not send)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())

    def health(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read())

    def idle(self, timeout=30):
        """``/health`` once no request is in flight and no row is decoding (the worker drops
        a finished row just after its client got the answer)."""
        deadline = time.monotonic() + timeout
        while (health := self.health())["decoding"] or health["in_flight"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.02)
        return health


@pytest.fixture(scope="module")
def server(model_folders):
    from align.serve import ServedModel, create_app

    served = ServedModel(
        {"kind": "parm", "adapter": str(model_folders / "parm"), "beta": 1.0},
        base=str(model_folders / "base"),
        name="tiny-parm",
        preference="helpful=0.6,harmless=0.4",
    )
    with LiveServer(create_app(served, max_batch=8)) as live:
        yield live
    served.close()


def chat(client, prompt, alpha=None, max_tokens=8, **options):
    extra = {"return_token_ids": True, "ignore_eos": True, **options.pop("extra", {})}
    if alpha is not None:
        extra["preference"] = alpha
    return client.chat.completions.create(
        model="tiny-parm",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=options.pop("temperature", 0),
        extra_body=extra,
        **options,
    )


def test_models_and_health_describe_the_served_route(server):
    client = server.client()
    (card,) = client.models.list().data
    assert card.id == "tiny-parm" and card.owned_by == "align"
    assert card.model_extra["objectives"] == list(OBJECTIVES)
    assert card.model_extra["default_preference"] == {"helpful": 0.6, "harmless": 0.4}
    assert card.model_extra["route"]["kind"] == "parm"
    assert client.models.retrieve("tiny-parm").id == "tiny-parm"
    health = server.health()
    assert health["status"] == "ok" and health["max_batch"] == 8


def test_greedy_answers_are_token_identical_alone_and_batched_with_joins_midway(server):
    """A long streamed request decodes while others of different α and lengths join it (two
    at once, one after another finished) and leave; every answer equals its answer alone."""
    client = server.client()
    requests = {
        "long": (PROMPTS[0], {"helpful": 0.9, "harmless": 0.1}, 300),
        "short": (PROMPTS[1], [0.2, 0.8], 5),
        "mid": (PROMPTS[2], "helpful=0.5,harmless=0.5", 40),
        "late": (PROMPTS[3], None, 12),  # the server's default α
    }
    alone = {}
    for name, (prompt, alpha, tokens) in requests.items():
        answer = chat(client, prompt, alpha, tokens)
        alone[name] = (answer.choices[0].token_ids, answer.choices[0].message.content)
        assert len(alone[name][0]) == tokens and answer.usage.completion_tokens == tokens
    other_alpha = chat(client, PROMPTS[0], [0.1, 0.9], 300).choices[0].token_ids
    assert other_alpha != alone["long"][0]  # α changes the answer
    before = server.health()

    streaming = threading.Event()
    streamed = {}

    def long_stream():
        prompt, alpha, tokens = requests["long"]
        stream = chat(client, prompt, alpha, tokens, stream=True)
        pieces = []
        for chunk in stream:
            choice = chunk.choices[0]
            if choice.delta.content:
                pieces.append(choice.delta.content)
                streaming.set()
            if choice.finish_reason is not None:
                streamed["long"] = (choice.token_ids, "".join(pieces), choice.finish_reason)
        streaming.set()

    def one(name):
        prompt, alpha, tokens = requests[name]
        answer = chat(client, prompt, alpha, tokens)
        return answer.choices[0].token_ids, answer.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        long = pool.submit(long_stream)
        assert streaming.wait(60)
        short, mid = pool.submit(one, "short"), pool.submit(one, "mid")
        streamed["short"] = short.result(60)
        streamed["late"] = pool.submit(one, "late").result(60)
        streamed["mid"] = mid.result(60)
        long.result(120)
    assert streamed["long"][2] == "length"
    for name in requests:
        assert streamed[name][:2] == alone[name], name
    after = server.idle()
    # They really were decoded together: three requests joined the long one mid-decoding.
    assert after["joined_running"] - before["joined_running"] >= 3
    assert after["peak_rows"] >= 3


def test_streams_are_openai_chunks_then_done_and_match_the_whole_answer(server):
    client = server.client()
    whole = chat(client, PROMPTS[2], [0.4, 0.6], 12)
    raw = _sse_lines(
        server,
        "/v1/chat/completions",
        {
            "model": "tiny-parm",
            "messages": [{"role": "user", "content": PROMPTS[2]}],
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "preference": [0.4, 0.6],
            "ignore_eos": True,
        },
    )
    assert raw[-1] == "[DONE]"
    chunks = [json.loads(line) for line in raw[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole.choices[0].message.content
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12

    completion = client.completions.create(
        model="tiny-parm",
        prompt="The quick brown fox",
        max_tokens=10,
        temperature=0,
        extra_body={"preference": [0.7, 0.3], "ignore_eos": True},
    )
    assert (
        completion.object == "text_completion" and completion.choices[0].finish_reason == "length"
    )
    pieces = [
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="tiny-parm",
            prompt="The quick brown fox",
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"preference": [0.7, 0.3], "ignore_eos": True},
        )
    ]
    assert "".join(pieces) == completion.choices[0].text


def _sse_lines(server, path, body):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    events = response.read().decode().split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1])
    return [e[len("data: ") :] for e in events[:-1]]


def test_stop_strings_cut_the_answer_and_seeded_sampling_repeats(server):
    client = server.client()
    full = chat(client, PROMPTS[0], [0.5, 0.5], 20).choices[0].message.content
    # A stop string of three plain characters, first found after the start of the answer.
    stop = next(
        full[i : i + 3]
        for i in range(3, len(full) - 3)
        if full[i : i + 3].isascii()
        and full[i : i + 3].isprintable()
        and full.find(full[i : i + 3]) == i
    )
    cut = chat(client, PROMPTS[0], [0.5, 0.5], 20, stop=[stop, "never appears"])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in chat(client, PROMPTS[0], [0.5, 0.5], 20, stop=stop, stream=True)
        if chunk.choices
    )
    assert streamed == full[: full.find(stop)]

    def sampled(seed):
        answer = chat(client, PROMPTS[2], [0.3, 0.7], 16, temperature=1.0, top_p=0.95, seed=seed)
        return answer.choices[0].token_ids

    assert sampled(11) == sampled(11)
    assert len({tuple(sampled(seed)) for seed in (1, 2, 3)}) > 1


BAD_REQUESTS = [
    # (body changes, status, param, words of the message)
    ({"preference": [0.5, 0.3, 0.2]}, 400, "preference", "needs 2 weights"),
    ({"preference": [-0.5, 1.5]}, 400, "preference", "negative"),
    ({"preference": [0.5, 0.6]}, 400, "preference", "sums to 1.1"),
    ({"preference": {"helpful": 0.5, "funny": 0.5}}, 400, "preference", "unknown ['funny']"),
    ({"preference": "helpful=lots"}, 400, "preference", "cannot parse"),
    ({"max_tokens": 0}, 400, "max_tokens", "max_tokens must be >= 1, got 0"),
    ({"max_tokens": -3}, 400, "max_tokens", "max_tokens must be >= 1, got -3"),
    ({"max_tokens": 10_000}, 400, "max_tokens", "can be at most"),
    ({"messages": [{"role": "user", "content": "hello " * 600}]}, 400, "messages", "context"),
    ({"messages": []}, 400, "messages", "messages"),
    ({"temperature": "hot"}, 400, "temperature", "temperature"),
    ({"temperature": -1}, 400, "temperature", "temperature must be in [0, 2]"),
    ({"n": 2}, 400, "n", "n must be 1"),
    ({"model": "gpt-4"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("change, status, param, words", BAD_REQUESTS)
def test_a_bad_request_is_a_4xx_saying_what_is_wrong(server, change, status, param, words):
    client = server.client()
    body = {
        "model": "tiny-parm",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        **change,
    }
    extra = {k: body.pop(k) for k in ("preference",) if k in body}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**body, extra_body=extra)
    assert caught.value.status_code == status
    error = caught.value.body
    assert words in error["message"], error
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if "context" in words:
        assert error["code"] == "context_length_exceeded"
    assert chat(client, "Hi", [0.5, 0.5], 3).usage.completion_tokens == 3  # still serving


@pytest.mark.parametrize(
    "path, raw, words",
    [
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "Hi"}',
            "not valid JSON",
        ),
        ("/v1/completions", b"prompt=Hi", "not valid JSON"),
        ("/v1/completions", b"[1, 2]", "must be a JSON object"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "Hi"}], "preference": [NaN, 1.0]}',
            "non-finite",
        ),
        ("/v1/completions", b'{"prompt": ["a", "b"]}', "one string"),
    ],
)
def test_malformed_bodies_are_a_400_with_a_json_error(server, path, raw, words):
    status, body = server.post(path, raw)
    assert status == 400 and words in body["error"]["message"], body
    status, body = server.post(
        "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    )
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_client_that_goes_away_leaves_the_batch(server):
    before = server.idle()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {})
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")
    response.close()  # the socket closes with both
    connection.close()
    deadline = time.monotonic() + 30
    while True:
        health = server.health()
        if health["cancelled"] > before["cancelled"] and health["decoding"] == 0:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    # It left early: far fewer steps than its 400 tokens.
    assert health["steps"] - before["steps"] < 300
    assert server.idle()["in_flight"] == 0
    started = time.monotonic()
    assert chat(server.client(), "Hi", [0.5, 0.5], 3).usage.completion_tokens == 3
    assert time.monotonic() - started < 10


# --- limits: API key, queue, body size, time limit, disconnects, shutdown -------------------


@contextlib.contextmanager
def serving(model_folders, max_batch=8, **limits):
    """A live server of the tiny PARM with ``limits`` (api_key, max_queue, ...)."""
    from align.serve import ServedModel, create_app

    served = ServedModel(
        {"kind": "parm", "adapter": str(model_folders / "parm"), "beta": 1.0},
        base=str(model_folders / "base"),
        name="tiny-parm",
    )
    try:
        with LiveServer(create_app(served, max_batch=max_batch, **limits)) as live:
            yield live
    finally:
        served.close()


def request(port, path, body=b"", headers=None, method="POST"):
    """``(status, headers, JSON body)`` of a raw request (``body`` bytes, or an iterable of
    bytes: sent chunked)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(
            method, path, body, {"Content-Type": "application/json", **(headers or {})}
        )
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def long_body(stream, max_tokens=480, **extra):
    """A request decoding ``max_tokens`` tokens (the tiny models' context is 512)."""
    return {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
        **extra,
    }


def open_stream(port, body, headers=None):
    """A streamed request whose first event was read: ``(connection, response)``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), headers or {})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    return connection, response


def rest_of_stream(response):
    """The JSON events after the first (the last one ``[DONE]``)."""
    text = response.read().decode()
    events = [e.strip().removeprefix("data: ") for e in text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def hang_up(connection):
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()


def wait_for(server, condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition(health := server.health()):
        assert time.monotonic() < deadline, health
        time.sleep(0.02)
    return health


def test_with_an_api_key_only_requests_bearing_it_are_served(model_folders):
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
    with serving(model_folders, api_key="sesame-123") as live:
        wrong = [None, "Bearer wrong", "Bearer sesame-12", "Bearer sesame-1234", "Basic sesame-123"]
        for authorization in [*wrong, "sesame-123"]:
            headers = {} if authorization is None else {"Authorization": authorization}
            status, response_headers, answer = request(
                live.port, "/v1/chat/completions", body, headers
            )
            assert status == 401, authorization
            assert response_headers["www-authenticate"] == "Bearer"
            error = answer["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
            assert "Authorization: Bearer" in error["message"]
        assert request(live.port, "/v1/models", method="GET")[0] == 401
        refused = openai.OpenAI(base_url=f"{live.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            refused.models.list()
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sesame-123", max_retries=0)
        assert client.models.list().data[0].id == "tiny-parm"
        assert chat(client, "Hi", [0.5, 0.5], 3).usage.completion_tokens == 3
        assert live.health()["status"] == "ok"  # probes need no key


def test_listening_beyond_loopback_without_a_key_warns(model_folders, monkeypatch, capsys):
    """``serve`` warns before it starts; uvicorn's run is replaced (nothing listens)."""
    from align.serve import ServedModel, is_loopback, serve
    from align.serve.app import GracefulServer

    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.1.2.3", "example.org"]))
    ran = []
    monkeypatch.setattr(GracefulServer, "run", lambda self: ran.append(self.config.host))
    served = ServedModel(
        {"kind": "parm", "adapter": str(model_folders / "parm")}, base=str(model_folders / "base")
    )
    for host, key, warned in [
        ("0.0.0.0", None, True),
        ("0.0.0.0", "k", False),
        ("127.0.0.1", None, False),
        ("::1", None, False),
    ]:
        serve(served, host=host, api_key=key)
        assert ("without an API key" in capsys.readouterr().err) == warned, (host, key)
    assert ran == ["0.0.0.0", "0.0.0.0", "127.0.0.1", "::1"]
    served.close()


def test_past_the_queue_bound_a_request_is_a_429_with_retry_after(model_folders):
    with serving(model_folders, max_batch=1, max_queue=1) as live:
        decoding, _ = open_stream(live.port, long_body(True))  # holds the one row
        waiting, waiting_response = open_stream(live.port, long_body(True, 8))  # queued
        assert live.health()["in_flight"] == 2
        body = json.dumps(long_body(False, 4)).encode()
        status, headers, answer = request(live.port, "/v1/chat/completions", body)
        assert status == 429 and headers["retry-after"] == "1", answer
        assert (
            answer["error"]["code"] == "queue_full" and "--max-queue" in answer["error"]["message"]
        )
        with pytest.raises(openai.RateLimitError):
            chat(live.client(), "Hi", [0.5, 0.5], 3)
        hang_up(decoding)  # its row frees: the waiting request decodes, to its end
        events = rest_of_stream(waiting_response)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        waiting.close()
        assert live.idle()["in_flight"] == 0
        assert chat(live.client(), "Hi", [0.5, 0.5], 3).usage.completion_tokens == 3


def test_a_body_past_the_size_limit_is_a_413(model_folders, server):
    # The default limit, 1 MiB.
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    status, headers, answer = request(server.port, "/v1/chat/completions", big)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    assert "1048576 bytes" in answer["error"]["message"]
    with serving(model_folders, max_body_bytes=2000) as live:
        small = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        under = json.dumps({**small, "user": "x" * 1800}).encode()  # an ignored field
        assert len(under) <= 2000
        assert request(live.port, "/v1/chat/completions", under)[0] == 200
        over = json.dumps({**small, "user": "x" * 2000}).encode()
        assert request(live.port, "/v1/chat/completions", over)[0] == 413
        chunks = iter([over[:1000], over[1000:]])  # no Content-Length: counted as it comes
        status, _, answer = request(live.port, "/v1/chat/completions", chunks)
        assert status == 413 and "2000 bytes" in answer["error"]["message"]
        # A body declared far too large is refused before it is sent.
        connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
        connection.putrequest("POST", "/v1/chat/completions")
        connection.putheader("Content-Length", str(10**9))
        connection.endheaders()
        assert connection.getresponse().status == 413
        connection.close()
        assert request(live.port, "/v1/chat/completions", under)[0] == 200


def test_a_request_past_the_time_limit_gets_an_error_and_frees_its_row(model_folders):
    with serving(model_folders, request_timeout=0.1) as live:
        before = live.health()
        status, _, answer = request(
            live.port, "/v1/chat/completions", json.dumps(long_body(False)).encode()
        )
        assert status == 504 and answer["error"]["code"] == "request_timeout"
        assert "0.1 s (--request-timeout)" in answer["error"]["message"]
        connection, response = open_stream(live.port, long_body(True))
        events = rest_of_stream(response)  # the error event, then [DONE]
        connection.close()
        assert events[-1]["error"]["code"] == "request_timeout"
        assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
        after = live.idle()
        assert after["cancelled"] - before["cancelled"] == 2
        assert after["steps"] - before["steps"] < 480  # both left long before their 480 tokens
        short = request(live.port, "/v1/completions", b'{"prompt": "Hi", "max_tokens": 2}')
        assert short[0] == 200


def test_a_client_waiting_for_a_whole_answer_that_goes_away_frees_its_row(server):
    before = server.idle()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(long_body(False)), {})
    wait_for(server, lambda health: health["decoding"] == 1)
    hang_up(connection)
    after = wait_for(
        server,
        lambda h: h["cancelled"] > before["cancelled"] and not h["decoding"] and not h["in_flight"],
    )
    assert after["steps"] - before["steps"] < 300  # far fewer than its 480 tokens
    started = time.monotonic()
    assert chat(server.client(), "Hi", [0.5, 0.5], 3).usage.completion_tokens == 3
    assert time.monotonic() - started < 10


@pytest.fixture(scope="module")
def soak():
    path = Path(__file__).resolve().parents[1] / "evaluation" / "soak_serve.py"
    spec = importlib.util.spec_from_file_location("soak_serve", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak_serve"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["soak_serve"]


def test_a_short_soak_of_mixed_requests_loses_no_good_request(model_folders, soak):
    """evaluation/soak_serve.py's mix (good, malformed, oversized, unauthenticated,
    disconnecting requests) from 16 clients: each kind gets its status, every good request
    its whole answer, and every row is freed."""
    limits = {"api_key": "soak-key", "max_queue": 64, "max_body_bytes": 1 << 16}
    with serving(model_folders, max_batch=16, request_timeout=60, **limits) as live:
        client = soak.Client(live.port, "soak-key", 4, limits["max_body_bytes"], "tiny-parm")
        before = live.health()
        plan = soak.plan(400, seed=1)
        results = soak.run_soak(client, plan, 16, time.monotonic() + 120)
        after = soak.wait_idle(live.port)
    assert len(results) == len(plan)
    lines, lost = soak.summary(results)
    assert lost == 0, "\n".join(lines)
    statuses = {}
    for result in results:
        statuses.setdefault(result.kind, set()).add(result.status)
    assert statuses == {
        "good": {200},
        "good stream": {200},
        "malformed": {400},
        "oversized": {413},
        "unauthenticated": {401},
        "disconnecting": {200, None},  # a stream's first event read, or no answer read
    }, "\n".join(lines)
    assert all(result.ok for result in results), "\n".join(lines)
    assert after["decoding"] == 0 and after["in_flight"] == 0
    left_streams = sum(r.kind == "disconnecting" and r.status == 200 for r in results)
    assert after["cancelled"] - before["cancelled"] >= left_streams > 0


def _serve_command(model_folders, port, *options):
    return [
        sys.executable,
        "-m",
        "align.cli",
        "serve",
        "--base",
        str(model_folders / "base"),
        "--route",
        f"{{kind: parm, adapter: {model_folders / 'parm'}}}",
        "--port",
        str(port),
        *options,
    ]


def test_sigterm_drains_align_serve_and_it_exits_0_in_time(model_folders):
    """``align serve`` in its own process: on SIGTERM new requests get a 503, in-flight ones
    finish or end with a clear error within --shutdown-timeout, and the process exits 0."""
    port = free_port()
    process = subprocess.Popen(
        _serve_command(model_folders, port, "--max-batch", "1", "--shutdown-timeout", "0.5"),
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                request(port, "/health", method="GET")
                break
            except OSError:
                assert time.monotonic() < deadline, "align serve did not start"
                time.sleep(0.2)
        # One row: four long streams decode one after another (seconds of work), and a
        # whole request waits behind them.
        streams = [open_stream(port, long_body(True)) for _ in range(4)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            whole = pool.submit(request, port, "/v1/chat/completions", json.dumps(long_body(False)))
            while request(port, "/health", method="GET")[2]["in_flight"] < 5:
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while (health := request(port, "/health", method="GET"))[0] == 200:
                assert time.monotonic() - signalled < 5, health
                time.sleep(0.01)
            assert health[0] == 503 and health[2]["error"]["code"] == "shutting_down"
            body = json.dumps(long_body(False, 2)).encode()
            status, _, answer = request(port, "/v1/chat/completions", body)
            assert status == 503 and "shutting down" in answer["error"]["message"]
            ends = []
            for connection, response in streams:
                ends.append(rest_of_stream(response)[-1])
                connection.close()
            status, _, answer = whole.result(30)
        assert process.wait(timeout=30) == 0, process.stdout.read()
        # --shutdown-timeout and a margin: a bound (no hang), not a timing; on a loaded 2-core
        # machine a decoding step and the interpreter's teardown took 6.7 s.
        assert time.monotonic() - signalled < 0.5 + 20
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Each stream ended with its whole answer or an error event saying why; the whole
    # request waited behind four long ones and was cancelled.
    finished = [e for e in ends if "error" not in e]
    assert all(e["choices"][0]["finish_reason"] == "length" for e in finished)
    cancelled = [e["error"] for e in ends if "error" in e]
    assert cancelled and all(e["code"] == "shutting_down" for e in cancelled)
    assert status == 503 and answer["error"]["code"] == "shutting_down"
    output = process.stdout.read()
    assert "Traceback" not in output, output


@pytest.mark.parametrize("kind", ["genarm", "mod", "policy"])
def test_every_kind_of_served_route_answers_as_the_sweep_builds_it(model_folders, kind):
    """GenARM ARMs, MOD policies and a preference-adapter policy are served from their sweep
    route specs; a policy's greedy answer equals the sweep's own answer for that route."""
    from align.serve import ServedModel, create_app
    from align.sweep import build_route
    from align.sweep.routes import Runtime

    for name, seed in (("helpful", 3), ("harmless", 4)):
        if not (model_folders / name).exists():
            tiny(seed).save_pretrained(model_folders / name)
            tiny_causal_lm(seed=0)[1].save_pretrained(model_folders / name)
    arms = {o: str(model_folders / o) for o in OBJECTIVES}
    spec = {
        "genarm": {"kind": "genarm", "arms": arms, "beta": 1.0},
        "mod": {"kind": "mod", "policies": arms},
        "policy": {"kind": "policy", "adapter": str(model_folders / "parm")},
    }[kind]
    served = ServedModel(spec, base=str(model_folders / "base"))
    assert served.objectives == OBJECTIVES and served.name == f"align-{kind}"
    with LiveServer(create_app(served)) as live:
        client = live.client()
        answers = {}
        for alpha in ([0.8, 0.2], [0.0, 1.0]):
            answer = client.chat.completions.create(
                model=f"align-{kind}",
                messages=[{"role": "user", "content": PROMPTS[0]}],
                max_tokens=10,
                temperature=0,
                extra_body={"preference": alpha, "return_token_ids": True},
            )
            answers[tuple(alpha)] = answer.choices[0]
        assert answers[(0.8, 0.2)].token_ids != answers[(0.0, 1.0)].token_ids
    served.close()
    if kind == "policy":
        route = build_route(spec, OBJECTIVES, {"max_new_tokens": 10})
        runtime = Runtime(str(model_folders / "base"))
        for alpha, choice in answers.items():
            swept = route.answer(runtime, [PROMPTS[0]], torch.tensor(alpha))[0]
            assert swept == choice.message.content.strip()
        route.close()


def test_without_its_model_thread_the_server_says_so(model_folders):
    """/health is a 503 and a request a 503 JSON error (not a hang) once the worker is gone."""
    from align.serve import ServedModel, create_app

    served = ServedModel(
        {"kind": "parm", "adapter": str(model_folders / "parm")}, base=str(model_folders / "base")
    )
    app = create_app(served)
    with LiveServer(app) as live:
        assert live.health()["status"] == "ok"
        app.state.scheduler.stop()
        connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert response.status == 503 and "not running" in json.loads(response.read())["status"]
        status, body = live.post("/v1/completions", b'{"prompt": "Hi", "max_tokens": 2}')
        assert status == 503 and "not running" in body["error"]["message"]
    served.close()


def test_serve_command_bad_input_is_one_error_line(model_folders):
    from typer.testing import CliRunner

    from align.cli import app

    runner = CliRunner()
    base = ["serve", "--base", str(model_folders / "base")]
    cases = [
        (["--route", "[1, 2]"], "--route must be a mapping"),
        (["--route", "{kind: base}", "--objectives", "a,b"], "cannot decode an arbitrary α"),
        (["--route", "{kind: telepathy}"], "a served route is parm or policy"),
        (["--route", "{kind: telepathy}", "--objectives", "a,b"], "unknown route kind"),
        (["--route", str(model_folders / "missing.yaml")], "no such route file"),
        (
            [
                "--route",
                f"{{kind: parm, adapter: {model_folders / 'parm'}}}",
                "--preference",
                "0.5,0.7",
            ],
            "sums to",
        ),
        (
            [
                "--route",
                f"{{kind: parm, adapter: {model_folders / 'parm'}}}",
                "--objectives",
                "a,b",
            ],
            "objective names disagree",
        ),
    ]
    for arguments, words in cases:
        result = runner.invoke(app, base + arguments)
        assert result.exit_code == 2, (arguments, result.output)
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and words in lines[0], (arguments, result.output)
        assert "Traceback" not in result.output


@pytest.mark.slow
def test_serve_command_on_the_embedded_model_with_a_parm(tmp_path):
    """``align serve`` as a user runs it: the embedded SmolLM2 guided by a PARM, concurrent
    requests of different α answered as each is alone."""
    from align.models import load_model

    base, _ = load_model()
    pblora(base).save_pretrained(tmp_path / "parm")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "align.cli",
        "serve",
        "--route",
        f"{{kind: parm, adapter: {tmp_path / 'parm'}, beta: 1.0}}",
        "--port",
        str(port),
        "--max-batch",
        "4",
    ]
    process = subprocess.Popen(
        command,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                (card,) = client.models.list().data
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "align serve did not start"
                time.sleep(0.5)
        assert card.id == "align-parm" and card.model_extra["objectives"] == list(OBJECTIVES)

        def ask(alpha):
            answer = client.chat.completions.create(
                model="align-parm",
                messages=[{"role": "user", "content": "Give me one tip for a rainy day."}],
                max_tokens=16,
                temperature=0,
                extra_body={"preference": alpha, "return_token_ids": True},
            )
            return answer.choices[0].token_ids, answer.choices[0].message.content

        alphas = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
        alone = [ask(a) for a in alphas]
        assert all(text.strip() for _, text in alone)
        assert alone[0] != alone[1]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            together = list(pool.map(ask, alphas))
        assert together == alone
    finally:
        process.terminate()
        process.wait(30)
