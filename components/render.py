"""Rendering: every file a droplet gets comes from a template in `cloud-init/` and settings.

One Jinja2 environment, strict about undefined names, so a renderer is a pure function:
same inputs, byte-identical output (droplets are replaced only when something really changed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent / "cloud-init"

def template_environment(directory: Path) -> jinja2.Environment:
    """The project's one way to render templates (here for `cloud-init/`, the lab for its own):
    strict about undefined names, whitespace as written."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


_env = template_environment(TEMPLATES)


def render_template(name: str, **context: Any) -> str:
    """Render `cloud-init/<name>` with `context`; a missing variable is an error."""
    return _env.get_template(name).render(**context)
