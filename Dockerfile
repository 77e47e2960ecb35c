# The one image of the CCAT data center: every role (api, worker, manager, migrate,
# demo-instrument) runs from it; the role is the first argument (see compose/entrypoint.sh).
#
#   scripts/build-images.sh                      # here: base from Debian packages, wheels from the host
#   docker build -t ccat-data-center:0.1.0 .     # with a registry and PyPI reachable from the build
#
# BASE_IMAGE is the pinned base. With a registry, pin it by digest
# (--build-arg BASE_IMAGE=debian:bookworm-slim@sha256:...). Where no registry is reachable,
# scripts/build-images.sh makes this tag from Debian packages (debootstrap + docker import).
# The build needs no secret and bakes none in: the database URL, broker password and S3 keys
# come from the environment at run time.
ARG BASE_IMAGE=debian:bookworm-slim

# --- python: the base with Python 3.11 and venv (the debootstrapped base has them already) ---
FROM ${BASE_IMAGE} AS python
RUN if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# --- builder: a virtualenv with the project and its runtime dependencies ---------------------
FROM python AS builder
# Wheels built on the host by scripts/build-images.sh (the folder holds only a README and a
# .gitignore in a clone). When it holds wheels the install is offline (--no-index); when it is
# empty pip uses the package index.
COPY compose/wheelhouse/ /wheelhouse/
COPY pyproject.toml README.md /src/
COPY src/ /src/src/
RUN set -eu; \
    if ls /wheelhouse/*.whl >/dev/null 2>&1; then offline=--no-index; else offline=; fi; \
    python3 -m venv /opt/ccat; \
    /opt/ccat/bin/pip install --no-cache-dir --disable-pip-version-check $offline \
        --find-links /wheelhouse "/src[api,transfer]"; \
    /opt/ccat/bin/pip uninstall --yes --quiet pip

# --- runtime: the venv, the role entry point, a non-root user ---------------------------------
FROM python AS runtime
ARG CCAT_UID=10001
# The user owns the mount points of the site volumes the compose stack uses, so a fresh named
# volume takes that ownership (Docker copies a mount point's owner into an empty volume).
RUN groupadd --system --gid "${CCAT_UID}" ccat \
    && useradd --system --uid "${CCAT_UID}" --gid ccat --home-dir /var/lib/ccat \
       --create-home --shell /usr/sbin/nologin ccat \
    && install -d -o ccat -g ccat -m 0750 /var/lib/ccat/transfer-logs \
    && for d in ccat/primecam_raw_data ccat/chai_raw_data ccat/buffer \
                cologne/buffer cologne/ramses us/buffer; do \
         install -d -o ccat -g ccat -m 0750 "/srv/ccat/$d"; \
       done
COPY --from=builder /opt/ccat /opt/ccat
COPY compose/entrypoint.sh /usr/local/bin/ccat-entrypoint
COPY compose/devtools.py /opt/ccat/share/devtools.py
RUN chmod 0755 /usr/local/bin/ccat-entrypoint
ENV PATH=/opt/ccat/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CCAT_API_HOST=0.0.0.0 \
    CCAT_API_PORT=8000 \
    CCAT_TRANSFER_LOG_DIR=/var/lib/ccat/transfer-logs
USER ${CCAT_UID}:${CCAT_UID}
WORKDIR /var/lib/ccat
EXPOSE 8000
ENTRYPOINT ["ccat-entrypoint"]
CMD ["help"]
