# Two images from one build: the processor (the default, last stage) and the tools (`--target
# tools`: loadgen, produce, bench). `docker compose up` builds the first for etl_processor and the
# second for loadgen. The processor's image holds the processor alone.
#   docker build -t online-store-cdc/etl-processor .
#   docker build --target tools -t online-store-cdc/etl-tools .
#   docker run --rm online-store-cdc/etl-processor --help

# --- build ---------------------------------------------------------------------------------------
FROM rust:1.95.0-bookworm AS builder

# rdkafka builds its bundled librdkafka from source: a C toolchain, make/cmake, pkg-config and zlib.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential cmake pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies first, in their own layer: with stub sources, this layer is rebuilt only when a
# manifest or Cargo.lock changes, not on every source edit. The workspace's three members must all
# be there for cargo to read it.
COPY Cargo.toml Cargo.lock ./
COPY tools/Cargo.toml ./tools/
COPY testkit/Cargo.toml ./testkit/
RUN mkdir -p src tools/src testkit/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > tools/src/main.rs \
    && touch src/lib.rs tools/src/lib.rs testkit/src/lib.rs \
    && cargo build --release --locked --bin etl-processor --bin etl-tools \
    && rm -rf src tools/src testkit/src

# The real sources, and the analytics DDL that src/sink/clickhouse.rs compiles in (the same file
# ClickHouse runs from init/clickhouse: one definition of the tables). touch: their timestamps may
# predate the stub build, and cargo must rebuild the crate.
COPY src ./src
COPY tools/src ./tools/src
COPY testkit/src ./testkit/src
COPY init/clickhouse/01-analytics.sql ./init/clickhouse/01-analytics.sql
# The release profile keeps line tables for local debugging; the images drop that debug info (most
# of a binary's size) and keep the symbols, so a backtrace still names its functions.
RUN touch src/main.rs src/lib.rs tools/src/main.rs tools/src/lib.rs testkit/src/lib.rs \
    && cargo build --release --locked --bin etl-processor --bin etl-tools \
    && objcopy --strip-debug target/release/etl-processor /usr/local/bin/etl-processor \
    && objcopy --strip-debug target/release/etl-tools /usr/local/bin/etl-tools

# --- runtime: what both images run on -------------------------------------------------------------
FROM debian:12.12-slim AS runtime

# The binaries link only libc, libm, libgcc_s and libz (librdkafka is static); all but
# ca-certificates are in the base image already and are listed to keep that explicit.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates libgcc-s1 zlib1g \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 etl \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin etl

USER 10001:10001

# --- tools: loadgen (compose's load generator), produce, bench --------------------------------------
FROM runtime AS tools
COPY --from=builder /usr/local/bin/etl-tools /usr/local/bin/etl-tools
ENTRYPOINT ["etl-tools"]
CMD ["--help"]

# --- processor: the default target --------------------------------------------------------------
FROM runtime AS processor
COPY --from=builder /usr/local/bin/etl-processor /usr/local/bin/etl-processor
# /metrics, /health/live and /health/ready (ETL_METRICS_ADDR).
EXPOSE 9464
ENTRYPOINT ["etl-processor"]
CMD ["run"]
