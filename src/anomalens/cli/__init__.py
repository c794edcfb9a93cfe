"""Command-line interface, one module per command group.

``anomalens fit | calibrate`` (:mod:`.fitting`), ``predict | zero-shot`` (:mod:`.predicting`),
``evaluate | discover`` (:mod:`.evaluating`), ``export | serve | info | backbones`` (:mod:`.deploy`),
``batch-predict | fit-many`` (:mod:`.scaleout`) and ``video fit | predict | evaluate | synth``
(:mod:`.video`).
"""

from __future__ import annotations

from typing import Optional

import typer

from .. import __version__
from . import deploy, evaluating, fitting, predicting, scaleout
from .video import video_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Visual anomaly detection and localization, offline, on CPU.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"anomalens {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Visual anomaly detection and localization, offline, on CPU."""


app.command()(fitting.fit)
app.command()(fitting.calibrate)
app.command()(predicting.predict)
app.command("zero-shot")(predicting.zero_shot)
app.command()(evaluating.evaluate)
app.command()(evaluating.discover)
app.command()(deploy.export)
app.command()(deploy.serve)
app.command("batch-predict")(scaleout.batch_predict)
app.command("fit-many")(scaleout.fit_many)
app.command()(deploy.info)
app.command()(deploy.backbones)
app.add_typer(video_app, name="video")


def main() -> None:  # pragma: no cover
    app()
