import pytest
import yaml

from granq_search.config import (
    ExperimentConfig,
    QuantConfig,
    dump_config,
    flatten,
    from_dict,
    get_path,
    list_presets,
    load_config,
    parse_set_args,
    to_dict,
    with_overrides,
)
from granq_search.errors import ConfigError


@pytest.mark.parametrize("preset", list_presets())
def test_presets_round_trip(preset, tmp_path):
    cfg = load_config(preset)
    assert from_dict(to_dict(cfg)) == cfg
    path = tmp_path / "c.yaml"
    dump_config(cfg, path, provenance={"trial": "x"})
    assert load_config(str(path)) == cfg


def test_default_round_trip_and_flatten():
    cfg = ExperimentConfig()
    flat = flatten(cfg)
    assert flat["quant.act.bits"] == 4 and flat["optim.student.lr"] == 1e-4
    assert all("/" not in k for k in flat)
    assert get_path(cfg, "loss.alpha_ds") == 0.2


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'quant.act.bitz'; did you mean 'quant.act.bits'"):
        from_dict({"quant": {"act": {"bitz": 3}}})


@pytest.mark.parametrize("data,field", [
    ({"quant": {"act": {"bits": 9}}}, "quant.act.bits"),
    ({"quant": {"weight": {"bits": 1}}}, "quant.weight.bits"),
    ({"quant": {"act": {"granularity": "per_pixel"}}}, "quant.act.granularity"),
    ({"quant": {"act": {"threshold": 1.5}}}, "quant.act.threshold"),
    ({"quant": {"act": {"threshold": -0.1}}}, "quant.act.threshold"),
    ({"optim": {"student": {"lr": -1}}}, "optim.student.lr"),
    ({"train": {"epochs": 2, "warmup_epochs": 2}}, "train.warmup_epochs"),
    ({"train": {"epochs": "ten"}}, "train.epochs"),
    ({"loss": {"student_loss": "mse"}}, "loss.student_loss"),
    ({"quant": {"overrides": [{"pattern": "conv1", "weight_bits": 12}]}}, "quant.overrides[0].weight_bits"),
])
def test_invalid_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as exc:
        from_dict(data)
    assert str(exc.value).startswith(field), str(exc.value)


def test_overrides_and_set_args():
    sets = parse_set_args(["quant.act.bits=3", "optim.student.lr=1e-3", "optim.milestones=[2, 4]"])
    assert sets == {"quant.act.bits": 3, "optim.student.lr": "1e-3", "optim.milestones": [2, 4]}
    cfg = with_overrides(ExperimentConfig(), sets)
    assert cfg.quant.act.bits == 3 and cfg.optim.student.lr == 1e-3 and cfg.optim.milestones == (2, 4)
    with pytest.raises(ConfigError, match="not a config field; did you mean 'quant.act'"):
        with_overrides(ExperimentConfig(), {"quant.actt.bits": 3})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set_args(["quant.act.bits"])


def test_section_defaults_are_valid():
    assert QuantConfig().act.granularity == "per_sample_channel"


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        load_config("digitz")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(str(empty))


def test_dump_config_portable_drops_machine_settings_at_any_depth(monkeypatch):
    import granq_search.config as config_module

    cfg = ExperimentConfig()
    monkeypatch.setattr(config_module, "MACHINE_SETTINGS", ("data.num_workers", "optim.student.momentum"))
    doc = yaml.safe_load(dump_config(cfg, portable=True))
    assert "num_workers" not in doc["data"] and "momentum" not in doc["optim"]["student"]
    assert "lr" in doc["optim"]["student"]
    full = yaml.safe_load(dump_config(cfg))
    assert "momentum" in full["optim"]["student"] and "num_workers" in full["data"]


def test_config_from_data_names_its_source_and_load_config_keeps_the_file_wording(tmp_path):
    from granq_search.config import config_from_data

    assert config_from_data({"train": {"epochs": 9}}, "x", {"train.epochs": 8}).train.epochs == 8
    with pytest.raises(ConfigError, match="^the config mapping must hold a mapping of sections, not list$"):
        config_from_data([1], "the config mapping")
    bad = tmp_path / "v.yaml"
    bad.write_text("config_version: 7\n")
    with pytest.raises(ConfigError, match=r"config file '.*v\.yaml' has config_version 7"):
        load_config(str(bad))


def test_public_names_are_exported():
    import granq_search.config as config_module

    for name in ("machine_neutral", "MACHINE_SETTINGS", "split_document", "read_yaml", "config_from_data"):
        assert name in config_module.__all__ and hasattr(config_module, name)
