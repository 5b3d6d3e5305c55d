#!/usr/bin/env python3
"""Runs the real Debezium Postgres connector in pydbzengine's embedded engine.

The connector settings come from debezium/online-store-connector.json (the same
file Kafka Connect uses in the compose stack); only the database address, the
offset storage and the converter switches are added or overridden here.

Sinks:
  --sink kafka   forward every record to the Kafka-protocol broker (topic = the
                 record's destination, key and value as produced by Kafka
                 Connect's JsonConverter, None value = tombstone). The batch is
                 flushed before the handler returns: the engine acknowledges a
                 batch, and saves its offsets, only after that.
  --sink jsonl   append {"topic": ..., "key": ..., "value": ...} lines to a file
                 (used to capture test fixtures).

Run it with the venv's python (scripts/install makes it). It stops cleanly on
SIGTERM / SIGINT: the engine is closed (offsets flushed) and the process exits.
It exits with status 1 when the connector stops by itself or a batch cannot be
delivered (the batch is then not acknowledged, so it is sent again on restart).

Environment (defaults for the flags of the same meaning):
  PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE   the database (overrides the JSON)
  ETL_KAFKA_BROKERS                            --brokers
  ENGINE_SCHEMAS, ENGINE_DECIMAL_HANDLING_MODE, ENGINE_SINK, ENGINE_STATE_DIR
  ENGINE_MESSAGE_TIMEOUT_MS   kafka sink: give up on a batch the broker has not
                              acknowledged after this long (default 60000)
  PYDBZ_JVM_OPTS              extra JVM options
"""
import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONNECTOR = REPO / "debezium" / "online-store-connector.json"

log = logging.getLogger("debezium-engine")


def parse_args():
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connector", default=str(DEFAULT_CONNECTOR), help="Kafka Connect connector JSON")
    p.add_argument("--state-dir", default=env("ENGINE_STATE_DIR", "."),
                   help="working directory: offsets file and the JVM's log4j config go here")
    p.add_argument("--offsets-file", help="default: STATE_DIR/offsets.dat")
    p.add_argument("--pg-host", default=env("PGHOST", "127.0.0.1"))
    p.add_argument("--pg-port", default=env("PGPORT"))
    p.add_argument("--pg-user", default=env("PGUSER"))
    p.add_argument("--pg-password", default=env("PGPASSWORD"))
    p.add_argument("--pg-dbname", default=env("PGDATABASE"))
    p.add_argument("--schemas", choices=["on", "off"], default=env("ENGINE_SCHEMAS"),
                   help="JSON converter schemas for key and value (default: as in the connector JSON)")
    p.add_argument("--decimal-handling-mode", choices=["precise", "string", "double"],
                   default=env("ENGINE_DECIMAL_HANDLING_MODE"),
                   help="default: as in the connector JSON")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any engine/connector property (repeatable)")
    p.add_argument("--sink", choices=["kafka", "jsonl"], default=env("ENGINE_SINK", "kafka"))
    p.add_argument("--brokers", default=env("ETL_KAFKA_BROKERS"), help="bootstrap servers for --sink kafka")
    p.add_argument("--output", help="file for --sink jsonl (appended to)")
    args = p.parse_args()
    if args.sink == "kafka" and not args.brokers:
        p.error("--sink kafka needs --brokers (or ETL_KAFKA_BROKERS)")
    if args.sink == "jsonl" and not args.output:
        p.error("--sink jsonl needs --output")
    return args


def resolve_env_placeholders(props):
    """The connector JSON names its credentials ${env:NAME}: Kafka Connect resolves them with its
    EnvVarConfigProvider (docker-compose.yml); the embedded engine has none, so this does it.
    A password nobody set is left out (the native stack's Postgres trusts local connections);
    any other unresolved placeholder stops start-up, naming the property and the variable."""
    for key, value in list(props.items()):
        if not (value.startswith("${env:") and value.endswith("}")):
            continue
        var = value[len("${env:"):-1]
        if var in os.environ:
            props[key] = os.environ[var]
        elif key == "database.password":
            del props[key]
        else:
            sys.exit(f"{key} is {value}: set {var} or pass the matching --pg-* option")


