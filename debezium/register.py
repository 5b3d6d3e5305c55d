#!/usr/bin/env python3
"""Register the Debezium connector with Kafka Connect, idempotently.

Reads a connector document ({"name": ..., "config": {...}}, the same file the
native stack uses), then:

1. waits until Kafka Connect's REST API answers (--wait-timeout);
2. GETs /connectors/<name>/config: if the connector is missing or its config
   differs from the file, PUTs the file's config to /connectors/<name>/config
   (PUT creates or updates); if it is the same, changes nothing and says so;
3. waits until /connectors/<name>/status shows the connector and every task
   RUNNING (--status-timeout). A FAILED connector or task prints its trace and
   exits 1.

Exit codes: 0 registered and running, 1 Connect unreachable / refused the
config / the connector failed or did not start in time, 2 bad arguments or an
unreadable connector file. Python 3 standard library only.
"""

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "online-store-connector.json")
# HTTP statuses worth retrying: Connect answers 409 while its workers rebalance
# and 5xx while it is still starting.
RETRYABLE = {409, 500, 502, 503, 504}


def log(message):
    print(f"register: {message}", flush=True)


def fail(message, code=1):
    print(f"register: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


class Unreachable(Exception):
    """Connect did not answer (refused, reset, timed out)."""


def request(base_url, method, path, body=None, timeout=10.0):
    """One HTTP call; returns (status, parsed JSON or text). Raises Unreachable."""
    data = None
    headers = {"Accept": "application/json"}
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(base_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=max(timeout, 0.1)) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        raise Unreachable(str(getattr(err, "reason", err))) from err
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text) if text.strip() else None
    except ValueError:
        return status, text


def describe(payload):
    if isinstance(payload, dict) and "message" in payload:
        return payload["message"]
    return json.dumps(payload) if not isinstance(payload, str) else payload


class Deadline:
    def __init__(self, seconds):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self):
        return self.end - time.monotonic()

    def expired(self):
        return self.remaining() <= 0


def call_until(deadline, interval, what, base_url, method, path, body=None, accept=(200,)):
    """Repeat a call while Connect is unreachable or answers a retryable status."""
    last = "no answer yet"
    while True:
        try:
            status, payload = request(base_url, method, path, body, timeout=min(10.0, deadline.remaining()))
            if status in accept:
                return status, payload
            if status not in RETRYABLE:
                fail(f"{what}: {method} {path} answered HTTP {status}: {describe(payload)}")
            last = f"HTTP {status}: {describe(payload)}"
        except Unreachable as err:
            last = str(err)
        if deadline.expired():
            fail(f"{what}: Kafka Connect at {base_url} did not answer within {deadline.seconds:g} s (last: {last})")
        time.sleep(max(0.0, min(interval, deadline.remaining())))


def normalized(config):
    """Connect keeps every value as a string; compare the file's config the same way."""
    out = {}
    for key, value in config.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif value is not None and not isinstance(value, str):
            value = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        out[key] = value
    return out


def read_connector(path):
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as err:
        fail(f"cannot read connector file {path}: {err}", code=2)
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or not doc["name"]:
        fail(f"{path}: expected a JSON object with a non-empty string \"name\"", code=2)
    if not isinstance(doc.get("config"), dict) or not doc["config"]:
        fail(f"{path}: expected a non-empty object \"config\"", code=2)
    if doc["config"].get("name", doc["name"]) != doc["name"]:
        fail(f"{path}: config.name {doc['config']['name']!r} differs from name {doc['name']!r}", code=2)
    return doc["name"], doc["config"]


def wait_running(base_url, name, deadline, interval):
    path = f"/connectors/{urllib.parse.quote(name, safe='')}/status"
    last = "no status yet"
    while True:
        try:
            status, payload = request(base_url, "GET", path, timeout=min(10.0, deadline.remaining()))
        except Unreachable as err:
            status, payload = None, None
            last = str(err)
        if status == 200 and isinstance(payload, dict):
            connector = payload.get("connector") or {}
            tasks = payload.get("tasks") or []
            failed = []
            if connector.get("state") == "FAILED":
                failed.append(("connector", connector))
            failed += [(f"task {t.get('id')}", t) for t in tasks if t.get("state") == "FAILED"]
            if failed:
                for what, item in failed:
                    print(
                        f"register: error: {name}: {what} FAILED on {item.get('worker_id', '?')}:\n"
                        f"{item.get('trace', '(no trace)')}",
                        file=sys.stderr,
                        flush=True,
                    )
                fail(
                    f"connector {name} failed; fix the cause, then restart it: POST "
                    f"{base_url}/connectors/{name}/restart?includeTasks=true&onlyFailed=true"
                )
            states = [t.get("state") for t in tasks]
            last = f"connector {connector.get('state')}, tasks {states or 'none yet'}"
            if connector.get("state") == "RUNNING" and tasks and all(s == "RUNNING" for s in states):
                log(f"connector {name} is RUNNING with {len(tasks)} task(s) RUNNING")
                return
        elif status is not None:
            last = f"HTTP {status}: {describe(payload)}"
        if deadline.expired():
            fail(f"connector {name} was not RUNNING within {deadline.seconds:g} s (last: {last})")
        time.sleep(max(0.0, min(interval, deadline.remaining())))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--connect-url",
        default=os.environ.get("CONNECT_URL", "http://debezium:8083"),
        help="Kafka Connect REST URL (default: $CONNECT_URL or http://debezium:8083)",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="connector JSON document (default: %(default)s)")
    parser.add_argument(
        "--wait-timeout", type=float, default=300.0, help="seconds to wait for Connect to answer (default: %(default)s)"
    )
    parser.add_argument(
        "--status-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for the connector and its tasks to be RUNNING (default: %(default)s)",
    )
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.wait_timeout <= 0 or args.status_timeout <= 0 or args.interval <= 0:
        fail("--wait-timeout, --status-timeout and --interval must be positive", code=2)

    base_url = args.connect_url.rstrip("/")
    name, config = read_connector(args.config)
    config_path = f"/connectors/{urllib.parse.quote(name, safe='')}/config"

    deadline = Deadline(args.wait_timeout)
    log(f"waiting for Kafka Connect at {base_url} (up to {args.wait_timeout:g} s)")
    _, info = call_until(deadline, args.interval, "waiting for Kafka Connect", base_url, "GET", "/")
    version = info.get("version", "?") if isinstance(info, dict) else "?"
    log(f"Kafka Connect {version} answers")

    status, current = call_until(
        deadline, args.interval, f"reading connector {name}", base_url, "GET", config_path, accept=(200, 404)
    )
    # Connect's GET .../config includes "name" even when the PUT body had none.
    wanted = normalized(config)
    wanted.setdefault("name", name)
    if status == 200 and isinstance(current, dict) and normalized(current) == wanted:
        log(f"connector {name} is already registered with this config; nothing changed")
    else:
        if status == 404:
            log(f"connector {name} is not registered; creating it")
        else:
            current = normalized(current) if isinstance(current, dict) else {}
            changed = sorted(k for k in set(wanted) | set(current) if wanted.get(k) != current.get(k))
            log(f"connector {name} config differs ({', '.join(changed)}); updating it")
        status, payload = call_until(
            Deadline(max(args.wait_timeout, 1.0)),
            args.interval,
            f"registering connector {name}",
            base_url,
            "PUT",
            config_path,
            body=config,
            accept=(200, 201),
        )
        log(f"connector {name} {'created' if status == 201 else 'updated'}")

    wait_running(base_url, name, Deadline(args.status_timeout), args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
