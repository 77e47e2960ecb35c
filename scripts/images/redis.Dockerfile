# Local stand-in for the official `redis:<major>` image, built from Debian's redis-server where no
# registry is reachable (scripts/build-images.sh): `redis-server` and `redis-cli` on the PATH,
# port 6379, working directory /data, runs as the `redis` user.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG REDIS_MAJOR=7
RUN set -eu; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; \
    rm -rf /var/lib/apt/lists/*; \
    redis-server --version | grep -q "v=${REDIS_MAJOR}\." \
      || { echo "Debian's redis-server is not version ${REDIS_MAJOR}" >&2; exit 1; }; \
    install -d -o redis -g redis -m 0750 /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