def offsets_file(args, state_dir: Path) -> Path:
    return Path(args.offsets_file or state_dir / "offsets.dat").resolve()


def engine_properties(args, state_dir: Path):
    """Connector JSON "config" + embedded-engine settings + overrides."""
    with open(args.connector) as f:
        connector = json.load(f)
    props = {k: str(v) for k, v in connector["config"].items()}
    props["name"] = connector["name"]

    for key, value in (("database.hostname", args.pg_host), ("database.port", args.pg_port),
                       ("database.user", args.pg_user), ("database.password", args.pg_password),
                       ("database.dbname", args.pg_dbname)):
        if value:
            props[key] = value
    resolve_env_placeholders(props)

    # Offsets live in a file next to the rest of the engine's state. The file
    # must be deleted whenever the database (and so the slot) is recreated:
    # stale offsets make the connector fail quietly.
    props["offset.storage"] = "org.apache.kafka.connect.storage.FileOffsetBackingStore"
    props["offset.storage.file.filename"] = str(offsets_file(args, state_dir))
    props["offset.flush.interval.ms"] = "1000"

    if args.decimal_handling_mode:
        props["decimal.handling.mode"] = args.decimal_handling_mode
    if args.schemas:
        enabled = "true" if args.schemas == "on" else "false"
        props["key.converter.schemas.enable"] = enabled
        props["value.converter.schemas.enable"] = enabled
    # The embedded engine reads "converter.*" for both key and value, and
    # "key.converter.*" / "value.converter.*" on top of that (as Connect does).
    props["converter.schemas.enable"] = props.get("value.converter.schemas.enable", "false")

    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--set expects KEY=VALUE, got {item!r}")
        props[key] = value
    return props


def write_log4j_config(state_dir: Path) -> Path:
    """Console-only log4j2 config (the packaged one also writes logs/pydbzengine.log
    relative to the working directory, duplicating the console output)."""
    path = state_dir / "log4j2.properties"
    path.write_text(
        "rootLogger.level=INFO\n"
        "rootLogger.appenderRef.stdout.ref=console\n"
        "appender.console.type=Console\n"
        "appender.console.name=console\n"
        "appender.console.target=SYSTEM_OUT\n"
        "appender.console.layout.type=PatternLayout\n"
        "appender.console.layout.pattern=%d{ISO8601} %-5level [%t] %c{1} - %m%n\n"
    )
    return path


class OffsetsKeeper:
    """Kafka's FileOffsetBackingStore rewrites its file in place (truncate, then write), and reading it back
    takes a file cut short for no offsets at all. An engine killed while saving would then start with a new
    snapshot after it had streamed, which the processor must stop on. So the keeper keeps a copy of the last
    complete file, and puts it back before the engine starts: older offsets only make the connector send
    again what came after them, which the processor skips. A cut file without a copy is removed, with a
    warning: the connector then takes a new snapshot, as Kafka's store would have made it."""

    def __init__(self, path: Path):
        self.path = path
        self.copy = path.with_name(path.name + ".complete")
        self.kept = None

    @staticmethod
    def complete(data: bytes) -> bool:
        """Whether `data` is a whole Java object stream, as the store reads it. Needs the JVM running."""
        import jpype
        stream = jpype.JClass("java.io.ObjectInputStream")(
            jpype.JClass("java.io.ByteArrayInputStream")(jpype.JArray(jpype.JByte)(data)))
        try:
            stream.readObject()
            return True
        except jpype.JException:  # EOFException and kin: cut short
            return False

    def _keep(self, data: bytes):
        if data == self.kept:
            return
        tmp = self.copy.with_name(self.copy.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.copy)
        self.kept = data

    def before_start(self):
        if not self.path.exists():
            # No offsets (a first start, or deleted to take a new snapshot on purpose): an older copy must
            # not come back later.
            self.copy.unlink(missing_ok=True)
            return
        data = self.path.read_bytes()
        if self.complete(data):
            self._keep(data)
            return
        if not self.copy.exists():
            # Killed before any complete save was copied: most likely during the first snapshot, which starts
            # over either way. Had it streamed, the processor stops on the new snapshot (exit code 5).
            log.warning("%s is cut short (%d bytes; the engine stopped while saving it) and no complete copy "
                        "exists: the connector takes a new snapshot; if it had streamed already, the processor "
                        "stops on that snapshot (README, \"The source started over\")", self.path, len(data))
            self.path.unlink()
            return
        log.warning("%s was cut short (%d bytes; the engine stopped while saving it): putting back the last "
                    "complete copy; the connector sends again what came after it", self.path, len(data))
        restored = self.copy.read_bytes()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(restored)
        os.replace(tmp, self.path)
        self.kept = restored

    def run(self, stop: threading.Event):
        """Copies each complete version of the file, until `stop`; a version read while the store writes
        it is cut short and left for the next round."""
        while not stop.wait(0.5):
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                continue
            if self.complete(data):
                self._keep(data)


