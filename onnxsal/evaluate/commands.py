"""CLI commands `sanity` and `evaluate` (registered on the main app by onnxsal.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
