"""CLI command `convert` (registered on the main app by onnxsal.cli); frameworks are imported only when it runs."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
