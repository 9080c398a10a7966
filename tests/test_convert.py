"""HF checkpoint import/export: round trips, sharding, and clear errors for bad checkpoints."""

import json
import os
import pickle

import numpy as np
import pytest
from conftest import checkpoint_tensors, convert_cli, forward, hf_logits, max_rel_error, random_ids
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from granite_jax import CheckpointError, GraniteForCausalLM, ModelConfig, load_hf_checkpoint, save_hf_checkpoint
from granite_jax.formats import hf


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=False, mamba_proj_bias=True, attention_bias=True)],
                         ids=["tied", "untied_biases"])
def test_hf_ours_hf_is_byte_identical(hf_checkpoint, tmp_path, overrides):
    directory, _ = hf_checkpoint(**overrides)
    save_hf_checkpoint(load_hf_checkpoint(directory), tmp_path / "out")
    original, written = checkpoint_tensors(directory), checkpoint_tensors(tmp_path / "out")
    assert sorted(original) == sorted(written)
    assert ("lm_head.weight" in written) == (not overrides.get("tie_word_embeddings", True))
    for name, value in original.items():
        assert written[name].dtype == value.dtype and written[name].shape == value.shape, name
        assert written[name].tobytes() == value.tobytes(), name


def test_bfloat16_checkpoint_round_trips_in_bfloat16(hf_checkpoint, tmp_path):
    import torch

    directory, hf_model = hf_checkpoint()
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    save_hf_checkpoint(load_hf_checkpoint(tmp_path / "bf16"), tmp_path / "out")
    original, written = checkpoint_tensors(tmp_path / "bf16"), checkpoint_tensors(tmp_path / "out")
    for name, value in original.items():
        assert str(written[name].dtype) == "bfloat16" and written[name].tobytes() == value.tobytes(), name


@pytest.mark.parametrize("preset_overrides", [dict(tie_word_embeddings=True), dict(tie_word_embeddings=False)])
def test_ours_to_transformers_gives_same_logits(tmp_path, preset_overrides):
    from transformers import AutoModelForCausalLM

    config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=16, shared_intermediate_size=24,
                         num_hidden_layers=2, layer_types=("mamba", "attention"), num_attention_heads=2,
                         num_key_value_heads=1, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                         mamba_chunk_size=4, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                         embedding_multiplier=12.0, **preset_overrides)
    model = GraniteForCausalLM(config, rngs=nnx.Rngs(7))
    save_hf_checkpoint(model, tmp_path / "ours")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = random_ids(5, (2, 11), vocab=96)
    assert max_rel_error(forward(model, ids).logits, hf_logits(hf_model, ids)) <= 1e-4


def test_sharded_save_writes_an_index_and_loads_back(hf_checkpoint, tmp_path):
    directory, hf_model = hf_checkpoint()
    model = load_hf_checkpoint(directory)
    files = save_hf_checkpoint(model, tmp_path / "sharded", max_shard_size=20_000)
    assert len(files) > 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(checkpoint_tensors(directory))
    for path in files:  # a shard exceeds the limit only when it holds a single larger tensor
        tensors = load_file(path)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 20_000
    ids = random_ids(6, (1, 9))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    sharded = forward(load_hf_checkpoint(tmp_path / "sharded"), ids).logits
    assert max_rel_error(sharded, hf_logits(hf_model, ids)) <= 1e-4
    assert max_rel_error(hf_logits(reloaded, ids), hf_logits(hf_model, ids)) <= 1e-6


