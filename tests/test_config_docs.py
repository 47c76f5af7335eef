"""docs/config.md is generated from the config schema (memtrain.config_docs) and every field is documented."""

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, create_model

from memtrain import config_docs
from memtrain.config import Config, DataConfig, DistConfig, ModelConfig, StackConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models(a)]


def _reachable(root=Config) -> list[type[BaseModel]]:
    seen, todo = [], [root]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        for info in model.model_fields.values():
            todo += _models(info.annotation)
    return seen


def test_docs_config_md_is_generated_from_the_schema():
    expected = config_docs.render_markdown()
    current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    assert current == expected, (
        f"{DOC} is out of date with memtrain/config.py; regenerate it: "
        "python -m memtrain.config_docs --write docs/config.md"
    )


def test_every_field_has_a_description():
    models = _reachable()
    assert {"HFDecoderConfig", "HFLoraConfig", "StageConfig", "ObjectiveWeights", "SlurmConfig"} <= {
        m.__name__ for m in models
    }
    missing = [
        f"{m.__name__}.{name}"
        for m in models
        for name, info in m.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert not missing, f"fields without Field(description=...): {', '.join(missing)}"


def test_fields_the_old_hand_written_page_lacked_are_documented():
    text = config_docs.render_markdown()
    for heading in (
        "### `model.hf_decoder`",
        "### `model.hf_decoder.lora`",
        "### `objective.weights`",
        "### `model.encoder`, `model.decoder`",
        "## `curriculum`",
    ):
        assert heading in text
    for row in ("| `kernels` |", "| `micro_batch_size` |", "| `attn_implementation` |", "| `target_modules` |"):
        assert row in text
    assert "| `path` | str | **required** |" in text  # required fields say so
    assert "| `zero_stage` | int, 0 to 3 | `0` |" in text  # constraints and defaults
    assert "`mixer` or `transformer`" in text  # Literal values


def test_a_new_field_appears_without_touching_the_renderer():
    """A field added to a section (and to a nested section) is rendered with its type, default and text."""
    Stack2 = create_model(
        "Stack2",
        __base__=StackConfig,
        window=(typing.Optional[int], Field(None, ge=3, description="a brand-new stack field")),  # noqa: UP045 (the rendering of Optional is under test)
    )
    Model2 = create_model(
        "Model2",
        __base__=ModelConfig,
        encoder=(Stack2, Field(Stack2(), description="the encoder")),
        extras=(dict[str, float], Field({}, description="a brand-new mapping field")),
    )
    Data2 = create_model(
        "Data2",
        __base__=DataConfig,
        prefetch=(typing.Literal["none", "some"], Field("some", description="a new data knob")),
    )
    Root = create_model(
        "Root",
        __base__=Config,
        model=(Model2, Field(Model2(), description="m")),
        data=(Data2, Field(Data2(), description="d")),
        top=(int, Field(7, description="a new top-level field")),
    )
    text = config_docs.render_markdown(Root)
    assert "| `window` | int ≥ 3 or null | `null` | a brand-new stack field |" in text
    assert "| `extras` | mapping of str to float | `{}` | a brand-new mapping field |" in text
    assert "| `prefetch` | `none` or `some` | `some` | a new data knob |" in text
    assert "| `top` | int | `7` | a new top-level field |" in text
    assert "### `model.encoder`" in text and "### `model.decoder`" in text  # no longer the same model
    assert "a brand-new stack field" not in config_docs.render_markdown()


def test_check_names_the_stale_file_and_the_command(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("# old\n")
    assert config_docs.main(["--check", str(stale)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(stale) in err
    assert f"python -m memtrain.config_docs --write {stale}" in err
    assert config_docs.main(["--write", str(stale)]) == 0
    assert config_docs.main(["--check", str(stale)]) == 0
    assert stale.read_text() == config_docs.render_markdown()


def test_descriptions_agree_with_the_batch_rules():
    """The documented batch arithmetic is the code's (memtrain.engine.ds_config.layout)."""
    ds_config = pytest.importorskip("memtrain.engine.ds_config")
    cfg = Config.model_validate(
        {"data": {"batch_size": 8}, "optim": {"grad_accum": 2}, "dist": {"engine": "deepspeed", "micro_batch_size": 4}}
    )
    lay = ds_config.layout(cfg, 4)
    assert (lay.global_batch, lay.micro_batch_size, lay.micro_batches) == (64, 4, 4)
    cfg = cfg.model_copy(update={"dist": DistConfig(engine="deepspeed", micro_batch_size=4, pipeline_stages=2)})
    lay = ds_config.layout(cfg, 4)
    assert (lay.global_batch, lay.data_parallel, lay.micro_batches) == (64, 2, 8)
    text = config_docs.render_markdown()
    assert "8 × 2 × 4 = 64 rows" in text and "`gradient_accumulation_steps` 8" in text
