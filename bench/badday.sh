#!/usr/bin/env bash
# The bad day, measured under HTTP load (issue 12, "Done when"): how long a broken release
# serves errors before it is switched back, and how soon a server killed mid-deploy listens
# again and resolves that deploy. Each figure is printed beside a baseline of the same run.
#
#   A. Switch-back of a broken release. Service `app` (kind generic) on one local node
#      (`host = "local"`: the agent is a child of the server, no SSH), served by a small
#      Python HTTP app that reads its answer from `<base>/current` on every request (STATUS
#      and REVISION files of the release: a switch takes effect on the next request, no
#      reload needed). Health check with the default timing:
#      `health = { url = "…/version", expect = "{digest}" }` (the finalize hook writes
#      $RELEASE_DIGEST to REVISION, as README shows). An open-loop load of $APP_RATE req/s
#      on the app for the whole bench. Each of $RUNS_A runs deploys a good version, then a
#      broken one whose every answer is a 500 (the health URL too), and the deploy fails.
#      Measured: from the node's switch to its switch back (the release's own record,
#      `release show --json`: the end of the `switch` phase to the end of `switch back`),
#      and the 500s the load saw meanwhile. Baseline: the good deploy's switch to verified
#      (the end of `verify`: what a passing health check costs) and the non-200s the load
#      saw during it (0 expected).
#   B. Restart while an interrupted deploy is recovered. The app's reload hook sleeps
#      $SLOW_RELOAD s. Each of $RUNS_B runs starts a deploy of a good version, waits for the
#      node's switch, SIGKILLs the server 1-2 s into the reload, and starts it again at once.
#      The hook the killed server started runs on (its own process group) and holds the
#      node's lock to its end; the restarted server then reloads again and verifies, so the
#      resolution takes the rest of the first reload plus a whole second one (~10 s here).
#      An API load of $API_RATE req/s (GET /healthz, /v1/status as `release status` asks,
#      /v1/releases?limit=5) runs from before the kill to the end, besides the app load.
#      Measured from the exec of the new server (bash's $EPOCHREALTIME, written by the shell
#      that then execs it): to a TCP connect to the port succeeding (a probe every 1 ms), to
#      /healthz answering 200, and to the interrupted release's final transition (its
#      record); API requests refused (connection refused) once the port accepted (0 is the
#      goal), between the exec and that (the process starting: a few ms), and in the gap
#      between the kill and the exec (nothing listens there: expected); the slowest API
#      answer after the exec (requests waiting in the listen backlog); and the answer to a
#      deploy of the same cell asked once /healthz answers (409 `recovering` expected).
#      Baseline: the same restart (SIGKILL, exec at once) with nothing to recover, same load.
#
# Where things live: one directory on /dev/shm (tmpfs: the node's base, the server's data
# directory and local store, the artifacts, the load logs), removed on exit; the output
# names its file system. Loopback only: the server on 127.0.0.1:$SERVER_PORT, the app on
# 127.0.0.1:$APP_PORT. Every process started here (server and its agents and hooks, app,
# load loops, probes, watchdog) is ended on exit by a trap; the whole run is bounded by
# $BENCH_DEADLINE s, each step by its own timeout. Not run in CI (it measures, asserts little).
#
# Timestamps: the server's records (microseconds, UTC) and the load logs (Python time.time())
# read the same clock on this machine. The load is open loop: a request is sent on schedule
# whether or not the previous ones have answered (a thread pool of 64), 5 s timeout each.
#
# Usage: bash bench/badday.sh      (no root needed; python3 and curl)
#        BENCH_KEEP=1 keeps the bench directory (logs, load records, `show --json` of each release)
# Env:   RELEASE_BIN=path (else cargo build --release), RUNS_A=5, RUNS_B=3, APP_RATE=40,
#        API_RATE=20, SLOW_RELOAD=6, SERVER_PORT=18490, APP_PORT=18491, BENCH_DEADLINE=600
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RUNS_A=${RUNS_A:-5}
RUNS_B=${RUNS_B:-3}
APP_RATE=${APP_RATE:-40}
API_RATE=${API_RATE:-20}
SLOW_RELOAD=${SLOW_RELOAD:-6}
SERVER_PORT=${SERVER_PORT:-18490}
APP_PORT=${APP_PORT:-18491}
DEADLINE=${BENCH_DEADLINE:-600}