def _rewrite(directory, change):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_checkpoint):
    directory, _ = hf_checkpoint()
    _rewrite(directory, lambda t: t.pop("model.layers.0.mamba.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model.layers.0.mamba.A_log'\]"):
        load_hf_checkpoint(directory)


def test_unexpected_tensor_is_named(hf_checkpoint):
    directory, _ = hf_checkpoint()
    _rewrite(directory, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensors.*model.layers.0.extra.weight"):
        load_hf_checkpoint(directory)


def test_shape_mismatch_is_named(hf_checkpoint):
    directory, _ = hf_checkpoint()
    _rewrite(directory, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(65,\); the config implies \(64,\)"):
        load_hf_checkpoint(directory)


def test_pickle_checkpoint_is_refused_without_being_unpickled(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint()
    os.remove(os.path.join(directory, "model.safetensors"))

    class Explodes:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "pwned"),))

    with open(os.path.join(directory, "pytorch_model.bin"), "wb") as f:
        pickle.dump(Explodes(), f)
    with pytest.raises(CheckpointError, match="pickle.*refuses"):
        load_hf_checkpoint(directory)
    assert not (tmp_path / "pwned").exists()


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_hf_checkpoint(tmp_path / "empty")


def test_index_naming_absent_shard(hf_checkpoint):
    directory, _ = hf_checkpoint()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_hf_checkpoint(directory)


def test_load_accepts_dtype_names_and_objects(hf_checkpoint):
    import jax.numpy as jnp

    directory, _ = hf_checkpoint()
    assert load_hf_checkpoint(directory, dtype=jnp.bfloat16).config.compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_hf_checkpoint(directory, dtype="int8")


# ------------------------------------------------------------------------- export safety, loading safety
def _tiny_config():
    return ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=16, shared_intermediate_size=24,
                       num_hidden_layers=2, layer_types=("mamba", "attention"), num_attention_heads=2,
                       num_key_value_heads=1, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                       mamba_chunk_size=4, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True)


@pytest.fixture
def tiny_run(tmp_path):
    """A run directory with one checkpoint (step 1) of a tiny model, saved as training saves it. Its metadata's
    `data.tokenizer` names a directory outside the run (`elsewhere/`) holding a tokenizer.json."""
    from granite_jax.train.checkpoint import RunCheckpoints

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tokenizer.json").write_text('{"from": "elsewhere"}')
    config = _tiny_config()
    model = GraniteForCausalLM(config, rngs=nnx.Rngs(0))
    run_dir = tmp_path / "run"
    checkpoints = RunCheckpoints(str(run_dir), keep=1, async_save=False)
    checkpoints.save(1, {"params": nnx.state(model, nnx.Param)}, {},
                     {"model": config.to_hf(), "run": {"data": {"tokenizer": str(elsewhere)}}})
    checkpoints.close()
    return str(run_dir)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_export_refuses_a_non_empty_directory(tiny_run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    originals = {"config.json": "{}", "model.safetensors": "weights", "tokenizer.json": "{}"}
    for name, text in originals.items():
        (out / name).write_text(text)
    code, _, err = convert_cli("export", tiny_run, out)
    line = _one_error_line(err)
    assert code == 2 and str(out) in line and "--overwrite" in line
    assert {name: (out / name).read_text() for name in originals} == originals


def test_export_onto_a_file_is_one_error_line(tiny_run, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = convert_cli("export", tiny_run, tmp_path / "file")
    assert code == 2 and "not a directory" in _one_error_line(err)


def test_a_full_disk_during_export_is_one_error_line_and_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    def disk_full(arrays, path, metadata=None):  # what safetensors raises on ENOSPC
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(hf, "save_file", disk_full)
    code, _, err = convert_cli("export", tiny_run, tmp_path / "hf")
    line = _one_error_line(err)
    assert code == 2 and line.startswith("error: could not write ") and line.endswith(
        "model.safetensors: no space left on the device"), line
    assert not (tmp_path / "hf").exists() or os.listdir(tmp_path / "hf") == []


def test_export_overwrite_replaces_only_its_own_files(tiny_run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    for name in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "model.sig", "config.json"]:
        (out / name).write_text("old")
    (out / "README.md").write_text("keep me")
    (out / "notes").mkdir()
    code, stdout, err = convert_cli("export", tiny_run, out, "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "notes"]
    assert (out / "README.md").read_text() == "keep me" and (out / "config.json").read_text() != "old"
    removed = next(line for line in stdout.splitlines() if line.startswith("removed"))
    for name in ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "model.sig"]:
        assert name in removed
    load_hf_checkpoint(out)


def test_exported_files_respect_the_umask(tiny_run, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, err = convert_cli("export", tiny_run, tmp_path / "hf")
        save_hf_checkpoint(load_hf_checkpoint(tmp_path / "hf"), tmp_path / "sharded", max_shard_size=4_000)
    finally:
        os.umask(old)
    assert code == 0, err
    for directory in (tmp_path / "hf", tmp_path / "sharded"):
        for name in os.listdir(directory):
            assert os.stat(directory / name).st_mode & 0o777 == 0o644, (directory, name)


def test_export_takes_tokenizer_files_only_from_the_run_or_the_user(tiny_run, tmp_path):
    from granite_jax.run_dir import RunDir

    code, stdout, err = convert_cli("export", tiny_run, tmp_path / "none")
    assert code == 0 and "no tokenizer files" in stdout and "only the weights" in stdout, err
    assert not (tmp_path / "none" / "tokenizer.json").exists()  # not the metadata's `elsewhere/`

    own = RunDir(tiny_run).tokenizer_dir
    os.makedirs(own)
    with open(os.path.join(own, "tokenizer.json"), "w") as f:
        f.write('{"from": "run"}')
    code, stdout, _ = convert_cli("export", tiny_run, tmp_path / "own")
    assert code == 0 and (tmp_path / "own" / "tokenizer.json").read_text() == '{"from": "run"}'
    assert f"tokenizer files copied from {own}" in stdout

    given = tmp_path / "given"
    given.mkdir()
    (given / "tokenizer.json").write_text('{"from": "user"}')
    code, _, _ = convert_cli("export", tiny_run, tmp_path / "user", "--tokenizer", given)
    assert code == 0 and (tmp_path / "user" / "tokenizer.json").read_text() == '{"from": "user"}'
    code, _, err = convert_cli("export", tiny_run, tmp_path / "bad", "--tokenizer",
                               tmp_path / "elsewhere" / "nope.model")
    assert code == 2 and "--tokenizer" in _one_error_line(err) and not (tmp_path / "bad").exists()
    (tmp_path / "empty").mkdir()
    code, _, err = convert_cli("export", tiny_run, tmp_path / "bad", "--tokenizer", tmp_path / "empty")
    assert code == 2 and "holds none of the HF tokenizer files" in _one_error_line(err)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/model.safetensors",
                                   ".."])
def test_index_shard_outside_the_directory_is_refused(hf_checkpoint, tmp_path, entry):
    directory, _ = hf_checkpoint()
    os.makedirs(os.path.join(directory, "sub"), exist_ok=True)
    index = os.path.join(directory, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"weight_map": {"model.norm.weight": entry}}, f)
    with pytest.raises(CheckpointError, match=f"{index}: shard entry '{entry}' is not a plain file name"):
        load_hf_checkpoint(directory)