class KafkaSink:
    def __init__(self, brokers: str, default_partitions: int, stopping: threading.Event):
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient

        self.conf = {"bootstrap.servers": brokers}
        self.timeout_ms = int(os.environ.get("ENGINE_MESSAGE_TIMEOUT_MS", "60000"))
        self.stopping = stopping
        self.producer = Producer({
            **self.conf,
            "enable.idempotence": True,
            "acks": "all",
            # librdkafka's default (consistent_random, CRC32) would place keys on
            # other partitions than the Java client / Kafka Connect do.
            "partitioner": "murmur2_random",
            # snappy batches fail on tansu's sqlite storage; lz4 works.
            "compression.type": "lz4",
            "linger.ms": 5,
            # Give up on a record after a minute (librdkafka's default is 5 min):
            # the batch then fails, and the engine stops without acknowledging it.
            "message.timeout.ms": self.timeout_ms,
        })
        self.admin = AdminClient(self.conf)
        self.default_partitions = default_partitions
        self.known_topics = set(self.producer.list_topics(timeout=30).topics)
        self.errors = []

    def _delivered(self, err, msg):
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err}")

    def _ensure_topic(self, topic: str):
        # Topics are created up front by scripts/stack. An idempotent produce to a
        # missing topic breaks tansu's storage, so never let that happen: create
        # a topic that is still unknown, like Kafka Connect's topic.creation would.
        if topic in self.known_topics:
            return
        self.known_topics = set(self.producer.list_topics(timeout=30).topics)
        if topic in self.known_topics:
            return
        from confluent_kafka.admin import NewTopic
        log.warning("topic %s does not exist; creating it with %d partitions", topic, self.default_partitions)
        fut = self.admin.create_topics([NewTopic(topic, self.default_partitions, 1)])[topic]
        fut.result(timeout=30)
        self.known_topics.add(topic)

    def write(self, records):
        for topic, key, value in records:
            self._ensure_topic(topic)
            while True:
                try:
                    self.producer.produce(topic, key=key, value=value, on_delivery=self._delivered)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    self.producer.poll(0.05)
            self.producer.poll(0)
        # Normally every record is delivered or has failed within message.timeout.ms,
        # but an idempotent producer whose broker died with requests in flight
        # can wait for that broker forever: bound the wait ourselves. Raising
        # here makes the engine stop without acknowledging the batch.
        deadline = time.monotonic() + self.timeout_ms / 1000 + 10
        while self.producer.flush(1.0) > 0:
            if self.stopping.is_set():
                raise RuntimeError("shutting down with records not yet acknowledged by the broker")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not acknowledge the batch within {self.timeout_ms} ms")
        if self.errors:
            errors, self.errors = self.errors, []
            raise RuntimeError(f"{len(errors)} records failed: {errors[:3]}")

    def close(self):
        if self.producer.flush(10) > 0:
            raise RuntimeError("records left unacknowledged at shutdown")