say() { printf '%s  %s\n' "$(date +%T)" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
command -v python3 >/dev/null || die "python3 is needed (the app, the load loops, the report)"
command -v curl >/dev/null || die "curl is needed"

if [ -z "${RELEASE_BIN:-}" ]; then
  say "building release (cargo build --release)"
  timeout 1800 cargo build --release --locked --quiet
  RELEASE_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/release
fi
[ -x "$RELEASE_BIN" ] || die "no release binary at $RELEASE_BIN"
BIN=$RELEASE_BIN

ROOT=$(mktemp -d /dev/shm/release-badday.XXXXXX)
FS_DESC="$ROOT ($(stat -f -c %T "$ROOT"))"
BASE=$ROOT/nodes/app
DATA=$ROOT/server/data
mkdir -p "$BASE" "$DATA" "$ROOT/art" "$ROOT/log" "$ROOT/shows"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$EPOCHREALTIME

# --- processes, and their end ---------------------------------------------------------------
SERVER_PID=
SERVER_PGIDS=()   # each server runs in a session of its own (setsid): it and its agents
BG_PIDS=()        # app, load loops, probes
WATCHDOG=
cleanup() {
  set +e
  [ -n "$WATCHDOG" ] && kill "$WATCHDOG" 2>/dev/null
  : >"$ROOT/stop"
  disown -a 2>/dev/null   # no "Killed" notices for the servers ended here
  for pgid in "${SERVER_PGIDS[@]}"; do kill -9 -- "-$pgid" 2>/dev/null; done
  # hooks run in process groups of their own; a SIGKILLed server leaves its hook running:
  # found by the node's base in their environment (a path made here), ended by id
  for env in /proc/[0-9]*/environ; do
    if grep -qzx "RELEASE_BASE=$BASE" "$env" 2>/dev/null; then
      pid=${env#/proc/}; kill -9 "${pid%/environ}" 2>/dev/null
    fi
  done
  for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  sleep 0.2
  for pid in "${BG_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
  if [ -n "${BENCH_KEEP:-}" ]; then echo "kept: $ROOT" >&2; else rm -rf "$ROOT"; fi
}
trap cleanup EXIT
trap 'say "failed at line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT TERM
( sleep "$DEADLINE"; echo "bench/badday.sh: deadline reached" >&2; kill -TERM $$ ) &
WATCHDOG=$!

# --- the helpers: the app, the load loop, the restart probe, the report ---------------------
cat >"$ROOT/badday.py" <<'PY'
"""bench/badday.sh's helpers: app, load, probe, report."""
import json, os, socket, sys, threading, time
import http.client, http.server
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from urllib.parse import urlsplit


def app(port, base):
    """Answers every request from <base>/current: STATUS (default 200) and REVISION."""
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        def do_GET(self):
            cur = os.path.join(base, "current")
            try:
                status = int(open(os.path.join(cur, "STATUS")).read().strip() or 200)
                body = open(os.path.join(cur, "REVISION"), "rb").read()
            except OSError:
                status, body = 503, b"no current release\n"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.ThreadingHTTPServer.daemon_threads = True
    http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), H).serve_forever()


def load(out, rate, deadline, stop, *urls):
    """Open loop: one GET every 1/rate s, the URLs in turn, until `stop` exists or the deadline.
    Writes one line per request: start end outcome path (outcome: status, refused, timeout...)."""
    rate, deadline = float(rate), float(deadline)
    token = os.environ.get("LOAD_TOKEN")
    targets = [urlsplit(u) for u in urls]
    done, lock = [], threading.Lock()

    def one(u):
        t0 = time.time()
        try:
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
            path = u.path + ("?" + u.query if u.query else "")
            c.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
            r = c.getresponse()
            r.read()
            outcome = str(r.status)
            c.close()
        except ConnectionRefusedError:
            outcome = "refused"
        except (socket.timeout, TimeoutError):
            outcome = "timeout"
        except ConnectionResetError:
            outcome = "reset"
        except Exception as e:  # noqa: BLE001 - any other failure is counted by its kind
            outcome = "error:" + type(e).__name__
        with lock:
            done.append((t0, time.time(), outcome, u.path))

    pool = ThreadPoolExecutor(64)
    start, i = time.time(), 0
    while time.time() < start + deadline and not os.path.exists(stop):
        wait = start + i / rate - time.time()
        if wait > 0:
            time.sleep(wait)
        pool.submit(one, targets[i % len(targets)])
        i += 1
    pool.shutdown(wait=True)
    with open(out, "w") as f:
        for t0, t1, outcome, path in sorted(done):
            f.write(f"{t0:.6f} {t1:.6f} {outcome} {path}\n")


