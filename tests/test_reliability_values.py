"""Bad command-line and config values: one line (argparse's usage plus one error line), exit 2,
nothing written."""
import json

import pytest

from threempose.config import ConfigError, load_config
from threempose.data import synthetic


@pytest.mark.parametrize("argv, message", [
    (["--images", "-5"], "--images must be >= 1"),
    (["--images", "0"], "--images must be >= 1"),
    (["--max-people", "-1"], "--max-people must be >= 0, got -1"),
    (["--min-size", "300", "--max-size", "200"], "need 16 <= --min-size <= --max-size, got --min-size 300"),
    (["--min-size", "8", "--max-size", "200"], "need 16 <= --min-size"),
])
def test_synthetic_arguments_are_checked_before_writing(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as caught:
        synthetic.main(["--out", str(tmp_path / "out"), *argv])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and message in err[-1] and err[-1].startswith("python -m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("synthetic_section, message", [
    ({"min_size": 300, "max_size": 200}, "16 <= min_size <= max_size, got min_size 300, max_size 200"),
    ({"train_images": -5}, "train_images, val_images and max_people must be >= 0, got -5"),
    ({"max_people": -1}, "max_people must be >= 0"),
])
def test_synthetic_config_values_are_checked(tmp_path, synthetic_section, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data": {"synthetic": synthetic_section}}))
    with pytest.raises(ConfigError, match=message):
        load_config(path)
