"""The run configs and Slurm templates that ship with memtrain.

In a source checkout they are the top-level ``yaml/`` and ``slurm/`` folders; an installed wheel carries the
same files as ``memtrain/configs/`` and ``memtrain/slurm/`` (``pyproject.toml`` maps one onto the other), so
both kinds of install find them here:

    configs_dir()                  -> the folder of shipped run configs
    slurm_dir()                    -> the folder of Slurm batch templates
    shipped_configs()              -> {"tiny": Path, "paper/memory_mixer_e512_d512": Path, ...}
    resolve_config("tiny")         -> the shipped yaml/tiny.yaml, unless a file named "tiny" exists
    resolve_config_dir("yaml/repro") -> the shipped yaml/repro/, unless such a folder exists here
    copy_configs(["tiny"], "out/") -> out/tiny.yaml (refuses to overwrite)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from memtrain.errors import UserError

_PACKAGE = Path(__file__).resolve().parent


def _data_dir(installed: str, checkout: str, marker: str) -> Path:
    """``memtrain/<installed>`` in a wheel install, else ``<checkout root>/<checkout>``; must contain ``marker``."""
    for d in (_PACKAGE / installed, _PACKAGE.parent / checkout):
        if (d / marker).is_file():
            return d
    raise UserError(
        f"{_PACKAGE}: the shipped {checkout}/ files are missing from this memtrain install "
        f"(reinstall memtrain: pip install --force-reinstall memtrain)"
    )


def configs_dir() -> Path:
    """The folder of shipped run configs (``yaml/`` in a checkout)."""
    return _data_dir("configs", "yaml", "tiny.yaml")


def slurm_dir() -> Path:
    """The folder of Slurm batch templates (``slurm/`` in a checkout)."""
    return _data_dir("slurm", "slurm", "_common.sh")


def shipped_configs() -> dict[str, Path]:
    """Every shipped config by name: its path under :func:`configs_dir` without ``.yaml``, sorted."""
    root = configs_dir()
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def _key(name: str | Path) -> str:
    """A shipped name from what a user may write: "yaml/tiny.yaml" in a checkout names the same file as "tiny"."""
    return str(name).replace("\\", "/").removeprefix("./").removeprefix("yaml/").strip("/")


def _lookup(name: str) -> Path | None:
    return shipped_configs().get(_key(name).removesuffix(".yaml"))


def resolve_config(path: str | Path) -> Path:
    """``path`` when such a file exists, else the shipped config of that name, else ``path`` unchanged.

    A file on disk always wins, so a user's own ``tiny.yaml`` in the working directory is never shadowed.
    """
    p = Path(path)
    if p.exists():
        return p
    try:
        found = _lookup(str(path))
    except UserError:
        return p
    return found if found is not None else p


def resolve_config_dir(path: str | Path) -> Path:
    """``path`` when such a folder exists, else the shipped folder of that name (``yaml/repro`` or ``repro``)."""
    p = Path(path)
    if p.exists():
        return p
    key = _key(path)
    try:
        shipped = configs_dir() / key
    except UserError:
        return p
    return shipped if key and shipped.is_dir() else p


def copy_configs(names: list[str], dest: str | Path, force: bool = False) -> list[Path]:
    """Copy shipped configs (by name; ``all`` for every one) into ``dest``, keeping their sub-folders.

    Nothing is written unless every name resolves and, without ``force``, no target file exists yet.
    """
    table = shipped_configs()
    if names == ["all"]:
        chosen = list(table)
    else:
        chosen = []
        for n in names:
            hit = _lookup(n)
            if hit is None:
                raise UserError(f"{n}: no shipped config of that name (see: memtrain configs list)")
            chosen.append(hit.relative_to(configs_dir()).with_suffix("").as_posix())
    dest = Path(dest)
    targets = {name: dest / f"{name}.yaml" for name in chosen}
    clash = [t for t in targets.values() if t.exists()]
    if clash and not force:
        raise UserError(f"{clash[0]}: already exists (use --force to overwrite)")
    out = []
    for name, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(table[name], tmp)
        tmp.replace(target)
        out.append(target)
    return out
