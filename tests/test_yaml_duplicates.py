"""A key given twice in a run config's YAML (a file's, or an override value's) is refused, at any depth, naming the
file (or override), the key's path and both lines: PyYAML alone keeps the last one silently (a second `data:` block
trained 8x256 instead of 2x64)."""

import re

import pytest

from granite_jax.train.config import RunConfigError, load_run_config

TWO_DATA_BLOCKS = """\
steps: 2
data:
  seq_len: 64
  batch_size: 2
optimizer:
  lr: 1.0e-3
data:
  seq_len: 256
  batch_size: 8
"""

NESTED_DUPLICATE = """\
steps: 2
data:
  seq_len: 64
  batch_size: 2
  shuffle_seed: 1
  batch_size: 8
"""

DEEPER_DUPLICATE = """\
steps: 2
model_overrides:
  num_hidden_layers: 2
mesh: {data: 1, fsdp: 2,
       fsdp: 4}
"""


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("text, key, first, second", [
    (TWO_DATA_BLOCKS, "data", 2, 7),
    (NESTED_DUPLICATE, "data.batch_size", 4, 6),
    (DEEPER_DUPLICATE, "mesh.fsdp", 4, 5),
])
def test_a_duplicate_key_in_a_config_file_is_refused(tmp_path, text, key, first, second):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(RunConfigError) as error:
        load_run_config(str(path))
    message = _one_line(error)
    assert message.startswith(f"{path}: ") and f"key {key!r} " in message, message
    assert f"line {first} " in message and f"line {second}" in message, message


def test_a_duplicate_key_in_an_override_value_is_refused():
    with pytest.raises(RunConfigError) as error:
        load_run_config(None, ["mesh={fsdp: 2, fsdp: 4}"])
    message = _one_line(error)
    assert message.startswith("override 'mesh={fsdp: 2, fsdp: 4}': ") and "key 'mesh.fsdp' " in message, message
    with pytest.raises(RunConfigError, match=re.escape("key 'data.batch_size' ")):
        load_run_config(None, ["data={seq_len: 64, batch_size: 2, batch_size: 8}"])


def test_keys_given_once_still_load(tmp_path):
    """The same key in different mappings, a repeated list item, a merge key overridden by an explicit one, and an
    override given twice on the command line (the later wins, as always) are not duplicates."""
    path = tmp_path / "run.yaml"
    path.write_text("steps: 3\ndata:\n  seq_len: 64\n  batch_size: 2\n  train: [a.jsonl, a.jsonl]\n"
                    "optimizer: &opt\n  lr: 1.0e-3\n  warmup_steps: 1\n"
                    "dpo:\n  <<: {beta: 0.5, loss: sigmoid}\n  beta: 0.2\n")
    config = load_run_config(str(path), ["data.format=preference", "data.tokenizer=data/tokenizer",
                                         "mesh={fsdp: 2}", "mesh={fsdp: 1}"])
    assert (config.steps, config.data.seq_len, config.data.batch_size) == (3, 64, 2)
    assert len(config.data.train) == 2 and config.optimizer.warmup_steps == 1
    assert config.dpo.beta == 0.2 and config.mesh["fsdp"] == 1
