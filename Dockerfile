# Aether in a container: a release build on Debian, run against the PostgreSQL
# named by DATABASE_URL (see docker-compose.yml).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
COPY migrations ./migrations
RUN cargo build --release --locked --bin aether

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home aether
COPY --from=build /src/target/release/aether /usr/local/bin/aether
USER aether
ENV WS_HOST=0.0.0.0 WS_PORT=8080 DATA_DIR=/home/aether/data
EXPOSE 8080
ENTRYPOINT ["aether"]
