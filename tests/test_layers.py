"""The package's layers (docs/architecture.md, "Who owns which decision"): each imports only from the ones
below it, and each decision has one owner. Read from the source with `ast`; nothing is imported."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "granite_jax"

# Bottom up; a module may import from its own layer and the layers below, never from one above.
LAYERS = [
    {"storage", "tree", "hlo", "runtime"},
    {"parallel", "data"},
    {"config"},  # the model configuration holds the sharding plan (parallel/plan.py)
    {"model", "run_dir"},
    {"formats"},
    {"sources"},
    {"train", "eval"},
    {"convert", "inspect"},
]


def _room(module: str) -> str:
    """granite_jax.train.setup -> "train"; granite_jax.sources -> "sources"."""
    return module.split(".")[1]


def _imports(path: Path):
    """Every granite_jax module `path` imports (at any depth: lazy imports count), with its line."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("granite_jax."):
            yield node.module, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module == "granite_jax":
            for alias in node.names:
                yield f"granite_jax.{alias.name}", node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("granite_jax."):
                    yield alias.name, node.lineno


def test_every_import_goes_down_the_layers():
    """No module imports from a layer above its own (so there are no import circles between layers either):
    e.g. `eval/` does not import `train/`, `formats/` neither, and `parallel/` not the model's configuration."""
    level = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue  # the package's face hands names on
        room = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        assert room in level, f"{path}: a new room; place it in LAYERS (and docs/architecture.md)"
        for module, line in _imports(path):
            if level[_room(module)] > level[room]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert upward == [], "\n".join(upward)


def test_init_from_is_parsed_by_the_weight_sources_alone():
    """Where weights come from is decided in `sources.py`: no other module splits an `init_from` text
    (`hf:DIR` / `run:DIR`), and only the run configuration hands it over."""
    parsers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "init_from"
                    and path.relative_to(PACKAGE).as_posix() not in ("sources.py", "train/config.py")):
                parsers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert parsers == [], parsers
    assert "partition(\":\")" in (PACKAGE / "sources.py").read_text()


def test_the_mamba_in_proj_is_split_in_one_place():
    """One `in_proj` split (z, [x B C], dt) serves the whole-row, context-parallel, sub-piece and decoding paths."""
    source = (PACKAGE / "model" / "mamba.py").read_text()
    assert source.count("self.in_proj(") == 1 and source.count("self._project(") >= 4
