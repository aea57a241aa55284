#!/usr/bin/env python3
"""Registry at scale: 1,000,000 releases and 5,000,000 audit events, generated straight into
SQLite (the audit events as a real hash chain, continuing the one the binary started), then:

  - `status`, `history --limit 50` and `show` over HTTP on a running `release serve`,
    p50/p99 of many requests on one keep-alive connection (goal: p99 < 5 ms each);
  - the web pages (matrix, timeline, release, artifact, audit log with filters) the same way;
  - `release audit verify` end to end (goal: < 30 s).

Usage: bench/registry.py [--releases N] [--events N] [--requests N] [--binary PATH] [--json FILE]
                         [--api-only]
Runs in a temporary directory on tmpfs (/dev/shm) unless --dir is given. --binary (or
RELEASE_BIN) skips the cargo build; --api-only measures the API reads alone (no pages, no
audit verify); --json also writes every figure to FILE (bench/run reads it).
"""
import argparse
import atexit
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

SERVICES = [f"svc{i}" for i in range(8)]
ENVS = ["staging", "production"]


def ts(i):
    # Monotone fake times, microsecond RFC 3339, a second apart.
    t = time.gmtime(1_700_000_000 + i)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{i % 1_000_000:06d}Z"


def generate(db_path, releases, events):
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    cur = conn.cursor()
    cur.execute("BEGIN")
    for i, s in enumerate(SERVICES):
        cur.execute("INSERT INTO services (name, kind, recorded_at) VALUES (?, 'generic', ?)", (s, ts(0)))
    cur.execute("INSERT INTO environments (name, position, promote_from, requires_approval, recorded_at) "
                "VALUES ('staging', 0, NULL, 0, ?)", (ts(0),))
    cur.execute("INSERT INTO environments (name, position, promote_from, requires_approval, recorded_at) "
                "VALUES ('production', 1, 'staging', 1, ?)", (ts(0),))
    digests = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(10_000)]
    cur.executemany("INSERT INTO artifacts VALUES (?, 1000, 10240, 10, '[]', ?)", [(d, ts(0)) for d in digests])
    cur.executemany(
        "INSERT INTO artifact_uploads (service, digest, version, uploaded_by, uploader_owner, uploaded_at) "
        "VALUES (?, ?, ?, 'ci', 'gitlab', ?)",
        [(s, d, f"1.{i}", ts(0)) for s in SERVICES for i, d in enumerate(digests)],
    )
    cells = len(SERVICES) * len(ENVS)
    last_in_cell = {}
    rows, transitions = [], []
    for i in range(1, releases + 1):
        service, env = SERVICES[i % len(SERVICES)], ENVS[(i // len(SERVICES)) % len(ENVS)]
        last_in_cell[(service, env)] = i
        rows.append((i, service, env, digests[i % len(digests)], "deploy", "superseded", "ci", "gitlab", ts(i), ts(i)))
        transitions += [(i, "approved", ts(i), "ci"), (i, "deploying", ts(i), "release"), (i, "live", ts(i), "release")]
        if len(rows) >= 100_000:
            flush(cur, rows, transitions)
            rows, transitions = [], []
    flush(cur, rows, transitions)
    # The newest release of each cell is live.
    cur.execute("DROP TRIGGER releases_state_machine")
    cur.executemany("UPDATE releases SET state = 'live' WHERE id = ?", [(i,) for i in last_in_cell.values()])
    conn.commit()
    print(f"  {releases} releases in {cells} cells, {3 * releases} transitions", flush=True)

    cur.execute("BEGIN")
    seq, prev = cur.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
    batch = []
    for n in range(events):
        seq += 1
        # Mostly CI deploys; people and refusals now and then; one rare actor (the worst
        # case for a filter without an index).
        at, actor, owner, action = ts(seq), "ci", "gitlab", "release.deploy"
        if seq % 10 == 0:
            actor, owner, action = "bob", "bob", "release.approve"
        elif seq % 10 == 5:
            actor, owner, action = "release", "release", "release.live"
        elif seq % 1000 == 7:
            actor, owner, action = "(unauthenticated)", "", "request.refused"
        if seq % 250_000 == 3:
            actor, owner, action = "mallory", "mallory", "request.refused"
        subject = f"release/{seq % releases + 1}"
        details = json.dumps({"service": SERVICES[seq % 8], "environment": "staging"}, separators=(",", ":"))
        fields = json.dumps([seq, at, actor, owner, action, subject, details], separators=(",", ":"), ensure_ascii=False)
        h = hashlib.sha256(prev + fields.encode()).digest()
        batch.append((seq, at, actor, owner, action, subject, details, prev, h))
        prev = h
        if len(batch) >= 100_000:
            cur.executemany("INSERT INTO audit_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
            batch = []
    cur.executemany("INSERT INTO audit_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    conn.close()
    print(f"  {events} audit events chained", flush=True)


def flush(cur, rows, transitions):
    cur.executemany(
        "INSERT INTO releases (id, service, environment, digest, kind, state, requested_by, requester_owner, "
        "requested_at, state_changed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    cur.executemany("INSERT INTO release_transitions (release_id, state, at, actor) VALUES (?, ?, ?, ?)", transitions)


def percentiles(samples):
    s = sorted(samples)
    return s[len(s) // 2] * 1000, s[int(len(s) * 0.99)] * 1000, s[-1] * 1000


def measure(host, port, token, paths, n):
    conn = http.client.HTTPConnection(host, port)
    headers = {"Authorization": f"Bearer {token}"}
    for path in paths[:20]:  # warm up
        conn.request("GET", path, headers=headers)
        conn.getresponse().read()
    samples = []
    for i in range(n):
        path = paths[i % len(paths)]
        start = time.perf_counter()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        samples.append(time.perf_counter() - start)
        if response.status != 200:
            sys.exit(f"{path}: HTTP {response.status}")
    return percentiles(samples)


def wait_for_chain(host, port, token, timeout=120):
    conn = http.client.HTTPConnection(host, port)
    started = time.time()
    while time.time() - started < timeout:
        conn.request("GET", "/audit", headers={"Authorization": f"Bearer {token}"})
        body = conn.getresponse().read().decode()
        if "The hash chain is intact" in body and "a full check is running" not in body:
            print(f"  audit chain checked by the server in {time.time() - started:.1f} s (at start, in the background)")
            return
        if "The hash chain is broken" in body:
            sys.exit("the generated chain is broken")
        time.sleep(0.5)
    sys.exit("the server did not finish checking the audit chain")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--releases", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--dir")
    parser.add_argument("--binary", default=os.environ.get("RELEASE_BIN"))
    parser.add_argument("--json")
    parser.add_argument("--api-only", action="store_true")
    args = parser.parse_args()

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.binary:
        binary = os.path.abspath(args.binary)
    else:
        subprocess.run(["cargo", "build", "--release", "--locked", "--quiet"], cwd=repo, check=True)
        binary = os.path.join(repo, "target", "release", "release")
    work = args.dir or tempfile.mkdtemp(prefix="release-bench-registry-", dir="/dev/shm")
    if not args.dir:
        atexit.register(shutil.rmtree, work, True)  # also on a failure or SIGTERM (below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    data = os.path.join(work, "data")
    config = os.path.join(work, "release.toml")
    with open(config, "w") as f:
        f.write(f'[server]\nlisten = "127.0.0.1:0"\ndata_dir = "{data}"\n')
        for s in SERVICES:
            f.write(f'[service.{s}]\nkind = "generic"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELEASE_")}
    token = json.loads(
        subprocess.run([binary, "token", "create", "bench", "--role", "auditor", "--data-dir", data, "--json"],
                       check=True, capture_output=True, env=env).stdout)["token"]

    print(f"generating into {work} (tmpfs)", flush=True)
    started = time.time()
    generate(os.path.join(data, "registry.db"), args.releases, args.events)
    print(f"  generated in {time.time() - started:.0f} s; registry {os.path.getsize(os.path.join(data, 'registry.db')) / 1e9:.2f} GB", flush=True)

    log = open(os.path.join(work, "server.log"), "w")
    server = subprocess.Popen([binary, "serve", "--config", config], stderr=log, env={**env, "RELEASE_LOG": "warn,release::cli=info"})
    try:
        url = None
        for _ in range(600):
            text = open(os.path.join(work, "server.log")).read()
            m = re.search(r"listening on http://([0-9.]+):(\d+)", text)
            if m:
                url = (m.group(1), int(m.group(2)))
                break
            time.sleep(0.05)
        if not url:
            sys.exit("the server did not start:\n" + open(os.path.join(work, "server.log")).read())
        rng = random.Random(1)
        ids = [rng.randint(1, args.releases) for _ in range(500)]
        cells = [(s, e) for s in SERVICES for e in ENVS]
        results = {
            "healthz (floor)": measure(*url, token, ["/healthz"], args.requests),
            "status": measure(*url, token, ["/v1/status"], args.requests),
            "history --limit 50": measure(
                *url, token, [f"/v1/releases?service={s}&environment={e}&limit=50" for s, e in cells], args.requests),
            "history (all) --limit 50": measure(*url, token, ["/v1/releases?limit=50"], args.requests),
            "show": measure(*url, token, [f"/v1/releases/{i}" for i in ids], args.requests),
        }
        verify_s, verified = None, {}
        if args.api_only:
            pages = {}
        else:
            # The pages check the audit chain whole once, in the background, at start: wait for it.
            wait_for_chain(*url, token)
            digests = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(0, 10_000, 20)]
            pages = {
                "page /": ["/"],
                "page /services/S?env=E": [f"/services/{s}?env={e}" for s, e in cells],
                "page /services/S (all envs)": [f"/services/{s}" for s in SERVICES],
                "page /releases/ID": [f"/releases/{i}" for i in ids],
                "page /artifacts/DIGEST": [f"/artifacts/{d}" for d in digests],
                "page /audit": ["/audit"],
                "page /audit?actor=bob": ["/audit?actor=bob"],
                "page /audit?actor=mallory (rare)": ["/audit?actor=mallory"],
                "page /audit?action=release.live": ["/audit?action=release.live"],
                "page /audit?service=svc3": ["/audit?service=svc3"],
                "page /audit?from=…&until=…": [f"/audit?from={ts(args.events // 2)}&until={ts(args.events // 2 + 3600)}"],
            }
            for name, paths in pages.items():
                results[name] = measure(*url, token, paths, max(200, args.requests // 10))
            started = time.time()
            out = subprocess.run([binary, "audit", "verify", "--json", "--server", f"http://{url[0]}:{url[1]}"],
                                 capture_output=True, env={**env, "RELEASE_TOKEN": token})
            verify_s = time.time() - started
            verified = json.loads(out.stdout or b"{}")
    finally:
        server.terminate()
        server.wait()

    print(f"\nrelease registry bench, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {os.cpu_count()} cores, "
          f"registry on tmpfs: {args.releases} releases, {args.events} audit events")
    print(f"{'request over HTTP (keep-alive)':<32} {'p50':>8} {'p99':>8} {'max':>8}   (goal: p99 < 5 ms)")
    for name, (p50, p99, worst) in results.items():
        print(f"{name:<32} {p50:>6.2f}ms {p99:>6.2f}ms {worst:>6.2f}ms")
    if verify_s is not None:
        print(f"{'audit verify (whole chain)':<32} {verify_s:>7.1f} s  ok={verified.get('ok')} events={verified.get('events')}   (goal: < 30 s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"releases": args.releases, "events": args.events, "requests": args.requests,
                       "ms": {k: {"p50": v[0], "p99": v[1], "max": v[2]} for k, v in results.items()},
                       "audit_verify_s": verify_s, "audit_verify_ok": verified.get("ok")}, f, indent=1)


if __name__ == "__main__":
    main()
