# Redis from Debian's redis-server, for the compose `redis` service where no registry image can be
# pulled. Built by scripts/docker_base.sh on the local Python base; compose.local.yml uses it.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# A fixed uid for the redis user (the package reuses an existing one), so USER can be numeric.
RUN groupadd --system --gid 10002 redis \
 && useradd --system --uid 10002 --gid redis --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
 && apt-get update \
 && apt-get install -y --no-install-recommends redis-server=5:7.0.* \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data \
 && chown redis:redis /data
WORKDIR /data
USER 10002:10002
EXPOSE 6379
# As the official image does: no protected mode (it refuses every client from another container when
# no password is set); only the compose network reaches this server, and no port is published.
ENTRYPOINT ["sh", "-c", "if [ \"$1\" = redis-server ]; then exec \"$@\" --protected-mode no; fi; exec \"$@\"", "--"]
CMD ["redis-server"]