def test_truncated_safetensors_is_named(hf_checkpoint):
    directory, _ = hf_checkpoint()
    path = os.path.join(directory, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=f"{path}: not a readable safetensors file"):
        load_hf_checkpoint(directory)
    code, _, err = _eval("perplexity", "--checkpoint", directory, "--data", "unused.jsonl")
    assert code == 2 and path in _one_error_line(err)


def _eval(*args):
    """`python eval.py ARGS` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(os.path.dirname(__file__), "..", "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("field, value, expected", [("rms_norm_eps", "1e-5", "a number"),
                                                    ("hidden_size", 64.0, "an integer"),
                                                    ("tie_word_embeddings", "yes", "true or false")])
def test_config_field_of_the_wrong_type_is_named(hf_checkpoint, field, value, expected):
    from granite_jax.config import ConfigError

    directory, _ = hf_checkpoint()
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        raw = json.load(f)
    with open(path, "w") as f:
        json.dump({**raw, field: value}, f)
    with pytest.raises(ConfigError, match=f"{path}: {field}={value!r} has type {type(value).__name__}; expected "
                                          f"{expected}"):
        load_hf_checkpoint(directory)


# ------------------------------------------------------------------------------------------- signing
@pytest.fixture
def key_pair(tmp_path):
    """(private key PEM path, public key PEM path) of a fresh P-256 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "key.pem", tmp_path / "key.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(private), str(public)


