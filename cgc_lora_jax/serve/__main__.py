"""python -m cgc_lora_jax.serve --workdir DIR [--host 127.0.0.1] [--port 8000] [slot and queue options]

DIR is a training run (adapters/meta.json) or a 1+N cluster folder (clusters.json). Binds to
loopback unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cgc_lora_jax.host_memory import reuse_freed_memory
from cgc_lora_jax.serve.engine import Engine, EngineConfig


def parse_args(argv=None) -> argparse.Namespace:
    defaults = EngineConfig()
    parser = argparse.ArgumentParser(prog="python -m cgc_lora_jax.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training run or a 1+N cluster folder")
    parser.add_argument("--base", default=None, help="the base's folder now (default: the path recorded at training)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, default=defaults.slots, help="decode slots per cluster")
    parser.add_argument("--base-slots", type=int, default=defaults.base_slots,
                        help="decode slots of the bare base (0: as many as --slots)")
    parser.add_argument("--context", type=int, default=defaults.context,
                        help="KV cache positions per slot: prompt + answer tokens at most")
    parser.add_argument("--max-prompt", type=int, default=defaults.max_prompt,
                        help="longest prompt in tokens (0: context - 1); prefill buckets cover up to it")
    parser.add_argument("--prefill-batch", type=int, default=defaults.prefill_batch,
                        help="prompts prefilled together")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="requests waiting for a slot before the server answers 429")
    args = parser.parse_args(argv)
    for name in ("slots", "context", "prefill_batch", "max_queue"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.prefill_batch > min(args.slots, args.base_slots or args.slots):
        parser.error("--prefill-batch cannot exceed --slots / --base-slots")
    return args


def main(argv=None) -> int:
    import uvicorn

    from cgc_lora_jax.serve.app import create_app

    args = parse_args(argv)
    reuse_freed_memory()  # before jax starts its backend (cgc_lora_jax/host_memory.py)
    # Our own handler: an imported library may have configured the root logger already.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger = logging.getLogger("cgc_lora_jax.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    config = EngineConfig(slots=args.slots, base_slots=args.base_slots, context=args.context,
                          prefill_batch=args.prefill_batch, max_prompt=args.max_prompt, max_queue=args.max_queue)
    engine = Engine.from_workdir(args.workdir, config, base=args.base)
    engine.start()
    try:
        uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
