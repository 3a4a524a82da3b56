"""Talks to a running lemur-serve with the official `openai` package (driven by tests/serve.rs).

Usage: openai_client.py BASE_URL MODEL MODE, MODE one of:
  api       chat and completions, streamed and not, 8 concurrent streams against solo runs,
            stop strings, max_tokens, malformed and oversized requests, a disconnect.
  sigterm   one long stream; prints "streaming" once it has begun, then reads it to the end.
  queue     (a server with --max-batch 1 --max-queue 1) the third request gets a 429.
  planset   (a server over a plan set) 8 concurrent streams against solo runs; the decode
            placement switched and KV caches moved.
  plannedset (a server that planned a plan set at start) the same streams; caches moved.
  failover  a long greedy stream; prints "streaming" once it has begun (the test kills
            rank 1), reads it to the end and checks it against the same request run
            before, checks /health and /metrics, prints "restart" and waits for a line
            on stdin (the test started rank 1 again), then for /health to say ok.
Prints "ok" when every check passed; any failure raises.
"""

import json
import sys
import threading
import time
import urllib.error
import urllib.request

import openai

BASE, MODEL, MODE = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="none", max_retries=0, timeout=120)


def raw(path, body, method="POST"):
    """A request by hand: (status, parsed JSON or text)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data if method == "POST" else None, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metric(name):
    _, text = raw("/metrics", None, method="GET")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def complete(prompt, n, **kw):
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, **kw)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage


def complete_streamed(prompt, n, **kw):
    pieces, finish = [], None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True, **kw):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


def expect_error(status, param=None, code=None, **kw):
    try:
        client.chat.completions.create(model=kw.pop("model", MODEL), **kw)
    except openai.APIStatusError as e:
        assert e.status_code == status, (e.status_code, e.body)
        err = e.body if "message" in (e.body or {}) else (e.body or {}).get("error", e.body)
        if param is not None:
            assert err["param"] == param, err
        if code is not None:
            assert err["code"] == code, err
        return err
    raise AssertionError(f"expected {status} for {kw}")


def concurrent_equal_solo():
    """8 concurrent streams of different lengths: each equal to the same request alone."""
    prompts = [
        ("Paris is", 6), ("The ocean", 14), ("List three colors:", 9), ("def add(a, b):", 16),
        ("Hello, my name", 5), ("In 1969, humans", 12), ("The best way to learn", 18), ("Cats and dogs", 8),
    ]
    solo = [complete_streamed(p, n) for p, n in prompts]
    together = [None] * len(prompts)
    batch_seen = []

    def run(i):
        together[i] = complete_streamed(*prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        batch_seen.append(metric("lemur_batch_size"))
        time.sleep(0.05)
    for t in threads:
        t.join()
    for i, (a, b) in enumerate(zip(together, solo)):
        assert a == b, (i, a, b)
    assert max(batch_seen) >= 4, f"the streams never shared a step: batch sizes {sorted(set(batch_seen))}"


def api():
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, health = raw("/health", None, method="GET")
    assert status == 200 and health["status"] == "ok", health
    assert [r["state"] for r in health["ranks"]] == ["up", "up"], health

    # Chat, whole and streamed: the same greedy answer.
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    whole = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and whole, r
    assert r.choices[0].finish_reason in ("stop", "length"), r
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole, (text, whole)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason

    # Completions: whole and streamed agree; max_tokens is obeyed.
    text, finish, usage = complete("The capital of France is", 10)
    assert (finish, usage.completion_tokens) == ("length", 10), (finish, usage)
    assert complete_streamed("The capital of France is", 10) == (text, "length")
    t3, f3, u3 = complete("The capital of France is", 3)
    assert (f3, u3.completion_tokens) == ("length", 3) and text.startswith(t3), (t3, text)

    # A stop string taken from the middle of the answer: the answer ends just before it.
    long_text, _, _ = complete("Once upon a time", 24)
    stop = long_text[len(long_text) // 2 : len(long_text) // 2 + 3]
    assert stop.strip(), long_text
    cut, finish, _ = complete("Once upon a time", 24, stop=[stop])
    assert (cut, finish) == (long_text[: long_text.index(stop)], "stop"), (cut, finish, stop, long_text)
    assert complete_streamed("Once upon a time", 24, stop=[stop]) == (cut, "stop")

    concurrent_equal_solo()

    # Malformed and oversized requests: OpenAI's error body, naming the field.
    status, body = raw("/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    expect_error(400, param="temperature", messages=msgs, temperature="hot")
    expect_error(400, param="temperature", messages=msgs, temperature=5)
    expect_error(400, param="model", code="model_not_found", model="gpt-4", messages=msgs)
    expect_error(400, param="messages", messages=[])
    expect_error(400, param="messages[0].role", messages=[{"role": "robot", "content": "hi"}])
    expect_error(400, param="n", messages=msgs, n=2)
    err = expect_error(400, param="messages", code="context_length_exceeded", messages=msgs, max_tokens=10**6)
    assert "context" in err["message"], err
    status, body = raw("/v1/completions", {"model": MODEL, "prompt": [1, 2, 10**7]})
    assert status == 400 and body["error"]["param"] == "prompt[2]", body
    status, body = raw("/v1/completions", b'{"model":"x","prompt":"' + b"a" * (5 << 20) + b'"}')
    assert status == 413 and "exceeds" in body["error"]["message"], (status, body)
    status, body = raw("/v1/nothing", {})
    assert status == 404 and "error" in body, body

    # A client that disconnects mid-stream: its request is cancelled and its cache freed.
    stream = client.completions.create(model=MODEL, prompt="Tell me a story", max_tokens=2000, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    for _ in range(200):
        if metric("lemur_running_requests") == 0 and metric("lemur_kv_positions_reserved") == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the disconnected stream's request still runs")
    assert metric("lemur_completion_tokens_total") > 100
    print("ok")


def sigterm():
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0, stream=True)
    pieces, finish = [], None
    for i, chunk in enumerate(stream):
        if i == 1:
            print("streaming", flush=True)
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "length", finish
    assert len("".join(pieces)) > 40, pieces
    print("ok")


def queue():
    # One request runs (max-batch 1), one waits (max-queue 1): the third is refused.
    first = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=200, temperature=0, stream=True)
    next(iter(first))
    waiting = threading.Thread(target=lambda: complete("Hello", 4))
    waiting.start()
    for _ in range(200):
        if metric("lemur_queue_depth") == 1:
            break
        time.sleep(0.02)
    try:
        complete("Hi", 2)
        raise AssertionError("a third request was accepted")
    except openai.RateLimitError as e:
        assert e.status_code == 429 and "queue" in e.body["message"], e.body
    first.close()
    waiting.join()
    print("ok")


def health():
    status, h = raw("/health", None, method="GET")
    assert status == 200, (status, h)
    return h


def failover():
    prompt, n = "Count from one to fifty: one, two, three, four,", 120
    want, _, _ = complete(prompt, n)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True)
    pieces = []
    for i, chunk in enumerate(stream):
        if i == 2:
            print("streaming", flush=True)
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
    assert "".join(pieces) == want, ("".join(pieces), want)
    h = health()
    assert h["status"] == "degraded" and h["ranks"][1]["state"] == "lost", h
    assert h["ranks"][1]["reason"], h
    assert metric("lemur_replans_total") == 1 and metric("lemur_replayed_total") >= 1
    assert complete(prompt, n)[0] == want, "served by rank 0 alone"
    print("restart", flush=True)
    sys.stdin.readline()
    for _ in range(1200):
        h = health()
        if h["status"] == "ok":
            break
        time.sleep(0.1)
    assert h["status"] == "ok" and all(r["state"] == "up" for r in h["ranks"]), h
    assert metric("lemur_replans_total") == 2
    assert complete(prompt, n)[0] == want, "served by both ranks again"
    print("ok")


def planset():
    concurrent_equal_solo()
    assert metric("lemur_placement_switches_total") >= 1, "the batch never moved to the x4 placement"
    assert metric("lemur_kv_moves_total") > 0
    print("ok")


def plannedset():
    # The planner's set for SmolLM2 on the Apple pair prefills on the M5 Pro and decodes
    # one stream on the M4 Pro: every prompt's caches move for its first decode step.
    concurrent_equal_solo()
    assert metric("lemur_kv_moves_total") > 0
    assert health()["status"] == "ok"
    print("ok")


{"api": api, "sigterm": sigterm, "queue": queue, "failover": failover, "planset": planset, "plannedset": plannedset}[MODE]()
