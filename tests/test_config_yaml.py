"""Config files a typo or a hostile file produces are refused at once with the fix named
(pipelines/spec/yaml_strict.py): empty, duplicate keys, alias bombs, oversized documents, absurd k."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli.main import main
from pipelines.config import load_config
from pipelines.spec.yaml_strict import MAX_BYTES, expanded_size, load_yaml
from tda.errors import ConfigError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _bomb(levels: int = 9) -> str:
    lines = ["model:", "  options:", "    a: &a [x, x, x, x, x, x, x, x, x]"]
    prev = "a"
    for name in "bcdefghijklmnop"[:levels - 1]:
        lines.append(f"    {name}: &{name} [{', '.join(['*' + prev] * 9)}]")
        prev = name
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, match", [
    ("", "is empty; write its sections"),
    ("# only a comment\n", "is empty"),
    ("data:\n  train_size: 10\n  train_size: 20\n", "'train_size' appears twice in one mapping \\(lines 2 and 3\\)"),
    ("data: {seed: 1}\ndata: {seed: 2}\n", "'data' appears twice"),
    (_bomb(), "expands to more than 100,000 values through YAML aliases"),
    ("a: &a [*a]\n", "not valid YAML|expands to more than"),
    ("x: " + "y" * (MAX_BYTES + 10) + "\n", "a config is at most"),
], ids=["empty", "comment-only", "duplicate-key", "duplicate-section", "alias-bomb", "recursive-alias", "oversized"])
def test_bad_yaml_is_a_config_error_at_once(tmp_path, capsys, text: str, match: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):  # the bomb's message comes from the check made before expansion
        load_config(path)
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_aliases_within_bounds_still_work_and_are_counted_by_expansion() -> None:
    assert load_yaml("a: &x [1, 2]\nb: *x\n", "t") == {"a": [1, 2], "b": [1, 2]}
    shared = [0] * 10
    assert expanded_size({"a": shared, "b": shared}) == 1 + 2 * (1 + 1 + 10)


def test_a_projection_wider_than_the_model_is_refused(tmp_path, capsys) -> None:
    assert main(["run", str(TINY), "--out", str(tmp_path / "run"), "--quiet", "--set", "featurize.k=100000000",
                 "--set", "featurize.projection=sparse"]) == 2
    err = capsys.readouterr().err
    assert "featurize.k is 100,000,000 but the model has only" in err and "choose featurize.k <=" in err
