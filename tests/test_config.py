"""Config loading: extends, validation errors that name the key and the file."""
import json

import pytest

from threempose.config import ConfigError, config_to_dict, load_config


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_defaults_are_the_thesis_settings(tmp_path):
    cfg = load_config(write(tmp_path / "c.json", {}))
    assert (cfg.model.rows, cfg.model.layers, cfg.model.channels, cfg.model.hidden) == (4, 10, 32, 2)
    assert cfg.model.eels == [4, 7]
    assert (cfg.loss.heatmap_weight, cfg.loss.grouping_weight, cfg.loss.teacher_weight,
            cfg.loss.flops_weight) == (1.0, 1e-3, 1.0, 1e-3)
    assert (cfg.search.epochs, cfg.search.arch_lr, cfg.search.tau_start) == (35, 5e-3, 10.0)
    assert [(e.layer, e.c0, e.threshold) for e in cfg.infer.eels] == [(4, 1.0, 1.0), (7, 2.0, 0.6)]


def test_extends_merges_nested_sections(tmp_path):
    write(tmp_path / "base.json", {"model": {"channels": 16, "layers": 6, "eels": [2, 4]}, "search": {"epochs": 3}})
    child = write(tmp_path / "child.json", {"extends": "base.json", "model": {"channels": 8}})
    cfg = load_config(child)
    assert cfg.model.channels == 8          # overridden
    assert cfg.model.layers == 6            # inherited
    assert cfg.search.epochs == 3
    assert cfg.source == str(child)


def test_overrides_apply_last(tmp_path):
    cfg = load_config(write(tmp_path / "c.json", {"search": {"epochs": 3}}),
                      overrides={"search": {"epochs": 1}})
    assert cfg.search.epochs == 1


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path / "bad.json", {"model": {"chanels": 16}})
    with pytest.raises(ConfigError, match=r"bad\.json.*model\.chanels"):
        load_config(p)


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path / "bad.json", {"search": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"search\.epochs"):
        load_config(p)
    p = write(tmp_path / "bad2.json", {"run": {"amp": "fp8"}})
    with pytest.raises(ConfigError, match=r"run\.amp.*one of"):
        load_config(p)


def test_missing_file_and_missing_base(tmp_path):
    with pytest.raises(ConfigError, match="not found.*nope.json"):
        load_config(tmp_path / "nope.json")
    p = write(tmp_path / "child.json", {"extends": "gone.json"})
    with pytest.raises(ConfigError, match=r"gone\.json.*extended by.*child\.json"):
        load_config(p)


def test_malformed_json_and_cycles(tmp_path):
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"m\.json.*not valid JSON"):
        load_config(tmp_path / "m.json")
    write(tmp_path / "a.json", {"extends": "b.json"})
    write(tmp_path / "b.json", {"extends": "a.json"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.json")


def test_semantic_checks(tmp_path):
    with pytest.raises(ConfigError, match="eels"):
        load_config(write(tmp_path / "c.json", {"model": {"layers": 5, "eels": [7]}}))


def test_round_trip_through_dict(tmp_path):
    cfg = load_config(write(tmp_path / "c.json", {"model": {"channels": 8}}))
    again = load_config(write(tmp_path / "d.json", config_to_dict(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_shipped_configs_load():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.json"))
    assert files, "configs/ should ship JSON configs"
    for f in files:
        load_config(f)


def test_the_readme_small_model_has_dynamic_rules_for_its_early_exits():
    """``infer --dynamic`` on a train-small model of a search-small genotype finds a rule per EEL."""
    from pathlib import Path

    from threempose.inference.dynamic_exit import resolve_rules
    from threempose.nas.supernet import Supernet

    root = Path(__file__).resolve().parents[1] / "configs"
    genotype = Supernet(load_config(root / "search-small.json").model).derive()
    eel_layers = list(genotype.exit_layers[:-1])
    assert eel_layers and sorted(resolve_rules(load_config(root / "train-small.json").infer.eels,
                                               eel_layers)) == sorted(eel_layers)
