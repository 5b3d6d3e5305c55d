# etl-processor image: `docker compose up` builds it for the etl_processor and loadgen services.
#   docker build -t online-store-cdc/etl-processor .
#   docker run --rm online-store-cdc/etl-processor --help

# --- build ---------------------------------------------------------------------------------------
FROM rust:1.95.0-bookworm AS builder

# rdkafka builds its bundled librdkafka from source: a C toolchain, make/cmake, pkg-config and zlib.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential cmake pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies first, in their own layer: with stub sources, this layer is rebuilt only when
# Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin etl-processor \
    && rm -rf src

# The real sources, and the analytics DDL that src/sink/clickhouse.rs compiles in (the same file
# ClickHouse runs from init/clickhouse: one definition of the tables). touch: their timestamps may
# predate the stub build, and cargo must rebuild the crate.
COPY src ./src
COPY init/clickhouse/01-analytics.sql ./init/clickhouse/01-analytics.sql
# The release profile keeps line tables for local debugging; the image drops that debug info (most of
# the binary's size) and keeps the symbols, so a backtrace still names its functions.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin etl-processor \
    && objcopy --strip-debug target/release/etl-processor /usr/local/bin/etl-processor

# --- runtime -------------------------------------------------------------------------------------
FROM debian:12.12-slim

# The binary links only libc, libm, libgcc_s and libz (librdkafka is static); all but
# ca-certificates are in the base image already and are listed to keep that explicit.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates libgcc-s1 zlib1g \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 etl \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin etl

COPY --from=builder /usr/local/bin/etl-processor /usr/local/bin/etl-processor

USER 10001:10001
# /metrics, /health/live and /health/ready (ETL_METRICS_ADDR).
EXPOSE 9464
ENTRYPOINT ["etl-processor"]
CMD ["run"]
