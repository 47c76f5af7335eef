"""A run directory written before a setting existed still holds the same run: a field its config.yaml lacks
counts at its default when the directory's identity is compared (memtrain.engine.rundir)."""

from __future__ import annotations

import pytest

import yaml
from memtrain.config import Config
from memtrain.engine.rundir import first_difference, prepare_run_dir, release_run_dir
from memtrain.errors import UserError


def _config(tmp_path, **model) -> Config:
    return Config.model_validate({"run": {"out_dir": str(tmp_path / "run")}, "model": model})


def _older(cfg: Config) -> dict:
    """cfg's dict as a version of memtrain without ``model.init`` wrote it."""
    old = cfg.model_dump(mode="json")
    del old["model"]["init"]
    return old


def test_a_missing_field_counts_at_its_default(tmp_path):
    cfg = _config(tmp_path)
    assert first_difference(_older(cfg), cfg.model_dump(mode="json")) is None
    other = _config(tmp_path, init="torch")
    assert first_difference(_older(cfg), other.model_dump(mode="json")) == (
        "model.init: 'arch' in the directory, 'torch' now"
    )


def test_an_older_run_directory_resumes(tmp_path):
    cfg = _config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(_older(cfg), sort_keys=False))
    try:
        prepare_run_dir(run, cfg, resume=True)
    finally:
        release_run_dir(run)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init"] == "arch"


def test_an_older_run_directory_of_another_run_is_still_refused(tmp_path):
    cfg = _config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(_older(cfg), sort_keys=False))
    with pytest.raises(UserError, match="model.init"):
        prepare_run_dir(run, _config(tmp_path, init="torch"), resume=True)
    release_run_dir(run)
