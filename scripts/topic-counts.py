#!/usr/bin/env python3
"""Messages per topic and partition in the broker (end offset - start offset).

Run it with the stack's venv python ($STACK_PYTHON in stack.env):

  scripts/topic-counts.py                         table of the prefix's topics
  scripts/topic-counts.py --json                  {"topic": {"partitions": N, "messages": M, "per_partition": [...]}}
  scripts/topic-counts.py --wait-total 1234 --timeout 60
        poll until the CDC table topics hold at least 1234 messages in all;
        prints the seconds waited, exits 1 at the deadline

With a non-transactional producer every offset is one message, so the offsets
count the change events (tombstones included).
"""
import argparse
import json
import os
import sys
import time

from confluent_kafka import Consumer, TopicPartition


def counts(consumer, prefix):
    md = consumer.list_topics(timeout=10)
    out = {}
    for name in sorted(md.topics):
        if prefix and not (name.startswith(prefix + ".") or name.endswith("." + prefix)):
            continue
        per_partition = []
        for p in sorted(md.topics[name].partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10, cached=False)
            per_partition.append(high - low)
        out[name] = {"partitions": len(per_partition), "messages": sum(per_partition), "per_partition": per_partition}
    return out


def table_total(c, prefix):
    return sum(v["messages"] for k, v in c.items() if k.startswith(prefix + ".public."))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default=os.environ.get("ETL_KAFKA_BROKERS"))
    ap.add_argument("--prefix", default=os.environ.get("ETL_TOPIC_PREFIX", "online_store"),
                    help="only topics of this prefix (and its heartbeat topic); '' for all")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--wait-total", type=int, help="wait until the <prefix>.public.* topics hold this many messages")
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    if not args.brokers:
        ap.error("--brokers or ETL_KAFKA_BROKERS is required")

    consumer = Consumer({"bootstrap.servers": args.brokers, "group.id": "topic-counts", "enable.auto.commit": False})
    try:
        if args.wait_total is not None:
            start = time.monotonic()
            while True:
                total = table_total(counts(consumer, args.prefix), args.prefix)
                if total >= args.wait_total:
                    print(f"{total} messages after {time.monotonic() - start:.2f}s")
                    return 0
                if time.monotonic() - start > args.timeout:
                    print(f"timeout: {total} of {args.wait_total} messages after {args.timeout}s", file=sys.stderr)
                    return 1
                time.sleep(0.1)
        c = counts(consumer, args.prefix)
        if args.json:
            print(json.dumps(c, indent=1))
        else:
            for name, v in c.items():
                print(f"{name:45} partitions={v['partitions']:<3} messages={v['messages']:<8} {v['per_partition']}")
            print(f"{'total (' + args.prefix + '.public.*)':45} messages={table_total(c, args.prefix)}")
        return 0
    finally:
        consumer.close()


if __name__ == "__main__":
    sys.exit(main())
