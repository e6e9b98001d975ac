"""Search-space files: strict validation before Ray starts, one line naming the file and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from granq_search.errors import SearchSpaceError
from granq_search.search.space import (
    TrialConfig,
    load_space,
    space_from_record,
    space_from_text,
    space_record_text,
)

REPO = Path(__file__).resolve().parents[2]

GOOD = {
    "base": "digits",
    "base_overrides": {"quant.act.granularity": "threshold"},
    "fidelity": {"train.epochs": 4, "train.warmup_epochs": 1, "train.iters_per_epoch": 5},
    "objectives": [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}],
    "parameters": {
        "quant.act.threshold": {"type": "float", "low": 0.0, "high": 1.0},
        "quant.act.bits": {"type": "categorical", "choices": [3, 4]},
        "optim.student.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "train.seed": {"type": "int", "low": 0, "high": 3},
    },
    "initial_points": [{"quant.act.threshold": 0.0, "quant.act.bits": 4}],
    "scheduler": {"type": "asha", "reduction_factor": 2, "grace_period": 1},
    "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2},
}


def write(tmp_path: Path, doc, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")
    return p


def with_change(path: str, value):
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    node = doc
    keys = path.split("/")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return doc


_DELETE = object()


def test_good_space_loads(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    assert space.directions == ["minimize", "minimize"]
    assert space.search_base.train.epochs == 4 and space.base.train.epochs == 8  # production kept
    assert space.base.quant.act.granularity == "threshold"
    assert space.asha_max_t == 4 and space.asha_grace_period == 2  # warm-up 1 + grace 1
    assert set(space.distributions()) == set(GOOD["parameters"])
    cfg = space.trial_config({"quant.act.bits": 3, "train.seed": 2})
    assert cfg.quant.act.bits == 3 and cfg.train.seed == 2 and cfg.train.epochs == 4


@pytest.mark.parametrize("path, value, key, words", [
    ("bogus", 1, "bogus", "unknown key"),
    ("objectives", [{"metric": "test_top1", "mode": "max"}], "objectives[0].metric", "test metric"),
    ("objectives", [{"metric": "best_test_top1", "mode": "max"}], "objectives[0].metric", "test metric"),
    ("objectives", [{"metric": "val_dorp", "mode": "min"}], "objectives[0].metric", "did you mean 'val_drop'"),
    ("objectives", [{"metric": "val_drop", "mode": "down"}], "objectives[0].mode", "min or max"),
    ("objectives", [], "objectives", "list"),
    ("parameters/quant.act.bitz", {"type": "int", "low": 2, "high": 4}, "parameters.quant.act.bitz",
     "did you mean 'quant.act.bits'"),
    ("parameters/quant.act.threshold", {"type": "float", "low": 0.9, "high": 0.1},
     "parameters.quant.act.threshold", "greater than high"),
    ("parameters/optim.student.lr", {"type": "float", "low": 0.0, "high": 1e-2, "log": True},
     "parameters.optim.student.lr.low", "log range needs low > 0"),
    ("parameters/quant.act.bits", {"type": "categorical", "choices": []}, "parameters.quant.act.bits.choices",
     "non-empty"),
    ("parameters/quant.act.bits", {"type": "categorical", "choices": [4, 9]}, "parameters.quant.act.bits",
     "choice 9 is rejected by the config"),
    ("parameters/quant.act.threshold", {"type": "float", "low": 0.0, "high": 1.5},
     "parameters.quant.act.threshold", "bound 1.5 is rejected"),
    ("parameters/quant.act.bits", {"type": "float", "low": 3, "high": 5}, "parameters.quant.act.bits.type",
     "not a float field"),
    ("parameters/quant.act.granularity", {"type": "int", "low": 0, "high": 1},
     "parameters.quant.act.granularity.type", "use type categorical"),
    ("parameters/quant.act.threshold", {"type": "float", "low": 0, "high": 1, "stepp": 0.1},
     "parameters.quant.act.threshold.stepp", "did you mean 'step'"),
    ("parameters/quant.act.threshold", {"type": "uniform", "low": 0, "high": 1},
     "parameters.quant.act.threshold.type", "not a parameter type"),
    ("fidelity/train.epochz", 3, "fidelity.train.epochz", "not a config field"),
    ("fidelity/train.warmup_epochs", 9, "fidelity", "the config rejects it"),
    ("base", "no_such_preset", "base", "no config file or preset"),
    ("base", "missing.yaml", "base", "does not exist"),
    ("constraints", {"latency_ms": 3}, "constraints.latency_ms", "cannot be budgeted"),
    ("constraints", {"bitops": -1}, "constraints.bitops", "number > 0"),
    ("initial_points", [{"quant.act.bits": 5}], "initial_points[0].quant.act.bits", "outside"),
    ("initial_points", [{"quant.weight.bits": 4}], "initial_points[0].quant.weight.bits", "not a searched"),
    ("scheduler", {"type": "hyperband"}, "scheduler.type", "asha or none"),
    ("scheduler", {"type": "asha", "grace_period": 4}, "scheduler.grace_period", "exceeds train.epochs"),
    ("scheduler", {"type": "asha", "reduction_factor": 1}, "scheduler.reduction_factor", "> 1"),
    ("sampler", {"type": "cmaes"}, "sampler.type", "tpe or random"),
    ("parameters", _DELETE, "parameters", "missing"),
])
def test_malformed_spaces_name_file_and_key(tmp_path, path, value, key, words):
    f = write(tmp_path, with_change(path, value))
    with pytest.raises(SearchSpaceError) as err:
        load_space(f)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(f) in msg, msg
    assert f": {key}:" in msg, msg
    assert words in msg, msg


def test_parameter_also_in_fidelity_is_an_error(tmp_path):
    doc = with_change("fidelity/quant.act.bits", 4)
    with pytest.raises(SearchSpaceError, match="also a searched parameter"):
        load_space(write(tmp_path, doc))


def test_yaml_syntax_and_empty_file(tmp_path):
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        load_space(write(tmp_path, "base: [digits\n"))
    with pytest.raises(SearchSpaceError, match="empty"):
        load_space(write(tmp_path, ""))
    with pytest.raises(SearchSpaceError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")


def test_base_file_relative_to_space_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text(textwrap.dedent("""\
        model: {name: tiny_test, num_classes: 10}
        train: {epochs: 3, warmup_epochs: 1, iters_per_epoch: 2}
    """))
    doc = with_change("base", "configs/mine.yaml")
    doc["fidelity"] = {"train.iters_per_epoch": 1}
    doc["scheduler"] = {"type": "none"}
    space = load_space(write(tmp_path / "configs", doc, "../space.yaml"))
    assert space.base.model.name == "tiny_test" and space.search_base.train.iters_per_epoch == 1


def test_set_overrides_split_between_budget_and_production(tmp_path):
    space = load_space(write(tmp_path, GOOD), {"train.epochs": 2, "data.batch_size": 128})
    # a fidelity key changes only the search budget; another key changes production too
    assert space.search_base.train.epochs == 2 and space.base.train.epochs == 8
    assert space.fidelity["train.epochs"] == 2
    assert space.base.data.batch_size == 128 and space.search_base.data.batch_size == 128
    # a searched parameter given with --set is pinned (see the pinning tests below)
    assert "quant.act.bits" not in load_space(write(tmp_path, GOOD), {"quant.act.bits": 4}).parameters
    with pytest.raises(SearchSpaceError, match="--set quant.act.bitz"):
        load_space(write(tmp_path, GOOD), {"quant.act.bitz": 4})


def test_record_round_trip(tmp_path):
    space = load_space(write(tmp_path, GOOD), {"data.batch_size": 128})
    again = space_from_record(yaml.safe_load(yaml.safe_dump(space.to_record())))
    assert again.base == space.base and again.search_base == space.search_base
    assert again.parameters == space.parameters and again.objectives == space.objectives
    assert again.initial_points == space.initial_points


def test_the_trial_config_builder_is_the_spaces_and_pickles(tmp_path):
    import pickle

    space = load_space(write(tmp_path, GOOD))
    params = {"quant.act.bits": 3, "optim.student.lr": 2e-3}
    trials = pickle.loads(pickle.dumps(TrialConfig(space.search_base)))
    assert trials(params) == space.trial_config(params) and trials({}) == space.search_base
    production = space.production_config(params)
    assert production.quant == trials(params).quant and production.optim == trials(params).optim
    assert (production.train.epochs, trials(params).train.epochs) == (8, 4)  # fidelity: the search's only


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "search_spaces").glob("*.yaml")))
def test_recorded_text_rebuilds_the_shipped_spaces(name):
    space = load_space(REPO / "search_spaces" / name, {"data.batch_size": 32})
    text = space_record_text(space)
    assert text.startswith("{") and len(text) <= 8000  # readable JSON in an MLflow tag
    again = space_from_text(text, origin="tag")
    assert again.to_record() == space.to_record() and again.base == space.base
    assert again.search_base == space.search_base and again.parameters == space.parameters


def test_a_long_record_text_is_compressed(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    text = space_record_text(space, limit=1500)
    assert text.startswith("zlib+base64:") and len(text) <= 1500
    assert space_from_text(text, origin="tag").to_record() == space.to_record()
    with pytest.raises(SearchSpaceError, match="too large to record on its MLflow run"):
        space_record_text(space, limit=100)
    for bad, words in (("{nope", "not a search-space record"), ("zlib+base64:%%", "not a search-space record"),
                       ("[1, 2]", "a JSON object"), ('{"raw": {}}', "no 'base_config'")):
        with pytest.raises(SearchSpaceError, match=f"^the tag: .*{words}"):
            space_from_text(bad, origin="the tag")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "search_spaces").glob("*.yaml")))
def test_shipped_spaces_load(name):
    space = load_space(REPO / "search_spaces" / name)
    assert space.initial_points, "every shipped space tries the paper's values first"
    assert all(not o.metric.startswith("test") for o in space.objectives)


def test_digits_default_budget():
    space = load_space(REPO / "search_spaces" / "digits.yaml")
    assert space.metrics == ["val_drop", "bitops"]
    assert {"quant.act.threshold", "quant.act.bits", "quant.weight.bits", "optim.student.lr",
            "optim.generator.lr", "loss.alpha_ds"} <= set(space.parameters)


# --------------------------------------------------------------------------- pinning with --set


def test_set_pins_a_searched_parameter(tmp_path):
    space = load_space(write(tmp_path, GOOD), {"quant.act.bits": 3, "data.batch_size": 128})
    assert space.pinned == {"quant.act.bits": 3}
    assert "quant.act.bits" not in space.parameters and "quant.act.bits" not in space.distributions()
    assert set(space.distributions()) == set(GOOD["parameters"]) - {"quant.act.bits"}
    assert space.trial_config({}).quant.act.bits == 3 and space.production_config({}).quant.act.bits == 3
    assert space.base.quant.act.bits == 3 and space.search_base.quant.act.bits == 3
    assert "quant.act.bits" not in space.fidelity  # not a budget key: production keeps the pin
    cfg = space.trial_config({"train.seed": 2})
    assert cfg.quant.act.bits == 3 and cfg.train.seed == 2 and cfg.train.epochs == 4
    assert space.production_config({"train.seed": 2}).train.epochs == 8
    assert space.base.data.batch_size == 128  # other --set overrides behave as before


def test_pin_is_normalised_to_the_parameter_type(tmp_path):
    space = load_space(write(tmp_path, GOOD), {"quant.act.threshold": 1, "train.seed": 2.0, "quant.act.bits": 4.0})
    assert space.pinned == {"quant.act.threshold": 1.0, "train.seed": 2, "quant.act.bits": 4}
    assert [type(v) for v in space.pinned.values()] == [float, int, int]


@pytest.mark.parametrize("path, value, words", [
    ("quant.act.threshold", 1.5, "inside {'type': 'float', 'low': 0.0, 'high': 1.0}"),
    ("optim.student.lr", 0.5, "'log': True"),
    ("train.seed", 7, "inside {'type': 'int', 'low': 0, 'high': 3}"),
    ("train.seed", 1.5, "inside"),
    ("quant.act.bits", 5, "one of [3, 4]"),
    ("quant.act.bits", "4", "one of [3, 4]"),
])
def test_pin_outside_the_range_is_an_error(tmp_path, path, value, words):
    f = write(tmp_path, GOOD)
    with pytest.raises(SearchSpaceError) as err:
        load_space(f, {path: value})
    msg = str(err.value)
    assert "\n" not in msg and str(f) in msg, msg
    assert f": --set {path}: {value!r} is outside the searched parameter's range" in msg, msg
    assert words in msg, msg


def test_pin_prunes_and_deduplicates_initial_points(tmp_path):
    doc = with_change("initial_points", [
        {"quant.act.threshold": 0.0, "quant.act.bits": 4},
        {"quant.act.threshold": 0.0, "quant.act.bits": 3},   # same as the first once bits is pinned
        {"quant.act.bits": 3},                               # nothing left once bits is pinned
        {"quant.act.threshold": 0.5, "train.seed": 1, "quant.act.bits": 3},
        {"quant.act.threshold": 0.5, "train.seed": 1},       # duplicate of the previous one
    ])
    f = write(tmp_path, doc)
    assert len(load_space(f).initial_points) == 5  # unpinned: every point kept as written
    space = load_space(f, {"quant.act.bits": 3})
    assert space.initial_points == ({"quant.act.threshold": 0.0}, {"quant.act.threshold": 0.5, "train.seed": 1})
    # the file is still checked as written: a pinned key's value outside its range is an error
    bad = with_change("initial_points", [{"quant.act.threshold": 0.0, "quant.act.bits": 5}])
    with pytest.raises(SearchSpaceError, match=r"initial_points\[0\]\.quant\.act\.bits: 5 is outside"):
        load_space(write(tmp_path, bad, "bad.yaml"), {"quant.act.bits": 3})


def test_pinning_every_parameter_is_an_error(tmp_path):
    f = write(tmp_path, GOOD)
    pins = {"quant.act.threshold": 0.5, "quant.act.bits": 3, "optim.student.lr": 1e-3, "train.seed": 0}
    with pytest.raises(SearchSpaceError) as err:
        load_space(f, pins)
    msg = str(err.value)
    assert "\n" not in msg and "nothing left to search" in msg and ": --set:" in msg, msg
    pins.pop("train.seed")
    assert list(load_space(f, pins).parameters) == ["train.seed"]


def test_pinned_warmup_sets_the_asha_grace_period(tmp_path):
    doc = with_change("parameters/train.warmup_epochs", {"type": "int", "low": 0, "high": 2})
    del doc["fidelity"]["train.warmup_epochs"]
    f = write(tmp_path, doc)
    assert load_space(f).asha_grace_period == 3  # largest searched warm-up 2 + grace 1
    space = load_space(f, {"train.warmup_epochs": 0})
    assert space.search_base.train.warmup_epochs == 0 and space.asha_grace_period == 1
    assert load_space(f, {"train.warmup_epochs": 2}).asha_grace_period == 3
    # grace 3: the searched warm-up range (up to 2) does not fit 4 epochs; a pin of 1 does, 2 does not
    doc["scheduler"]["grace_period"] = 3
    f2 = write(tmp_path, doc, "asha.yaml")
    with pytest.raises(SearchSpaceError, match="exceeds train.epochs"):
        load_space(f2)
    assert load_space(f2, {"train.warmup_epochs": 1}).asha_grace_period == 4
    with pytest.raises(SearchSpaceError, match=r"warm-up \(2\) \+ grace_period \(3\) = 5 epochs exceeds"):
        load_space(f2, {"train.warmup_epochs": 2})


def test_pinned_train_epochs_is_allowed_with_asha(tmp_path):
    doc = with_change("parameters/train.epochs", {"type": "int", "low": 2, "high": 6})
    del doc["fidelity"]["train.epochs"]
    f = write(tmp_path, doc)
    with pytest.raises(SearchSpaceError, match="ASHA needs one epoch budget"):
        load_space(f)
    space = load_space(f, {"train.epochs": 3})
    assert space.asha_max_t == 3 and space.base.train.epochs == 3


def test_pin_record_round_trip(tmp_path):
    space = load_space(write(tmp_path, GOOD), {"quant.act.bits": 3.0, "data.batch_size": 128})
    record = yaml.safe_load(yaml.safe_dump(space.to_record()))
    assert record["pinned"] == {"quant.act.bits": 3}
    assert "quant.act.bits" not in record["parameters"]
    again = space_from_record(record)  # the base already holds the pin: applied once, accepted again
    assert again.pinned == space.pinned and again.parameters == space.parameters
    assert again.base == space.base and again.search_base == space.search_base
    assert again.initial_points == space.initial_points == ({"quant.act.threshold": 0.0},)
    assert again.to_record() == space.to_record()
    # a record written before pinning existed (no "pinned" key) rebuilds the same pins
    del record["pinned"]
    assert space_from_record(record).pinned == {"quant.act.bits": 3}
    record["pinned"] = {"quant.act.bits": 4}
    with pytest.raises(SearchSpaceError, match="pinned"):
        space_from_record(record)


def test_pin_on_the_digits_space():
    space = load_space(REPO / "search_spaces" / "digits.yaml", {"quant.act.bits": 3, "quant.weight.bits": 3})
    assert space.pinned == {"quant.act.bits": 3, "quant.weight.bits": 3}
    assert not {"quant.act.bits", "quant.weight.bits"} & set(space.distributions())
    cfg = space.trial_config({})
    assert (cfg.quant.act.bits, cfg.quant.weight.bits) == (3, 3)
    assert (space.base.quant.act.bits, space.base.quant.weight.bits) == (3, 3)
    assert all(not {"quant.act.bits", "quant.weight.bits"} & set(p) for p in space.initial_points)
    assert len(space.initial_points) == 3  # the three shipped points still differ in their other values
    with pytest.raises(SearchSpaceError, match=r"--set quant.weight.bits: 6 is outside .* one of \[2, 3, 4, 5\]"):
        load_space(REPO / "search_spaces" / "digits.yaml", {"quant.weight.bits": 6})
