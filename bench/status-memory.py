#!/usr/bin/env python3
"""Memory and threads of `release serve` under reads alone (issue 11, item 5).

20,000 `GET /v1/status` at 64 concurrent (ApacheBench, keep-alive, loopback) against a fresh
server; prints VmRSS before, VmHWM (peak) and the most threads seen during the run, VmRSS and
threads 60 s after, beside the figures the issue measured before the fix.

Usage: bench/status-memory.py [--binary PATH (default: $RELEASE_BIN, else target/release/release)] [--requests N] [--concurrency C]
       [--after SECONDS]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

BASELINE = "issue 11 (before): 18 MB idle -> 298 MB peak, 248 threads"


def status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    kb = lambda k: int(fields[k].split()[0]) / 1024
    return {"rss": kb("VmRSS"), "hwm": kb("VmHWM"), "threads": int(fields["Threads"])}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default=os.environ.get("RELEASE_BIN", "target/release/release"))
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--after", type=int, default=60)
    args = p.parse_args()
    if not shutil.which("ab"):
        sys.exit("needs ab (apache2-utils)")
    work = tempfile.mkdtemp(prefix="release-status-mem-")
    try:
        data = os.path.join(work, "data")
        config = os.path.join(work, "release.toml")
        with open(config, "w") as f:
            f.write(f'[server]\nlisten = "127.0.0.1:0"\ndata_dir = "{data}"\n')
        env = {**os.environ, "RELEASE_LOG": "warn,release::cli=info"}
        token = json.loads(subprocess.run(
            [args.binary, "token", "create", "bench", "--role", "auditor", "--data-dir", data, "--json"],
            check=True, capture_output=True, env=env).stdout)["token"]
        log_path = os.path.join(work, "server.log")
        server = subprocess.Popen([args.binary, "serve", "--config", config], stderr=open(log_path, "w"), env=env)
        addr = None
        for _ in range(300):
            text = open(log_path).read()
            if "listening on http://" in text:
                addr = text.split("listening on http://")[1].split()[0]
                break
            time.sleep(0.05)
        if not addr:
            sys.exit("the server did not start:\n" + open(log_path).read())
        time.sleep(1)
        idle = status(server.pid)
        most_threads = [idle["threads"]]
        done = threading.Event()

        def sample():
            while not done.is_set():
                most_threads[0] = max(most_threads[0], status(server.pid)["threads"])
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.time()
        ab = subprocess.run(["ab", "-q", "-k", "-n", str(args.requests), "-c", str(args.concurrency),
                             "-H", f"Authorization: Bearer {token}", f"http://{addr}/v1/status"],
                            capture_output=True, text=True)
        took = time.time() - started
        done.set()
        sampler.join()
        failed = [l for l in ab.stdout.splitlines() if l.startswith(("Failed requests", "Non-2xx"))]
        p99 = [l for l in ab.stdout.splitlines() if l.strip().startswith("99%")]
        peak = status(server.pid)
        time.sleep(args.after)
        after = status(server.pid)
        server.terminate()
        server.wait()
        print(f"{args.requests} GET /v1/status at {args.concurrency} concurrent in {took:.1f} s; "
              f"{'; '.join(failed) or 'no failures'}; p99 {p99[0].split()[1] + ' ms' if p99 else '?'}")
        print(f"  RSS idle {idle['rss']:.0f} MiB -> peak (VmHWM) {peak['hwm']:.0f} MiB -> "
              f"{after['rss']:.0f} MiB {args.after} s after")
        print(f"  threads idle {idle['threads']} -> most seen {most_threads[0]} -> {after['threads']} after")
        print(f"  baseline: {BASELINE}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
