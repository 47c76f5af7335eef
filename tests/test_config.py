"""Config loading: overrides, strict validation, one-line messages."""

import pytest

from memtrain.config import PRESETS, Config, apply_overrides, config_from_dict, load_config
from memtrain.errors import UserError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_validate_and_seq_len():
    cfg = Config()
    assert cfg.model.seq_len == cfg.model.chunk_len * cfg.model.n_chunks


def test_overrides_parse_yaml_values(tmp_path):
    p = write(tmp_path, "model: {chunk_len: 16}\n")
    cfg = load_config(
        p,
        [
            "optim.lr=3e-4",
            "model.encoder.arch=transformer",
            "model.encoder.n_heads=2",
            "train.compile=true",
            "run.name=x",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.encoder.arch == "transformer" and cfg.model.encoder.n_heads == 2
    assert cfg.train.compile is True and cfg.model.chunk_len == 16


def test_unknown_key_suggests_closest(tmp_path):
    p = write(tmp_path, "model:\n  chunk_lenn: 3\n")
    with pytest.raises(UserError, match=r"unknown config key 'model.chunk_lenn'; did you mean 'chunk_len'"):
        load_config(p)


def test_unknown_nested_key_suggests(tmp_path):
    with pytest.raises(UserError, match=r"model.encoder.d_modle'; did you mean 'd_model'"):
        load_config(write(tmp_path, "model: {encoder: {d_modle: 4}}\n"))


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'optimizer'; did you mean 'optim'"):
        load_config(write(tmp_path, "optimizer: {lr: 1}\n"))


def test_wrong_type_and_range(tmp_path):
    with pytest.raises(UserError, match=r"optim.lr: .*greater than 0 \(got -1\)"):
        load_config(write(tmp_path, "optim: {lr: -1}\n"))
    with pytest.raises(UserError, match=r"train.steps: .*integer"):
        load_config(write(tmp_path, "train: {steps: many}\n"))


def test_malformed_yaml_names_line(tmp_path):
    with pytest.raises(UserError, match=r"malformed YAML at line 3, column 15"):
        load_config(write(tmp_path, "model:\n  kind: memory\n  chunk_len: 4: 5\n"))


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_bad_override_syntax():
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])


def test_cross_field_rules():
    with pytest.raises(UserError, match="autoencoder reads one chunk"):
        config_from_dict({"model": {"kind": "autoencoder", "n_chunks": 4}})
    with pytest.raises(UserError, match="reconstruction is the autoencoder's objective"):
        config_from_dict({"objective": {"weights": {"reconstruction": 1.0}}})
    with pytest.raises(UserError, match="n_heads must be >= 1"):
        config_from_dict({"model": {"encoder": {"arch": "transformer", "n_heads": 0}}})
    with pytest.raises(UserError, match="curriculum stages add up to 30 steps but train.steps is 10"):
        config_from_dict(
            {
                "train": {"steps": 10},
                "curriculum": [
                    {"name": "a", "steps": 10, "weights": {"blank_copy": 1}},
                    {"name": "b", "steps": 20, "weights": {"copy": 1}},
                ],
            }
        )


def test_presets_replace_weights():
    cfg = config_from_dict({"objective": {"preset": "reference_combined"}})
    assert cfg.objective.weights.active() == PRESETS["reference_combined"]


def test_stages_default_to_one():
    cfg = config_from_dict({"train": {"steps": 7}, "objective": {"weights": {"causal": 1, "copy": 0.5}}})
    (stage,) = cfg.stages()
    assert stage.steps == 7 and stage.weights.active() == {"causal": 1.0, "copy": 0.5}


def test_every_shipped_config_validates():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[1].joinpath("yaml").rglob("*.yaml"))
    assert files
    import yaml

    checked = 0
    for f in files:
        raw = yaml.safe_load(f.read_text()) or {}
        if f.parent.name == "sweeps" or "models" in raw:  # sweep grids and measurement suites, not run configs
            continue
        load_config(f)
        checked += 1
    assert checked >= 10


def test_tied_autoencoder_cannot_freeze_its_encoder_without_its_head():
    """An autoencoder's tied LM head is its encoder's token embedding: freezing the encoder alone would
    silently freeze the head too, so the combination is refused, naming the stage."""
    ae = {"kind": "autoencoder", "n_chunks": 1, "tie_embeddings": True}
    stages = lambda freeze: [{"name": "s", "steps": 10, "weights": {"reconstruction": 1}, "freeze": freeze}]  # noqa: E731
    with pytest.raises(UserError, match="stage 's' freezes the encoder but not the head"):
        config_from_dict({"model": ae, "train": {"steps": 10}, "curriculum": stages(["encoder"])})
    with pytest.raises(UserError, match="stage 's' freezes the head but not the encoder"):
        config_from_dict({"model": ae, "train": {"steps": 10}, "curriculum": stages(["head"])})
    with pytest.raises(UserError, match="model.frozen_encoder would freeze the head too"):
        config_from_dict({"model": {**ae, "frozen_encoder": {}}, "objective": {"weights": {"reconstruction": 1}}})
    config_from_dict({"model": ae, "train": {"steps": 10}, "curriculum": stages(["encoder", "head"])})
    config_from_dict(
        {"model": {**ae, "tie_embeddings": False}, "train": {"steps": 10}, "curriculum": stages(["encoder"])}
    )
    # the model itself: with the tie, the head's weight is the encoder's embedding
    from memtrain.models import build_model

    cfg = config_from_dict({"model": ae, "objective": {"weights": {"reconstruction": 1}}})
    model = build_model(cfg.model, 64)
    assert model.lm_head.weight is model.encoder.wte.weight