class JsonlSink:
    def __init__(self, path: str):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, records):
        for topic, key, value in records:
            line = {"topic": topic,
                    "key": json.loads(key) if key is not None else None,
                    "value": json.loads(value) if value is not None else None}
            self.file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.file.flush()  # readers (fixture capture) poll the file while we run

    def close(self):
        self.file.close()


def main():
    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-5s [py] %(name)s - %(message)s")
    args = parse_args()
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    props = engine_properties(args, state_dir)
    log.info("connector %s -> %s:%s/%s, slot %s, decimal.handling.mode=%s, schemas=%s, sink=%s",
             props["name"], props.get("database.hostname"), props.get("database.port"),
             props.get("database.dbname"), props.get("slot.name"), props.get("decimal.handling.mode"),
             props["converter.schemas.enable"], args.sink)

    stop = threading.Event()
    if args.sink == "kafka":
        sink = KafkaSink(args.brokers, int(props.get("topic.creation.default.partitions", "1")), stop)
    else:
        sink = JsonlSink(args.output)

    # Must be set before pydbzengine starts the JVM. -Xrs: the JVM leaves
    # SIGTERM/SIGINT to Python, so a kill runs the clean shutdown below.
    os.environ["PYDBZ_JVM_OPTS"] = " ".join([
        "-Xrs", f"-Dlog4j2.configurationFile={write_log4j_config(state_dir)}",
        os.environ.get("PYDBZ_JVM_OPTS", ""),
    ]).strip()
    from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine
    from pydbzengine.engine.jvm import ensure_jvm_started

    # The offsets are checked in the JVM, before the engine reads them.
    ensure_jvm_started()
    offsets = OffsetsKeeper(offsets_file(args, state_dir))
    offsets.before_start()

    counts = {"records": 0, "batches": 0, "first": None}

    class Forwarder(BasePythonChangeHandler):
        def handleJsonBatch(self, records):
            batch = []
            for r in records:
                key, value = r.key(), r.value()
                batch.append((str(r.destination()),
                              None if key is None else str(key),
                              None if value is None else str(value)))
            sink.write(batch)  # raises -> the engine stops without acknowledging
            if counts["first"] is None and batch:
                counts["first"] = time.monotonic()
                log.info("first batch forwarded (%d records, %.1f s after start)", len(batch),
                         counts["first"] - started)
            counts["records"] += len(batch)
            counts["batches"] += 1

    engine = DebeziumJsonEngine(properties=props, handler=Forwarder())
    failure = []

    def run():
        try:
            engine.run()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failure.append(e)
        finally:
            stop.set()

    signalled = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping", signum)
        signalled.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    code = 0
    worker = threading.Thread(target=run, name="debezium-engine", daemon=True)
    keeper = threading.Thread(target=offsets.run, args=(stop,), name="offsets-keeper", daemon=True)
    try:
        worker.start()
        keeper.start()
        # The main thread stays in Python (not inside the JVM) so signals are handled.
        while not stop.wait(0.5):
            pass
        if signalled.is_set():
            log.info("closing engine")
        else:
            # run() returned on its own: the connector failed (details in the log above).
            log.error("engine stopped by itself%s", f": {failure[0]!r}" if failure else "")
            code = 1
    finally:
        # A bounded shutdown (scripts/stack sends SIGKILL after 60 s): whatever
        # hangs, the process ends.
        watchdog = threading.Timer(45, lambda: (log.error("shutdown took over 45 s: exiting"), os._exit(1)))
        watchdog.daemon = True
        watchdog.start()
        if worker.is_alive():  # else the engine has shut itself down already
            engine.close()
        worker.join(timeout=30)
        try:
            sink.close()
        except Exception as e:  # noqa: BLE001
            log.error("closing sink: %r", e)
            code = 1
        log.info("forwarded %d records in %d batches (%.1f s running)", counts["records"], counts["batches"],
                 time.monotonic() - started)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # JVM threads would otherwise keep the process alive.
        os._exit(code)


if __name__ == "__main__":
    main()
