# switchboard: a multi-tenant MCP gateway. Two stages: build with the same command CI runs
# (`cargo build --release --locked`), then copy the one binary into a distroless image
# (glibc, CA certificates, no shell, no package manager) that runs as a non-root user.
#
#   docker build -t switchboard .
#   docker run --rm -e DATABASE_URL=... switchboard migrate   # as an init step; needs no secret
#   docker run -p 3000:3000 --env-file .env --stop-timeout 190 switchboard   # serve (the default)
#
# The stop timeout: on SIGTERM the gateway drains, each step bounded by DRAIN_TIMEOUT_SECS
# (README, Operations, Shutdown); docker's default of 10 s would kill it mid-drain. 190 s
# covers the worst case with DRAIN_TIMEOUT_SECS=20, as deploy/kubernetes.yaml does.

FROM rust:1.95-slim-bookworm AS build
# jemalloc (the gateway's allocator) is built from source with make, which the slim image lacks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
COPY benches ./benches
RUN cargo build --release --locked --bin switchboard

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/switchboard /usr/local/bin/switchboard
ENV APP_ENV=production \
    HOST=0.0.0.0 \
    PORT=3000 \
    LOG_FORMAT=json
# 65532 is the "nonroot" user of the distroless image.
USER 65532:65532
EXPOSE 3000
# SIGTERM starts the drain: /ready turns 503, calls in flight finish, audit is flushed; a
# second SIGTERM cuts it short. The health check probes /live (liveness), not /ready.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["switchboard", "healthcheck"]
ENTRYPOINT ["switchboard"]
CMD ["serve"]
