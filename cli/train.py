"""``medssl-train``: semi-supervised training.

One command per registered method (:mod:`medssl.training.methods`). Detection: ``focalmix`` and
``supervised-det``. Segmentation: ``ad`` (A&D), ``bcp`` (BCP), ``supervised-seg``,
``mean-teacher``, ``fixmatch``, ``flexmatch`` and ``patchcl``, each in the settings ``ssl``,
``imbssl``, ``uda`` and ``semidg``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import click

from medssl.cli.errors import MedsslGroup
from medssl.errors import ConfigError

__all__ = ["resolve_config", "train"]


def resolve_config(name: str) -> Path:
    """A config path, or the name of a bundled config (``focalmix``, ``focalmix-cpu``)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = resources.files("medssl.training") / "configs" / f"{name}.yaml"
    if bundled.is_file():
        return Path(str(bundled))
    choices = sorted(
        p.name.removesuffix(".yaml")
        for p in (resources.files("medssl.training") / "configs").iterdir()
        if p.name.endswith(".yaml")
    )
    raise ConfigError(
        f"config {name!r} is neither a file nor a bundled config ({', '.join(choices)})",
        key="--config",
    )


@click.group(cls=MedsslGroup)
def train() -> None:
    """Train medssl models from CT.

    Detection (LUNA16 layout): `focalmix` (FocalMix, CVPR 2020) and its fully
    supervised baseline `supervised-det`, with the identical network and budget.

    Segmentation (Decathlon datasets, one per domain): `ad` (A&D, NeurIPS 2023), `bcp` (BCP,
    CVPR 2023), `fixmatch` (FixMatch, fixed threshold) and `flexmatch` (FlexMatch CPL
    thresholds), and the baselines `supervised-seg` and `mean-teacher`, in the settings ssl,
    imbssl, uda, semidg.
    """


def _detector_command(method: str, summary: str) -> click.Command:
    @train.command(method, help=summary)
    @click.option(
        "--config",
        "config_name",
        default="focalmix",
        show_default=True,
        help="YAML config file, or a bundled one: focalmix (paper size, GPU), focalmix-cpu.",
    )
    @click.option(
        "--data",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        required=True,
        help="LUNA16 folder (subset0..9, annotations.csv; optional unlabeled/).",
    )
    @click.option("--labeled", type=int, required=True, help="Annotated training scans to use.")
    @click.option(
        "--unlabeled",
        type=int,
        default=0,
        show_default=True,
        help="Unlabeled scans (unlabeled/ and --set "
        "data.unlabeled_dirs first, then the leftover pool).",
    )
    @click.option(
        "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder."
    )
    @click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt.")
    @click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPU if present).")
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config value, e.g. --set optim.steps=500 --set focalmix.k=2.",
    )
    def command(
        config_name: str,
        data: Path,
        labeled: int,
        unlabeled: int,
        out: Path,
        resume: bool,
        device: str | None,
        overrides: tuple[str, ...],
    ) -> None:
        # Imported here: torch loads only when training actually starts.
        from medssl.config import load_config, parse_overrides
        from medssl.training.detection.config import DetectionExperiment
        from medssl.training.detection.trainer import train_detector

        values = {**parse_overrides(overrides), "method": method}
        cfg = load_config(DetectionExperiment, resolve_config(config_name), values)
        run = train_detector(cfg, data, out, labeled, unlabeled, resume=resume, device=device)
        if run.test_report is not None:
            click.echo(
                json.dumps(
                    {
                        "run": str(run.out),
                        "best_checkpoint": str(run.best_checkpoint),
                        "test": run.test_report,
                    },
                    indent=2,
                )
            )

    return command


def _segmentation_command(method: str, summary: str) -> click.Command:
    @train.command(method, help=summary)
    @click.option(
        "--setting",
        type=click.Choice(["ssl", "imbssl", "uda", "semidg"]),
        default="ssl",
        show_default=True,
        help="ssl: labeled fraction of one domain; imbssl: 11 imbalanced classes; "
        "uda: labeled source, unlabeled target; semidg: few labels from 3 domains, a 4th held out.",
    )
    @click.option(
        "--profile",
        type=click.Choice(["paper", "cpu"]),
        default="paper",
        show_default=True,
        help="Bundled config size: paper (GPU, official sizes) or cpu (minutes on a laptop).",
    )
    @click.option(
        "--config",
        "config_name",
        default=None,
        help="A YAML config file replacing the bundled seg-SETTING[-cpu] config.",
    )
    @click.option(
        "--data",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        required=True,
        help="Folder of Decathlon datasets, one per domain (DATA/<domain>/dataset.json), "
        "e.g. from `medssl synth organs --domain A --domain B ... DATA`.",
    )
    @click.option(
        "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder."
    )
    @click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt.")
    @click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPU if present).")
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config value, e.g. --set optim.steps=500 --set ad.drs=false.",
    )
    def command(
        setting: str,
        profile: str,
        config_name: str | None,
        data: Path,
        out: Path,
        resume: bool,
        device: str | None,
        overrides: tuple[str, ...],
    ) -> None:
        from medssl.config import load_config, parse_overrides
        from medssl.training.segmentation.config import SegmentationExperiment
        from medssl.training.segmentation.trainer import train_segmenter

        bundled = f"seg-{setting}" + ("-cpu" if profile == "cpu" else "")
        values = {**parse_overrides(overrides), "method": method}
        cfg = load_config(SegmentationExperiment, resolve_config(config_name or bundled), values)
        run = train_segmenter(cfg, data, out, resume=resume, device=device)
        click.echo(
            json.dumps(
                {
                    "run": str(run.out),
                    "best_checkpoint": str(run.best_checkpoint),
                    "test": run.test_report,
                },
                indent=2,
            )
        )

    return command


def _register_methods() -> None:
    """One command per registered method (:data:`medssl.training.methods.REGISTRY`)."""
    from medssl.training.methods.registry import REGISTRY

    for entry in REGISTRY.values():
        make = _detector_command if entry.family == "detection" else _segmentation_command
        make(entry.name, entry.summary)


_register_methods()


if __name__ == "__main__":
    train()
