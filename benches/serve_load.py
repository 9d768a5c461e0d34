"""Load on an OpenAI-compatible chat endpoint (Python's standard library only): N clients at
once, each sending R streamed chat completions one after the other (one persona, a different
dialogue per request, greedy, a fixed token limit). Prints one JSON line: requests/s, time to
the first token (mean, p50, p90), reply tokens/s over the run.

    python benches/serve_load.py http://127.0.0.1:8080 --clients 8 --requests 4 --max-tokens 32
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

PERSONA = "i run marathons. i listen to jazz while i work. i am saving up to buy a boat."
TURNS = [
    "hi! how are you today?", "what do you do for a living?", "do you like it there?",
    "what do you do on weekends?", "do you have any pets at home?", "what is your favorite food?",
    "where did you grow up?", "what music do you listen to?",
]


def one(url, body):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {r.read()[:200]}")
    first, usage = None, None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if first is None and choices and choices[0].get("delta", {}).get("content"):
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    conn.close()
    return first if first is not None else total, total, usage["completion_tokens"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    results, errors = [], []

    def client(c):
        for i in range(a.requests):
            turn = TURNS[(c * a.requests + i) % len(TURNS)]
            body = {
                "messages": [{"role": "system", "content": PERSONA},
                             {"role": "user", "content": f"{turn} ({c}.{i})"}],
                "temperature": 0, "max_tokens": a.max_tokens, "stream": True,
                "stream_options": {"include_usage": True},
            }
            try:
                results.append(one(a.url, body))
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))

    # One warm-up request (first-use allocations, kernels on a GPU).
    one(a.url, {"messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 4, "temperature": 0, "stream": True,
                                         "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    print(json.dumps({
        "clients": a.clients, "requests": len(results), "errors": errors[:3],
        "max_tokens": a.max_tokens, "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 3),
        "reply_tokens_per_s": round(tokens / wall, 1),
        "ttft_mean_s": round(statistics.mean(ttft), 4),
        "ttft_p50_s": round(ttft[len(ttft) // 2], 4),
        "ttft_p90_s": round(ttft[min(len(ttft) - 1, int(len(ttft) * 0.9))], 4),
        "request_mean_s": round(statistics.mean(r[1] for r in results), 4),
    }))


if __name__ == "__main__":
    main()
