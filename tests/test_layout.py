"""The package's stage order: no library module imports a module of a later stage.

    core -> data -> models -> demo -> run -> training -> evaluation -> multitask / export / serve -> cli

(evaluation never imports training; the baselines and 1+N serving reach the run folder through
run/, never through the trainer or the exporter). Imports are read from the source (every
`import` and `from ... import`, also those inside functions), so a lazy import counts too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = [  # (stage, module prefixes); a module belongs to the longest prefix that matches it
    ("core", ("cgc_lora_jax", "cgc_lora_jax._checkout", "cgc_lora_jax.layers", "cgc_lora_jax.merge",
              "cgc_lora_jax.params", "cgc_lora_jax.precision", "cgc_lora_jax.sharding", "cgc_lora_jax.loss",
              "cgc_lora_jax.target_loss",
              "cgc_lora_jax.baselines", "cgc_lora_jax.cache", "cgc_lora_jax.config", "cgc_lora_jax.host_memory",
              "cgc_lora_jax.configs", "cgc_lora_jax.scoring")),
    ("data", ("cgc_lora_jax.data",)),
    ("models", ("cgc_lora_jax.models",)),
    ("demo", ("cgc_lora_jax.demo",)),
    ("run", ("cgc_lora_jax.run", "cgc_lora_jax.hub")),
    ("training", ("cgc_lora_jax.training",)),
    ("evaluation", ("cgc_lora_jax.evaluation",)),
    ("serving", ("cgc_lora_jax.multitask", "cgc_lora_jax.export", "cgc_lora_jax.serve")),
    ("cli", ("cgc_lora_jax.cli", "cgc_lora_jax.__main__")),
]
FOLDERS = {"cgc_lora_jax": "cgc_lora_jax", "models": "cgc_lora_jax.models", "configs": "cgc_lora_jax.configs"}


def stage_of(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (rank, prefix)
    if best is None or (best[1] == "cgc_lora_jax" and module != "cgc_lora_jax"):
        raise AssertionError(f"{module} has no stage: add it to STAGES in tests/test_layout.py")
    return best[0]


def library_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported_modules(path: Path, module: str) -> set[str]:
    """Every cgc_lora_jax module that `path` imports (`from pkg import sub` counts sub)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    known = library_modules()
    return {n for n in names if n in known}


def test_every_module_has_a_stage():
    for module in library_modules():
        stage_of(module)


@pytest.mark.parametrize("module", sorted(library_modules()))
def test_no_module_imports_a_later_stage(module):
    path = library_modules()[module]
    mine = stage_of(module)
    later = sorted(f"{m} ({STAGES[stage_of(m)][0]})" for m in imported_modules(path, module) if stage_of(m) > mine)
    assert not later, f"{module} ({STAGES[mine][0]}) imports later stages: {later}"


def test_the_checker_sees_lazy_imports(tmp_path):
    """The rule holds for imports inside functions too (a reference case the walk must catch)."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from cgc_lora_jax.training import loop\n    import cgc_lora_jax.models.llama\n")
    found = imported_modules(source, "cgc_lora_jax.data.probe")
    assert {"cgc_lora_jax.training.loop", "cgc_lora_jax.models.llama"} <= found
    assert stage_of("cgc_lora_jax.training.loop") > stage_of("cgc_lora_jax.data.records")
    assert stage_of("cgc_lora_jax.evaluation.evaluate") > stage_of("cgc_lora_jax.training.loop")
