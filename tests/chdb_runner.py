"""Runs SQL on an embedded, current ClickHouse (chdb) for the tests.

stdin: {"statements": [sql, ...], "queries": [sql, ...]}
stdout: {"version": "...", "results": [{"ok": tsv} or {"error": message}, ...]},
one result per query. The statements run first, in order, in one session.
"""
import json
import sys

from chdb import session

request = json.load(sys.stdin)
s = session.Session()
for statement in request["statements"]:
    s.query(statement)
results = []
for q in request["queries"]:
    try:
        results.append({"ok": str(s.query(q, "TSV"))})
    except Exception as e:  # reported per query, so one bad query names itself
        results.append({"error": str(e)})
version = str(s.query("SELECT version()", "TSV")).strip()
json.dump({"version": version, "results": results}, sys.stdout)
