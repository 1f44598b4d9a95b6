# The corevault image: the node agent (DaemonSet), the server and the webhook (Deployments), the CLI.
#
# `make image` builds it. Python packages are installed from wheels made on the build host
# (`pip wheel . -w build/wheels`, which make image runs), so the build itself needs no PyPI
# access and no CA bundle in any layer; everything else comes from Debian's packages on top of
# debian:bookworm-slim, which make image makes from Debian packages where no registry is reachable.

# The pipe handler the kernel starts on every crash: static, so it runs from the host's
# root whatever the host's libc, and tiny, so the crash path never waits for Python.
FROM debian:bookworm-slim AS forward
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY src/corevault/capture/forward.c /forward.c
RUN gcc -O2 -static -Wall -Werror -o /corevault-forward /forward.c

# The virtual environment, built against Debian's python3 (3.11 on bookworm), which the final
# stage has at the same path. Dependencies first: their layer stays cached while only corevault changes.
# Extension modules are stripped of their symbols (50 MB); the libraries auditwheel vendored into
# *.libs are left as they are, since strip can break what patchelf rewrote. Never imported, so
# removed (61 MB together): kubernetes.aio, an asyncio copy of the client, and botocore's models
# of services other than S3 and the STS/SSO ones that web-identity and SSO credentials use.
FROM debian:bookworm-slim AS venv
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv binutils \
 && rm -rf /var/lib/apt/lists/*
COPY build/wheels/deps /wheels/deps
RUN python3 -m venv /opt/corevault \
 && /opt/corevault/bin/pip install --no-cache-dir --no-index --find-links /wheels/deps \
      -r /wheels/deps/requirements.txt \
 && find /opt/corevault -name '*.so' -not -path '*.libs/*' -exec strip --strip-unneeded {} + \
 && cd /opt/corevault/lib/python3.11/site-packages \
 && rm -rf kubernetes/aio \
 && find botocore/data -mindepth 1 -maxdepth 1 -type d \
      ! -name s3 ! -name sts ! -name sso ! -name sso-oidc -exec rm -rf {} +
COPY build/wheels/corevault /wheels/corevault
RUN /opt/corevault/bin/pip install --no-cache-dir --no-index --no-deps /wheels/corevault/*.whl \
 && /opt/corevault/bin/pip uninstall -y -q pip setuptools \
 && find /opt/corevault -depth -type d -name tests -path '*/site-packages/*/tests' -exec rm -rf {} +

FROM debian:bookworm-slim
# No documentation, manual pages or translations from the packages below: nobody reads them here.
RUN printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/info/*' \
      > /etc/dpkg/dpkg.cfg.d/corevault-slim \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 gdb elfutils zstd bubblewrap \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log
COPY --from=venv /opt/corevault /opt/corevault
COPY --from=forward /corevault-forward /usr/lib/corevault/corevault-forward
ENV PATH=/opt/corevault/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /
ENTRYPOINT ["corevault"]
