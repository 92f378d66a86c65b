"""Render homeserver.yaml from a template and the environment (standard library only).

    python configure.py TEMPLATE OUTPUT

Every `${NAME}` in the template is replaced by the value of NAME as a JSON string, which is
also a valid YAML scalar whatever it contains. Values come from the environment, then from
the key file garage-init writes (GARAGE_KEY_FILE, default /garage-keys/s3.env: `NAME=value`
lines), then from DEFAULTS. A name with no value stops with an error naming it.
"""

from __future__ import annotations

import json
import os
import string
import sys
from pathlib import Path

DEFAULTS = {
    "SYNAPSE_PUBLIC_BASEURL": "http://localhost:8080/",
    "SYNAPSE_MAX_UPLOAD_SIZE": "50M",
    "POSTGRES_USER": "synapse",
    "POSTGRES_DB": "synapse",
    "POSTGRES_HOST": "postgres",
    "S3_ENDPOINT_URL": "http://garage:3900",
    "S3_REGION": "garage",
    "S3_BUCKET": "matrix",
}


def read_key_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def render(template: str, env: dict[str, str]) -> str:
    names = {
        m.group("named") or m.group("braced")
        for m in string.Template.pattern.finditer(template)
        if m.group("named") or m.group("braced")
    }
    missing = sorted(n for n in names if not env.get(n))
    if missing:
        raise SystemExit(f"configure.py: no value for {', '.join(missing)} (see .env.example)")
    return string.Template(template).substitute({n: json.dumps(env[n]) for n in names})


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        raise SystemExit(__doc__)
    template, output = Path(argv[1]), Path(argv[2])
    key_file = Path(os.environ.get("GARAGE_KEY_FILE", "/garage-keys/s3.env"))
    env = {**DEFAULTS, **read_key_file(key_file), **os.environ}
    text = render(template.read_text(), env)
    tmp = output.with_name(f".{output.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, output)
    print(f"configure.py: wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
