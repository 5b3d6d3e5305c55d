"""Runs SQL on an embedded, current ClickHouse (chdb) for the tests.

stdin: {"statements": [sql, ...], "queries": [sql, ...]}
stdout: {"version": "...", "results": [tsv, ...]}, one TSV text per query.
The statements run first, in order, in one session.
"""
import json
import sys

from chdb import session

request = json.load(sys.stdin)
s = session.Session()
for statement in request["statements"]:
    s.query(statement)
results = [str(s.query(q, "TSV")) for q in request["queries"]]
version = str(s.query("SELECT version()", "TSV")).strip()
json.dump({"version": version, "results": results}, sys.stdout)
