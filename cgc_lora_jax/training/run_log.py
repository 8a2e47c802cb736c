"""Where a run's numbers go: a progress bar, TensorBoard event files and metrics.jsonl.

`metrics.jsonl` in the workdir gets one JSON object per logged step, always with `step` and
`loss` (training records) or `step` and `val_loss` (validation records); per-task values are
`loss/<task>` keys. Other tools read it, so these names are stable.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from tqdm.auto import tqdm


class RunLog:
    def __init__(self, workdir: str | Path, total_steps: int, start_step: int = 0, write_files: bool = True):
        """write_files=False (hosts other than 0 of a multi-host run): log nothing, write nothing."""
        self.workdir = Path(workdir)
        self.write_files = write_files
        self.jsonl = open(self.workdir / "metrics.jsonl" if write_files else os.devnull, "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not write_files)
        self._tb = None
        self._tokens = 0.0
        self._since = time.perf_counter()

    @property
    def tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        return self._tb

    def info(self, message: str) -> None:
        if self.write_files:
            self.bar.write(message)

    def count_tokens(self, tokens: float) -> None:
        self._tokens += tokens

    def train(self, step: int, record: dict) -> None:
        """Log one training record (scalars only) at `step`; advances the progress bar."""
        elapsed = time.perf_counter() - self._since
        record = {"step": step, **record, "tokens_per_s": self._tokens / max(elapsed, 1e-9)}
        self._tokens, self._since = 0.0, time.perf_counter()
        self._write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        tasks = " ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in record.items() if k.startswith("loss/"))
        self.info(
            f"step {step} loss {record['loss']:.4f} lr {record.get('lr', 0):.2e} grad_norm "
            f"{record.get('grad_norm', 0):.3f} padding {record.get('padding_fraction', 0):.2f} | {tasks}"
        )

    def validation(self, step: int, record: dict) -> None:
        record = {"step": step, **record}
        self._write(record)
        self.info(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def _write(self, record: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
        self.jsonl.flush()
        if not self.write_files:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        if self._tb is not None:
            self._tb.close()
