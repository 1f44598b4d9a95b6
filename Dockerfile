# The corevault image: the agent (DaemonSet), the webhook and the CLI.

# The pipe handler the kernel starts on every crash: static, so it runs from the host's
# root whatever the host's libc, and tiny, so the crash path never waits for Python.
FROM debian:bookworm-slim AS forward
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY src/corevault/capture/forward.c /forward.c
RUN gcc -O2 -static -Wall -Werror -o /corevault-forward /forward.c

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends gdb elfutils binutils zstd \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . && rm -rf /src
COPY --from=forward /corevault-forward /usr/lib/corevault/corevault-forward
WORKDIR /
ENTRYPOINT ["corevault"]
