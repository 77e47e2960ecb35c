# Local stand-in for the official `prom/prometheus` image, built from Debian's prometheus where
# no registry is reachable (scripts/build-images.sh), so the compose profile "monitoring" and
# the alerting rules run for real here: `prometheus` as the entrypoint (compose's `command` adds
# the flags), the TSDB in /prometheus, `wget` for the compose health check, runs as `nobody`
# like the official image. Debian's version (2.42 in bookworm) is older than the compose file's
# tag; the rules use nothing newer (they are also checked by Debian's promtool).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN set -eu; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget; \
    rm -rf /var/lib/apt/lists/*; \
    prometheus --version; \
    install -d -o nobody -g nogroup -m 0755 /prometheus
WORKDIR /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus", "--storage.tsdb.path=/prometheus", \
    "--web.console.templates=/etc/prometheus/consoles", \
    "--web.console.libraries=/etc/prometheus/console_libraries"]
CMD ["--config.file=/etc/prometheus/prometheus.yml"]
