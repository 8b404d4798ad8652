# chatenv server image: `docker run -p 8000:8000 <image>` serves the chat environment
# (WebSocket /ws, GET /health) on port 8000, like OpenEnv's chat_env image.
#
# BASE defaults to the official slim Python image. Where official images cannot be
# pulled, build an offline Debian base first (.ci/docker-engine.sh makes
# chatenv-base:bookworm) and pass it:  docker build --build-arg BASE=chatenv-base:bookworm .
# Package index settings (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST) and
# HTTP(S)_PROXY can be passed as --build-arg; nothing registry-specific is baked in.
#
# OpenEnv's launchers start an image in three ways, and each works here:
#   local Docker     the image's ENTRYPOINT + CMD (both serve, alone or together)
#   Daytona, Modal   `cd /app/env && python -m uvicorn chatenv:app --host 0.0.0.0 --port 8000`
#                    (the `app` of /app/env/openenv.yaml), or the ENTRYPOINT without its CMD
#   HF sandbox       an executable named `server` on PATH
# UVICORN (default: uvicorn) is what makes the second form work, about 2 MB; build with
# --build-arg UVICORN= for the smallest image, served by chatenv's own server only.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG UVICORN=uvicorn

# One layer: the runtime dependency (and uvicorn for the launchers that run it), an
# unprivileged user, `python` where the base has only `python3`, and two small scripts:
# `server` serves with the image's defaults; the entrypoint serves when given no command
# (or only flags) and runs any other command it is given.
# PIP_BREAK_SYSTEM_PACKAGES: a Debian-python base marks its Python as externally
# managed (PEP 668); inside an image that is what we want. Ignored elsewhere.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        python3 -m pip install --no-cache-dir websockets ${UVICORN} \
    && useradd --uid 10001 --user-group --home-dir /app --no-create-home --shell /usr/sbin/nologin chatenv \
    && { command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python; } \
    && printf '#!/bin/sh\n# chatenv on CHATENV_HOST:CHATENV_PORT (0.0.0.0:8000 in this image)\nexec python3 /app/env/chatenv.py serve "$@"\n' \
        > /usr/local/bin/server \
    && printf '#!/bin/sh\n# No command, or only flags: serve. Any other command: run it.\nif [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; then set -- server "$@"; fi\nexec "$@"\n' \
        > /usr/local/bin/chatenv-entrypoint \
    && chmod 755 /usr/local/bin/server /usr/local/bin/chatenv-entrypoint

# /app/env is where OpenEnv's cloud launchers look for openenv.yaml and run uvicorn from.
WORKDIR /app/env
COPY --chown=root:root chatenv.py openenv.yaml /app/env/

# TOKENIZER_NAME / SYSTEM_PROMPT (OpenEnv) and CHATENV_* are read by chatenv itself.
# SYSTEM_PROMPT is OpenEnv's chat image default; its TOKENIZER_NAME (gpt2, downloaded at
# build time there) cannot be: this image uses the embedded byte-level tokenizer.
# UVICORN_* are uvicorn's own options (it reads UVICORN_<OPTION> for each flag), for the
# launchers that run `python -m uvicorn chatenv:app` with no flags: the native server's
# defaults where uvicorn decides. Messages up to 16 MiB (raise with CHATENV_MAX_MESSAGE_BYTES),
# request heads up to 16 KiB, pings every 20 s with a 20 s timeout, 1,280 concurrent HTTP
# requests (256 sessions + 1,024 other connections; 503 past it), idle keep-alive 5 s.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHATENV_HOST=0.0.0.0 \
    CHATENV_PORT=8000 \
    SYSTEM_PROMPT="You are a helpful AI assistant." \
    UVICORN_WS_MAX_SIZE=16777216 \
    UVICORN_H11_MAX_INCOMPLETE_EVENT_SIZE=16384 \
    UVICORN_WS_PING_INTERVAL=20 \
    UVICORN_WS_PING_TIMEOUT=20 \
    UVICORN_LIMIT_CONCURRENCY=1280 \
    UVICORN_TIMEOUT_KEEP_ALIVE=5

USER chatenv
EXPOSE 8000

# Standard library only; no proxy for the loopback address.
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request as u; r = u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/health', timeout=2); sys.exit(r.status != 200)"]

# Exec form all the way down: the server is PID 1 and receives SIGTERM from `docker stop`.
ENTRYPOINT ["chatenv-entrypoint"]
CMD ["server"]