def _key_file(path, kind: str) -> str:
    """A PEM file of a key `check_signing_key` must refuse."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    pkcs8 = lambda key, encryption=None: key.private_bytes(  # noqa: E731
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption or serialization.NoEncryption())
    data = {"rsa": lambda: pkcs8(rsa.generate_private_key(65537, 2048)),
            "ed25519": lambda: pkcs8(ed25519.Ed25519PrivateKey.generate()),
            "encrypted": lambda: pkcs8(ec.generate_private_key(ec.SECP256R1()),
                                       serialization.BestAvailableEncryption(b"secret")),
            "secp256k1": lambda: pkcs8(ec.generate_private_key(ec.SECP256K1())),
            "public": lambda: ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "garbage": lambda: b"not a key"}[kind]()
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("kind, message", [
    ("rsa", "is RSAPrivateKey: model signing takes an elliptic-curve key"),
    ("ed25519", "is Ed25519PrivateKey: model signing takes an elliptic-curve key"),
    ("encrypted", "is encrypted: give an unencrypted key"),
    ("secp256k1", "is on curve secp256k1: model signing takes secp256r1"),
    ("public", "is not a PEM private key"),
    ("garbage", "is not a PEM private key"),
])
def test_a_key_that_cannot_sign_is_refused_before_the_export(tiny_run, tmp_path, kind, message):
    """One error line, and no unsigned export left behind (a retry needs no --overwrite)."""
    out = tmp_path / "export"
    code, _, err = convert_cli("export", tiny_run, out, "--sign-key", _key_file(tmp_path / "key.pem", kind))
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.fixture
def signed_export(tiny_run, tmp_path, key_pair):
    """A signed export of `tiny_run` with its tokenizer: (directory, public key path)."""
    from granite_jax.run_dir import RunDir

    os.makedirs(RunDir(tiny_run).tokenizer_dir)
    with open(os.path.join(RunDir(tiny_run).tokenizer_dir, "tokenizer.json"), "w") as f:
        f.write("{}")
    out = tmp_path / "signed"
    code, stdout, err = convert_cli("export", tiny_run, out, "--sign-key", key_pair[0])
    assert code == 0 and f"signed: {out / 'model.sig'}" in stdout, err
    return str(out), key_pair[1]


def test_signed_export_verifies_with_model_signing_and_with_us(signed_export):
    import subprocess
    import sys

    from model_signing import verifying

    from granite_jax.formats.signing import VerifySpec

    directory, public = signed_export
    assert {"model.sig", "tokenizer.json", "config.json", "model.safetensors"} <= set(os.listdir(directory))
    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(directory, f"{directory}/model.sig")
    cli = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", directory, "--signature",
                          f"{directory}/model.sig", "--public_key", public], capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0 and "Verification succeeded" in cli.stdout, cli.stdout + cli.stderr
    load_hf_checkpoint(directory, verify=VerifySpec(public_key=public))


def test_changed_shard_is_refused_naming_it(signed_export):
    from granite_jax.formats.signing import SignatureError, VerifySpec

    directory, public = signed_export
    path = os.path.join(directory, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SignatureError, match=r"files changed since signing: \['model.safetensors'\]"):
        load_hf_checkpoint(directory, verify=VerifySpec(public_key=public))
    code, _, err = _eval("perplexity", "--checkpoint", directory, "--data", "unused.jsonl", "--verify-key", public)
    assert code == 2 and "model.safetensors" in _one_error_line(err)


def test_stray_file_is_refused(signed_export):
    from granite_jax.formats.signing import SignatureError, VerifySpec

    directory, public = signed_export
    with open(os.path.join(directory, "extra.py"), "w") as f:
        f.write("print('hi')")
    with pytest.raises(SignatureError, match="not covered by the signature.*extra.py"):
        load_hf_checkpoint(directory, verify=VerifySpec(public_key=public))


def test_another_key_is_refused(signed_export, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from granite_jax.formats.signing import SignatureError, VerifySpec

    directory, _ = signed_export
    other = tmp_path / "other.pub"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(SignatureError, match="verification against the public key .*other.pub failed"):
        load_hf_checkpoint(directory, verify=VerifySpec(public_key=str(other)))


def test_unsigned_directory_is_refused_when_verification_is_asked(hf_checkpoint, key_pair):
    from granite_jax.formats.signing import SignatureError, VerifySpec

    directory, _ = hf_checkpoint()
    with pytest.raises(SignatureError, match="has no model.sig, so it cannot be verified"):
        load_hf_checkpoint(directory, verify=VerifySpec(public_key=key_pair[1]))


def test_unverified_load_says_so_only_for_signed_directories(signed_export, hf_checkpoint, caplog):
    directory, _ = signed_export
    with caplog.at_level("WARNING", logger="granite_jax.formats"):
        load_hf_checkpoint(directory)
    assert [r.getMessage() for r in caplog.records] == [
        f"{directory} has a model.sig but was loaded unverified (pass a public key, certificate chain or "
        "Sigstore identity to verify it)"]
    caplog.clear()
    unsigned, _ = hf_checkpoint()
    with caplog.at_level("WARNING", logger="granite_jax.formats"):
        load_hf_checkpoint(unsigned)
    assert caplog.records == []


def test_init_verify_refuses_a_changed_checkpoint(signed_export, tmp_path):
    from granite_jax.formats.signing import SignatureError
    from granite_jax.train.config import RunConfigError, load_run_config
    from granite_jax.train.setup import initial_model

    directory, public = signed_export
    config = load_run_config(None, [f"init_from=hf:{directory}", f"init_verify={{public_key: {public}}}"])
    assert initial_model(config).config.vocab_size == 96
    with open(os.path.join(directory, "stray.txt"), "w") as f:
        f.write("x")
    with pytest.raises(SignatureError, match="stray.txt"):
        initial_model(config)
    with pytest.raises(RunConfigError, match="init_verify: unknown keys \\['key'\\]"):
        load_run_config(None, [f"init_from=hf:{directory}", f"init_verify={{key: {public}}}"])
    with pytest.raises(RunConfigError, match="applies to init_from=hf:DIR"):
        load_run_config(None, [f"init_verify={{public_key: {public}}}"])


# ------------------------------------------------------------------------------------------ convert import
def _import(*args):
    """`python -m granite_jax.convert import ARGS` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from granite_jax.convert.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["import", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def test_import_then_export_gives_the_same_checkpoint(hf_checkpoint, tmp_path):
    """HF → `convert import` → `convert export` → HF: every tensor byte-identical, config.json equal, the
    tokenizer files carried through RUN_DIR/tokenizer/; the checkpoint is step 0 and holds only parameters."""
    from granite_jax.formats.run import IMPORTED_FROM
    from granite_jax.train.checkpoint import RunCheckpoints

    directory, _ = hf_checkpoint(tie_word_embeddings=False, mamba_proj_bias=True)
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        f.write('{"from": "hf"}')
    run_dir = tmp_path / "imported"
    code, stdout, err = _import(directory, run_dir)
    assert code == 0, err
    assert "step 0" in stdout
    assert sorted(os.listdir(run_dir / "tokenizer")) == ["generation_config.json", "tokenizer.json"]
    checkpoints = RunCheckpoints(str(run_dir), keep=1, async_save=False)
    step, meta = checkpoints.latest_meta()
    checkpoints.close()
    assert step == 0 and meta[IMPORTED_FROM] == os.path.abspath(directory)
    import orbax.checkpoint as ocp

    stored = ocp.StandardCheckpointer().metadata(str(run_dir / "checkpoints" / "0" / "state"))
    assert set(getattr(stored, "item_metadata", stored)) == {"params"}  # no optimizer state, no step

    code, _, err = convert_cli("export", run_dir, tmp_path / "exported")
    assert code == 0, err
    original, written = checkpoint_tensors(directory), checkpoint_tensors(tmp_path / "exported")
    assert sorted(original) == sorted(written)
    for name, value in original.items():
        assert written[name].dtype == value.dtype and written[name].tobytes() == value.tobytes(), name
    # config.json as a direct HF → ours → HF conversion writes it (which names layer types and the dtype as
    # transformers 4.57 does, so it is not the source's text when transformers 5 wrote that)
    save_hf_checkpoint(load_hf_checkpoint(directory), tmp_path / "direct")
    read = lambda d: json.loads((d / "config.json").read_text())  # noqa: E731
    assert read(tmp_path / "exported") == read(tmp_path / "direct")
    assert (tmp_path / "exported" / "tokenizer.json").read_text() == '{"from": "hf"}'


def test_import_refuses_a_run_with_checkpoints_and_bad_sources(tiny_run, hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint()
    before = sorted(os.listdir(os.path.join(tiny_run, "checkpoints")))
    code, _, err = _import(directory, tiny_run)
    assert code == 2 and "already has checkpoints" in _one_error_line(err) and tiny_run in err
    assert sorted(os.listdir(os.path.join(tiny_run, "checkpoints"))) == before
    code, _, err = _import(tmp_path / "nowhere", tmp_path / "new")
    assert code == 2 and "nowhere" in _one_error_line(err) and not (tmp_path / "new").exists()
