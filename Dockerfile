# Both binaries in one small image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY assets ./assets
COPY benches ./benches
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/analytics-gateway /src/target/release/bi-sim /usr/local/bin/
USER nobody
ENV GATEWAY_LISTEN=0.0.0.0:4000
EXPOSE 4000 4100
CMD ["analytics-gateway"]
