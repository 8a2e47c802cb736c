"""cgc_lora_jax/training/run_log.py: metrics.jsonl records (stable names, non-finite values kept
as text), the per-window token rate, and TensorBoard scalars equal to the records."""

import json
import math

from tensorboardX.proto.event_pb2 import Event

from cgc_lora_jax.training.run_log import RunLog


def tensorboard_scalars(folder) -> dict[str, list]:
    """{tag: [(step, value)]} from the event files, read record by record (TFRecord framing:
    u64 length, u32 crc, payload, u32 crc)."""
    scalars = {}
    for path in sorted(folder.iterdir()):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_records_and_tensorboard_scalars(tmp_path, monkeypatch):
    clock = iter([100.0, 102.0, 102.0, 105.0, 105.0])
    monkeypatch.setattr("cgc_lora_jax.training.run_log.time.perf_counter", lambda: next(clock))
    log = RunLog(tmp_path, total_steps=4)
    log.count_tokens(300.0)
    log.count_tokens(100.0)
    log.train(2, {"loss": 2.5, "lr": 1e-3, "loss/A": 2.0})  # 400 tokens over 2 s
    log.validation(2, {"val_loss": math.inf})
    log.count_tokens(30.0)
    log.train(4, {"loss": 1.5})  # 30 tokens over the 3 s since the last record
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 2, "loss": 2.5, "lr": 1e-3, "loss/A": 2.0, "tokens_per_s": 200.0},
        {"step": 2, "val_loss": "inf"},
        {"step": 4, "loss": 1.5, "tokens_per_s": 10.0},
    ]
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(2, 2.5), (4, 1.5)] and scalars["loss/A"] == [(2, 2.0)]
    assert scalars["tokens_per_s"] == [(2, 200.0), (4, 10.0)] and "val_loss" in scalars


def test_appends_across_restarts(tmp_path):
    for step in (1, 2):
        log = RunLog(tmp_path, total_steps=2, start_step=step - 1)
        log.train(step, {"loss": float(step)})
        log.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
