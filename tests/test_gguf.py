"""GGUF export for llama.cpp: llama.cpp (llama-cpp-python) runs our files as we run the model, and they hold what
llama.cpp's own converter writes from our HF export of the same model.

Every release shape, tiny: hybrid MoE with a shared expert (tied, NoPE), dense hybrid (untied, 2 B/C groups), and
the all-attention dense (RoPE, attention biases) and MoE (RoPE, untied) models. The tests run on one worker
(`xdist_group`) so that they share the models and files the module fixtures build.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TOKENIZER, forward, make_hf_model, max_rel_error
from filelock import FileLock

from granite_jax import load_hf_checkpoint, save_hf_checkpoint
from granite_jax.formats.gguf import save_gguf

pytestmark = pytest.mark.xdist_group("gguf")

VOCAB = 4096  # the test tokenizer's (data/tokenizer)
SHAPES = {
    "hybrid_moe": dict(),  # TINY_HF: Mamba, attention, Mamba; 4 experts (2 used) + shared expert; tied; NoPE
    "hybrid_dense": dict(num_local_experts=0, num_experts_per_tok=0, intermediate_size=48, tie_word_embeddings=False,
                         mamba_n_groups=2),
    "attention_dense": dict(layer_types=["attention"] * 3, position_embedding_type="rope", num_local_experts=0,
                            num_experts_per_tok=0, intermediate_size=48, attention_bias=True, rope_theta=1e5),
    "attention_moe": dict(layer_types=["attention"] * 3, position_embedding_type="rope", tie_word_embeddings=False),
}
# llama.cpp's K-quants take rows of 256: a wider hybrid MoE, so that q4_k_m really is Q4_K / Q6_K.
WIDE = dict(hidden_size=256, intermediate_size=256, shared_intermediate_size=256, mamba_d_head=64)
ARCHITECTURES = {"hybrid_moe": "granitehybrid", "hybrid_dense": "granitehybrid", "attention_dense": "granite",
                 "attention_moe": "granitemoe"}
TEXT = "<|start_of_role|>user<|end_of_role|>In the beginning God created the heaven and the earth.<|end_of_text|>\n"
GREEDY_TOKENS = 6
# max |ours - llama.cpp| / max |ours| over every position's logits; measured on these models: f32 ≤ 1.0e-5,
# q8_0 ≤ 1.3e-2 (f16 ≤ 5.6e-4, bf16 ≤ 3.4e-3), q4_k_m 2.3e-2 (WIDE)
TOLERANCE = {"f32": 1e-4, "q8_0": 0.03, "q4_k_m": 0.06}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """shape -> (our model, HF export directory with the tokenizer, {outtype: our GGUF file}), built on demand."""
    root = tmp_path_factory.mktemp("gguf")
    built = {}

    def get(shape: str):
        if shape not in built:
            hf_model = make_hf_model(3, vocab_size=VOCAB, **(WIDE if shape == "wide" else SHAPES[shape]))
            hf_model.save_pretrained(root / f"{shape}-transformers")
            model = load_hf_checkpoint(root / f"{shape}-transformers")
            export = root / shape
            save_hf_checkpoint(model, export)
            for name in os.listdir(TOKENIZER):
                shutil.copy(os.path.join(TOKENIZER, name), export)
            files = {outtype: str(save_gguf(model, root / f"{shape}-{outtype}.gguf", outtype=outtype,
                                            tokenizer_dir=TOKENIZER, name="tiny"))
                     for outtype in ("f32", "q8_0")}
            built[shape] = model, export, files
        return built[shape]

    return get


def llama(path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)


def llama_logits(path, ids) -> np.ndarray:
    model = llama(path)
    model.eval(list(ids))
    return np.array(model.scores[: len(ids)])


def test_bad_outtype_names_the_valid_ones(exports, tmp_path):
    model, _, _ = exports("hybrid_moe")
    with pytest.raises(ValueError, match="f32, f16, bf16, q8_0, q4_k_m"):
        save_gguf(model, tmp_path / "x.gguf", outtype="q4_0")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("shape", SHAPES)
def test_llama_cpp_computes_our_logits_and_greedy_tokens(exports, shape):
    """f32: llama.cpp's logits at every position (a batched prompt, then single-token decode steps) are ours, and
    its greedy continuation is ours; q8_0 within its quantization error. Its tokenizer is the HF one."""
    from tokenizers import Tokenizer

    model, _, files = exports(shape)
    runner = llama(files["f32"])
    prompt = Tokenizer.from_file(os.path.join(TOKENIZER, "tokenizer.json")).encode(TEXT).ids
    assert runner.tokenize(TEXT.encode(), add_bos=False, special=True) == prompt
    runner.eval(prompt)
    for _ in range(GREEDY_TOKENS):
        runner.eval([int(np.argmax(runner.scores[runner.n_tokens - 1]))])
    ids = list(runner.input_ids[: runner.n_tokens])
    theirs = np.array(runner.scores[: len(ids)])
    ours = np.asarray(forward(model, np.asarray([ids], np.int32)).logits[0], np.float32)
    assert max_rel_error(theirs, ours) <= TOLERANCE["f32"]
    # Greedy decoding is the same: our argmax after each prefix is the token llama.cpp chose.
    assert list(np.argmax(ours[len(prompt) - 1: -1], axis=-1)) == ids[len(prompt):]
    assert max_rel_error(llama_logits(files["q8_0"], ids), ours) <= TOLERANCE["q8_0"]


@pytest.mark.slow
def test_q4_k_m_is_llama_cpp_quantized_and_close(exports, tmp_path):
    from gguf import GGUFReader, LlamaFileType

    model, _, _ = exports("wide")
    path = save_gguf(model, tmp_path / "m.gguf", outtype="q4_k_m", tokenizer_dir=TOKENIZER)
    assert os.listdir(tmp_path) == ["m.gguf"]  # the intermediate file is gone
    reader = GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_K_M
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_K", "Q6_K", "F32"}
    ids = np.random.default_rng(0).integers(0, VOCAB, 12).tolist()
    ours = np.asarray(forward(model, np.asarray([ids], np.int32)).logits[0], np.float32)
    assert max_rel_error(llama_logits(path, ids), ours) <= TOLERANCE["q4_k_m"]


def test_a_file_without_tokenizer_runs_on_token_ids(exports, tmp_path):
    model, _, _ = exports("hybrid_moe")
    path = save_gguf(model, tmp_path / "bare.gguf")
    ids = [5, 17, 300, 4000, 9]
    ours = np.asarray(forward(model, np.asarray([ids], np.int32)).logits[0], np.float32)
    assert max_rel_error(llama_logits(path, ids), ours) <= TOLERANCE["f32"]


# ------------------------------------------------------------------ llama.cpp's own converter as the reference
CONVERTER_VERSION = "0.3.36"  # llama-cpp-python's sdist vendors llama.cpp with convert_hf_to_gguf.py
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
# The converter recognises a BPE pre-tokenizer by hashing the ids it gives a probe text, i.e. only for the
# vocabularies in its table; the test tokenizer is not one, so the driver names it (byte-level GPT-2: "gpt-2").
CONVERTER_DRIVER = """
import importlib.util, sys
root = sys.argv[1]
sys.path.insert(0, root)
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", root + "/convert_hf_to_gguf.py")
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
for job in sys.argv[2:]:
    source, outfile, outtype = job.split(",")
    sys.argv = ["convert_hf_to_gguf.py", source, "--outtype", outtype, "--outfile", outfile, "--model-name", "tiny"]
    convert.main()
