# Placeholder image: installs the torch-free core and the serving extras.
# The gateway issue (#7) completes it (entrypoint, spool volume, ports, healthcheck).
FROM python:3.11-slim
WORKDIR /opt/medssl
COPY pyproject.toml README.md ./
COPY medssl ./medssl
COPY training ./training
COPY export ./export
COPY serving ./serving
COPY cli ./cli
RUN pip install --no-cache-dir ".[serve]"
ENTRYPOINT ["medssl"]
CMD ["--help"]
