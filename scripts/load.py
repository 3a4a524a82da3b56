"""An OpenAI-API load generator (stdlib only) for scripts/bench-serve.sh.

Usage: load.py BASE_URL MODEL CONCURRENCY ROUNDS TOKENS
Runs CONCURRENCY client threads, each sending ROUNDS streamed completion requests
(fixed prompts, greedy, TOKENS at most) one after another, and prints one JSON line:
aggregate generated tokens/s over the wall time, median time to first token, and the
time to first token of one extra request sent once every stream is running.
"""

import json
import statistics
import sys
import threading
import time
import urllib.request

BASE, MODEL, CONC, ROUNDS, TOKENS = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
PROMPTS = [
    "Once upon a time, in a land far away,",
    "The history of the printing press begins",
    "Here is a recipe for a simple bread:",
    "The three laws of thermodynamics are",
    "In the year 2050, cities will",
    "A short poem about the sea:",
    "The main differences between cats and dogs are",
    "To learn a new language quickly, you should",
]


def stream(prompt):
    """(tokens, seconds to the first token, seconds in all) of one streamed request."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(BASE + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, tokens = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                first = time.perf_counter() - start
    return tokens, first or 0.0, time.perf_counter() - start


def main():
    stream(PROMPTS[0])  # warm-up
    results, lock = [], threading.Lock()

    def client(i):
        for r in range(ROUNDS):
            out = stream(PROMPTS[(i + r) % len(PROMPTS)])
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CONC)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    # One more request once every stream is running: its time to first token under load.
    time.sleep(min(2.0, 0.2 * CONC))
    probe = stream("A question arriving late:") if CONC > 1 else None
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    print(json.dumps({
        "concurrency": CONC,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(r[1] for r in results),
        "ttft_under_load_s": probe[1] if probe else None,
    }))


main()
