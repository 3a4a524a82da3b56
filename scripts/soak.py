"""A soak of a loopback lemur-serve cluster under load while its ranks are killed (run by
scripts/soak.sh).

Usage: soak.py BIN_DIR CLUSTER PLAN MODEL RANKS [--minutes M] [--clients C]
               [--chaos-min S] [--chaos-max S]

Starts ranks 1..RANKS-1 (`lemur-worker`, long-running) and rank 0 (`lemur-serve`), takes
each prompt's greedy text as a reference from the whole cluster, then runs C clients for M
minutes, each sending requests one after another: mixed prompt lengths, plain and streamed,
and streams it closes early (cancellations). Meanwhile every CHAOS_MIN to CHAOS_MAX seconds
it kills a random worker rank (SIGKILL or SIGTERM) and starts it again 5 to 30 s later.
Every answer is checked against its reference (a cancelled stream's text against the
reference's start). It prints a report: requests served, failed (by reason), wrong, hung;
replays and re-plans from /metrics; p50/p99 latency; resident memory of rank 0 after warm-up
(the least of three samples 10 s apart), once settled at the end, and its peak. Exits 1 when
a target is missed: a hang, a wrong text, a failure of an unexpected kind, or rank 0's
memory growing more than 10%.
"""

import argparse
import collections
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("bin")
ap.add_argument("cluster")
ap.add_argument("plan")
ap.add_argument("model")
ap.add_argument("ranks", type=int)
ap.add_argument("--minutes", type=float, default=30)
ap.add_argument("--clients", type=int, default=6)
ap.add_argument("--chaos-min", type=float, default=60)
ap.add_argument("--chaos-max", type=float, default=120)
ap.add_argument("--port", type=int, default=18080)
ap.add_argument("--logs", default=".")
args = ap.parse_args()

BASE = f"http://127.0.0.1:{args.port}"
MODEL = "smol"
# Request deadline: a request still unanswered after this has hung.
HANG_S = 300
PARAGRAPH = ("The river wound through the valley, past farms and mills, carrying boats of grain and timber "
             "down to the sea, where the harbour town traded with ships from every coast. ")
PROMPTS = [
    ("Hi", 16),
    ("Once upon a time, in a land far away,", 48),
    ("List the planets of the solar system in order:", 32),
    ("Summarise this text. " + PARAGRAPH * 4, 24),
    ("Continue the story. " + PARAGRAPH * 10, 40),
    ("def fibonacci(n):", 64),
]

stop = threading.Event()
lock = threading.Lock()
served = collections.Counter()
failed = collections.Counter()
wrong = []
hung = []
latency = []
ttft = []
chaos_log = []


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def body(prompt, n, stream):
    return json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0,
                       "ignore_eos": True, "stream": stream}).encode()


def post(prompt, n, stream):
    req = urllib.request.Request(BASE + "/v1/completions", data=body(prompt, n, stream),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=HANG_S)


def complete(prompt, n):
    with post(prompt, n, False) as r:
        return json.load(r)["choices"][0]["text"]


def stream(prompt, n, close_after=None):
    """(text, seconds to the first piece, error message or None); stops reading after
    `close_after` pieces (a client that goes away)."""
    start, first, pieces = time.perf_counter(), None, []
    with post(prompt, n, True) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return "".join(pieces), first, chunk["error"].get("message", str(chunk["error"]))
            for c in chunk.get("choices", []):
                if c.get("text"):
                    first = first or time.perf_counter() - start
                    pieces.append(c["text"])
            if close_after is not None and len(pieces) >= close_after:
                break
    return "".join(pieces), first, None