"""


def llama_cpp_converter() -> Path:
    """llama.cpp's converter (script, model classes and its own gguf-py) from the llama-cpp-python sdist, which
    has it (the wheel pip builds does not): from $LLAMA_CPP_PYTHON_SDIST if set, else `pip download`ed once into
    .pytest_cache."""
    root = ROOT / ".pytest_cache" / f"llama.cpp-{CONVERTER_VERSION}"
    root.parent.mkdir(exist_ok=True)
    with FileLock(f"{root}.lock"):
        if (root / "convert_hf_to_gguf.py").is_file():
            return root
        with tempfile.TemporaryDirectory(dir=root.parent) as scratch:
            sdist = os.environ.get("LLAMA_CPP_PYTHON_SDIST")
            if not sdist:
                subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={CONVERTER_VERSION}",
                                "--no-deps", "--no-binary", ":all:", "--quiet", "-d", scratch], check=True)
                sdist = os.path.join(scratch, f"llama_cpp_python-{CONVERTER_VERSION}.tar.gz")
            prefix = f"llama_cpp_python-{CONVERTER_VERSION}/vendor/llama.cpp/"
            staging = Path(scratch) / "llama.cpp"
            with tarfile.open(sdist) as tar:
                for member in tar.getmembers():
                    relative = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                    if member.isfile() and relative.startswith(CONVERTER_PARTS):
                        target = staging / relative
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(tar.extractfile(member).read())
            staging.rename(root)
    return root


# Every shape in f32 (the layout and metadata of each architecture) and one quantized file (the q8_0 blocks);
# bf16 and f16 are the f32 tensors cast, and the other shapes' q8_0 the same quantizer (suite time).
REFERENCE_JOBS = [(shape, "f32") for shape in SHAPES] + [("hybrid_moe", "q8_0")]


@pytest.fixture(scope="module")
def reference_files(exports, tmp_path_factory):
    """(shape, outtype) -> the file llama.cpp's converter writes from our HF export (one converter process)."""
    out = tmp_path_factory.mktemp("converter")
    jobs = {job: out / f"{job[0]}-{job[1]}.gguf" for job in REFERENCE_JOBS}
    argv = [f"{exports(shape)[1]},{path},{outtype}" for (shape, outtype), path in jobs.items()]
    done = subprocess.run([sys.executable, "-c", CONVERTER_DRIVER, str(llama_cpp_converter()), *argv],
                          capture_output=True, text=True, cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    return jobs


def gguf_contents(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: ([int(t) for t in field.types], field.contents()) for name, field in reader.fields.items()
              if not name.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(n) for n in t.shape], np.array(t.data)) for t in reader.tensors}
    return fields, tensors


@pytest.mark.slow
@pytest.mark.parametrize("shape,outtype", REFERENCE_JOBS, ids=[f"{s}-{o}" for s, o in REFERENCE_JOBS])
def test_file_is_what_llama_cpp_converter_writes(exports, reference_files, shape, outtype, tmp_path):
    model, _, files = exports(shape)
    path = files.get(outtype) or save_gguf(model, tmp_path / "m.gguf", outtype=outtype, tokenizer_dir=TOKENIZER,
                                           name="tiny")
    ours, theirs = gguf_contents(path), gguf_contents(reference_files[shape, outtype])
    assert ours[0]["general.architecture"][1] == ARCHITECTURES[shape]
    assert ours[0] == theirs[0]  # every metadata key, its type and value (tokenizer and chat template included)
    assert list(ours[1]) == list(theirs[1])  # the same tensors in the same order
    for name, (kind, shape_, data) in ours[1].items():
        assert (kind, shape_) == theirs[1][name][:2], name
        if name.endswith("ssm_a"):  # -exp(A_log): numpy's exp vs torch's, a rounding apart
            np.testing.assert_allclose(data, theirs[1][name][2], rtol=1e-6, err_msg=name)
        else:
            assert data.tobytes() == theirs[1][name][2].tobytes(), name