def probe(out, port, exec_file, deadline):
    """After the exec time appears in exec_file: the first TCP connect to the port that
    succeeds (tried every 1 ms, each attempt begun after the exec), then the first /healthz 200."""
    port, end = int(port), time.time() + float(deadline)
    t_exec = accept = healthz = None
    while time.time() < end and accept is None:
        if t_exec is None:
            try:
                t_exec = float(open(exec_file).read())
            except (OSError, ValueError):
                time.sleep(0.001)
                continue
        s = socket.socket()
        s.settimeout(2)
        t = time.time()
        try:
            s.connect(("127.0.0.1", port))
            if t > t_exec:
                accept = time.time()
        except OSError:
            time.sleep(0.001)
        finally:
            s.close()
    while accept is not None and time.time() < end:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                healthz = time.time()
                break
        except OSError:
            pass
        time.sleep(0.002)
    json.dump({"exec": t_exec, "accept": accept, "healthz": healthz}, open(out, "w"))


def ts(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def phase_end(show, phase):
    ends = [ts(d["finished_at"]) for d in show["deployments"] if d["phase"] == phase]
    return max(ends) if ends else None


def med(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def report(root):
    marks = [json.loads(line) for line in open(f"{root}/marks.jsonl")]
    app = [l.split() for l in open(f"{root}/log/app.load")]
    app = [(float(a), float(b), o) for a, b, o, _ in app]
    api = [l.split() for l in open(f"{root}/log/api.load")]
    api = [(float(a), float(b), o) for a, b, o, _ in api]
    shows = {}

    def show(i):
        if i not in shows:
            shows[i] = json.load(open(f"{root}/shows/{i}.json"))
        return shows[i]

    def seen(log, t0, t1, bad):
        return sum(1 for a, _, o in log if t0 <= a <= t1 and bad(o))

    fmt = lambda x, unit="s", p=3: "-" if x is None else f"{x:.{p}f}{unit}"
    rng = lambda xs, p=3: "-" if not xs else f"{min(xs):.{p}f}-{max(xs):.{p}f}"
    rows = []

    # A
    good, bad = [m for m in marks if m["kind"] == "good"], [m for m in marks if m["kind"] == "bad"]
    g_verify = [phase_end(show(m["id"]), "verify") - phase_end(show(m["id"]), "switch") for m in good]
    g_err = [seen(app, m["t0"], m["t1"], lambda o: o != "200") for m in good]
    b_back = [phase_end(show(m["id"]), "switch back") - phase_end(show(m["id"]), "switch") for m in bad]
    b_500 = [seen(app, m["t0"], m["t1"], lambda o: o == "500") for m in bad]
    b_oth = [seen(app, m["t0"], m["t1"], lambda o: o not in ("200", "500")) for m in bad]
    b_state = sorted({show(m["id"])["state"] for m in bad})
    b_first_wrong = []
    for m in bad:
        e = [a for a, _, o in app if m["t0"] <= a <= m["t1"] and o == "500"]
        b_first_wrong.append(e[-1] - e[0] if e else None)
    app_all = len(app)
    app_rate = app_all / (app[-1][0] - app[0][0]) if app_all > 1 else 0

    print("A. a broken release (every answer 500), health check with the default timing")
    print(f"   {'':44} {'median':>9} {'min-max':>15}   per run")
    def row(name, xs, unit="s", p=3):
        print(f"   {name:44} {fmt(med(xs), unit, p):>9} {rng(xs, p):>15}   {' '.join(fmt(x, '', p) for x in xs)}")
    row("broken: switch -> switch back", b_back)
    row("broken: 500s seen by the app load", b_500, "", 0)
    row("broken: first to last 500 seen", [x for x in b_first_wrong if x is not None])
    row("broken: other non-200s seen (refused...)", b_oth, "", 0)
    row("baseline, good: switch -> verified", g_verify)
    row("baseline, good: non-200s seen by the app load", g_err, "", 0)
    print(f"   broken releases ended: {', '.join(b_state)}; goal: switched back within 2 s of the switch: "
          f"{'PASS' if b_back and max(b_back) < 2 else 'MISS'} (max {fmt(max(b_back) if b_back else None)})")

    # B
    print()
    print(f"B. restart after SIGKILL, under API load ({'/'.join(['healthz', 'status', 'releases'])}) and the app load")
    print(f"   {'':44} {'recovering':>22}   {'baseline: nothing to recover':>28}")
    rec = [m for m in marks if m["kind"] == "recover"]
    cold = [m for m in marks if m["kind"] == "cold"]

    def figures(ms):
        out = {k: [] for k in ("accept", "healthz", "resolved", "refused_bind", "refused_after", "refused_gap", "other", "slowest", "app")}
        for m in ms:
            p = json.load(open(m["probe"]))
            ex = p["exec"]
            out["accept"].append(None if p["accept"] is None else (p["accept"] - ex) * 1000)
            out["healthz"].append(None if p["healthz"] is None else (p["healthz"] - ex) * 1000)
            if m.get("id") is not None:
                out["resolved"].append(ts(show(m["id"])["transitions"][-1]["at"]) - ex)
            t1 = m["t1"]
            bound = p["accept"] or t1
            out["refused_bind"].append(seen(api, ex, bound, lambda o: o == "refused"))
            out["refused_after"].append(seen(api, bound, t1, lambda o: o == "refused"))
            out["refused_gap"].append(seen(api, m["kill"], ex, lambda o: o == "refused"))
            out["other"].append(seen(api, m["kill"], t1, lambda o: o not in ("200", "refused")))
            out["slowest"].append(max([(b - a) * 1000 for a, b, o in api if ex <= a <= t1 and o == "200"], default=None))
            out["app"].append(seen(app, m["kill"], t1, lambda o: o != "200"))
        return out
    fr, fc = figures(rec), figures(cold)

    def cell(xs, unit, p):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "-"
        return f"{med(xs):.{p}f}{unit} ({rng(xs, p)})"
    def brow(name, key, unit, p):
        print(f"   {name:44} {cell(fr[key], unit, p):>22}   {cell(fc[key], unit, p):>28}")
    brow("exec -> port accepts a connection", "accept", "ms", 1)
    brow("exec -> /healthz answers 200", "healthz", "ms", 1)
    brow("exec -> interrupted deploy resolved", "resolved", "s", 2)
    brow("API refused once the port accepted", "refused_after", "", 0)
    brow("API refused, exec -> port accepted", "refused_bind", "", 0)
    brow("API refused, kill -> exec (nothing runs)", "refused_gap", "", 0)
    brow("API answers other than 200/refused", "other", "", 0)
    brow("slowest API 200 after the exec", "slowest", "ms", 1)
    brow("app non-200s, kill -> end of the run", "app", "", 0)
    states = sorted({show(m["id"])["state"] for m in rec})
    asked = [m.get("asked") for m in rec]
    print(f"   interrupted deploys ended: {', '.join(states)}; a deploy of that cell asked once /healthz "
          f"answered: {', '.join(str(a) for a in asked)}")
    print(f"   (medians (min-max) over {len(rec)} and {len(cold)} restarts; a run ends "
          f"{rec[0]['tail'] if rec else 0} s after the resolution)")
    apis = len(api)
    print()
    print(f"load: app {app_all} requests ({app_rate:.1f}/s), API {apis} requests; "
          f"no-listener gaps are the only refusals expected")


if __name__ == "__main__":
    {"app": app, "load": load, "probe": probe, "report": report}[sys.argv[1]](*sys.argv[2:])
PY
tools() { python3 "$ROOT/badday.py" "$@"; }   # in the foreground; in the background, python3
# itself, so that $! is the process the trap ends

# --- the app, its versions, the server -----------------------------------------------------
curl -s -o /dev/null "http://127.0.0.1:$APP_PORT/" && die "port $APP_PORT is taken (APP_PORT=...)"
curl -s -o /dev/null "http://127.0.0.1:$SERVER_PORT/" && die "port $SERVER_PORT is taken (SERVER_PORT=...)"
python3 "$ROOT/badday.py" app "$APP_PORT" "$BASE" >"$ROOT/log/app.log" 2>&1 &
BG_PIDS+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$APP_PORT/" && break; sleep 0.05; done
curl -s -o /dev/null "http://127.0.0.1:$APP_PORT/" || die "the app did not start: $(cat "$ROOT/log/app.log")"

GOODS=$((RUNS_A + RUNS_B))
for k in $(seq 0 "$GOODS"); do
  mkdir -p "$ROOT/art/good$k"; echo 200 >"$ROOT/art/good$k/STATUS"; echo "good $k" >"$ROOT/art/good$k/VERSION"
done
for k in $(seq "$RUNS_A"); do
  mkdir -p "$ROOT/art/bad$k"; echo 500 >"$ROOT/art/bad$k/STATUS"; echo "bad $k" >"$ROOT/art/bad$k/VERSION"
done

cat >"$ROOT/server/release.toml" <<EOF
[server]
listen = "127.0.0.1:$SERVER_PORT"
data_dir = "$DATA"

[[environment]]
name = "staging"

[service.app]
kind = "generic"
keep = 3
hooks.finalize = ["echo \$RELEASE_DIGEST > REVISION"]
hooks.reload = ["test ! -e $ROOT/slow || sleep $SLOW_RELOAD"]
health = { url = "http://127.0.0.1:$APP_PORT/version", expect = "{digest}" }

[[service.app.node]]
environment = "staging"
host = "local"
base = "$BASE"
EOF

N_START=0
# start_server: a new server in a session of its own; the shell that execs it first writes
# $EPOCHREALTIME to $ROOT/log/exec-N (the probe reads it), N counting starts
start_server() {
  N_START=$((N_START + 1))
  EXEC_FILE=$ROOT/log/exec-$N_START
  RELEASE_LOG=info setsid bash -c 'printf %s "$EPOCHREALTIME" >"$1"; shift; exec "$@"' _ "$EXEC_FILE" \
    "$BIN" serve --config "$ROOT/server/release.toml" --data-dir "$DATA" \
    </dev/null >/dev/null 2>>"$ROOT/log/server.log" &
  SERVER_PID=$!
  SERVER_PGIDS+=("$SERVER_PID")
}
wait_healthz() {
  for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$SERVER_PORT/healthz" && return 0; sleep 0.05; done
  die "the server does not answer /healthz: $(tail -5 "$ROOT/log/server.log")"
}
start_server
wait_healthz
export RELEASE_SERVER=http://127.0.0.1:$SERVER_PORT
token() { "$BIN" token create "$1" --role "$2" --owner bench --data-dir "$DATA" --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'; }
RELEASE_TOKEN=$(token bench deployer,ci)
READER=$(token reader auditor)
export RELEASE_TOKEN
upload() { timeout 60 "$BIN" upload "$ROOT/art/$1" --service app --version "$1" --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])'; }
declare -A DIG
for k in $(seq 0 "$GOODS"); do DIG[good$k]=$(upload "good$k"); done
for k in $(seq "$RUNS_A"); do DIG[bad$k]=$(upload "bad$k"); done
say "server up on $RELEASE_SERVER, $((GOODS + 1 + RUNS_A)) versions uploaded; node base on $FS_DESC"
# a release live before the load starts: every measured deploy replaces a good one
timeout 120 "$BIN" deploy app --env staging "${DIG[good0]}" --wait >>"$ROOT/log/cli.log" 2>&1 ||
  die "the first deploy failed: $(tail -5 "$ROOT/log/cli.log")"

# --- the load loops: the app for the whole bench, the API too ------------------------------
python3 "$ROOT/badday.py" load "$ROOT/log/app.load" "$APP_RATE" "$DEADLINE" "$ROOT/stop" "http://127.0.0.1:$APP_PORT/" &
BG_PIDS+=($!); APP_LOAD=$!
LOAD_TOKEN=$READER python3 "$ROOT/badday.py" load "$ROOT/log/api.load" "$API_RATE" "$DEADLINE" "$ROOT/stop" \
  "http://127.0.0.1:$SERVER_PORT/healthz" "http://127.0.0.1:$SERVER_PORT/v1/status" \
  "http://127.0.0.1:$SERVER_PORT/v1/releases?limit=5" &
BG_PIDS+=($!); API_LOAD=$!
sleep 1

now() { echo "$EPOCHREALTIME"; }
mark() { printf '%s\n' "$1" >>"$ROOT/marks.jsonl"; }
last_id() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["id"])'; }
state_of() { "$BIN" show "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }
save_show() { "$BIN" show "$1" --json >"$ROOT/shows/$1.json"; }
# deploy KIND NAME: deploy --wait, its window and id in the marks; the exit code is not judged
# here (a broken release is meant to fail), the recorded state is, in the report
deploy() {
  local kind=$1 name=$2 t0 out id
  t0=$(now)
  out=$(timeout 120 "$BIN" deploy app --env staging "${DIG[$name]}" --wait --json 2>>"$ROOT/log/cli.log") || true
  id=$(echo "$out" | last_id) || die "deploy $name: no release id in: $out"
  mark "{\"kind\": \"$kind\", \"id\": $id, \"t0\": $t0, \"t1\": $(now)}"
  save_show "$id"
  echo "$id"
}

# --- A. a broken release, after a good one, $RUNS_A times -----------------------------------
for k in $(seq "$RUNS_A"); do
  id=$(deploy good "good$k"); [ "$(state_of "$id")" = live ] || die "good$k did not go live (release $id)"
  sleep 0.5
  id=$(deploy bad "bad$k"); [ "$(state_of "$id")" = failed ] || die "bad$k was not failed (release $id)"
  sleep 0.5
done
say "A done: $RUNS_A good and $RUNS_A broken deploys"

# --- B. restarts: with nothing to recover, then during a slow reload ------------------------
TAIL=1
# restart KIND [ID]: SIGKILL the server, start it again at once, probe it; for a recovery,
# wait for the release to be final
restart() {
  local kind=$1 id=${2:-} probe t_kill asked=null st
  probe=$ROOT/log/probe-$((N_START + 1)).json
  python3 "$ROOT/badday.py" probe "$probe" "$SERVER_PORT" "$ROOT/log/exec-$((N_START + 1))" 60 &
  local probe_pid=$!; BG_PIDS+=("$probe_pid")
  sleep 0.3   # the probe's python is up
  t_kill=$(now)
  kill -9 "$SERVER_PID"
  wait "$SERVER_PID" 2>/dev/null || true
  start_server
  timeout 65 tail --pid="$probe_pid" -f /dev/null || die "the restart probe did not end"
  if [ -n "$id" ]; then
    # a deploy of the same cell, asked while it is recovered: its status and error code
    asked=$(curl -s -m 5 -o "$ROOT/log/asked.json" -w '%{http_code}' -H "Authorization: Bearer $RELEASE_TOKEN" \
      -H 'Content-Type: application/json' -X POST "$RELEASE_SERVER/v1/releases" \
      -d "{\"service\": \"app\", \"environment\": \"staging\", \"digest\": \"${DIG[$3]}\"}")
    asked="\"$asked $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("error", {}).get("code", "accepted"))' "$ROOT/log/asked.json" 2>/dev/null || echo '?')\""
    for _ in $(seq 600); do
      st=$(state_of "$id"); [ "$st" = deploying ] || break; sleep 0.1
    done
    [ "$st" != deploying ] || die "release $id still deploying 60 s after the restart"
    case $asked in *" accepted\"") die "a deploy asked during the recovery was accepted: the cell was not held" ;; esac
    save_show "$id"
  else
    wait_healthz
  fi
  sleep "$TAIL"
  mark "{\"kind\": \"$kind\", \"id\": ${id:-null}, \"kill\": $t_kill, \"t1\": $(now), \"probe\": \"$probe\", \"asked\": $asked, \"tail\": $TAIL}"
}
: >"$ROOT/slow"
for k in $(seq "$RUNS_B"); do
  restart cold
  sleep 1
  name=good$((RUNS_A + k))
  id=$(timeout 30 "$BIN" deploy app --env staging "${DIG[$name]}" --json | last_id)
  # wait for the node's switch, then 1 s into the slow reload
  for _ in $(seq 300); do
    "$BIN" show "$id" --json | python3 -c 'import json,sys; sys.exit(not any(d["phase"] == "switch" for d in json.load(sys.stdin)["deployments"]))' && break
    sleep 0.05
  done
  sleep 1
  [ "$(state_of "$id")" = deploying ] || die "release $id is not deploying when the server is killed"
  restart recover "$id" "$name"
  sleep 1
done
rm -f "$ROOT/slow"
say "B done: $RUNS_B restarts with nothing to recover, $RUNS_B during a ${SLOW_RELOAD}s reload"

: >"$ROOT/stop"
wait "$APP_LOAD" "$API_LOAD"

# --- report ----------------------------------------------------------------------------------
printf '\nrelease bad-day bench, %s, %s\n' "$(date -u +%FT%TZ)" "$("$BIN" --version)"
printf 'machine: %s cores, Linux %s; load average at start %s, at end %s\n' "$(nproc)" "$(uname -r)" \
  "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf 'node, server data and store on: %s; one local node; app load %s req/s, API load %s req/s\n' \
  "$FS_DESC" "$APP_RATE" "$API_RATE"
printf 'health = { url, expect = "{digest}" } with the defaults; reload hook in B: sleep %s s\n\n' "$SLOW_RELOAD"
tools report "$ROOT"
awk -v a="$STARTED" -v b="$EPOCHREALTIME" 'BEGIN {printf "bench wall time: %.0f s\n", b - a}'
