# chatenv server image: `docker run -p 8000:8000 <image>` serves the chat environment
# (WebSocket /ws, GET /health) on port 8000, like OpenEnv's chat_env image.
#
# BASE defaults to the official slim Python image. Where official images cannot be
# pulled, build an offline Debian base first (.ci/docker-engine.sh makes
# chatenv-base:bookworm) and pass it:  docker build --build-arg BASE=chatenv-base:bookworm .
# Package index settings (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST) and
# HTTP(S)_PROXY can be passed as --build-arg; nothing registry-specific is baked in.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST

# One layer: the only runtime dependency, plus an unprivileged user.
# PIP_BREAK_SYSTEM_PACKAGES: a Debian-python base marks its Python as externally
# managed (PEP 668); inside an image that is what we want. Ignored elsewhere.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        python3 -m pip install --no-cache-dir websockets \
    && useradd --uid 10001 --user-group --home-dir /app --no-create-home --shell /usr/sbin/nologin chatenv

WORKDIR /app
COPY --chown=root:root chatenv.py /app/chatenv.py

# TOKENIZER_NAME / SYSTEM_PROMPT (OpenEnv) and CHATENV_* are read by chatenv itself.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER chatenv
EXPOSE 8000

# Standard library only; no proxy for the loopback address.
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request as u; r = u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/health', timeout=2); sys.exit(r.status != 200)"]

# Exec form: the server is PID 1 and receives SIGTERM from `docker stop` itself.
# `python3` exists on both the official image and a Debian base (which has no `python`).
ENTRYPOINT ["python3", "/app/chatenv.py"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
