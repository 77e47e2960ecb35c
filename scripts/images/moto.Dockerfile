# Local stand-in for `motoserver/moto:<version>` (moto's standalone server), built where no
# registry is reachable (scripts/build-images.sh) from wheels downloaded on the host into this
# build context. Same entry point and port as the published image (moto_server on 5000), but
# only the S3 backend's dependencies are installed: the compose stack uses S3 alone.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
COPY wheels/ /wheels/
RUN set -eu; \
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/moto; \
    /opt/moto/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
        --find-links /wheels moto[s3] flask flask-cors; \
    /opt/moto/bin/pip uninstall --yes --quiet pip; \
    rm -rf /wheels; \
    groupadd --system --gid 10002 moto; \
    useradd --system --uid 10002 --gid moto --home-dir /moto --create-home moto
ENV PATH=/opt/moto/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1
WORKDIR /moto
USER 10002:10002
EXPOSE 5000
ENTRYPOINT ["moto_server", "-H", "0.0.0.0"]