def get(path):
    try:
        with urllib.request.urlopen(BASE + path, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def metric(name):
    _, text = get("/metrics")
    for line in (text or "").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# ---- the cluster ----

procs = {}


def start_worker(r):
    out = open(os.path.join(args.logs, f"rank{r}.log"), "a")
    procs[r] = subprocess.Popen([os.path.join(args.bin, "lemur-worker"), "--rank", str(r), "--cluster", args.cluster],
                                stdout=out, stderr=out)


def start_server():
    out = open(os.path.join(args.logs, "rank0.log"), "a")
    procs[0] = subprocess.Popen([os.path.join(args.bin, "lemur-serve"), "--cluster", args.cluster, "--plan", args.plan,
                                 "--model", args.model, "--served-model-name", MODEL, "--http", f"127.0.0.1:{args.port}",
                                 "--max-batch", "8", "--max-queue", "64", "--replan-seconds", "5"],
                                stdout=out, stderr=out)


def wait_ok(limit):
    deadline = time.time() + limit
    while time.time() < deadline:
        status, text = get("/health")
        if status == 200 and json.loads(text).get("status") == "ok":
            return True
        if procs[0].poll() is not None:
            sys.exit(f"soak: lemur-serve exited with {procs[0].returncode} (see {args.logs}/rank0.log)")
        time.sleep(0.2)
    return False


def chaos():
    workers = list(range(1, args.ranks))
    while not stop.wait(random.uniform(args.chaos_min, args.chaos_max)):
        r = random.choice(workers)
        sig = random.choice([signal.SIGKILL, signal.SIGTERM])
        procs[r].send_signal(sig)
        procs[r].wait()
        down = random.uniform(5, 30)
        with lock:
            chaos_log.append((time.time(), r, sig.name, down))
        log(f"chaos: {sig.name} to rank {r}; back in {down:.0f} s")
        if stop.wait(down):
            start_worker(r)
            return
        start_worker(r)


# ---- the load ----

def expected(message):
    """Failures a client may see while a rank is lost and planned around: a full queue (429),
    no placement over the ranks left (503), or a stream whose request had nowhere to be
    replayed. Anything else is a defect."""
    return message.startswith(("429 ", "503 ")) or message == "RuntimeError: the cluster failed during the request"


def client(i, refs):
    rng = random.Random(i)
    while not stop.is_set():
        prompt, n = rng.choice(PROMPTS)
        want = refs[prompt]
        mode = rng.choice(["plain", "stream", "stream", "cancel"])
        t0 = time.perf_counter()
        try:
            if mode == "plain":
                text, first, err = complete(prompt, n), None, None
            else:
                k = rng.randint(1, 8) if mode == "cancel" else None
                text, first, err = stream(prompt, n, k)
            took = time.perf_counter() - t0
            if err is not None:
                raise RuntimeError(err)
            ok = want.startswith(text) if mode == "cancel" else text == want
            with lock:
                if not ok:
                    wrong.append((mode, prompt[:40], text[:80], want[:80]))
                else:
                    served[mode] += 1
                    if mode != "cancel":
                        latency.append(took)
                    if first is not None:
                        ttft.append(first)
        except urllib.error.HTTPError as e:
            msg = f"{e.code} " + e.read().decode()[:200]
            with lock:
                failed[msg[:90]] += 1
            time.sleep(0.5)
        except TimeoutError:
            with lock:
                hung.append((mode, prompt[:40]))
        except Exception as e:  # noqa: BLE001 (every failure is counted by its reason)
            took = time.perf_counter() - t0
            with lock:
                if took >= HANG_S - 1:
                    hung.append((mode, prompt[:40]))
                else:
                    failed[f"{type(e).__name__}: {e}"[:90]] += 1
            time.sleep(0.5)


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main():
    os.makedirs(args.logs, exist_ok=True)
    for r in range(1, args.ranks):
        start_worker(r)
    start_server()
    try:
        if not wait_ok(180):
            sys.exit("soak: the cluster was not up within 180 s")
        log("cluster up; taking the references")
        try:
            refs = {p: complete(p, n) for p, n in PROMPTS}
        except urllib.error.HTTPError as e:
            sys.exit(f"soak: taking the references: {e.code} {e.read().decode()}")
        began = time.time()
        end = began + args.minutes * 60
        rss = [(0.0, rss_kb(procs[0].pid))]
        threads = [threading.Thread(target=client, args=(i, refs), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        monkey = threading.Thread(target=chaos, daemon=True)
        monkey.start()
        while time.time() < end:
            time.sleep(min(10, max(0.1, end - time.time())))
            rss.append((time.time() - began, rss_kb(procs[0].pid)))
            if procs[0].poll() is not None:
                log(f"lemur-serve exited with {procs[0].returncode}")
                break
            with lock:
                n_ok, n_bad = sum(served.values()), sum(failed.values())
            log(f"{(time.time() - began) / 60:.1f} min: {n_ok} served, {n_bad} failed, {len(wrong)} wrong, "
                f"{len(hung)} hung; rank 0 {rss[-1][1] / 1024:.0f} MB")
        stop.set()
        for t in threads:
            t.join(HANG_S + 10)
        still = [t for t in threads if t.is_alive()]
        # The cluster should be whole again once the last killed rank is back.
        wait_ok(60)
        replans, replayed = metric("lemur_replans_total"), metric("lemur_replayed_total")
        # Rank 0 settled (the last re-plan done, no load): three more samples for the end.
        time.sleep(10)
        settled = []
        for _ in range(3):
            settled.append(rss_kb(procs[0].pid))
            time.sleep(2)
    finally:
        stop.set()
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()

    warm = [kb for t, kb in rss if kb and t >= min(120, args.minutes * 6)] or [kb for _, kb in rss if kb]
    # The least of three samples, so that a re-plan's transient (rank 0 reading the weights
    # a rank lacks) is not taken for growth; a leak raises the least too.
    settled = [kb for kb in settled if kb] or warm[-3:]
    rss_start, rss_end, rss_peak = min(warm[:3]), min(settled), max(warm)
    growth = rss_end / rss_start - 1
    unexpected = {m: c for m, c in failed.items() if not expected(m)}
    report = {
        "minutes": args.minutes, "ranks": args.ranks, "clients": args.clients,
        "served": dict(served), "served_total": sum(served.values()),
        "failed": dict(failed), "failed_total": sum(failed.values()), "unexpected_failures": unexpected,
        "wrong": wrong[:10], "wrong_total": len(wrong), "hung": len(hung) + len(still),
        "kills": [f"rank {r} {sig}, down {down:.0f} s" for _, r, sig, down in chaos_log],
        "replans": replans, "replayed": replayed,
        "latency_p50_s": round(pct(latency, 50), 3), "latency_p99_s": round(pct(latency, 99), 3),
        "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p99_s": round(pct(ttft, 99), 3),
        "rank0_rss_mb_start": round(rss_start / 1024, 1), "rank0_rss_mb_end": round(rss_end / 1024, 1),
        "rank0_rss_mb_peak": round(rss_peak / 1024, 1), "rank0_rss_growth": round(growth, 4),
    }
    print(json.dumps(report, indent=2))
    missed = [what for what, bad in [("a request hung", report["hung"] > 0), ("wrong text", wrong),
                                     ("unexpected failures", unexpected), ("memory grew over 10%", growth > 0.10),
                                     ("nothing served", not served)] if bad]
    if missed:
        print("soak: missed: " + ", ".join(missed), file=sys.stderr)
        sys.exit(1)
    print("soak: every target met", file=sys.stderr)


if __name__ == "__main__":
    main()
