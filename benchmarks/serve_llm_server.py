"""Ray Serve LLM's OpenAI app (``ray.serve.llm.build_openai_app``) on a Ray head of its own: the third
server of ``benchmarks/bench_gateway.py``, with the same model folder and engine arguments.

    python -m benchmarks.serve_llm_server --model-dir DIR --name NAME --port 8001 --engine '{"dtype": "float32"}'

Serves until SIGTERM, then shuts its own cluster down (never `ray stop`).
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine", default="{}", help="vLLM engine arguments as JSON (AsyncEngineArgs fields)")
    parser.add_argument("--env", default="{}", help="environment of the engine's replica as JSON")
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the head (Serve LLM hangs on 2)")
    args = parser.parse_args()

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    stop = False

    def _on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)  # fmt: skip
    signal.signal(signal.SIGTERM, _on_signal)  # after ray.init, which sets a handler of its own
    engine: dict[str, Any] = json.loads(args.engine)
    config = LLMConfig(
        model_loading_config={"model_id": args.name, "model_source": args.model_dir},
        engine_kwargs=engine,
        placement_group_config={"bundles": [{"CPU": 1}]},  # CPU bundles: a CPU deployment, no GPU asked
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        runtime_env={"env_vars": json.loads(args.env)},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"enable_access_log": False})
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False, route_prefix="/")
    print(f"serving {args.name} at http://127.0.0.1:{args.port}/v1", flush=True)
    while not stop:
        time.sleep(0.5)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
